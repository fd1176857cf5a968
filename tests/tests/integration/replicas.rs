//! Two replicas of every service on one database and one stream: tickets
//! filed through both ticket replicas run to completion on executors bound
//! to different replicas, with no task assigned twice and no event doubled.

use std::collections::HashMap;
use std::time::Duration;

use omoi_proto::ticket as pb;
use omoi_tests::{InProcess, Infra, events, eventually, ticket_client};

const TICKETS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_every_service_run_tickets_exactly_once() {
    let infra = Infra::new().await.unwrap();
    let mut queues = Vec::new();
    let mut healths = Vec::new();
    let mut tickets = Vec::new();
    for _ in 0..2 {
        queues.push(InProcess::start(infra.task_queue_config()).await.unwrap());
        healths.push(InProcess::health(infra.health_config()).await.unwrap());
    }
    for q in &queues {
        tickets.push(InProcess::ticket(infra.ticket_config(&q.url)).await.unwrap());
    }
    let mut executors = Vec::new();
    for i in 0..2 {
        let mut ec = infra.executor_config(&queues[i].url, &healths[i].url, &tickets[i].url);
        ec.capacity = 4;
        executors.push(
            InProcess::spawn(move |incoming, stop| omoi_executor::serve(ec, incoming, stop))
                .await
                .unwrap(),
        );
    }

    let clients: Vec<_> = tickets.iter().map(|t| ticket_client(&t.url)).collect();
    let mut ids = Vec::new();
    for i in 0..TICKETS {
        let r = clients[i % 2]
            .clone()
            .create_ticket(pb::CreateTicketRequest {
                title: format!("ticket {i}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ids.push(r.ticket.unwrap().id);
    }
    for (i, id) in ids.iter().enumerate() {
        eventually(Duration::from_secs(120), "ticket completed", || async {
            let t = clients[(i + 1) % 2]
                .clone()
                .get_ticket(pb::GetTicketRequest {
                    ticket_id: id.clone(),
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            (t.ticket?.status == 3).then_some(())
        })
        .await;
    }

    let expected = (TICKETS * 4 * 4 + TICKETS * 3) as u64;
    let events = events::read_all(
        &infra.nats_url,
        &infra.topology.stream,
        expected,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let mut seen = HashMap::new();
    for e in &events {
        assert!(seen.insert(e.id.clone(), ()).is_none(), "event {} doubled", e.id);
    }
    for ty in ["TASK_ASSIGNED", "TASK_COMPLETED"] {
        let per = events::per_entity(&events, ty);
        assert_eq!(per.len(), TICKETS * 4, "{ty}");
        assert!(
            per.values().all(|n| *n == 1),
            "{ty} more than once for a task: a double assignment"
        );
    }
    for ty in ["TICKET_CREATED", "TICKET_STARTED", "TICKET_COMPLETED"] {
        let per = events::per_entity(&events, ty);
        assert_eq!(per.len(), TICKETS, "{ty}");
        assert!(per.values().all(|n| *n == 1), "{ty} doubled");
    }
    // Both executors worked.
    let agents: std::collections::HashSet<String> = events
        .iter()
        .filter(|e| e.event_type == "TASK_COMPLETED")
        .filter_map(|e| {
            e.payload
                .as_ref()
                .map(omoi_proto::convert::struct_to_json)
                .and_then(|p| p["agent_id"].as_str().map(str::to_owned))
        })
        .collect();
    assert_eq!(agents.len(), 2, "both executors took work");

    for e in executors {
        e.stop().await.unwrap();
    }
    for s in tickets.into_iter().chain(healths).chain(queues) {
        s.stop().await.unwrap();
    }
    infra.cleanup().await.unwrap();
}
