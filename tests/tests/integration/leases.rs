//! Nothing stays RUNNING forever: a running task is held by a lease (its
//! first seconds, then its agent's heartbeats listing it, or ExtendLease),
//! and one nobody holds goes back to the queue as a retry, saying why.
//! Real task-queue and health services, scripted agents.

use std::time::Duration;

use omoi_proto::health as hp;
use omoi_proto::taskqueue as tq;
use omoi_tests::agent::ScriptedAgent;
use omoi_tests::{HealthClient, InProcess, Infra, TaskQueueClient, eventually, file_ticket};
use tonic::Code;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);
const PENDING: i32 = 1;
const RUNNING: i32 = 3;
/// The running lease of these tests.
const LEASE_SECONDS: f64 = 1.0;

struct Rig {
    infra: Infra,
    queue: InProcess,
    health: InProcess,
}

impl Rig {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    async fn start_with(tune: impl FnOnce(&mut omoi_task_queue::Config)) -> Self {
        let infra = Infra::new().await.unwrap();
        let mut config = infra.task_queue_config();
        config.lease_seconds = LEASE_SECONDS;
        tune(&mut config);
        let queue = InProcess::start(config).await.unwrap();
        let health = InProcess::health(infra.health_config()).await.unwrap();
        Self { infra, queue, health }
    }

    fn q(&self) -> TaskQueueClient {
        self.queue.client()
    }

    fn h(&self) -> HealthClient {
        omoi_tests::health_client(&self.health.url)
    }

