//! People in the loop, with the real Claude Code against a stand-in model
//! API: a phase gated for approval holds (across restarts of the ticket
//! service and the task queue) until a person approves it over HTTP; a
//! request for changes sends the work it builds on back to its agent, whose
//! model sees the comment, and the gate asks again; the approval's comment
//! reaches the gated phase's agent. Notifications reach the receivers
//! people subscribe: each event once, signed, in order per ticket, through
//! 503s and a killed notifier.

use omoi_proto::common::{Phase, TicketStatus};
use omoi_proto::events::Event;
use omoi_proto::notify::notification_service_client::NotificationServiceClient;
use omoi_proto::notify::{
    CreateSubscriptionRequest, DeleteSubscriptionRequest, DeliveryState, ListDeliveriesRequest,
    ListSubscriptionsRequest, SubscriptionFormat,
};
use omoi_proto::taskqueue as tq;
use omoi_proto::ticket as pb;
use omoi_tests::console::Console;
use omoi_tests::mesh::{Options, ProcessMesh};
use omoi_tests::model_api::{Cli, ModelApi};
use omoi_tests::receiver::{Received, Receiver};
use omoi_tests::repo::{git, remote};
use omoi_tests::{Infra, client, eventually, file_ticket, read_ticket, wait_ticket, wait_ticket_where};
use serde_json::{Value, json};
use std::time::Duration;
use tonic::Code;

const SECRET: &str = "sk-ant-test-people-do-not-leak";
const AWAITING: i32 = TicketStatus::AwaitingApproval as i32;
const IN_PROGRESS: i32 = TicketStatus::InProgress as i32;
const COMPLETED: i32 = TicketStatus::Completed as i32;
const GATE_AWAITING: i32 = pb::GateState::AwaitingApproval as i32;
const GATE_APPROVED: i32 = pb::GateState::Approved as i32;
const PENDING: i32 = omoi_proto::common::TaskStatus::Pending as i32;

/// Plan it (INITIAL), then build it (IMPLEMENTATION), the building gated.
fn gated(repository: &str, approvals: Vec<i32>) -> pb::CreateTicketRequest {
    pb::CreateTicketRequest {
        title: "greet people".into(),
        repository: repository.to_owned(),
        plan: vec![
            pb::TaskSpec {
                title: "plan the greeting".into(),
                phase: Phase::Initial.into(),
                max_retries: Some(0),
                ..Default::default()
            },
            pb::TaskSpec {
                title: "build the greeting".into(),
                phase: Phase::Implementation.into(),
                depends_on: vec![0],
                max_retries: Some(0),
                ..Default::default()
            },
        ],
        approvals,
        ..Default::default()
    }
}

