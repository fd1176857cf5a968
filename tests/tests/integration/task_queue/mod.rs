//! TaskQueueService against real PostgreSQL and NATS, served in-process,
//! by concern; the helpers here are every part's.

mod control;
mod dispatch;
mod failures;
mod requests;
mod upkeep;

use std::collections::HashSet;
use std::time::Duration;

use omoi_proto::taskqueue::watch_assignments_response::Event as StreamEvent;
use omoi_proto::taskqueue::{self as pb};
use omoi_tests::agent::ScriptedAgent;
use omoi_tests::{HealthClient, InProcess, Infra, TaskQueueClient, events, eventually};
use tonic::Code;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(400);

const INITIAL: i32 = 1;
const IMPLEMENTATION: i32 = 2;
const PENDING: i32 = 1;
const ASSIGNED: i32 = 2;
const RUNNING: i32 = 3;
const COMPLETED: i32 = 4;
const FAILED: i32 = 5;
const CANCELLED: i32 = 7;
const RETRYABLE: i32 = 1;
const PERMANENT: i32 = 2;

/// The history of a task with one retry whose two attempts both time out.
const TIMED_OUT_TWICE: [&str; 9] = [
    "TASK_CREATED",
    "TASK_ASSIGNED",
    "TASK_STARTED",
    "TASK_TIMED_OUT",
    "TASK_RETRIED",
    "TASK_ASSIGNED",
    "TASK_STARTED",
    "TASK_TIMED_OUT",
    "TASK_FAILED",
];

fn new_task(title: &str, priority: i32) -> pb::NewTask {
    pb::NewTask {
        title: title.to_owned(),
        phase: INITIAL,
        priority,
        ..Default::default()
    }
}

async fn enqueue(client: &TaskQueueClient, tasks: Vec<pb::NewTask>) -> Vec<pb::Task> {
    client
        .clone()
        .enqueue_tasks(pb::EnqueueTasksRequest { tasks })
        .await
        .expect("enqueue")
        .into_inner()
        .tasks
}

async fn get(client: &TaskQueueClient, id: &str) -> pb::Task {
    client
        .clone()
        .get_task(pb::GetTaskRequest { task_id: id.to_owned() })
        .await
        .expect("get")
        .into_inner()
        .task
        .expect("task")
}

async fn count_rows(infra: &Infra, table: &str) -> i64 {
    let pool = infra.db.connect().await.unwrap();
    let n = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    n
}

struct Setup {
    infra: Infra,
    tq: InProcess,
    client: TaskQueueClient,
    /// The health service the test's agents register with.
    health: InProcess,
    agents: HealthClient,
}

async fn setup() -> Setup {
    setup_with(|_| {}).await
}

async fn setup_with(tune: impl FnOnce(&mut omoi_task_queue::Config)) -> Setup {
    let infra = Infra::new().await.expect("infra");
    let mut config = infra.task_queue_config();
    tune(&mut config);
    let tq = InProcess::start(config).await.expect("task-queue");
    let client = tq.client();
    let health = InProcess::health(infra.health_config()).await.expect("health");
    let agents = omoi_tests::health_client(&health.url);
    Setup {
        infra,
        tq,
        client,
        health,
        agents,
    }
}

impl Setup {
    async fn finish(self) {
        self.health.stop().await.expect("clean stop");
        self.tq.stop().await.expect("clean stop");
        self.infra.cleanup().await.expect("cleanup");
    }
}

fn expect<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>, code: Code, field: &str) {
    let err = r.expect_err("must be refused");
    assert_eq!(err.code(), code, "{field}: {}", err.message());
    assert!(err.message().contains(field), "{field} not in {:?}", err.message());
}

/// A task with `timeout_seconds` and one retry, started by an agent.
async fn started_with_one_retry(s: &Setup, timeout_seconds: i32) -> (pb::Task, ScriptedAgent, pb::Assignment) {
    let task = pb::NewTask {
        timeout_seconds,
        max_retries: Some(1),
        ..new_task("slow", 1)
    };
    let t = enqueue(&s.client, vec![task]).await.remove(0);
    let mut agent = ScriptedAgent::connect(&s.client, &s.agents, 1, vec![]).await.unwrap();
    let a1 = agent.next_assignment(WAIT).await.unwrap();
    agent.start(&a1).await.unwrap();
    (t, agent, a1)
}