    /// A registered agent's id.
    async fn register(&self) -> Uuid {
        let agent = self
            .h()
            .register_agent(hp::RegisterAgentRequest {
                agent_type: "scripted".into(),
                capacity: 1,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .agent
            .unwrap();
        agent.id.parse().unwrap()
    }

    async fn heartbeat(&self, agent: Uuid, running: &[&str]) {
        self.h()
            .heartbeat(hp::HeartbeatRequest {
                agent_id: agent.to_string(),
                running_task_ids: running.iter().map(|s| s.to_string()).collect(),
            })
            .await
            .unwrap();
    }

    async fn enqueue(&self, title: &str) {
        self.q()
            .enqueue_tasks(tq::EnqueueTasksRequest {
                tasks: vec![tq::NewTask {
                    title: title.into(),
                    phase: 1,
                    ..Default::default()
                }],
            })
            .await
            .unwrap();
    }

    /// A task, started by `agent`; its assignment.
    async fn running(&self, agent: &mut ScriptedAgent, title: &str) -> tq::Assignment {
        self.enqueue(title).await;
        let a = agent.next_assignment(WAIT).await.expect("an assignment");
        agent.start(&a).await.unwrap();
        a
    }

    async fn task(&self, id: &str) -> tq::Task {
        self.q()
            .get_task(tq::GetTaskRequest { task_id: id.into() })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap()
    }

    /// Waits until the task is back in the queue; its error says why.
    async fn taken_back(&self, a: &tq::Assignment) -> tq::Task {
        let id = a.task.as_ref().unwrap().id.clone();
        eventually(WAIT, "the task taken back", || async {
            let t = self.task(&id).await;
            (t.status == PENDING && t.retry_count == 1).then_some(t)
        })
        .await
    }

    async fn stop(self) {
        self.health.stop().await.unwrap();
        self.queue.stop().await.unwrap();
        self.infra.cleanup().await.unwrap();
    }
}

fn id_of(a: &tq::Assignment) -> &str {
    &a.task.as_ref().unwrap().id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_the_health_service_does_not_know_is_refused() {
    let rig = Rig::start().await;
    let refused = ScriptedAgent::connect_as(&rig.q(), Uuid::now_v7(), 1, vec![])
        .await
        .err()
        .expect("refused");
    let status = refused.downcast_ref::<tonic::Status>().expect("a status");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("RegisterAgent first"), "{}", status.message());
    // Nor one that left.
    let id = rig.register().await;
    rig.h()
        .deregister_agent(hp::DeregisterAgentRequest {
            agent_id: id.to_string(),
        })
        .await
        .unwrap();
    let refused = ScriptedAgent::connect_as(&rig.q(), id, 1, vec![])
        .await
        .err()
        .expect("refused");
    let status = refused.downcast_ref::<tonic::Status>().expect("a status");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_silent_for_two_heartbeat_intervals_gets_no_new_work_until_heard() {
    // Heartbeats every second: two seconds of silence and no new work,
    // long before the health service would call the agent stale (90 s).
    let rig = Rig::start_with(|c| c.heartbeat_interval_seconds = 1).await;
    let id = rig.register().await;
    let heard = tokio::time::Instant::now();
    let mut agent = ScriptedAgent::connect_as(&rig.q(), id, 1, vec![]).await.unwrap();
    let first = rig.running(&mut agent, "while heard").await;
    agent.complete(&first).await.unwrap();
    // The silence under test: more than two intervals since registering.
    tokio::time::sleep_until(heard + Duration::from_millis(2500)).await;
    rig.enqueue("while silent").await;
    assert!(
        agent.next_assignment(Duration::from_secs(3)).await.is_none(),
        "nothing for a silent agent"
    );
    rig.heartbeat(id, &[]).await;
    let a = agent.next_assignment(WAIT).await.expect("work again once heard");
    assert_eq!(a.task.unwrap().title, "while silent");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_that_list_a_task_hold_it_and_one_that_drops_it_lets_it_go() {
    let rig = Rig::start().await;
    let id = rig.register().await;
    let mut agent = ScriptedAgent::connect_as(&rig.q(), id, 2, vec![]).await.unwrap();
    let held = rig.running(&mut agent, "held").await;
    let lost = rig.running(&mut agent, "lost").await;
    // Both listed at first; then the agent lists only one (its CompleteTask
    // for the other was lost, say), heartbeat after heartbeat.
    rig.heartbeat(id, &[id_of(&held), id_of(&lost)]).await;
    let lost_id = id_of(&lost).to_owned();
    let t = eventually(WAIT, "the dropped task taken back", || async {
        rig.heartbeat(id, &[id_of(&held)]).await;
        let t = rig.task(&lost_id).await;
        (t.status == PENDING).then_some(t)
    })
    .await;
    assert!(
        t.error_message.contains("no longer lists the task"),
        "{}",
        t.error_message
    );
    // The listed one is held far past the lease, and its agent is told
    // nothing: it completes it.
    assert_eq!(rig.task(id_of(&held)).await.status, RUNNING);
    agent.complete(&held).await.unwrap();
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deregistered_agents_running_task_goes_back_at_once() {
    // A lease far longer than the test: only the deregistration lets go.
    let rig = Rig::start_with(|c| c.lease_seconds = 3600.0).await;
    let id = rig.register().await;
    let mut agent = ScriptedAgent::connect_as(&rig.q(), id, 1, vec![]).await.unwrap();
    let a = rig.running(&mut agent, "abandoned").await;
    rig.h()
        .deregister_agent(hp::DeregisterAgentRequest {
            agent_id: id.to_string(),
        })
        .await
        .unwrap();
    let t = rig.taken_back(&a).await;
    assert!(t.error_message.contains("deregistered"), "{}", t.error_message);
    // Its late report is refused: the attempt is over.
    let err = agent.complete(&a).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_lease_holds_a_task_its_agent_does_not_list() {
    let rig = Rig::start().await;
    let id = rig.register().await;
    let mut agent = ScriptedAgent::connect_as(&rig.q(), id, 1, vec![]).await.unwrap();
    let a = rig.running(&mut agent, "long").await;
    let asked = std::time::Instant::now();
    let extended = rig
        .q()
        .extend_lease(tq::ExtendLeaseRequest {
            task_id: id_of(&a).into(),
            attempt: a.attempt,
            seconds: 3,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(extended.lease_expires_at.is_some());
    // The agent heartbeats, never listing the task.
    let task_id = id_of(&a).to_owned();
    let t = eventually(WAIT, "the task taken back", || async {
        rig.heartbeat(id, &[]).await;
        let t = rig.task(&task_id).await;
        (t.status == PENDING).then_some(t)
    })
    .await;
    // Held until the extension ran out, well past the 1 s lease.
    assert!(asked.elapsed() >= Duration::from_millis(2900), "{:?}", asked.elapsed());
    assert!(
        t.error_message.contains("no longer lists the task"),
        "{}",
        t.error_message
    );

    // Bad requests are refused, naming the field; a finished or stale
    // attempt has nothing to extend.
    for (req, code, needle) in [
        (
            tq::ExtendLeaseRequest {
                task_id: "x".into(),
                attempt: 1,
                seconds: 5,
            },
            Code::InvalidArgument,
            "task_id",
        ),
        (
            tq::ExtendLeaseRequest {
                task_id: id_of(&a).into(),
                attempt: 0,
                seconds: 5,
            },
            Code::InvalidArgument,
            "attempt",
        ),
        (
            tq::ExtendLeaseRequest {
                task_id: id_of(&a).into(),
                attempt: 1,
                seconds: 0,
            },
            Code::InvalidArgument,
            "seconds",
        ),
        (
            tq::ExtendLeaseRequest {
                task_id: id_of(&a).into(),
                attempt: 1,
                seconds: 86_401,
            },
            Code::InvalidArgument,
            "seconds",
        ),
        (
            tq::ExtendLeaseRequest {
                task_id: id_of(&a).into(),
                attempt: 1,
                seconds: 5,
            },
            Code::FailedPrecondition,
            "pending",
        ),
        (
            tq::ExtendLeaseRequest {
                task_id: Uuid::now_v7().to_string(),
                attempt: 1,
                seconds: 5,
            },
            Code::NotFound,
            "not found",
        ),
    ] {
        let err = rig.q().extend_lease(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{needle}: {err:?}");
        assert!(err.message().contains(needle), "{needle}: {}", err.message());
    }
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_killed_mid_run_comes_back_as_itself_and_its_task_runs_again() {
    use omoi_proto::ticket as pb;
    use omoi_tests::mesh::{Options, ProcessMesh};
    let infra = Infra::new().await.unwrap();
    let options = Options {
        executors: 0,
        heartbeat_interval_seconds: 1,
        env: vec![("OMOI_LEASE_SECONDS".into(), "2".into())],
        ..Default::default()
    };
    let mut mesh = ProcessMesh::start(&infra, options).await.unwrap();
    let me = |sleep_ms: &str| {
        vec![
            ("OMOI_AGENT_ID".to_string(), "executor-a".to_string()),
            ("OMOI_DEMO_SLEEP_MS".to_string(), sleep_ms.to_string()),
        ]
    };
    mesh.add_executor(&infra, &me("10000")).await.unwrap();
    let tickets = mesh.tickets();
    let ticket = file_ticket(
        &tickets,
        pb::CreateTicketRequest {
            title: "Survive a kill".into(),
            plan: vec![pb::TaskSpec {
                title: "slow".into(),
                phase: 1,
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await;
    let task_id = ticket.tasks[0].id.clone();
    let queue = omoi_tests::client(&mesh.task_queue.url);
    let get = || async {
        queue
            .clone()
            .get_task(tq::GetTaskRequest {
                task_id: task_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap()
    };
    let first = eventually(WAIT, "the task running", || async {
        let t = get().await;
        (t.status == RUNNING).then_some(t)
    })
    .await;
    mesh.executors.pop().unwrap().kill9().await.unwrap();
    mesh.add_executor(&infra, &me("20")).await.unwrap();
    let id = ticket.ticket.unwrap().id;
    let done = omoi_tests::wait_ticket(&tickets, &id, 3).await;
    let t = &done.tasks[0];
    // Its lost attempt was taken back once its agent, back under the same
    // identity, heartbeated without it; the retry ran on the same agent.
    assert_eq!(t.attempt, 2);
    assert_eq!(t.assigned_agent_id, first.assigned_agent_id);
    let agents = omoi_tests::health_client(&mesh.health.url)
        .list_agents(hp::ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1, "one identity, however often it starts: {agents:?}");
    assert_eq!(agents[0].id, first.assigned_agent_id);
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}
