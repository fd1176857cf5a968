//! The executor's `openhands` runner against a stand-in agent server, on the
//! whole mesh with every service a process.

use std::time::Duration;

use omoi_proto::ticket::{self as pb};
use omoi_tests::mesh::{Options, ProcessMesh};
use omoi_tests::openhands::StandIn;
use omoi_tests::{Infra, TicketClient, eventually, file_ticket, wait_ticket};

const WAIT: Duration = Duration::from_secs(60);
const COMPLETED: i32 = 3;
const FAILED: i32 = 4;
const CANCELLED: i32 = 5;

async fn file(c: &TicketClient, title: &str, phase: i32, max_retries: i32) -> (String, String) {
    let r = file_ticket(
        c,
        pb::CreateTicketRequest {
            title: title.to_owned(),
            plan: vec![pb::TaskSpec {
                title: title.to_owned(),
                phase,
                max_retries: Some(max_retries),
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await;
    (r.ticket.unwrap().id, r.tasks[0].id.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_finish_fail_stop_and_refuse_as_scripted() {
    let infra = Infra::new().await.unwrap();
    let server = StandIn::start(Some("session-key")).await.unwrap();
    let mut mesh = ProcessMesh::start(
        &infra,
        Options {
            executors: 0,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let openhands = |phases: &str, key: &str, model: &str| {
        vec![
            ("OMOI_RUNNER".to_string(), "openhands".to_string()),
            ("OPENHANDS_URL".to_string(), server.url.clone()),
            ("OPENHANDS_API_KEY".to_string(), key.to_string()),
            ("OPENHANDS_POLL_MS".to_string(), "50".to_string()),
            ("LLM_MODEL".to_string(), model.to_string()),
            ("LLM_API_KEY".to_string(), "sk-test".to_string()),
            ("OMOI_AGENT_PHASES".to_string(), phases.to_string()),
        ]
    };
    // Initial and implementation: a working server; integration: a wrong key;
    // refactoring: a server that answers 503.
    mesh.add_executor(
        &infra,
        &openhands("INITIAL,IMPLEMENTATION", "session-key", "scripted/model"),
    )
    .await
    .unwrap();
    mesh.add_executor(&infra, &openhands("INTEGRATION", "wrong-key", "scripted/model"))
        .await
        .unwrap();
    mesh.add_executor(&infra, &openhands("REFACTORING", "session-key", "scripted/unavailable"))
        .await
        .unwrap();
    let tickets = mesh.tickets();

    let (id, task) = file(&tickets, "outcome=finished", 1, 0).await;
    let done = wait_ticket(&tickets, &id, COMPLETED).await;
    let result = omoi_proto::convert::struct_to_json(done.tasks[0].result.as_ref().unwrap());
    assert_eq!(result["summary"], "All done");
    let ws = std::path::Path::new(result["workspace"].as_str().unwrap());
    assert!(
        std::fs::read_to_string(ws.join("OPENHANDS.md"))
            .unwrap()
            .contains("outcome=finished")
    );
    let conv = server.conversation(&task).expect("the task id is the conversation id");
    assert!(conv.deleted, "conversations are deleted when done");
    assert_eq!(conv.model, "scripted/model");
    // The conversation's stats, summed over its LLMs (agent and condenser),
    // cached prompt tokens taken out of the input.
    let usage = done.tasks[0]
        .usage
        .as_ref()
        .expect("usage from the conversation's stats");
    assert_eq!(
        (
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_read_tokens,
            usage.cache_write_tokens
        ),
        (1390, 350, 200, 10)
    );
    assert!((usage.cost_usd - 0.015).abs() < 1e-9 && !usage.cost_estimated);
    assert_eq!(usage.model, "scripted/model");
    assert_eq!(done.ticket.as_ref().unwrap().usage.as_ref(), Some(usage));

    let (id, _) = file(&tickets, "outcome=error", 1, 0).await;
    let failed = wait_ticket(&tickets, &id, FAILED).await;
    assert!(
        failed.tasks[0].error_message.contains("error"),
        "{}",
        failed.tasks[0].error_message
    );

    let (id, _) = file(&tickets, "outcome=stuck", 2, 0).await;
    let failed = wait_ticket(&tickets, &id, FAILED).await;
    assert!(
        failed.tasks[0].error_message.contains("stuck"),
        "{}",
        failed.tasks[0].error_message
    );

    let (id, task) = file(&tickets, "outcome=slow", 1, 0).await;
    eventually(WAIT, "conversation running", || async {
        server.conversation(&task).filter(|c| c.status == "running").map(|_| ())
    })
    .await;
    tickets
        .clone()
        .cancel_ticket(pb::CancelTicketRequest {
            ticket_id: id.clone(),
            reason: "changed our minds".into(),
        })
        .await
        .unwrap();
    eventually(WAIT, "conversation interrupted and deleted", || async {
        server
            .conversation(&task)
            .filter(|c| c.interrupted && c.deleted)
            .map(|_| ())
    })
    .await;
    wait_ticket(&tickets, &id, CANCELLED).await;

    // A refused key fails at once, for good.
    let (id, _) = file(&tickets, "outcome=finished", 3, 3).await;
    let failed = wait_ticket(&tickets, &id, FAILED).await;
    let t = &failed.tasks[0];
    assert_eq!((t.attempt, t.error_class), (1, 2), "permanent: {}", t.error_message);
    assert!(t.error_message.contains("authentication failed"), "{}", t.error_message);

    // A server error is retried.
    let (id, _) = file(&tickets, "outcome=finished", 4, 1).await;
    let failed = wait_ticket(&tickets, &id, FAILED).await;
    let t = &failed.tasks[0];
    assert_eq!(
        (t.attempt, t.retry_count, t.error_class),
        (2, 1, 1),
        "{}",
        t.error_message
    );
    assert!(t.error_message.contains("503"), "{}", t.error_message);
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}
