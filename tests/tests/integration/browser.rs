//! The web console in a real browser: Debian's headless Chromium, driven over
//! WebDriver by tests/browser/console.py (selenium, pinned in
//! .ci/requirements.txt), against a mesh of real processes whose executors
//! run the demo agent. Screenshots of each page land in
//! target/browser-artefacts.

use std::time::Duration;

use omoi_proto::common::{Phase, TicketStatus};
use omoi_proto::ticket as pb;
use omoi_tests::console::Console;
use omoi_tests::mesh::{Options, ProcessMesh};
use omoi_tests::{Infra, wait_ticket};

const TOKEN: &str = "console-browser-token";

async fn console(mesh: &ProcessMesh, token: Option<&str>) -> Console {
    Console::start(&mesh.ticket.url, &mesh.task_queue.url, &mesh.health.url, token).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_watches_and_steers_the_mesh_in_a_browser() {
    let infra = Infra::new().await.unwrap();
    // Slow enough steps that a task is seen running, its events arriving;
    // an implementation task's first attempt fails (retried by the queue
    // for the board's ticket, for good where retries are 0).
    let options = Options {
        executor_env: vec![
            ("OMOI_DEMO_SLEEP_MS".into(), "1500".into()),
            ("OMOI_DEMO_FAIL_FIRST".into(), "PHASE_IMPLEMENTATION".into()),
        ],
        ..Options::default()
    };
    let mesh = ProcessMesh::start(&infra, options).await.unwrap();
    let failing = mesh
        .tickets()
        .create_ticket(pb::CreateTicketRequest {
            title: "Fails once, then works".into(),
            plan: vec![pb::TaskSpec {
                title: "Implement it".into(),
                phase: Phase::Implementation as i32,
                max_retries: Some(0),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .ticket
        .unwrap();
    wait_ticket(&mesh.tickets(), &failing.id, TicketStatus::Failed as i32).await;

    let open = console(&mesh, None).await;
    let guarded = console(&mesh, Some(TOKEN)).await;
    omoi_tests::browser::run(
        "console.py",
        &[
            ("OMOI_CONSOLE_URL", &open.url),
            ("OMOI_CONSOLE_AUTH_URL", &guarded.url),
            ("OMOI_CONSOLE_TOKEN", TOKEN),
            ("OMOI_FAILED_TICKET", &failing.id),
        ],
        &[
            "board_and_ticket",
            "retry_failed",
            "follow_up",
            "agents_and_queue",
            "login",
        ],
        Duration::from_secs(360),
    )
    .await;
    // What the browser did, as the mesh has it: the retried task's ticket
    // completed on its second attempt.
    let got = wait_ticket(&mesh.tickets(), &failing.id, TicketStatus::Completed as i32).await;
    assert_eq!(got.tasks[0].attempt, 2, "{:?}", got.tasks[0]);
    // And the follow-up asked from its page ran after it.
    assert_eq!(got.tasks.len(), 2, "{:?}", got.tasks);
    assert_eq!(got.tasks[1].depends_on, std::slice::from_ref(&got.tasks[0].id));
    open.stop().await;
    guarded.stop().await;
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_approves_a_phase_from_the_inbox_and_hears_of_its_completion() {
    let infra = Infra::new().await.unwrap();
    let secret = "browser-receiver-secret-0123";
    let receiver = omoi_tests::receiver::Receiver::start(secret).await.unwrap();
    let options = Options {
        env: vec![
            ("OMOI_NOTIFY_ALLOW_HTTP_HOSTS".into(), "127.0.0.1".into()),
            ("OMOI_NOTIFY_BACKOFF_SECONDS".into(), "0.2".into()),
        ],
        ..Options::default()
    };
    let mesh = ProcessMesh::start(&infra, options).await.unwrap();
    let (bare, _) = omoi_tests::repo::remote();
    let tickets = mesh.tickets();
    let ticket = tickets
        .clone()
        .create_ticket(pb::CreateTicketRequest {
            title: "Greet people".into(),
            repository: bare.display().to_string(),
            approvals: vec![Phase::Implementation as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .ticket
        .unwrap();
    wait_ticket(&tickets, &ticket.id, TicketStatus::AwaitingApproval as i32).await;
    let console = console(&mesh, None).await;
    let comment = "Plan approved: go on.";
    omoi_tests::browser::run(
        "inbox.py",
        &[
            ("OMOI_CONSOLE_URL", &console.url),
            ("OMOI_TICKET", &ticket.id),
            ("OMOI_COMMENT", comment),
            ("OMOI_RECEIVER_URL", &receiver.url),
            ("OMOI_RECEIVER_SECRET", secret),
        ],
        &[
            "ticket_gate",
            "inbox_shows_the_work",
            "subscribe",
            "approve_from_the_inbox",
            "delivery_log",
        ],
        Duration::from_secs(240),
    )
    .await;
    // What the browser did, as the mesh has it.
    let done = wait_ticket(&tickets, &ticket.id, TicketStatus::Completed as i32).await;
    let gate = &done.ticket.unwrap().gates[0];
    assert_eq!(gate.state, pb::GateState::Approved as i32);
    assert_eq!((gate.comment.as_str(), gate.decided_by.as_str()), (comment, "operator"));
    // The receiver had it signed, once taken.
    let taken: Vec<_> = receiver.received().into_iter().filter(|r| r.status == 200).collect();
    assert!(taken.iter().all(|r| r.signed && r.fresh), "{taken:?}");
    assert!(
        taken.iter().any(|r| r.body["eventType"] == "TICKET_COMPLETED"),
        "{taken:?}"
    );
    console.stop().await;
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_compares_a_steps_candidates_side_by_side() {
    let infra = Infra::new().await.unwrap();
    let mesh = ProcessMesh::start(&infra, Options::default()).await.unwrap();
    let (bare, _) = omoi_tests::repo::remote();
    let tickets = mesh.tickets();
    // Two demo-agent candidates doing the same work: both pass the check,
    // the tie goes to the first.
    let ticket = tickets
        .clone()
        .create_ticket(pb::CreateTicketRequest {
            title: "Build the feature twice".into(),
            repository: bare.display().to_string(),
            check_command: "test -f src/feature.rs".into(),
            plan: vec![pb::TaskSpec {
                title: "Build it".into(),
                phase: Phase::Implementation as i32,
                candidates: Some(pb::Candidates {
                    count: 2,
                    requires: vec![],
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let id = ticket.ticket.as_ref().unwrap().id.clone();
    let done = wait_ticket(&tickets, &id, TicketStatus::Completed as i32).await;
    let chooser = done.tasks.iter().find(|t| t.candidate_of.is_empty()).unwrap();
    let second = done.tasks.iter().find(|t| t.candidate == 2).unwrap();
    let console = console(&mesh, None).await;
    omoi_tests::browser::run(
        "candidates.py",
        &[
            ("OMOI_CONSOLE_URL", &console.url),
            ("OMOI_TICKET", &id),
            ("OMOI_CHOOSER", &chooser.id),
            ("OMOI_CANDIDATE", &second.id),
        ],
        &["side_by_side", "a_person_lands_the_other", "a_candidates_own_page"],
        Duration::from_secs(180),
    )
    .await;
    // The button made a person's choice: candidate 2 is the step's now.
    let now = wait_ticket(&tickets, &id, TicketStatus::Completed as i32).await;
    let choice = now.tasks.iter().find(|t| t.lands_candidate).expect("the choice's task");
    assert!(choice.candidates[1].chosen, "{:?}", choice.candidates);
    assert!(choice.candidates[1].reason.ends_with(": the second reads better"));
    console.stop().await;
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
    let _ = std::fs::remove_dir_all(bare.parent().unwrap());
}

/// The guardian's interventions in the console: real Claude Code against
/// the stand-in that loops, nudged and stopped in each of two attempts;
/// the ticket's page badges the task and lists the four interventions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_sees_where_the_guardian_stepped_in() {
    use omoi_tests::model_api::{Cli, ModelApi};
    let infra = Infra::new().await.unwrap();
    let api = ModelApi::start().await.unwrap();
    let home = std::env::temp_dir().join(format!("omoi-agent-home-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&home).unwrap();
    let mut mesh = ProcessMesh::start(
        &infra,
        Options {
            executors: 0,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut env = api.executor_env(Cli::Claude, &home, "sk-ant-browser-guardian");
    env.push(("OMOI_GUARDIAN_REPEAT_THRESHOLD".to_owned(), "3".to_owned()));
    mesh.add_executor(&infra, &env).await.unwrap();
    let tickets = mesh.tickets();
    let created = tickets
        .clone()
        .create_ticket(pb::CreateTicketRequest {
            title: "outcome=loop".into(),
            plan: vec![pb::TaskSpec {
                title: "outcome=loop".into(),
                phase: Phase::Implementation as i32,
                max_retries: Some(1),
                ..Default::default()
            }],
            guardian: Some(pb::GuardianSettings {
                nudges: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let id = created.ticket.as_ref().unwrap().id.clone();
    let failed = wait_ticket(&tickets, &id, TicketStatus::Failed as i32).await;
    let console = console(&mesh, None).await;
    omoi_tests::browser::run(
        "guardian.py",
        &[
            ("OMOI_CONSOLE_URL", &console.url),
            ("OMOI_TICKET", &id),
            ("OMOI_TASK", &failed.tasks[0].id),
        ],
        &["interventions_on_the_task"],
        Duration::from_secs(120),
    )
    .await;
    console.stop().await;
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
    let _ = std::fs::remove_dir_all(home);
}
