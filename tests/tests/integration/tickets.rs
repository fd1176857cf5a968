//! TicketService on the real mesh (task-queue, health, ticket) over gRPC,
//! PostgreSQL and JetStream.

use std::time::Duration;

use futures::StreamExt;
use omoi_proto::taskqueue as tq;
use omoi_proto::ticket::{self as pb};
use omoi_tests::agent::ScriptedAgent;
use omoi_tests::{InProcess, Infra, Mesh, TicketClient, eventually, file_ticket, ticket_client};
use tonic::Code;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

const OPEN: i32 = 1;
const IN_PROGRESS: i32 = 2;
const COMPLETED: i32 = 3;
const FAILED: i32 = 4;
const CANCELLED: i32 = 5;
const TASK_PENDING: i32 = 1;
const TASK_FAILED: i32 = 5;
const TASK_CANCELLED: i32 = 7;

fn create(title: &str) -> pb::CreateTicketRequest {
    pb::CreateTicketRequest {
        title: title.to_owned(),
        description: "Users sign in with OAuth.".to_owned(),
        priority: 3,
        ..Default::default()
    }
}

async fn ticket_status(c: &TicketClient, id: &str) -> i32 {
    get(c, id).await.status
}

async fn wait_status(c: &TicketClient, id: &str, want: i32) {
    eventually(WAIT, &format!("ticket status {want}"), || async {
        (ticket_status(c, id).await == want).then_some(())
    })
    .await;
}

async fn count(infra: &Infra, table: &str) -> i64 {
    let pool = infra.db.connect().await.unwrap();
    let n = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    n
}