/// A ticket of one implementation task.
fn one_task(title: &str, repository: &str) -> pb::CreateTicketRequest {
    pb::CreateTicketRequest {
        title: title.into(),
        repository: repository.to_owned(),
        plan: vec![pb::TaskSpec {
            title: "do it".into(),
            phase: Phase::Implementation.into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn tempdir(what: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("omoi-{what}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn payload(e: &Event) -> Value {
    e.payload
        .as_ref()
        .map(omoi_proto::convert::struct_to_json)
        .unwrap_or_default()
}

/// The dispatch pauses the queue holds for ticket `id`.
async fn holds_of(queue: &omoi_tests::TaskQueueClient, id: &str) -> Vec<tq::Pause> {
    let stats = queue
        .clone()
        .get_queue_stats(tq::GetQueueStatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    stats.pauses.into_iter().filter(|p| p.ticket_id == id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_phase_waits_for_a_person_and_what_they_say_reaches_the_agents() {
    let infra = Infra::new().await.unwrap();
    let api = ModelApi::start().await.unwrap();
    let home = tempdir("agent-home");
    let options = Options {
        executors: 0,
        ..Default::default()
    };
    let mut mesh = ProcessMesh::start(&infra, options).await.unwrap();
    mesh.add_executor(&infra, &api.executor_env(Cli::Claude, &home, SECRET))
        .await
        .unwrap();
    let tickets = mesh.tickets();
    let mut t = tickets.clone();
    let (bare, _) = remote();
    let repository = bare.display().to_string();
    let implementation = i32::from(Phase::Implementation);

    // Gates name phases of the plan, each once.
    for (approvals, field) in [
        (vec![i32::from(Phase::Refactoring)], "approvals[0]"),
        (vec![implementation, implementation], "approvals[1]"),
        (vec![99], "approvals[0]"),
    ] {
        let s = t.create_ticket(gated(&repository, approvals)).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
        assert!(s.message().contains(field), "{}", s.message());
    }

    let created = file_ticket(&tickets, gated(&repository, vec![implementation])).await;
    let ticket = created.ticket.unwrap();
    let (plan_task, build_task) = (created.tasks[0].id.clone(), created.tasks[1].id.clone());
    assert_eq!(ticket.gates.len(), 1);
    assert_eq!(ticket.gates[0].phase, implementation);

    // Planned, the building waits for a person: nothing of it dispatched.
    let waiting = wait_ticket(&tickets, &ticket.id, AWAITING).await;
    let gate = &waiting.ticket.as_ref().unwrap().gates[0];
    assert_eq!((gate.state, gate.rounds), (GATE_AWAITING, 1));
    assert_eq!(gate.review_task_ids, vec![plan_task.clone()]);
    let build = waiting.tasks.iter().find(|x| x.id == build_task).unwrap();
    assert_eq!(build.status, PENDING);
    assert_eq!(build.attempt, 0);

    // Asking for changes needs them said; the ticket's other gates and
    // tickets without any take no decision.
    let ask = |comment: &str| pb::RequestChangesRequest {
        ticket_id: ticket.id.clone(),
        comment: comment.into(),
        phase: 0,
    };
    let s = t.request_changes(ask("  ")).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
    assert!(s.message().contains("comment"), "{}", s.message());
    let s = t
        .request_changes(pb::RequestChangesRequest {
            phase: Phase::Integration.into(),
            ..ask("more")
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{}", s.message());
    let plain = file_ticket(
        &tickets,
        pb::CreateTicketRequest {
            title: "no gates".into(),
            ..Default::default()
        },
    )
    .await
    .ticket
    .unwrap();
    let s = t
        .approve(pb::ApproveRequest {
            ticket_id: plain.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{}", s.message());
    t.cancel_ticket(pb::CancelTicketRequest {
        ticket_id: plain.id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    assert_eq!(
        read_ticket(&tickets, &ticket.id).await.unwrap().ticket.unwrap().gates[0].rounds,
        1,
        "a refused decision changes nothing"
    );

    // Changes: the planning agent's session goes on with the comment, then
    // the gate asks again, the changes among what is to be approved.
    let asked = t
        .request_changes(ask("Write the plan down as well: file=PLAN.md"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(asked.ticket.as_ref().unwrap().status, IN_PROGRESS);
    let revision = asked.task.unwrap();
    assert_eq!(revision.depends_on, vec![plan_task.clone()]);
    let again = wait_ticket_where(&tickets, &ticket.id, "the gate asks again", |x| {
        x.status == AWAITING && x.gates[0].rounds == 2
    })
    .await;
    let gate = &again.gates[0];
    assert_eq!(gate.review_task_ids, vec![plan_task.clone(), revision.id.clone()]);
    assert_eq!(gate.change_requests.len(), 1);
    assert_eq!(gate.change_requests[0].requested_by, "operator");
    let conversations = api.conversations();
    let revised = conversations
        .iter()
        .find(|c| c.to_string().contains("file=PLAN.md"))
        .expect("the request for changes reached the model");
    assert!(
        revised.to_string().contains("toolu_write_hello_txt"),
        "it resumed the planning conversation: {revised}"
    );
    let branch = &ticket.branch;
    assert_eq!(git(&bare, &["show", &format!("{branch}:PLAN.md")]), "hello from claude");

    // The gate holds across restarts of the queue and the ticket service,
    // while the executor goes on taking other work.
    mesh.restart_task_queue().await.unwrap();
    mesh.restart_ticket().await.unwrap();
    let tickets = mesh.tickets();
    let mut t = tickets.clone();
    let queue = client(&mesh.task_queue.url);
    let other = file_ticket(&tickets, one_task("meanwhile", &repository))
        .await
        .ticket
        .unwrap();
    wait_ticket(&tickets, &other.id, COMPLETED).await;
    let held = read_ticket(&tickets, &ticket.id).await.unwrap();
    assert_eq!(held.ticket.as_ref().unwrap().status, AWAITING);
    let build = held.tasks.iter().find(|x| x.id == build_task).unwrap();
    assert_eq!((build.status, build.attempt), (PENDING, 0));
    let holds = holds_of(&queue, &ticket.id).await;
    assert_eq!(holds.len(), 1, "{holds:?}");
    assert_eq!(holds[0].phase, implementation);

    // Approved over HTTP, with a word for the builder.
    let console = Console::start(&mesh.ticket.url, &mesh.task_queue.url, &mesh.health.url, None).await;
    let approve = format!("{}/v1/tickets/{}:approve", console.url, ticket.id);
    let body = json!({"comment": "Looks right; keep the greeting short."}).to_string();
    let (status, _, text) = omoi_tests::http::send("POST", &approve, Some(body.clone()), &[])
        .await
        .unwrap();
    assert_eq!(status, 200, "{text}");
    let approved: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(approved["ticket"]["status"], "TICKET_STATUS_IN_PROGRESS", "{approved}");
    assert_eq!(
        approved["ticket"]["gates"][0]["state"], "GATE_STATE_APPROVED",
        "{approved}"
    );
    assert_eq!(approved["ticket"]["gates"][0]["decidedBy"], "operator", "{approved}");
    let (status, _, text) = omoi_tests::http::send("POST", &approve, Some(body), &[]).await.unwrap();
    assert_eq!(status, 400, "approved once: {text}");
    assert!(text.contains("awaits approval"), "{text}");

    let done = wait_ticket(&tickets, &ticket.id, COMPLETED).await;
    assert_eq!(done.ticket.as_ref().unwrap().gates[0].state, GATE_APPROVED);
    let conversations = api.conversations();
    let told = conversations
        .iter()
        .find(|c| c.to_string().contains("keep the greeting short"))
        .expect("the approval's comment reached the builder");
    assert!(told.to_string().contains("Approved by operator"), "{told}");
    assert!(told.to_string().contains("Write the plan down as well"), "{told}");
    eventually(Duration::from_secs(30), "the gate released on the queue", || {
        let (queue, id) = (&queue, &ticket.id);
        async move { holds_of(queue, id).await.is_empty().then_some(()) }
    })
    .await;

    // Each step is an event; the asks say what is to be approved.
    let events = omoi_tests::ticket_history(&tickets, &ticket.id).await;
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let at = |name: &str| {
        types
            .iter()
            .position(|x| *x == name)
            .unwrap_or_else(|| panic!("{name}: {types:?}"))
    };
    assert!(
        at("TICKET_APPROVAL_REQUESTED") < at("TICKET_CHANGES_REQUESTED"),
        "{types:?}"
    );
    assert!(at("TICKET_CHANGES_REQUESTED") < at("TICKET_APPROVED"), "{types:?}");
    assert!(at("TICKET_APPROVED") < at("TICKET_COMPLETED"), "{types:?}");
    let asks: Vec<Value> = events
        .iter()
        .filter(|e| e.event_type == "TICKET_APPROVAL_REQUESTED")
        .map(payload)
        .collect();
    assert_eq!(asks.len(), 2, "{asks:?}");
    assert_eq!(asks[1]["round"], 2);
    assert_eq!(asks[1]["phase"], "PHASE_IMPLEMENTATION");
    assert_eq!(asks[1]["status"], "awaiting_approval");
    assert_eq!(asks[1]["tasks"].as_array().unwrap().len(), 2, "{asks:?}");
    assert!(
        asks[1]["tasks"][0]["summary"].as_str().unwrap().contains("Done"),
        "{asks:?}"
    );
    let approved = events.iter().find(|e| e.event_type == "TICKET_APPROVED").unwrap();
    assert_eq!(payload(approved)["comment"], "Looks right; keep the greeting short.");
    assert!(!format!("{events:?}{done:?}").contains(SECRET));

    // A gate on the first phase asks at once; cancelling the ticket lets
    // go of what the queue held for it.
    let first = file_ticket(&tickets, gated(&repository, vec![i32::from(Phase::Initial)])).await;
    let first_ticket = first.ticket.unwrap();
    assert_eq!(first_ticket.status, AWAITING);
    assert_eq!(first_ticket.gates[0].review_task_ids, Vec::<String>::new());
    eventually(Duration::from_secs(30), "the first phase held", || {
        let (queue, id) = (&queue, &first_ticket.id);
        async move { (holds_of(queue, id).await.len() == 1).then_some(()) }
    })
    .await;
    t.cancel_ticket(pb::CancelTicketRequest {
        ticket_id: first_ticket.id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    assert!(holds_of(&queue, &first_ticket.id).await.is_empty());
    // Sent round again, it is held again before anything goes out.
    t.retry_ticket(pb::RetryTicketRequest {
        ticket_id: first_ticket.id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    assert_eq!(holds_of(&queue, &first_ticket.id).await.len(), 1);
    let again = wait_ticket(&tickets, &first_ticket.id, AWAITING).await;
    assert!(again.tasks.iter().all(|x| x.status == PENDING), "{:?}", again.tasks);

    console.stop().await;
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
    let _ = std::fs::remove_dir_all(home);
}

/// A subscription of `path` on the receiver.
fn subscribe(receiver: &Receiver, path: &str, types: &[&str], format: SubscriptionFormat) -> CreateSubscriptionRequest {
    CreateSubscriptionRequest {
        url: format!("{}{path}", receiver.url),
        event_types: types.iter().map(|t| (*t).to_owned()).collect(),
        format: format.into(),
        secret: NOTIFY_SECRET.into(),
    }
}

const NOTIFY_SECRET: &str = "whsec-people-test-0123456789";

/// How many of a subscription's deliveries are delivered.
async fn delivered(n: &mut NotificationServiceClient<tonic::transport::Channel>, id: &str) -> Option<usize> {
    let log = n
        .list_deliveries(ListDeliveriesRequest {
            subscription_id: id.to_owned(),
            ..Default::default()
        })
        .await
        .ok()?
        .into_inner();
    Some(
        log.deliveries
            .iter()
            .filter(|d| d.state == DeliveryState::Delivered as i32)
            .count(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_reach_each_subscriber_once_signed_and_in_order_across_a_killed_notifier() {
    let infra = Infra::new().await.unwrap();
    let receiver = Receiver::start(NOTIFY_SECRET).await.unwrap();
    let options = Options {
        executors: 1,
        env: vec![
            ("OMOI_NOTIFY_ALLOW_HTTP_HOSTS".into(), "127.0.0.1".into()),
            ("OMOI_NOTIFY_TIMEOUT_SECONDS".into(), "2".into()),
            ("OMOI_NOTIFY_BACKOFF_SECONDS".into(), "0.2".into()),
            ("OMOI_NOTIFY_MAX_BACKOFF_SECONDS".into(), "1".into()),
            ("OMOI_CONSOLE_URL".into(), "https://console.example".into()),
        ],
        ..Default::default()
    };
    let mut mesh = ProcessMesh::start(&infra, options).await.unwrap();
    let notify = |mesh: &ProcessMesh| NotificationServiceClient::new(omoi_tests::channel(&mesh.ticket.url));
    let mut n = notify(&mesh);

    // Bad subscriptions are refused, naming the field; nothing is kept.
    let json_types = [
        "TICKET_CREATED",
        "TICKET_APPROVAL_REQUESTED",
        "TICKET_APPROVED",
        "TICKET_COMPLETED",
    ];
    let good = subscribe(&receiver, "/json", &json_types, SubscriptionFormat::Json);
    for (req, field, why) in [
        (
            CreateSubscriptionRequest {
                url: "http://example.com/hook".into(),
                ..good.clone()
            },
            "url",
            "must be https",
        ),
        (
            CreateSubscriptionRequest {
                url: format!("{}/hook", mesh.task_queue.url),
                ..good.clone()
            },
            "url",
            "the mesh's own",
        ),
        (
            CreateSubscriptionRequest {
                event_types: vec!["TICKET_DONE".into()],
                ..good.clone()
            },
            "event_types[0]",
            "not a ticket event type",
        ),
        (
            CreateSubscriptionRequest {
                secret: String::new(),
                ..good.clone()
            },
            "secret",
            "must not be empty",
        ),
    ] {
        let s = n.create_subscription(req).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
        assert!(
            s.message().contains(field) && s.message().contains(why),
            "{}",
            s.message()
        );
    }
    assert!(
        n.list_subscriptions(ListSubscriptionsRequest {})
            .await
            .unwrap()
            .into_inner()
            .subscriptions
            .is_empty()
    );

    let json = n
        .create_subscription(good)
        .await
        .unwrap()
        .into_inner()
        .subscription
        .unwrap();
    let slack = n
        .create_subscription(subscribe(
            &receiver,
            "/slack",
            &["TICKET_COMPLETED"],
            SubscriptionFormat::Slack,
        ))
        .await
        .unwrap()
        .into_inner()
        .subscription
        .unwrap();
    let listed = n
        .list_subscriptions(ListSubscriptionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.subscriptions.len(), 2);
    assert!(!format!("{listed:?}").contains(NOTIFY_SECRET), "secrets are write-only");

    // Two tickets, one gated; the notifier is killed in the middle of a
    // delivery (its receiver holding the request).
    receiver.hold(3);
    let tickets = mesh.tickets();
    let gated = file_ticket(
        &tickets,
        pb::CreateTicketRequest {
            title: "gated <and> noted".into(),
            approvals: vec![Phase::Implementation.into()],
            ..Default::default()
        },
    )
    .await
    .ticket
    .unwrap();
    let plain = file_ticket(&tickets, one_task("plain", "")).await.ticket.unwrap();
    tokio::time::timeout(Duration::from_secs(60), receiver.held())
        .await
        .expect("a delivery held");
    // Killed once every other answer it got is recorded: a receiver's 2xx
    // in flight at the kill would be delivered again (X-Omoi-Event-Id lets
    // a receiver see that).
    eventually(Duration::from_secs(30), "the answers so far recorded", || {
        let (receiver, json_id, slack_id) = (&receiver, json.id.clone(), slack.id.clone());
        let mut n = notify(&mesh);
        async move {
            let taken = receiver.received().iter().filter(|r| r.status == 200).count();
            let delivered = delivered(&mut n, &json_id).await? + delivered(&mut n, &slack_id).await?;
            (delivered == taken).then_some(())
        }
    })
    .await;
    mesh.restart_ticket().await.unwrap();
    receiver.release();
    let tickets = mesh.tickets();
    wait_ticket(&tickets, &gated.id, AWAITING).await;
    tickets
        .clone()
        .approve(pb::ApproveRequest {
            ticket_id: gated.id.clone(),
            comment: "fine".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_ticket(&tickets, &gated.id, COMPLETED).await;
    wait_ticket(&tickets, &plain.id, COMPLETED).await;

    // Every subscribed event of both, taken once (a 200), after a 503, in
    // the order of each ticket's events; every try signed and fresh.
    let mut expected: Vec<(String, String)> = Vec::new();
    for id in [&gated.id, &plain.id] {
        for e in omoi_tests::ticket_history(&tickets, id).await {
            if json_types.contains(&e.event_type.as_str()) {
                expected.push((id.clone(), e.id.clone()));
            }
        }
    }
    assert_eq!(expected.len(), 6, "{expected:?}");
    let taken = |path: &str| -> Vec<Received> {
        receiver
            .received()
            .into_iter()
            .filter(|r| r.path == path && r.status == 200)
            .collect()
    };
    eventually(Duration::from_secs(60), "every event delivered", || async {
        (taken("/json").len() >= expected.len() && taken("/slack").len() >= 2).then_some(())
    })
    .await;
    let all = receiver.received();
    assert!(all.iter().all(|r| r.signed && r.fresh), "{all:#?}");
    let json_taken = taken("/json");
    let mut ids: Vec<&str> = json_taken.iter().map(|r| r.event_id.as_str()).collect();
    assert_eq!(ids.len(), expected.len(), "each event once: {ids:?}");
    for ticket in [&gated.id, &plain.id] {
        let want: Vec<&str> = expected
            .iter()
            .filter(|(t, _)| t == ticket)
            .map(|(_, e)| e.as_str())
            .collect();
        let got: Vec<&str> = json_taken
            .iter()
            .filter(|r| r.body["ticketId"] == ticket.as_str())
            .map(|r| r.event_id.as_str())
            .collect();
        let log: Vec<(String, String, u16, String)> = receiver
            .received()
            .into_iter()
            .map(|r| (r.at.format("%H:%M:%S%.3f").to_string(), r.path, r.status, r.event_id))
            .collect();
        assert_eq!(got, want, "in order for ticket {ticket}: {log:#?}");
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), expected.len());
    for r in all.iter().filter(|r| r.path == "/json" && r.status == 200) {
        let first = all
            .iter()
            .position(|x| x.path == "/json" && x.event_id == r.event_id)
            .unwrap();
        assert_eq!(all[first].status, 503, "a 503 first: {:?}", all[first]);
    }
    let body = &json_taken[0].body;
    assert!(
        body["ticketUrl"]
            .as_str()
            .unwrap()
            .starts_with("https://console.example/tickets/"),
        "{body}"
    );

    // Slack's shape: text and blocks, the ticket linked to the console.
    let slack_taken = taken("/slack");
    assert_eq!(slack_taken.len(), 2);
    let message = slack_taken
        .iter()
        .find(|r| r.body["text"].as_str().unwrap_or_default().starts_with("gated"))
        .expect("the gated ticket's completion");
    assert_eq!(message.body["text"], "gated <and> noted: completed");
    let section = message.body["blocks"][0]["text"]["text"].as_str().unwrap();
    assert_eq!(
        section,
        format!(
            "<https://console.example/tickets/{}|gated &lt;and&gt; noted>\ncompleted",
            gated.id
        )
    );

    // Each try is visible: the deliveries, delivered, with what each try got.
    let mut n = notify(&mesh);
    let log = n
        .list_deliveries(ListDeliveriesRequest {
            subscription_id: json.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(log.deliveries.len(), expected.len());
    for d in &log.deliveries {
        assert_eq!(d.state, DeliveryState::Delivered as i32, "{d:?}");
        assert_eq!(d.attempts.last().unwrap().status_code, 200, "{d:?}");
    }
    assert!(
        log.deliveries
            .iter()
            .any(|d| d.attempts.len() == 2 && d.attempts[0].status_code == 503 && d.attempts[0].latency_ms >= 0)
    );

    // How long an event took to reach its receiver (its first try).
    let mut delays: Vec<i64> = json_taken
        .iter()
        .filter_map(|r| {
            let occurred = chrono::DateTime::parse_from_rfc3339(r.body["occurredAt"].as_str()?).ok()?;
            let first = all.iter().find(|x| x.path == "/json" && x.event_id == r.event_id)?;
            Some((first.at - occurred.with_timezone(&chrono::Utc)).num_milliseconds())
        })
        .collect();
    delays.sort_unstable();
    eprintln!("event → first delivery try, ms: {delays:?}");

    // A deleted subscription is gone, with its log.
    n.delete_subscription(DeleteSubscriptionRequest {
        subscription_id: slack.id.clone(),
    })
    .await
    .unwrap();
    let s = n
        .list_deliveries(ListDeliveriesRequest {
            subscription_id: slack.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{}", s.message());

    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}
