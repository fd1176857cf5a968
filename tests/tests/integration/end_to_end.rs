//! omoi end to end: every service a separate process, executors running the
//! demo agent through the command runner, tickets filed over gRPC.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use omoi_proto::taskqueue as tq;
use omoi_proto::ticket::{self as pb};
use omoi_tests::mesh::{Options, ProcessMesh, sample, scrape};
use omoi_tests::{Infra, client, events, eventually, file_ticket, wait_ticket};

const WAIT: Duration = Duration::from_secs(60);
const COMPLETED: i32 = 3;
const FAILED: i32 = 4;
const CANCELLED: i32 = 5;

fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// The pid the executor logged when it started the agent of `task_id`.
async fn agent_pid(queue_url: &str, task_id: &str) -> i32 {
    eventually(WAIT, "agent started", || async {
        let mut stream = client(queue_url)
            .stream_task_output(tq::StreamTaskOutputRequest {
                task_id: task_id.to_owned(),
                follow: false,
            })
            .await
            .ok()?
            .into_inner();
        while let Some(Ok(msg)) = stream.next().await {
            let line = msg.event?.text;
            if let Some(pid) = line.split("(pid ").nth(1) {
                return pid.trim_end_matches(')').parse().ok();
            }
        }
        None
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_runs_through_two_executors_in_phase_order_with_workspaces() {
    let infra = Infra::new().await.unwrap();
    let mesh = ProcessMesh::start(&infra, Options::default()).await.unwrap();
    let tickets = mesh.tickets();
    let created = file_ticket(
        &tickets,
        pb::CreateTicketRequest {
            title: "Add OAuth login".into(),
            description: "Billing needs OAuth.".into(),
            ..Default::default()
        },
    )
    .await;
    let id = created.ticket.unwrap().id;
    let done = wait_ticket(&tickets, &id, COMPLETED).await;
    let mut tasks = done.tasks.clone();
    tasks.sort_by_key(|t| t.phase);
    for pair in tasks.windows(2) {
        let end = omoi_proto::convert::from_timestamp(pair[0].completed_at.as_ref().unwrap()).unwrap();
        let start = omoi_proto::convert::from_timestamp(pair[1].started_at.as_ref().unwrap()).unwrap();
        assert!(
            end <= start,
            "{} started before {} completed",
            pair[1].title,
            pair[0].title
        );
    }
    for t in &tasks {
        let result = omoi_proto::convert::struct_to_json(t.result.as_ref().expect("a result"));
        let ws = result["workspace"].as_str().unwrap();
        assert!(ws.starts_with(&mesh.workspace_root.display().to_string()), "{ws}");
        assert!(ws.ends_with(&format!("{}/{}", t.id, t.attempt)), "{ws}");
        let name = omoi_proto::common::Phase::try_from(t.phase).unwrap().as_str_name();
        let name = name.trim_start_matches("PHASE_").to_ascii_lowercase();
        let log_file = format!("agent-log/{name}.md");
        let log = std::fs::read_to_string(Path::new(ws).join(&log_file)).unwrap();
        assert!(log.contains(&t.id), "{log}");
        let changed: Vec<&str> = result["changed_files"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert!(changed.contains(&log_file.as_str()), "{changed:?}");
        assert_eq!(result["exit_code"], 0);
    }
    assert!(
        Path::new(&format!(
            "{}/{}/1/src/feature.rs",
            mesh.workspace_root.display(),
            tasks[1].id
        ))
        .exists()
    );
    // The output of a task is on JetStream for anyone to follow.
    let lines = omoi_tests::task_output(&mesh.task_queue.url, &tasks[0].id).await;
    assert!(lines.iter().any(|l| l.contains("writing PLAN.md")), "{lines:?}");

    // Prometheus metrics of the run.
    let tq = eventually(Duration::from_secs(15), "queue depth sampled", || async {
        let text = scrape(mesh.metrics.task_queue).await.ok()?;
        (sample(&text, r#"omoi_tasks{phase="PHASE_REFACTORING",status="completed"}"#) == Some(1.0)).then_some(text)
    })
    .await;
    assert_eq!(
        sample(&tq, r#"omoi_task_outcomes_total{outcome="completed"}"#),
        Some(4.0)
    );
    assert_eq!(sample(&tq, "omoi_dispatch_latency_seconds_count"), Some(4.0));
    assert_eq!(
        sample(
            &tq,
            r#"omoi_grpc_requests_total{code="OK",method="/omoi.taskqueue.v1.TaskQueueService/StartTask"}"#
        ),
        Some(4.0)
    );
    assert!(sample(&tq, "omoi_outbox_backlog").is_some());
    let health = scrape(mesh.metrics.health).await.unwrap();
    assert_eq!(
        sample(&health, r#"omoi_agents{status="healthy"}"#),
        Some(2.0),
        "{health}"
    );
    assert!(
        sample(
            &health,
            r#"omoi_grpc_requests_total{code="OK",method="/omoi.health.v1.AgentHealthService/RegisterAgent"}"#
        )
        .is_some()
    );
    let codes = mesh.stop().await.unwrap();
    assert!(codes.iter().all(|c| *c == Some(0)), "clean exits: {codes:?}");
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_remove_policy_leaves_no_workspace_behind_not_even_a_failed_attempts() {
    let infra = Infra::new().await.unwrap();
    let options = Options {
        executors: 1,
        executor_env: vec![
            ("OMOI_DEMO_SLEEP_MS".into(), "10".into()),
            ("OMOI_WORKSPACE_POLICY".into(), "remove".into()),
            ("OMOI_DEMO_FAIL_FIRST".into(), "PHASE_INTEGRATION".into()),
        ],
        ..Default::default()
    };
    let mesh = ProcessMesh::start(&infra, options).await.unwrap();
    let tickets = mesh.tickets();
    let created = file_ticket(
        &tickets,
        pb::CreateTicketRequest {
            title: "tidy".into(),
            ..Default::default()
        },
    )
    .await;
    let done = wait_ticket(&tickets, &created.ticket.unwrap().id, COMPLETED).await;
    assert!(done.tasks.iter().any(|t| t.attempt == 2), "one task ran twice");
    // Each run's workspace, and with the last one its task's directory;
    // the executor's own state (`.omoi`) and its git cache stay.
    eventually(WAIT, "an empty workspace root", || async {
        let left: Vec<_> = std::fs::read_dir(&mesh.workspace_root)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| !p.ends_with(".omoi") && !p.ends_with(".git-cache"))
            .collect();
        left.is_empty().then_some(())
    })
    .await;
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_command_is_retried_then_fails_the_ticket() {
    let infra = Infra::new().await.unwrap();
    let options = Options {
        executors: 1,
        executor_env: vec![("OMOI_DEMO_FAIL".into(), "connection reset by upstream".into())],
        ..Default::default()
    };
    let mesh = ProcessMesh::start(&infra, options).await.unwrap();
    let tickets = mesh.tickets();
    let created = file_ticket(
        &tickets,
        pb::CreateTicketRequest {
            title: "flaky".into(),
            plan: vec![pb::TaskSpec {
                title: "try".into(),
                phase: 1,
                max_retries: Some(1),
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await;
    let id = created.ticket.unwrap().id;
    let failed = wait_ticket(&tickets, &id, FAILED).await;
    let task = &failed.tasks[0];
    assert_eq!((task.retry_count, task.attempt), (1, 2), "retried once");
    assert!(
        task.error_message.contains("connection reset by upstream"),
        "{}",
        task.error_message
    );
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_kills_the_agent_process_group_and_a_timeout_kills_it_too() {
    let infra = Infra::new().await.unwrap();
    let options = Options {
        executors: 1,
        executor_env: vec![("OMOI_DEMO_SLEEP_MS".into(), "600000".into())],
        ..Default::default()
    };
    let mesh = ProcessMesh::start(&infra, options).await.unwrap();
    let tickets = mesh.tickets();
    let plan = |timeout| pb::CreateTicketRequest {
        title: "slow".into(),
        plan: vec![pb::TaskSpec {
            title: "sleepy".into(),
            phase: 1,
            max_retries: Some(0),
            timeout_seconds: timeout,
            ..Default::default()
        }],
        ..Default::default()
    };
    let created = file_ticket(&tickets, plan(0)).await;
    let (id, task_id) = (created.ticket.unwrap().id, created.tasks[0].id.clone());
    let pid = agent_pid(&mesh.task_queue.url, &task_id).await;
    assert!(pid_alive(pid));
    tickets
        .clone()
        .cancel_ticket(pb::CancelTicketRequest {
            ticket_id: id.clone(),
            reason: "not needed".into(),
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "agent process gone", || async {
        (!pid_alive(pid)).then_some(())
    })
    .await;
    wait_ticket(&tickets, &id, CANCELLED).await;

    let created = file_ticket(&tickets, plan(1)).await;
    let (id, task_id) = (created.ticket.unwrap().id, created.tasks[0].id.clone());
    let pid = agent_pid(&mesh.task_queue.url, &task_id).await;
    eventually(Duration::from_secs(15), "timed-out agent gone", || async {
        (!pid_alive(pid)).then_some(())
    })
    .await;
    let failed = wait_ticket(&tickets, &id, FAILED).await;
    assert!(
        failed.tasks[0].error_message.contains("timed out"),
        "{}",
        failed.tasks[0].error_message
    );
    // Whichever noticed the deadline first, the executor or the queue, the
    // attempt ended as a timeout.
    let all = events::read_all(&infra.nats_url, &infra.topology.stream, 0, Duration::from_secs(2))
        .await
        .unwrap();
    let history = events::history(&all, &task_id);
    assert!(history.contains(&"TASK_TIMED_OUT".to_owned()), "{history:?}");
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_killed_mid_task_loses_it_to_the_other_after_stale_detection() {
    let infra = Infra::new().await.unwrap();
    let options = Options {
        executors: 1,
        executor_env: vec![("OMOI_DEMO_SLEEP_MS".into(), "2000".into())],
        stale_after_seconds: 2.0,
        heartbeat_interval_seconds: 1,
        ..Options::default()
    };
    let mut mesh = ProcessMesh::start(&infra, options).await.unwrap();
    let tickets = mesh.tickets();
    let created = file_ticket(
        &tickets,
        pb::CreateTicketRequest {
            title: "survive".into(),
            plan: vec![pb::TaskSpec {
                title: "one".into(),
                phase: 1,
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await;
    let (id, task_id) = (created.ticket.unwrap().id, created.tasks[0].id.clone());
    // Killed while its agent is mid-run: the task must still finish elsewhere.
    agent_pid(&mesh.task_queue.url, &task_id).await;
    let doomed = mesh.executors.remove(0);
    doomed.kill9().await.unwrap();
    mesh.add_executor(&infra, &[("OMOI_DEMO_SLEEP_MS".into(), "10".into())])
        .await
        .unwrap();
    let done = wait_ticket(&tickets, &id, COMPLETED).await;
    assert_eq!(done.tasks[0].attempt, 2, "a second attempt on the other executor");
    assert_eq!(done.tasks[0].retry_count, 1);
    let events = events::read_all(&infra.nats_url, &infra.topology.stream, 0, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(events::per_entity(&events, "AGENT_STALE").len(), 1);
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_on_a_local_git_repository_works_in_a_clone_and_traversal_is_refused() {
    let infra = Infra::new().await.unwrap();
    let repo = std::env::temp_dir().join(format!("omoi-repo-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&repo).unwrap();
    let git = |args: &[&str]| {
        let ok = std::process::Command::new("git")
            .args(args)
            .current_dir(&repo)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .status()
            .unwrap()
            .success();
        assert!(ok, "git {args:?}");
    };
    git(&["init", "-q"]);
    std::fs::write(repo.join("README.md"), "hello\n").unwrap();
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "init"]);

    let mesh = ProcessMesh::start(
        &infra,
        Options {
            executors: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let tickets = mesh.tickets();
    for bad in ["../../etc", "/tmp/../etc", "--upload-pack=touch /tmp/pwned"] {
        let err = tickets
            .clone()
            .create_ticket(pb::CreateTicketRequest {
                title: "escape".into(),
                repository: bad.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}");
        assert!(err.message().contains("repository"), "{bad}: {}", err.message());
    }
    let created = file_ticket(
        &tickets,
        pb::CreateTicketRequest {
            title: "in a repo".into(),
            repository: repo.display().to_string(),
            plan: vec![pb::TaskSpec {
                title: "edit".into(),
                phase: 2,
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await;
    let id = created.ticket.unwrap().id;
    let done = wait_ticket(&tickets, &id, COMPLETED).await;
    let result = omoi_proto::convert::struct_to_json(done.tasks[0].result.as_ref().unwrap());
    let ws = Path::new(result["workspace"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(ws.join("README.md")).unwrap(),
        "hello\n",
        "a clone of the repository"
    );
    assert!(ws.join(".git").exists());
    assert!(ws.join("src/feature.rs").exists());
    mesh.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&repo);
    infra.cleanup().await.unwrap();
}

/// What an attempt costs in calls between the services: the executor reads
/// its ticket without the ticket's tasks (no ListTasks behind it) and its
/// dependencies in one call, whatever the ticket's size. A default ticket
/// (four chained tasks) on a git remote: every attempt starts, reads its
/// ticket, lands its work (ExtendLease first) and completes; the three with
/// a dependency read it once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_costs_the_same_few_calls_whatever_its_ticket() {
    let infra = Infra::new().await.unwrap();
    let (remote, _) = omoi_tests::repo::remote();
    let mesh = ProcessMesh::start(
        &infra,
        Options {
            executors: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let tickets = mesh.tickets();
    let created = file_ticket(
        &tickets,
        pb::CreateTicketRequest {
            title: "count the calls".into(),
            repository: remote.display().to_string(),
            ..Default::default()
        },
    )
    .await;
    let id = created.ticket.unwrap().id;
    // Waited for by listing (not reading) tickets: the count is the mesh's own.
    eventually(WAIT, "the ticket completed", || {
        let mut tickets = tickets.clone();
        let id = id.clone();
        async move {
            let listed = tickets.list_tickets(pb::ListTicketsRequest::default()).await.ok()?;
            let t = listed.into_inner().tickets.into_iter().find(|t| t.id == id)?;
            (t.status == COMPLETED).then_some(())
        }
    })
    .await;
    let mut calls = omoi_tests::mesh::calls(&scrape(mesh.metrics.task_queue).await.unwrap());
    calls.extend(omoi_tests::mesh::calls(&scrape(mesh.metrics.ticket).await.unwrap()));
    let count = |m: &str| calls.get(m).copied().unwrap_or_default();
    eprintln!("calls for a ticket of 4 attempts: {calls:?}");
    let per_ticket = [
        ("TaskQueueService/StartTask", 4),
        ("TicketService/GetTicket", 4),
        ("TaskQueueService/BatchGetTasks", 3),
        ("TaskQueueService/ExtendLease", 4),
        ("TaskQueueService/CompleteTask", 4),
        ("TaskQueueService/GetTask", 0),
        ("TaskQueueService/ListTasks", 0),
    ];
    for (method, expected) in per_ticket {
        assert_eq!(count(method), expected, "{method}: {calls:?}");
    }
    mesh.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(remote.parent().unwrap());
    infra.cleanup().await.unwrap();
}