/// Runs each assignment to completion (start, complete) until `n` are done;
/// returns the titles in the order they were handed out.
async fn work(agent: &mut ScriptedAgent, n: usize) -> Vec<tq::Task> {
    let mut done = Vec::new();
    while done.len() < n {
        let a = agent.next_assignment(WAIT).await.expect("an assignment");
        agent.start(&a).await.unwrap();
        agent.complete(&a).await.unwrap();
        done.push(a.task.unwrap());
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_plan_runs_through_its_phases_and_the_ticket_follows() {
    let infra = Infra::new().await.unwrap();
    let mesh = Mesh::start(&infra, |_| {}).await.unwrap();
    let tickets = mesh.tickets();
    let created = file_ticket(&tickets, create("Add OAuth login")).await;
    let t = created.ticket.unwrap();
    assert_eq!((t.status, t.priority, t.title.as_str()), (OPEN, 3, "Add OAuth login"));
    assert_eq!(created.tasks.len(), 4);
    let phases: Vec<i32> = created.tasks.iter().map(|t| t.phase).collect();
    assert_eq!(phases, [1, 2, 3, 4]);
    for (i, task) in created.tasks.iter().enumerate() {
        assert_eq!(task.ticket_id, t.id);
        assert_eq!(task.priority, 3);
        assert!(task.description.contains("Users sign in with OAuth."));
        let want: Vec<String> = if i == 0 {
            vec![]
        } else {
            vec![created.tasks[i - 1].id.clone()]
        };
        assert_eq!(task.depends_on, want);
    }

    // A watcher from the start sees every event in order and then the end.
    let mut watch = tickets
        .clone()
        .watch_ticket(pb::WatchTicketRequest {
            ticket_id: t.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();

    let mut agent = ScriptedAgent::connect(&mesh.queue(), &mesh.agents(), 2, vec![])
        .await
        .unwrap();
    let first = agent.next_assignment(WAIT).await.unwrap();
    assert_eq!(first.task.as_ref().unwrap().phase, 1);
    agent.start(&first).await.unwrap();
    wait_status(&tickets, &t.id, IN_PROGRESS).await;
    agent.complete(&first).await.unwrap();
    let rest = work(&mut agent, 3).await;
    assert_eq!(
        rest.iter().map(|t| t.phase).collect::<Vec<_>>(),
        [2, 3, 4],
        "dependency order"
    );
    wait_status(&tickets, &t.id, COMPLETED).await;

    let mut seen = Vec::new();
    while let Some(Ok(event)) = tokio::time::timeout(WAIT, watch.next()).await.unwrap() {
        seen.push((
            event.entity_type.clone(),
            event.entity_id.clone(),
            event.event_type.clone(),
        ));
    }
    let ticket_events: Vec<&str> = seen.iter().filter(|e| e.0 == "ticket").map(|e| e.2.as_str()).collect();
    assert_eq!(ticket_events, ["TICKET_CREATED", "TICKET_STARTED", "TICKET_COMPLETED"]);
    assert_eq!(
        seen.last().unwrap().2,
        "TICKET_COMPLETED",
        "the stream ends with the final event"
    );
    for task in &created.tasks {
        let history: Vec<&str> = seen.iter().filter(|e| e.1 == task.id).map(|e| e.2.as_str()).collect();
        assert_eq!(
            history,
            ["TASK_CREATED", "TASK_ASSIGNED", "TASK_STARTED", "TASK_COMPLETED"],
            "{}",
            task.title
        );
    }
    // A task completes only after the one before it (stream order).
    let pos = |id: &str, ty: &str| seen.iter().position(|e| e.1 == id && e.2 == ty).unwrap();
    for w in created.tasks.windows(2) {
        assert!(pos(&w[0].id, "TASK_COMPLETED") < pos(&w[1].id, "TASK_ASSIGNED"));
    }
    // Watching a finished ticket replays its history and ends.
    let replay: Vec<_> = tickets
        .clone()
        .watch_ticket(pb::WatchTicketRequest {
            ticket_id: t.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    assert_eq!(replay.len(), seen.len());
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_dag_is_kept_and_a_cycle_is_refused_with_nothing_written() {
    let infra = Infra::new().await.unwrap();
    let mesh = Mesh::start(&infra, |_| {}).await.unwrap();
    let tickets = mesh.tickets();
    let spec = |title: &str, phase: i32, deps: &[i32]| pb::TaskSpec {
        title: title.to_owned(),
        phase,
        depends_on: deps.to_vec(),
        ..Default::default()
    };
    let cyclic = pb::CreateTicketRequest {
        plan: vec![spec("a", 1, &[2]), spec("b", 2, &[0]), spec("c", 3, &[1])],
        ..create("cyclic")
    };
    let err = tickets.clone().create_ticket(cyclic).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("cycle plan[0] -> plan[2] -> plan[1] -> plan[0]"),
        "{}",
        err.message()
    );
    for (plan, needle) in [
        (vec![spec("a", 1, &[5])], "plan[0].depends_on[0]"),
        (vec![spec("a", 1, &[0])], "plan[0].depends_on[0]"),
        (vec![spec("", 1, &[])], "plan[0].title"),
        (vec![spec("a", 9, &[])], "plan[0].phase"),
    ] {
        let err = tickets
            .clone()
            .create_ticket(pb::CreateTicketRequest { plan, ..create("bad") })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(needle), "{needle}: {}", err.message());
    }
    for (req, needle) in [
        (create(""), "title"),
        (create(&"x".repeat(201)), "title"),
        (
            pb::CreateTicketRequest {
                priority: 9,
                ..create("t")
            },
            "priority",
        ),
        (
            pb::CreateTicketRequest {
                repository: "--upload-pack=evil".into(),
                ..create("t")
            },
            "repository",
        ),
        (
            pb::CreateTicketRequest {
                repository: "https://bot:hunter2@example.com/r.git".into(),
                ..create("t")
            },
            "repository",
        ),
        (
            pb::CreateTicketRequest {
                base_ref: "main".into(),
                ..create("t")
            },
            "base_ref",
        ),
        (
            pb::CreateTicketRequest {
                repository: "/srv/repo".into(),
                base_ref: "--orphan".into(),
                ..create("t")
            },
            "base_ref",
        ),
        (
            pb::CreateTicketRequest {
                pull_request: true,
                ..create("t")
            },
            "pull_request",
        ),
        (
            pb::CreateTicketRequest {
                description: "d".repeat(70_000),
                ..create("t")
            },
            "description",
        ),
        (
            pb::CreateTicketRequest {
                request_id: "a b".into(),
                ..create("t")
            },
            "request_id",
        ),
        (
            pb::CreateTicketRequest {
                labels: [("bad key".to_string(), "v".to_string())].into(),
                ..create("t")
            },
            "labels",
        ),
        (
            pb::CreateTicketRequest {
                plan: vec![pb::TaskSpec {
                    title: "t".into(),
                    phase: 2,
                    requires: [("runner".to_string(), "a\nb".to_string())].into(),
                    ..Default::default()
                }],
                ..create("t")
            },
            "plan[0].requires[runner]",
        ),
        (
            pb::CreateTicketRequest {
                check_command: "cargo test".into(),
                ..create("t")
            },
            "check_command",
        ),
    ] {
        let err = tickets.clone().create_ticket(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{needle}");
        assert!(err.message().contains(needle), "{needle}: {}", err.message());
    }
    assert_eq!(count(&infra, "tickets").await, 0);
    assert_eq!(count(&infra, "tasks").await, 0);

    // A diamond: b and c after a, d after both.
    let dag = pb::CreateTicketRequest {
        plan: vec![
            spec("a", 1, &[]),
            spec("b", 2, &[0]),
            spec("c", 2, &[0]),
            spec("d", 3, &[1, 2]),
        ],
        ..create("diamond")
    };
    let created = file_ticket(&tickets, dag).await;
    let ids: Vec<&str> = created.tasks.iter().map(|t| t.id.as_str()).collect();
    let mut d_deps = created.tasks[3].depends_on.clone();
    d_deps.sort();
    let mut want = vec![ids[1].to_string(), ids[2].to_string()];
    want.sort();
    assert_eq!(d_deps, want);
    assert_eq!(created.tasks[0].priority, 3, "ticket priority HIGH -> 3");
    let mut agent = ScriptedAgent::connect(&mesh.queue(), &mesh.agents(), 4, vec![])
        .await
        .unwrap();
    let order = work(&mut agent, 4).await;
    assert_eq!(order[0].title, "a");
    assert_eq!(order[3].title, "d");
    wait_status(&tickets, &created.ticket.unwrap().id, COMPLETED).await;
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_create_with_the_same_request_id_returns_the_first_ticket() {
    let infra = Infra::new().await.unwrap();
    let mesh = Mesh::start(&infra, |_| {}).await.unwrap();
    let req = pb::CreateTicketRequest {
        request_id: "req-42".into(),
        ..create("once")
    };
    let first = file_ticket(&mesh.tickets(), req.clone()).await;
    let again = file_ticket(&mesh.tickets(), req).await;
    assert_eq!(first.ticket.as_ref().unwrap().id, again.ticket.as_ref().unwrap().id);
    let ids = |r: &pb::CreateTicketResponse| r.tasks.iter().map(|t| t.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&first), ids(&again));
    assert_eq!(count(&infra, "tickets").await, 1);
    assert_eq!(count(&infra, "tasks").await, 4);
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_ticket_mid_run_stops_its_agent_and_cancels_its_tasks() {
    let infra = Infra::new().await.unwrap();
    let mesh = Mesh::start(&infra, |_| {}).await.unwrap();
    let tickets = mesh.tickets();
    let created = file_ticket(&tickets, create("to cancel")).await;
    let id = created.ticket.unwrap().id;
    let mut agent = ScriptedAgent::connect(&mesh.queue(), &mesh.agents(), 1, vec![])
        .await
        .unwrap();
    let a = agent.next_assignment(WAIT).await.unwrap();
    agent.start(&a).await.unwrap();
    wait_status(&tickets, &id, IN_PROGRESS).await;
    let cancelled = tickets
        .clone()
        .cancel_ticket(pb::CancelTicketRequest {
            ticket_id: id.clone(),
            reason: "priorities changed".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .ticket
        .unwrap();
    assert_eq!(cancelled.status, CANCELLED);
    let c = agent
        .next_cancellation(WAIT)
        .await
        .expect("the running task is stopped");
    assert_eq!(c.reason, "priorities changed");
    let got = tickets
        .clone()
        .get_ticket(pb::GetTicketRequest {
            ticket_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.tasks.iter().all(|t| t.status == TASK_CANCELLED), "{:?}", got.tasks);
    // It stays cancelled once the task events arrive, and cannot be cancelled twice.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ticket_status(&tickets, &id).await, CANCELLED);
    let err = tickets
        .clone()
        .cancel_ticket(pb::CancelTicketRequest {
            ticket_id: id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_failing_for_good_fails_the_ticket_and_a_retry_brings_it_back() {
    let infra = Infra::new().await.unwrap();
    let mesh = Mesh::start(&infra, |_| {}).await.unwrap();
    let tickets = mesh.tickets();
    let created = file_ticket(&tickets, create("doomed")).await;
    let id = created.ticket.unwrap().id;
    let mut agent = ScriptedAgent::connect(&mesh.queue(), &mesh.agents(), 1, vec![])
        .await
        .unwrap();
    let a = agent.next_assignment(WAIT).await.unwrap();
    agent.start(&a).await.unwrap();
    agent.fail(&a, "permission denied", 0).await.unwrap();
    wait_status(&tickets, &id, FAILED).await;

    // The operator fixed the permissions: the ticket goes round again, the
    // failed task with a fresh budget and its cancelled phases with it.
    let retry = |ticket_id: &str| {
        let mut c = tickets.clone();
        let request = pb::RetryTicketRequest {
            ticket_id: ticket_id.to_owned(),
            reason: "permissions fixed".into(),
        };
        async move { c.retry_ticket(request).await }
    };
    assert_eq!(
        retry(&Uuid::now_v7().to_string()).await.unwrap_err().code(),
        Code::NotFound
    );
    let retried = retry(&id).await.unwrap().into_inner();
    // Back in the queue (the first already on its way to the agent).
    assert!(
        retried
            .tasks
            .iter()
            .all(|t| t.status != TASK_FAILED && t.status != TASK_CANCELLED),
        "{:?}",
        retried.tasks
    );
    wait_status(&tickets, &id, IN_PROGRESS).await;
    let again = work(&mut agent, 4).await;
    assert_eq!(again[0].id, a.task.as_ref().unwrap().id);
    wait_status(&tickets, &id, COMPLETED).await;
    assert_eq!(retry(&id).await.unwrap_err().code(), Code::FailedPrecondition);
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_list_newest_first_by_status_and_page() {
    let infra = Infra::new().await.unwrap();
    let mesh = Mesh::start(&infra, |_| {}).await.unwrap();
    let tickets = mesh.tickets();
    for i in 0..5 {
        tickets.clone().create_ticket(create(&format!("t{i}"))).await.unwrap();
    }
    let mut titles = Vec::new();
    let mut token = String::new();
    loop {
        let page = tickets
            .clone()
            .list_tickets(pb::ListTicketsRequest {
                page_size: 2,
                page_token: token.clone(),
                status: OPEN,
            })
            .await
            .unwrap()
            .into_inner();
        titles.extend(page.tickets.into_iter().map(|t| t.title));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(titles, ["t4", "t3", "t2", "t1", "t0"]);
    let none = tickets
        .clone()
        .list_tickets(pb::ListTicketsRequest {
            status: COMPLETED,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.tickets.is_empty());
    for (req, field) in [
        (
            pb::ListTicketsRequest {
                page_size: -1,
                ..Default::default()
            },
            "page_size",
        ),
        (
            pb::ListTicketsRequest {
                page_token: "x".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            pb::ListTicketsRequest {
                status: 77,
                ..Default::default()
            },
            "status",
        ),
    ] {
        let err = tickets.clone().list_tickets(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(field));
    }
    let missing = Uuid::now_v7().to_string();
    let err = tickets
        .clone()
        .get_ticket(pb::GetTicketRequest {
            ticket_id: missing.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = tickets
        .clone()
        .get_ticket(pb::GetTicketRequest {
            ticket_id: missing.clone(),
            view: 9,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("view"), "{err:?}");
    let err = tickets
        .clone()
        .watch_ticket(pb::WatchTicketRequest {
            ticket_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_task_queue_down_a_ticket_is_kept_and_its_tasks_created_once_it_is_back() {
    let infra = Infra::new().await.unwrap();
    // The ticket service points at a port where the task-queue is not yet.
    let port = omoi_tests::process::free_port();
    let queue_url = format!("http://127.0.0.1:{port}");
    let ticket = InProcess::ticket(infra.ticket_config(&queue_url)).await.unwrap();
    let tickets = ticket_client(&ticket.url);
    let created = file_ticket(&tickets, create("queued later")).await;
    let id = created.ticket.unwrap().id;
    assert_eq!(created.tasks.len(), 4);
    assert!(created.tasks.iter().all(|t| t.status == TASK_PENDING));
    assert_eq!(count(&infra, "tasks").await, 0, "nothing on the queue yet");

    let config = infra.task_queue_config();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let queue = InProcess::spawn_on(listener, move |incoming, stop| {
        omoi_task_queue::serve(config, incoming, stop)
    })
    .await
    .unwrap();
    eventually(WAIT, "tasks created", || async {
        (count(&infra, "tasks").await == 4).then_some(())
    })
    .await;
    let got = tickets
        .clone()
        .get_ticket(pb::GetTicketRequest {
            ticket_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids = |ts: &[tq::Task]| ts.iter().map(|t| t.id.clone()).collect::<Vec<_>>();
    assert_eq!(
        ids(&got.tasks),
        ids(&created.tasks),
        "the tasks announced are the tasks created"
    );
    // The ticket alone (what an executor reads for an attempt) does not ask
    // the task queue: it is there while the queue is away, its tasks not.
    queue.stop().await.unwrap();
    let read = |view: pb::TicketView| {
        let (mut tickets, id) = (tickets.clone(), id.clone());
        async move {
            tickets
                .get_ticket(pb::GetTicketRequest {
                    ticket_id: id,
                    view: view.into(),
                })
                .await
        }
    };
    let basic = read(pb::TicketView::Basic).await.unwrap().into_inner();
    assert_eq!(basic.ticket.map(|t| t.id), Some(id.clone()));
    assert!(basic.tasks.is_empty(), "{:?}", basic.tasks);
    let full = read(pb::TicketView::Full).await.unwrap_err();
    assert_eq!(full.code(), Code::Unavailable, "{full:?}");
    ticket.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_may_reword_what_the_default_plan_tells_each_phase() {
    let infra = Infra::new().await.unwrap();
    let file = std::env::temp_dir().join(format!("omoi-phases-{}.json", uuid::Uuid::new_v4().simple()));
    std::fs::write(&file, r#"{"implementation": "Write it in Rust, with property tests."}"#).unwrap();
    let options = omoi_tests::mesh::Options {
        executors: 0,
        env: vec![("OMOI_PHASE_INSTRUCTIONS_FILE".into(), file.display().to_string())],
        ..Default::default()
    };
    let mesh = omoi_tests::mesh::ProcessMesh::start(&infra, options).await.unwrap();
    let created = mesh
        .tickets()
        .create_ticket(create("Add OAuth login"))
        .await
        .unwrap()
        .into_inner();
    let told: Vec<&str> = created
        .tasks
        .iter()
        .map(|t| t.description.split("\n\n").next().unwrap_or_default())
        .collect();
    assert_eq!(told[1], "Write it in Rust, with property tests.");
    assert!(told[0].starts_with("Prepare the ground"), "{}", told[0]);
    assert!(created.tasks[1].description.contains("Users sign in with OAuth."));
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
    let _ = std::fs::remove_file(file);
}

async fn get(c: &TicketClient, id: &str) -> pb::Ticket {
    c.clone()
        .get_ticket(pb::GetTicketRequest {
            ticket_id: id.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .ticket
        .unwrap()
}

/// UpdateTicket setting the budget (None lifts it).
fn budget(id: &str, max_cost_usd: Option<f64>) -> pb::UpdateTicketRequest {
    pb::UpdateTicketRequest {
        ticket: Some(pb::Ticket {
            id: id.to_owned(),
            max_cost_usd,
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["max_cost_usd".into()],
        }),
    }
}

/// Whether the task queue holds the ticket's tasks back.
async fn dispatch_paused(mesh: &Mesh, ticket_id: &str) -> bool {
    let stats = mesh
        .queue()
        .get_queue_stats(tq::GetQueueStatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    stats.pauses.iter().any(|p| p.ticket_id == ticket_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_budget_pauses_the_ticket_until_it_is_raised() {
    const PAUSED: i32 = 6;
    let infra = Infra::new().await.unwrap();
    let mesh = Mesh::start(&infra, |_| {}).await.unwrap();
    let tickets = mesh.tickets();
    let spec = |title: &str, phase: i32, deps: Vec<i32>| pb::TaskSpec {
        title: title.into(),
        phase,
        depends_on: deps,
        ..Default::default()
    };
    let t = file_ticket(
        &tickets,
        pb::CreateTicketRequest {
            max_cost_usd: Some(1.0),
            plan: vec![
                spec("one", 1, vec![]),
                spec("two", 2, vec![0]),
                spec("three", 3, vec![1]),
            ],
            ..create("On a budget")
        },
    )
    .await
    .ticket
    .unwrap();
    assert_eq!(t.max_cost_usd, Some(1.0));
    let mut agent = ScriptedAgent::connect(&mesh.queue(), &mesh.agents(), 1, vec![])
        .await
        .unwrap();

    // Under budget, the ticket runs.
    let one = agent.next_assignment(WAIT).await.unwrap();
    agent.start(&one).await.unwrap();
    agent.complete_spending(&one, 0.6).await.unwrap();
    // Reaching it pauses the ticket: its next ready task stays PENDING. (No
    // agent waits meanwhile: a task released in the moment between the
    // completion and the pause could still go out.)
    let two = agent.next_assignment(WAIT).await.unwrap();
    agent.start(&two).await.unwrap();
    drop(agent);
    mesh.queue()
        .complete_task(tq::CompleteTaskRequest {
            task_id: two.task.as_ref().unwrap().id.clone(),
            attempt: two.attempt,
            usage: Some(omoi_proto::common::Usage {
                cost_usd: 0.5,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_status(&tickets, &t.id, PAUSED).await;
    let paused = get(&tickets, &t.id).await;
    assert_eq!(paused.paused_reason, "budget of $1.00 reached: $1.1000 spent");
    assert!((paused.usage.as_ref().unwrap().cost_usd - 1.1).abs() < 1e-9);
    eventually(WAIT, "the ticket's dispatch paused", || async {
        dispatch_paused(&mesh, &t.id).await.then_some(())
    })
    .await;
    let tasks = mesh
        .queue()
        .list_tasks(tq::ListTasksRequest {
            ticket_id: t.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    let three = tasks.into_iter().find(|x| x.title == "three").unwrap();
    assert_eq!((three.status, three.unmet_dependencies), (TASK_PENDING, 0));

    // Bad updates change nothing.
    for (req, field) in [
        (
            pb::UpdateTicketRequest {
                update_mask: None,
                ..budget(&t.id, Some(5.0))
            },
            "update_mask",
        ),
        (
            pb::UpdateTicketRequest {
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["title".into()],
                }),
                ..budget(&t.id, Some(5.0))
            },
            "update_mask",
        ),
        (budget(&t.id, Some(-1.0)), "ticket.max_cost_usd"),
        (budget(&t.id, Some(f64::NAN)), "ticket.max_cost_usd"),
        (budget("nope", Some(5.0)), "ticket.id"),
        (
            pb::UpdateTicketRequest {
                ticket: None,
                ..budget(&t.id, Some(5.0))
            },
            "ticket",
        ),
    ] {
        let err = tickets.clone().update_ticket(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    assert_eq!(get(&tickets, &t.id).await.status, PAUSED);

    // An agent that comes now gets nothing of it; raising the budget sends
    // it on: the pause is lifted, the task goes out.
    let mut agent = ScriptedAgent::connect(&mesh.queue(), &mesh.agents(), 1, vec![])
        .await
        .unwrap();
    assert!(agent.next_assignment(Duration::from_millis(300)).await.is_none());
    let raised = tickets.clone().update_ticket(budget(&t.id, Some(5.0))).await.unwrap();
    let raised = raised.into_inner().ticket.unwrap();
    assert_eq!((raised.status, raised.paused_reason.as_str()), (IN_PROGRESS, ""));
    assert!(!dispatch_paused(&mesh, &t.id).await);
    let third = agent.next_assignment(WAIT).await.unwrap();
    assert_eq!(third.task.as_ref().unwrap().title, "three");
    agent.start(&third).await.unwrap();
    // Lowered under what it spent, it pauses at once; the running task
    // finishes, and the last one's completion still completes the ticket.
    let lowered = tickets.clone().update_ticket(budget(&t.id, Some(1.0))).await.unwrap();
    assert_eq!(lowered.into_inner().ticket.unwrap().status, PAUSED);
    assert!(dispatch_paused(&mesh, &t.id).await);
    agent.complete_spending(&third, 0.1).await.unwrap();
    wait_status(&tickets, &t.id, COMPLETED).await;

    // Every status change has its event, TICKET_PAUSED twice.
    let mut watch = tickets
        .clone()
        .watch_ticket(pb::WatchTicketRequest {
            ticket_id: t.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(Ok(e)) = watch.next().await {
        if e.event_type.starts_with("TICKET_") {
            seen.push(e.event_type);
        }
    }
    assert_eq!(
        seen,
        [
            "TICKET_CREATED",
            "TICKET_STARTED",
            "TICKET_PAUSED",
            "TICKET_STARTED",
            "TICKET_PAUSED",
            "TICKET_COMPLETED"
        ]
    );
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

type Board = tonic::Streaming<pb::WatchTicketsResponse>;

/// Reads the board stream until a message satisfies `want`.
async fn board_until(
    board: &mut Board,
    what: &str,
    want: impl Fn(&pb::WatchTicketsResponse) -> bool,
) -> pb::WatchTicketsResponse {
    tokio::time::timeout(WAIT, async {
        loop {
            let m = board
                .next()
                .await
                .expect("the board stream goes on")
                .expect("a message");
            if want(&m) {
                return m;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no board message: {what}"))
}

/// The ticket `id`'s message on the board, with `check` on it.
fn about(m: &pb::WatchTicketsResponse, id: &str, check: impl Fn(&pb::Ticket, &[tq::Task]) -> bool) -> bool {
    m.ticket.as_ref().is_some_and(|t| t.id == id && check(t, &m.tasks))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_board_stream_sends_the_newest_tickets_then_every_change_from_any_replica() {
    const TASK_RUNNING: i32 = 3;
    const TASK_COMPLETED: i32 = 4;
    let infra = Infra::new().await.unwrap();
    let mesh = Mesh::start(&infra, |_| {}).await.unwrap();
    // Another replica of the ticket service, where the changes are made.
    let other = InProcess::ticket(infra.ticket_config(&mesh.task_queue.url))
        .await
        .unwrap();
    let (watched, writer) = (mesh.tickets(), ticket_client(&other.url));
    let file = |c: &TicketClient, title: &str| {
        let (mut c, req) = (c.clone(), create(title));
        async move { c.create_ticket(req).await.unwrap().into_inner().ticket.unwrap() }
    };
    file(&writer, "older").await;
    let newest = file(&writer, "newest").await;

    for bad in [-1, 1001] {
        let err = watched
            .clone()
            .watch_tickets(pb::WatchTicketsRequest { page_size: bad })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("page_size"), "{}", err.message());
    }
    let mut board = watched
        .clone()
        .watch_tickets(pb::WatchTicketsRequest { page_size: 1 })
        .await
        .unwrap()
        .into_inner();
    // The snapshot: the newest ticket with its planned tasks, then its end.
    let first = board.next().await.unwrap().unwrap();
    assert!(
        about(&first, &newest.id, |t, tasks| t.status == OPEN && tasks.len() == 4),
        "{first:?}"
    );
    assert!(board.next().await.unwrap().unwrap().snapshot_done);

    // A ticket filed on the other replica appears, its tasks with it.
    let fresh = file(&writer, "filed while watching").await;
    board_until(&mut board, "the new ticket", |m| {
        about(m, &fresh.id, |_, tasks| tasks.len() == 4)
    })
    .await;

    // Its task's progress and the ticket's own status follow.
    let mut agent = ScriptedAgent::connect(&mesh.queue(), &mesh.agents(), 8, vec![])
        .await
        .unwrap();
    let a = loop {
        let a = agent.next_assignment(WAIT).await.unwrap();
        if a.task.as_ref().unwrap().ticket_id == fresh.id {
            break a;
        }
    };
    let task_id = a.task.as_ref().unwrap().id.clone();
    agent.start(&a).await.unwrap();
    let status_of = |tasks: &[tq::Task]| tasks.iter().find(|t| t.id == task_id).map(|t| t.status);
    board_until(&mut board, "running task, ticket in progress", |m| {
        about(m, &fresh.id, |t, tasks| {
            t.status == IN_PROGRESS && status_of(tasks) == Some(TASK_RUNNING)
        })
    })
    .await;
    agent.complete(&a).await.unwrap();
    board_until(&mut board, "completed task", |m| {
        about(m, &fresh.id, |_, tasks| status_of(tasks) == Some(TASK_COMPLETED))
    })
    .await;
    writer
        .clone()
        .cancel_ticket(pb::CancelTicketRequest {
            ticket_id: fresh.id.clone(),
            reason: "enough".into(),
        })
        .await
        .unwrap();
    board_until(&mut board, "cancelled ticket", |m| {
        about(m, &fresh.id, |t, _| t.status == CANCELLED)
    })
    .await;

    // The watched replica loses its database listener: what it may have
    // missed comes again as a snapshot, and changes keep coming after it.
    let pool = infra.db.connect().await.unwrap();
    let listeners =
        "FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%omoi_ticket_changed%'";
    eventually(WAIT, "a listener per replica", || async {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) {listeners}")))
            .fetch_one(&pool)
            .await
            .unwrap();
        (n == 2).then_some(())
    })
    .await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT pg_terminate_backend(pid) {listeners}"
    )))
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    board_until(&mut board, "a fresh snapshot", |m| m.snapshot_done).await;
    writer
        .clone()
        .update_ticket(pb::UpdateTicketRequest {
            ticket: Some(pb::Ticket {
                id: newest.id.clone(),
                priority: 4,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["priority".into()],
            }),
        })
        .await
        .unwrap();
    board_until(&mut board, "the new priority", |m| {
        about(m, &newest.id, |t, _| t.priority == 4)
    })
    .await;

    drop(board);
    other.stop().await.unwrap();
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_that_ended_go_after_their_retention_and_open_ones_stay() {
    let infra = Infra::new().await.unwrap();
    let task_queue = InProcess::start(infra.task_queue_config()).await.unwrap();
    let mut config = infra.ticket_config(&task_queue.url);
    // Passes every 3 s (a tenth of it).
    config.ticket_retention_seconds = 30.0;
    let ticket = InProcess::ticket(config).await.unwrap();
    let c = ticket_client(&ticket.url);
    let create = |title: &str| {
        let mut c = c.clone();
        let title = title.to_owned();
        async move {
            c.create_ticket(pb::CreateTicketRequest {
                title,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .ticket
            .unwrap()
            .id
        }
    };
    let (ended, young, open) = (create("ended").await, create("young").await, create("open").await);
    for id in [&ended, &young] {
        c.clone()
            .cancel_ticket(pb::CancelTicketRequest {
                ticket_id: id.clone(),
                reason: "done with it".into(),
            })
            .await
            .unwrap();
    }
    let pool = infra.db.connect().await.unwrap();
    sqlx::query("UPDATE tickets SET updated_at = now() - interval '1 hour' WHERE id = ANY($1)")
        .bind(vec![ended.parse::<Uuid>().unwrap(), open.parse().unwrap()])
        .execute(&pool)
        .await
        .unwrap();
    let exists = |id: String| {
        let mut c = c.clone();
        async move {
            match c
                .get_ticket(pb::GetTicketRequest {
                    ticket_id: id,
                    ..Default::default()
                })
                .await
            {
                Ok(_) => true,
                Err(s) if s.code() == Code::NotFound => false,
                Err(s) => panic!("GetTicket: {s}"),
            }
        }
    };
    eventually(Duration::from_secs(30), "the old cancelled ticket gone", || async {
        (!exists(ended.clone()).await).then_some(())
    })
    .await;
    assert!(exists(young.clone()).await, "ended within the retention: kept");
    assert!(exists(open.clone()).await, "still open, however old: kept");
    let plans: i64 = sqlx::query_scalar("SELECT count(*) FROM ticket_tasks WHERE ticket_id = $1")
        .bind(ended.parse::<Uuid>().unwrap())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(plans, 0, "its plan went with it");
    pool.close().await;
    ticket.stop().await.unwrap();
    task_queue.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}
