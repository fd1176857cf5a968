//! AgentHealthService on the real mesh: registration, heartbeats, stale
//! detection and the task-queue taking a stale agent's work back.

use std::collections::HashMap;
use std::time::Duration;

use omoi_proto::health::{self as pb};
use omoi_proto::ticket as tk;
use omoi_tests::agent::ScriptedAgent;
use omoi_tests::{HealthClient, InProcess, Infra, Mesh, events, eventually, health_client};
use tonic::Code;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);
const HEALTHY: i32 = 1;
const STALE: i32 = 2;
const DEREGISTERED: i32 = 3;

async fn register(c: &HealthClient, agent_type: &str) -> pb::Agent {
    c.clone()
        .register_agent(pb::RegisterAgentRequest {
            agent_type: agent_type.to_owned(),
            capacity: 2,
            labels: [("zone".to_string(), "a".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .agent
        .unwrap()
}

async fn status(c: &HealthClient, id: &str) -> i32 {
    c.clone()
        .get_agent(pb::GetAgentRequest {
            agent_id: id.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .agent
        .unwrap()
        .status
}

async fn deregister(c: &HealthClient, id: &str) -> Result<pb::DeregisterAgentResponse, tonic::Status> {
    c.clone()
        .deregister_agent(pb::DeregisterAgentRequest {
            agent_id: id.to_owned(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn beat(c: &HealthClient, id: &str) -> Result<pb::HeartbeatResponse, tonic::Status> {
    c.clone()
        .heartbeat(pb::HeartbeatRequest {
            agent_id: id.to_owned(),
            running_task_ids: vec![],
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_heartbeat_list_and_deregister() {
    let infra = Infra::new().await.unwrap();
    let mut config = infra.health_config();
    config.heartbeat_interval_seconds = 7;
    let health = InProcess::health(config).await.unwrap();
    let c = health_client(&health.url);
    let reg = c
        .clone()
        .register_agent(pb::RegisterAgentRequest {
            agent_type: "executor".into(),
            phase: 2,
            capacity: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reg.heartbeat_interval_seconds, 7, "the interval is told back");
    let a = reg.agent.unwrap();
    assert_eq!(
        (a.status, a.capacity, a.phase, a.phases.clone()),
        (HEALTHY, 3, 2, vec![2])
    );
    let task = Uuid::now_v7().to_string();
    let hb = c
        .clone()
        .heartbeat(pb::HeartbeatRequest {
            agent_id: a.id.clone(),
            running_task_ids: vec![task.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((hb.interval_seconds, hb.status), (7, HEALTHY));
    let got = c
        .clone()
        .get_agent(pb::GetAgentRequest { agent_id: a.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .agent
        .unwrap();
    assert_eq!(got.running_task_ids, vec![task]);

    let other = register(&c, "reviewer").await;
    let listed = c
        .clone()
        .list_agents(pb::ListAgentsRequest { status: HEALTHY })
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(listed.len(), 2);
    deregister(&c, &other.id).await.unwrap();
    let err = beat(&c, &other.id).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "a deregistered agent's heartbeat is refused"
    );
    assert_eq!(status(&c, &other.id).await, DEREGISTERED);
    let err = deregister(&c, &other.id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    let missing = Uuid::now_v7().to_string();
    assert_eq!(beat(&c, &missing).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(
        c.clone()
            .get_agent(pb::GetAgentRequest { agent_id: missing })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    for (req, field) in [
        (
            pb::RegisterAgentRequest {
                agent_type: String::new(),
                capacity: 1,
                ..Default::default()
            },
            "agent_type",
        ),
        (
            pb::RegisterAgentRequest {
                agent_type: "x".into(),
                capacity: 0,
                ..Default::default()
            },
            "capacity",
        ),
        (
            pb::RegisterAgentRequest {
                agent_type: "x".into(),
                capacity: 1,
                phase: 9,
                ..Default::default()
            },
            "phase",
        ),
        (
            pb::RegisterAgentRequest {
                agent_type: "x".into(),
                capacity: 1,
                agent_id: "zz".into(),
                ..Default::default()
            },
            "agent_id",
        ),
    ] {
        let err = c.clone().register_agent(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    assert_eq!(beat(&c, "not-a-uuid").await.unwrap_err().code(), Code::InvalidArgument);
    health.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_goes_stale_its_tasks_move_to_another_and_a_heartbeat_recovers_it() {
    let infra = Infra::new().await.unwrap();
    let mesh = Mesh::start(&infra, |h| h.stale_after_seconds = 1.0).await.unwrap();
    let agents = mesh.agents();
    let silent = register(&agents, "executor").await;
    let ticket = mesh
        .tickets()
        .create_ticket(tk::CreateTicketRequest {
            title: "survive a dead agent".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ticket_id = ticket.ticket.unwrap().id;
    // The silent agent takes the first task, starts it, and goes quiet.
    let silent_id: Uuid = silent.id.parse().unwrap();
    let mut dead = ScriptedAgent::connect_as(&mesh.queue(), silent_id, 1, vec![])
        .await
        .unwrap();
    let a = dead.next_assignment(WAIT).await.unwrap();
    dead.start(&a).await.unwrap();
    let mut late = dead.client.clone();
    drop(dead);

    eventually(WAIT, "agent stale", || async {
        (status(&agents, &silent.id).await == STALE).then_some(())
    })
    .await;
    // Its task goes back to the queue, counted as a retry, and another agent takes it.
    let mut alive = ScriptedAgent::connect(&mesh.queue(), &mesh.agents(), 1, vec![])
        .await
        .unwrap();
    let again = alive.next_assignment(WAIT).await.expect("requeued to another agent");
    assert_eq!(again.task.as_ref().unwrap().id, a.task.as_ref().unwrap().id);
    assert_eq!(again.attempt, 2);
    assert_eq!(again.task.as_ref().unwrap().retry_count, 1, "counted as a retry");
    // The stale agent's late report is refused.
    let task_id = a.task.as_ref().unwrap().id.clone();
    let err = late
        .complete_task(omoi_proto::taskqueue::CompleteTaskRequest {
            task_id,
            attempt: a.attempt,
            result: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    alive.start(&again).await.unwrap();
    alive.complete(&again).await.unwrap();
    for _ in 0..3 {
        let next = alive.next_assignment(WAIT).await.unwrap();
        alive.start(&next).await.unwrap();
        alive.complete(&next).await.unwrap();
    }
    eventually(WAIT, "ticket completed", || async {
        let t = mesh
            .tickets()
            .get_ticket(tk::GetTicketRequest {
                ticket_id: ticket_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        (t.ticket.unwrap().status == 3).then_some(())
    })
    .await;

    // A heartbeat brings it back.
    let hb = beat(&agents, &silent.id).await.unwrap();
    assert_eq!(hb.status, HEALTHY);
    assert_eq!(status(&agents, &silent.id).await, HEALTHY);
    let events = events::read_all(&infra.nats_url, &infra.topology.stream, 0, Duration::from_secs(2))
        .await
        .unwrap();
    let history: Vec<String> = events::history(&events, &silent.id);
    assert_eq!(history, ["AGENT_REGISTERED", "AGENT_STALE", "AGENT_RECOVERED"]);
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_health_replicas_publish_one_stale_event_per_agent() {
    let infra = Infra::new().await.unwrap();
    let mut config = infra.health_config();
    config.stale_after_seconds = 0.5;
    let a = InProcess::health(config.clone()).await.unwrap();
    let b = InProcess::health(config).await.unwrap();
    let (ca, cb) = (health_client(&a.url), health_client(&b.url));
    let mut ids = Vec::new();
    for i in 0..10 {
        let c = if i % 2 == 0 { &ca } else { &cb };
        ids.push(register(c, "executor").await.id);
    }
    for id in &ids {
        eventually(WAIT, "stale", || async {
            (status(&ca, id).await == STALE).then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let events = events::read_all(&infra.nats_url, &infra.topology.stream, 20, WAIT)
        .await
        .unwrap();
    let stale = events::per_entity(&events, "AGENT_STALE");
    for id in &ids {
        assert_eq!(stale.get(id), Some(&1), "one AGENT_STALE for {id}");
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_after_a_scripted_run() {
    let infra = Infra::new().await.unwrap();
    let mesh = Mesh::start(&infra, |_| {}).await.unwrap();
    let agents = mesh.agents();
    let worker = register(&agents, "executor").await;
    let _idle = register(&agents, "reviewer").await;
    let gone = register(&agents, "executor").await;
    deregister(&agents, &gone.id).await.unwrap();
    let queue = mesh.queue();
    let mut q = queue.clone();
    q.enqueue_tasks(omoi_proto::taskqueue::EnqueueTasksRequest {
        tasks: (0..3)
            .map(|i| omoi_proto::taskqueue::NewTask {
                title: format!("t{i}"),
                phase: 1,
                max_retries: Some(0),
                ..Default::default()
            })
            .collect(),
    })
    .await
    .unwrap();
    let mut agent = ScriptedAgent::connect_as(&queue, worker.id.parse().unwrap(), 1, vec![])
        .await
        .unwrap();
    for i in 0..3 {
        let a = agent.next_assignment(WAIT).await.unwrap();
        agent.start(&a).await.unwrap();
        if i == 1 {
            agent.fail(&a, "syntax error", 0).await.unwrap();
        } else {
            agent.complete(&a).await.unwrap();
        }
    }
    let stats = eventually(WAIT, "counts from task events", || async {
        let s = agents
            .clone()
            .get_health_statistics(pb::GetHealthStatisticsRequest {})
            .await
            .unwrap()
            .into_inner();
        let w = s.agents.iter().find(|a| a.agent_id == worker.id)?;
        (w.completed == 2 && w.failed == 1).then_some(s)
    })
    .await;
    assert_eq!(stats.total_agents, 3);
    let by_status: HashMap<i32, i64> = stats.by_status.iter().map(|s| (s.status, s.count)).collect();
    assert_eq!(by_status, HashMap::from([(HEALTHY, 2), (DEREGISTERED, 1)]));
    let by_type: HashMap<String, i64> = stats.by_type.iter().map(|t| (t.agent_type.clone(), t.count)).collect();
    assert_eq!(
        by_type,
        HashMap::from([("executor".to_string(), 2), ("reviewer".to_string(), 1)])
    );
    assert!(stats.max_heartbeat_age_seconds >= stats.average_heartbeat_age_seconds);
    assert!(stats.max_heartbeat_age_seconds < 60.0);
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_gone_past_their_retention_are_forgotten_and_healthy_ones_kept() {
    let infra = Infra::new().await.unwrap();
    let mut config = infra.health_config();
    config.stale_after_seconds = 0.5;
    config.agent_retention_seconds = 1.0;
    let health = InProcess::health(config).await.unwrap();
    let c = health_client(&health.url);
    let (gone, silent, alive) = (
        register(&c, "executor").await.id,
        register(&c, "executor").await.id,
        register(&c, "executor").await.id,
    );
    deregister(&c, &gone).await.unwrap();
    let listed = || async {
        let agents = c
            .clone()
            .list_agents(pb::ListAgentsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .agents;
        agents.into_iter().map(|a| a.id).collect::<Vec<_>>()
    };
    // The living one heartbeats all along; the others go, one deregistered,
    // one stale, and are forgotten a second later.
    let left = eventually(WAIT, "the gone agents forgotten", || async {
        beat(&c, &alive).await.unwrap();
        let ids = listed().await;
        (!ids.contains(&gone) && !ids.contains(&silent)).then_some(ids)
    })
    .await;
    assert_eq!(left, [alive]);
    let err = c
        .clone()
        .get_agent(pb::GetAgentRequest { agent_id: gone })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    health.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_list_stream_follows_changes_made_on_any_replica() {
    use futures::StreamExt;
    let infra = Infra::new().await.unwrap();
    let a = InProcess::health(infra.health_config()).await.unwrap();
    let b = InProcess::health(infra.health_config()).await.unwrap();
    let (watched, writer) = (health_client(&a.url), health_client(&b.url));
    let first = register(&writer, "executor").await;

    let err = watched
        .clone()
        .watch_agents(pb::WatchAgentsRequest { status: 9 })
        .await
        .unwrap_err();
    assert!(
        err.code() == Code::InvalidArgument && err.message().contains("status"),
        "{err:?}"
    );
    let mut list = watched
        .clone()
        .watch_agents(pb::WatchAgentsRequest::default())
        .await
        .unwrap()
        .into_inner();
    // Reads lists until agent `id` in one satisfies `want`.
    let mut until = async |what: &str, id: &str, want: &dyn Fn(&pb::Agent) -> bool| {
        tokio::time::timeout(WAIT, async {
            loop {
                let m = list.next().await.expect("the stream goes on").expect("a list");
                if m.agents.iter().any(|x| x.id == id && want(x)) {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no list with {what}"))
    };
    until("the registered agent", &first.id, &|x| x.status == HEALTHY).await;

    let second = register(&writer, "reviewer").await;
    until("the second agent", &second.id, &|_| true).await;
    let task = Uuid::now_v7().to_string();
    writer
        .clone()
        .heartbeat(pb::HeartbeatRequest {
            agent_id: second.id.clone(),
            running_task_ids: vec![task.clone()],
        })
        .await
        .unwrap();
    until("its running task", &second.id, &|x| {
        x.running_task_ids == [task.clone()]
    })
    .await;
    deregister(&writer, &first.id).await.unwrap();
    until("the first deregistered", &first.id, &|x| x.status == DEREGISTERED).await;

    // The watched replica's listener is cut: the list comes again once it
    // listens anew, and changes keep coming.
    let pool = infra.db.connect().await.unwrap();
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND query LIKE 'LISTEN%omoi_agents_changed%'",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let third = register(&writer, "tester").await;
    until("an agent registered after the cut", &third.id, &|_| true).await;

    drop(list);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}
