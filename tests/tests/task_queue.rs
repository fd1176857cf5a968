//! TaskQueueService against real PostgreSQL and NATS, served in-process.

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

#[tokio::test]
async fn a_task_without_a_timeout_gets_the_default_deadline() {
    let s = setup().await;
    let mut timed = new_task("timed", 1);
    timed.timeout_seconds = 5;
    let created = enqueue(&s.client, vec![new_task("untimed", 1), timed]).await;
    let timeouts: Vec<i32> = created.iter().map(|t| t.timeout_seconds).collect();
    assert_eq!(timeouts, [7200, 5], "two hours unless the task says");
    assert_eq!(get(&s.client, &created[0].id).await.timeout_seconds, 7200);
    s.finish().await;

    let s = setup_with(|c| c.default_task_timeout_seconds = 0).await;
    let created = enqueue(&s.client, vec![new_task("untimed", 1)]).await;
    assert_eq!(created[0].timeout_seconds, 0, "0 turns the default off");
    s.finish().await;
}

#[tokio::test]
async fn ready_tasks_go_out_by_priority_then_age() {
    let s = setup().await;
    // Across phases too: an agent taking them all gets one order.
    let in_phase = |title: &str, priority: i32, phase: i32| pb::NewTask {
        phase,
        ..new_task(title, priority)
    };
    let tasks = enqueue(
        &s.client,
        vec![
            in_phase("low", 1, 3),
            in_phase("high-old", 5, 2),
            in_phase("mid", 3, 1),
            in_phase("high-new", 5, 4),
        ],
    )
    .await;
    assert!(tasks.iter().all(|t| t.status == PENDING && t.attempt == 0));
    let mut agent = ScriptedAgent::connect(&s.client, &s.agents, 1, vec![]).await.unwrap();
    let mut order = Vec::new();
    for _ in 0..4 {
        let a = agent.next_assignment(WAIT).await.expect("assignment");
        let t = a.task.clone().unwrap();
        assert_eq!(a.attempt, 1);
        assert_eq!(t.status, ASSIGNED);
        order.push(t.title.clone());
        // Capacity 1: nothing more arrives until this one is done.
        assert!(
            agent.next(QUIET).await.is_none() || order.len() == 4,
            "capacity exceeded"
        );
        agent.start(&a).await.unwrap();
        let done = agent.complete(&a).await.unwrap();
        assert_eq!(done.status, COMPLETED);
    }
    assert_eq!(order, ["high-old", "high-new", "mid", "low"]);
    s.finish().await;
}

#[tokio::test]
async fn agents_only_get_their_phases_and_never_more_than_capacity() {
    let s = setup().await;
    let mut tasks = Vec::new();
    for i in 0..3 {
        tasks.push(new_task(&format!("initial {i}"), 1));
        tasks.push(pb::NewTask {
            phase: IMPLEMENTATION,
            ..new_task(&format!("impl {i}"), 1)
        });
    }
    enqueue(&s.client, tasks).await;
    let mut implementer = ScriptedAgent::connect(&s.client, &s.agents, 2, vec![IMPLEMENTATION])
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Some(a) = implementer.next_assignment(QUIET).await {
        got.push(a.task.unwrap());
    }
    assert_eq!(got.len(), 2, "capacity 2");
    assert!(got.iter().all(|t| t.phase == IMPLEMENTATION));
    s.finish().await;
}

#[tokio::test]
async fn completion_releases_dependents_and_failure_cascades() {
    let s = setup().await;
    let (a, b, c, d) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let with = |id: Uuid, title: &str, deps: &[Uuid]| pb::NewTask {
        id: id.to_string(),
        depends_on: deps.iter().map(ToString::to_string).collect(),
        max_retries: Some(0),
        ..new_task(title, 1)
    };
    // a <- b <- c, and d depends on a and c.
    let created = enqueue(
        &s.client,
        vec![
            with(a, "a", &[]),
            with(b, "b", &[a]),
            with(c, "c", &[b]),
            with(d, "d", &[a, c]),
        ],
    )
    .await;
    assert_eq!(
        created.iter().map(|t| t.unmet_dependencies).collect::<Vec<_>>(),
        [0, 1, 1, 2]
    );
    let mut agent = ScriptedAgent::connect(&s.client, &s.agents, 4, vec![]).await.unwrap();
    let first = agent.next_assignment(WAIT).await.unwrap();
    assert_eq!(first.task.as_ref().unwrap().title, "a");
    assert!(agent.next(QUIET).await.is_none(), "b must wait for a");
    agent.start(&first).await.unwrap();
    agent.complete(&first).await.unwrap();
    let second = agent.next_assignment(WAIT).await.unwrap();
    assert_eq!(second.task.as_ref().unwrap().title, "b");
    assert_eq!(get(&s.client, &d.to_string()).await.unmet_dependencies, 1);
    // b fails for good: c and, through c, d are cancelled with the reason.
    agent.start(&second).await.unwrap();
    let failed = agent.fail(&second, "syntax error in main.rs", 0).await.unwrap();
    assert_eq!(failed.status, FAILED);
    assert_eq!(failed.error_class, PERMANENT);
    for id in [c, d] {
        let t = get(&s.client, &id.to_string()).await;
        assert_eq!(t.status, CANCELLED, "{}", t.title);
        assert!(t.error_message.contains(&b.to_string()), "{}", t.error_message);
    }
    assert!(agent.next(QUIET).await.is_none());
    // A new task cannot depend on a failed one.
    let err = s
        .client
        .clone()
        .enqueue_tasks(pb::EnqueueTasksRequest {
            tasks: vec![with(Uuid::now_v7(), "late", &[b])],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("tasks[0].depends_on[0]"), "{}", err.message());
    s.finish().await;
}

/// With the dispatcher's sweep out of the picture, each completion's own
/// wake-up hands out what it made possible: a dependent it released (no
/// agent was short of capacity), or ready work that was waiting for the
/// capacity it freed.
#[tokio::test]
async fn each_completion_dispatches_what_it_makes_possible_without_a_sweep() {
    let s = setup_with(|c| c.dispatch_sweep_ms = 600_000).await;
    let title = |a: &pb::Assignment| a.task.as_ref().unwrap().title.clone();
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let with = |id: Uuid, name: &str, deps: &[Uuid]| pb::NewTask {
        id: id.to_string(),
        depends_on: deps.iter().map(ToString::to_string).collect(),
        ..new_task(name, 1)
    };
    let mut agent = ScriptedAgent::connect(&s.client, &s.agents, 2, vec![]).await.unwrap();
    enqueue(&s.client, vec![with(a, "a", &[]), with(b, "b", &[a])]).await;
    // A slot stays free: nothing waits for capacity.
    let first = agent.next_assignment(WAIT).await.unwrap();
    assert_eq!(title(&first), "a");
    agent.start(&first).await.unwrap();
    agent.complete(&first).await.unwrap();
    let second = agent
        .next_assignment(WAIT)
        .await
        .expect("the released dependent goes out");
    assert_eq!(title(&second), "b");

    // b holds one slot; of three more, one fits and two wait for capacity.
    enqueue(&s.client, vec![new_task("c", 3), new_task("d", 2), new_task("e", 1)]).await;
    let third = agent.next_assignment(WAIT).await.unwrap();
    assert_eq!(title(&third), "c");
    assert!(agent.next(QUIET).await.is_none(), "capacity 2");
    let mut held = vec![second, third];
    for expected in ["d", "e"] {
        let done = held.remove(0);
        agent.start(&done).await.unwrap();
        agent.complete(&done).await.unwrap();
        let next = agent.next_assignment(WAIT).await.expect("freed capacity is filled");
        assert_eq!(title(&next), expected);
        held.push(next);
    }
    s.finish().await;
}

#[tokio::test]
async fn a_cycle_or_bad_field_is_refused_and_nothing_is_written() {
    let s = setup().await;
    let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let with = |id: Uuid, deps: &[Uuid]| pb::NewTask {
        id: id.to_string(),
        depends_on: deps.iter().map(ToString::to_string).collect(),
        ..new_task("t", 1)
    };
    let cases: Vec<(Vec<pb::NewTask>, Code, &str)> = vec![
        (
            vec![with(a, &[c]), with(b, &[a]), with(c, &[b])],
            Code::InvalidArgument,
            "cycle",
        ),
        (vec![with(a, &[a])], Code::InvalidArgument, "tasks[0].depends_on[0]"),
        (
            vec![with(a, &[Uuid::now_v7()])],
            Code::InvalidArgument,
            "unknown task id",
        ),
        (
            vec![pb::NewTask {
                title: String::new(),
                ..new_task("", 1)
            }],
            Code::InvalidArgument,
            "tasks[0].title",
        ),
        (
            vec![new_task("ok", 1), new_task("neg", -1)],
            Code::InvalidArgument,
            "tasks[1].priority",
        ),
        (
            vec![pb::NewTask {
                timeout_seconds: -1,
                ..new_task("t", 1)
            }],
            Code::InvalidArgument,
            "timeout_seconds",
        ),
        (
            vec![pb::NewTask {
                max_retries: Some(-2),
                ..new_task("t", 1)
            }],
            Code::InvalidArgument,
            "max_retries",
        ),
        (
            vec![pb::NewTask {
                phase: 0,
                ..new_task("t", 1)
            }],
            Code::InvalidArgument,
            "tasks[0].phase",
        ),
        (
            vec![pb::NewTask {
                id: "nope".into(),
                ..new_task("t", 1)
            }],
            Code::InvalidArgument,
            "tasks[0].id",
        ),
        (
            vec![pb::NewTask {
                ticket_id: "x".into(),
                ..new_task("t", 1)
            }],
            Code::InvalidArgument,
            "ticket_id",
        ),
        (vec![with(a, &[]), with(a, &[])], Code::InvalidArgument, "tasks[1].id"),
        (vec![], Code::InvalidArgument, "tasks"),
        (
            (0..1001).map(|i| new_task(&i.to_string(), 1)).collect(),
            Code::InvalidArgument,
            "tasks",
        ),
    ];
    for (tasks, code, needle) in cases {
        let err = s
            .client
            .clone()
            .enqueue_tasks(pb::EnqueueTasksRequest { tasks })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{needle}: {}", err.message());
        assert!(err.message().contains(needle), "{needle} not in {:?}", err.message());
    }
    assert_eq!(count_rows(&s.infra, "tasks").await, 0);
    assert_eq!(count_rows(&s.infra, "task_dependencies").await, 0);
    // Nothing was published either: the stream holds no event.
    let events = events::read_all(&s.infra.nats_url, &s.infra.topology.stream, 0, Duration::ZERO)
        .await
        .unwrap();
    assert!(events.is_empty(), "{events:?}");
    // A task id that already exists.
    let t = enqueue(&s.client, vec![with(a, &[])]).await;
    let err = s
        .client
        .clone()
        .enqueue_tasks(pb::EnqueueTasksRequest {
            tasks: vec![with(b, &[]), with(a, &[])],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{}", err.message());
    assert_eq!(count_rows(&s.infra, "tasks").await, 1);
    assert_eq!(t.len(), 1);
    s.finish().await;
}

fn expect<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>, code: Code, field: &str) {
    let err = r.expect_err("must be refused");
    assert_eq!(err.code(), code, "{field}: {}", err.message());
    assert!(err.message().contains(field), "{field} not in {:?}", err.message());
}

#[tokio::test]
async fn malformed_requests_to_every_rpc_name_the_field() {
    let s = setup().await;
    let mut c = s.client.clone();
    let missing = Uuid::now_v7().to_string();
    expect(
        c.get_task(pb::GetTaskRequest { task_id: "1".into() }).await,
        Code::InvalidArgument,
        "task_id",
    );
    expect(
        c.get_task(pb::GetTaskRequest {
            task_id: missing.clone(),
        })
        .await,
        Code::NotFound,
        &missing,
    );
    let batch = |ids: Vec<String>| pb::BatchGetTasksRequest { task_ids: ids };
    expect(
        c.batch_get_tasks(batch(vec![])).await,
        Code::InvalidArgument,
        "task_ids",
    );
    expect(
        c.batch_get_tasks(batch(vec![missing.clone(); 1001])).await,
        Code::InvalidArgument,
        "task_ids",
    );
    expect(
        c.batch_get_tasks(batch(vec![missing.clone(), "x".into()])).await,
        Code::InvalidArgument,
        "task_ids[1]",
    );
    expect(
        c.batch_get_tasks(batch(vec![missing.clone()])).await,
        Code::NotFound,
        &missing,
    );
    expect(
        c.list_tasks(pb::ListTasksRequest {
            page_size: -1,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "page_size",
    );
    expect(
        c.list_tasks(pb::ListTasksRequest {
            page_token: "abc".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "page_token",
    );
    expect(
        c.list_tasks(pb::ListTasksRequest {
            status: 42,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "status",
    );
    expect(
        c.cancel_task(pb::CancelTaskRequest {
            task_id: String::new(),
            reason: String::new(),
        })
        .await,
        Code::InvalidArgument,
        "task_id",
    );
    expect(
        c.start_task(pb::StartTaskRequest {
            task_id: missing.clone(),
            attempt: 0,
        })
        .await,
        Code::InvalidArgument,
        "attempt",
    );
    expect(
        c.start_task(pb::StartTaskRequest {
            task_id: missing.clone(),
            attempt: 1,
        })
        .await,
        Code::NotFound,
        &missing,
    );
    expect(
        c.complete_task(pb::CompleteTaskRequest {
            task_id: "zz".into(),
            attempt: 1,
            result: None,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "task_id",
    );
    expect(
        c.fail_task(pb::FailTaskRequest {
            task_id: missing.clone(),
            attempt: 1,
            error_message: String::new(),
            error_class: 9,
            timed_out: false,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "error_class",
    );
    for (agent_id, capacity, phases, field) in [
        ("x".to_string(), 1, vec![], "agent_id"),
        (missing.clone(), 0, vec![], "capacity"),
        (missing.clone(), 1001, vec![], "capacity"),
        (missing.clone(), 1, vec![7], "phases[0]"),
    ] {
        expect(
            c.watch_assignments(pb::WatchAssignmentsRequest {
                agent_id,
                phases,
                capacity,
            })
            .await,
            Code::InvalidArgument,
            field,
        );
    }
    assert_eq!(count_rows(&s.infra, "tasks").await, 0);
    assert_eq!(count_rows(&s.infra, "event_batches").await, 0);
    s.finish().await;
}

#[tokio::test]
async fn a_retryable_failure_is_retried_after_a_stored_backoff() {
    let s = setup().await;
    let t = &enqueue(&s.client, vec![new_task("flaky", 1)]).await[0];
    let mut agent = ScriptedAgent::connect(&s.client, &s.agents, 1, vec![]).await.unwrap();
    let a1 = agent.next_assignment(WAIT).await.unwrap();
    agent.start(&a1).await.unwrap();
    let before = chrono::Utc::now();
    let retried = agent.fail(&a1, "connection reset by peer", 0).await.unwrap();
    let after = chrono::Utc::now();
    assert_eq!(retried.status, PENDING);
    assert_eq!(retried.retry_count, 1);
    assert_eq!(retried.error_class, RETRYABLE);
    assert!(retried.assigned_agent_id.is_empty());
    // First retry: 1 s ± 25 %, measured from the failure.
    let next = omoi_proto::convert::from_timestamp(retried.next_attempt_at.as_ref().unwrap()).unwrap();
    let (lo, hi) = omoi_domain::backoff::bounds(0);
    assert!(
        next >= before + chrono::Duration::from_std(lo).unwrap() - chrono::Duration::milliseconds(50),
        "{next} too early"
    );
    assert!(
        next <= after + chrono::Duration::from_std(hi).unwrap() + chrono::Duration::milliseconds(50),
        "{next} too late"
    );
    // Not handed out before its time, then handed out again with attempt 2.
    let a2 = agent.next_assignment(WAIT).await.expect("retried");
    let received = chrono::Utc::now();
    assert!(received >= next, "handed out at {received}, before {next}");
    assert_eq!(a2.attempt, 2);
    assert_eq!(a2.task.as_ref().unwrap().id, t.id);
    // The first attempt's reports are now refused.
    let stale = agent.complete(&a1).await.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    agent.start(&a2).await.unwrap();
    assert_eq!(agent.complete(&a2).await.unwrap().status, COMPLETED);
    s.finish().await;
}

#[tokio::test]
async fn permanent_errors_fail_at_once_and_retries_run_out() {
    let s = setup().await;
    let perm = &enqueue(&s.client, vec![new_task("perm", 2)]).await[0];
    let mut agent = ScriptedAgent::connect(&s.client, &s.agents, 1, vec![]).await.unwrap();
    let a = agent.next_assignment(WAIT).await.unwrap();
    assert_eq!(a.task.as_ref().unwrap().id, perm.id);
    agent.start(&a).await.unwrap();
    let failed = agent.fail(&a, "Permission denied (publickey)", 0).await.unwrap();
    assert_eq!(
        (failed.status, failed.retry_count, failed.error_class),
        (FAILED, 0, PERMANENT)
    );
    // An explicit class overrides the message.
    let explicit = &enqueue(&s.client, vec![new_task("explicit", 1)]).await[0];
    let a = agent.next_assignment(WAIT).await.unwrap();
    assert_eq!(a.task.as_ref().unwrap().id, explicit.id);
    let failed = agent.fail(&a, "connection reset", PERMANENT).await.unwrap();
    assert_eq!(failed.status, FAILED);

    let limited = &enqueue(
        &s.client,
        vec![pb::NewTask {
            max_retries: Some(1),
            ..new_task("twice", 1)
        }],
    )
    .await[0];
    let a1 = agent.next_assignment(WAIT).await.unwrap();
    agent.start(&a1).await.unwrap();
    assert_eq!(
        agent.fail(&a1, "timeout talking to LLM", 0).await.unwrap().status,
        PENDING
    );
    let a2 = agent.next_assignment(WAIT).await.unwrap();
    assert_eq!(a2.attempt, 2);
    agent.start(&a2).await.unwrap();
    let out = agent.fail(&a2, "timeout talking to LLM", 0).await.unwrap();
    assert_eq!((out.status, out.retry_count), (FAILED, 1));
    assert_eq!(out.id, limited.id);
    s.finish().await;
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

#[tokio::test]
async fn a_running_task_past_its_deadline_is_cancelled_on_the_stream_and_retried() {
    let s = setup().await;
    let (t, mut agent, a1) = started_with_one_retry(&s, 1).await;
    let cancel = agent.next_cancellation(WAIT).await.expect("cancellation on the stream");
    assert_eq!((cancel.task_id.as_str(), cancel.attempt), (t.id.as_str(), 1));
    assert!(cancel.reason.contains("timed out"), "{}", cancel.reason);
    let late = agent.complete(&a1).await.unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    let a2 = agent.next_assignment(WAIT).await.expect("retried after the timeout");
    assert_eq!(a2.attempt, 2);
    agent.start(&a2).await.unwrap();
    // Out of retries: the second timeout fails the task.
    let cancel = agent.next_cancellation(WAIT).await.unwrap();
    assert_eq!(cancel.attempt, 2);
    let t = eventually(WAIT, "task failed", || async {
        let t = get(&s.client, &t.id).await;
        (t.status == FAILED).then_some(t)
    })
    .await;
    assert!(t.error_message.contains("timed out"));
    let events = events::read_all(&s.infra.nats_url, &s.infra.topology.stream, 9, WAIT)
        .await
        .unwrap();
    assert_eq!(events::history(&events, &t.id), TIMED_OUT_TWICE);
    s.finish().await;
}

#[tokio::test]
async fn a_timeout_the_agent_notices_first_is_still_a_timeout() {
    let s = setup().await;
    let (t, mut agent, a1) = started_with_one_retry(&s, 60).await;
    let retried = agent.timed_out(&a1).await.unwrap();
    assert_eq!((retried.status, retried.retry_count), (PENDING, 1));
    assert!(
        retried.error_message.contains("timed out after 60 s"),
        "{}",
        retried.error_message
    );
    let late = agent.timed_out(&a1).await.unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "a stale attempt changes nothing");
    let a2 = agent.next_assignment(WAIT).await.expect("retried after the timeout");
    agent.start(&a2).await.unwrap();
    let failed = agent.timed_out(&a2).await.unwrap();
    assert_eq!(failed.status, FAILED);
    let events = events::read_all(&s.infra.nats_url, &s.infra.topology.stream, 9, WAIT)
        .await
        .unwrap();
    assert_eq!(events::history(&events, &t.id), TIMED_OUT_TWICE);
    s.finish().await;
}

#[tokio::test]
async fn cancel_works_in_every_open_state_and_not_after() {
    let s = setup().await;
    let ids: Vec<String> = enqueue(&s.client, (0..4).map(|i| new_task(&format!("t{i}"), 10 - i)).collect())
        .await
        .into_iter()
        .map(|t| t.id)
        .collect();
    let cancel = |id: String| {
        let mut c = s.client.clone();
        async move {
            c.cancel_task(pb::CancelTaskRequest {
                task_id: id,
                reason: "no longer needed".into(),
            })
            .await
        }
    };
    let mut agent = ScriptedAgent::connect(&s.client, &s.agents, 2, vec![]).await.unwrap();
    let running = agent.next_assignment(WAIT).await.unwrap();
    let assigned = agent.next_assignment(WAIT).await.unwrap();
    agent.start(&running).await.unwrap();
    assert_eq!(running.task.as_ref().unwrap().id, ids[0]);
    assert_eq!(assigned.task.as_ref().unwrap().id, ids[1]);

    // Pending: never handed out.
    cancel(ids[3].clone()).await.unwrap();
    // Running and assigned: the agent is told at once, and the freed
    // capacity takes the one task left.
    let t = cancel(ids[0].clone()).await.unwrap().into_inner().task.unwrap();
    assert_eq!(t.status, CANCELLED);
    cancel(ids[1].clone()).await.unwrap();
    let mut cancellations = HashSet::new();
    let mut assignments = Vec::new();
    while let Some(event) = agent.next(QUIET).await {
        match event {
            StreamEvent::Cancellation(c) => {
                assert_eq!((c.attempt, c.reason.as_str()), (1, "no longer needed"));
                cancellations.insert(c.task_id);
            }
            StreamEvent::Assignment(a) => assignments.push(a),
        }
    }
    assert_eq!(cancellations, HashSet::from([ids[0].clone(), ids[1].clone()]));
    assert_eq!(assignments.len(), 1, "only the task still pending: {assignments:?}");
    let next = assignments.remove(0);
    assert_eq!(next.task.as_ref().unwrap().id, ids[2]);
    assert_eq!(
        agent.start(&assigned).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    agent.start(&next).await.unwrap();
    agent.complete(&next).await.unwrap();
    // Terminal states refuse.
    for id in [&ids[0], &ids[2], &ids[3]] {
        assert_eq!(cancel(id.clone()).await.unwrap_err().code(), Code::FailedPrecondition);
    }
    assert_eq!(
        cancel(Uuid::now_v7().to_string()).await.unwrap_err().code(),
        Code::NotFound
    );
    s.finish().await;
}

#[tokio::test]
async fn stale_attempts_and_illegal_reports_are_refused() {
    let s = setup().await;
    enqueue(&s.client, vec![new_task("t", 1)]).await;
    let mut agent = ScriptedAgent::connect(&s.client, &s.agents, 1, vec![]).await.unwrap();
    let a = agent.next_assignment(WAIT).await.unwrap();
    // Completing before starting is illegal.
    assert_eq!(agent.complete(&a).await.unwrap_err().code(), Code::FailedPrecondition);
    let wrong = pb::Assignment {
        attempt: a.attempt + 1,
        ..a.clone()
    };
    let err = agent.start(&wrong).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("not current"), "{}", err.message());
    agent.start(&a).await.unwrap();
    // A retried report of the same attempt (its answer was lost) succeeds
    // again and changes nothing.
    assert_eq!(agent.start(&a).await.unwrap().status, RUNNING);
    agent.complete(&a).await.unwrap();
    assert_eq!(agent.complete(&a).await.unwrap().status, COMPLETED);
    assert_eq!(agent.start(&a).await.unwrap_err().code(), Code::FailedPrecondition);
    assert_eq!(
        agent.fail(&a, "x", 0).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    let events = events::read_all(&s.infra.nats_url, &s.infra.topology.stream, 4, WAIT)
        .await
        .unwrap();
    let history = events::history(&events, &a.task.as_ref().unwrap().id);
    assert_eq!(
        history,
        ["TASK_CREATED", "TASK_ASSIGNED", "TASK_STARTED", "TASK_COMPLETED"]
    );
    s.finish().await;
}

#[tokio::test]
async fn a_dropped_stream_requeues_its_unstarted_tasks_at_once() {
    let s = setup().await;
    enqueue(&s.client, (0..3).map(|i| new_task(&format!("t{i}"), 1)).collect()).await;
    let mut first = ScriptedAgent::connect(&s.client, &s.agents, 3, vec![]).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(first.next_assignment(WAIT).await.unwrap());
    }
    first.start(&got[0]).await.unwrap();
    let started_id = got[0].task.as_ref().unwrap().id.clone();
    drop(first);
    let mut second = ScriptedAgent::connect(&s.client, &s.agents, 3, vec![]).await.unwrap();
    let mut again = HashSet::new();
    for _ in 0..2 {
        let a = second.next_assignment(WAIT).await.expect("requeued task");
        assert_eq!(a.attempt, 2, "a new attempt");
        again.insert(a.task.unwrap().id);
    }
    let expected: HashSet<String> = got[1..].iter().map(|a| a.task.as_ref().unwrap().id.clone()).collect();
    assert_eq!(again, expected);
    // The started task stays with its agent (stale detection takes it back).
    assert!(second.next(QUIET).await.is_none());
    assert_eq!(get(&s.client, &started_id).await.status, RUNNING);
    s.finish().await;
}

#[tokio::test]
async fn list_filters_and_pages_and_stats_count() {
    let s = setup().await;
    let ticket = Uuid::now_v7().to_string();
    let mut tasks: Vec<pb::NewTask> = (0..5)
        .map(|i| pb::NewTask {
            ticket_id: ticket.clone(),
            ..new_task(&format!("t{i}"), 1)
        })
        .collect();
    tasks.push(pb::NewTask {
        phase: IMPLEMENTATION,
        ..new_task("other", 1)
    });
    let created = enqueue(&s.client, tasks).await;
    let mut c = s.client.clone();
    // Several by id, in the order asked (one asked twice comes twice).
    let ids = [&created[3], &created[0], &created[5], &created[3]].map(|t| t.id.clone());
    let batch = c
        .batch_get_tasks(pb::BatchGetTasksRequest { task_ids: ids.to_vec() })
        .await
        .unwrap()
        .into_inner();
    let titles: Vec<&str> = batch.tasks.iter().map(|t| t.title.as_str()).collect();
    assert_eq!(titles, ["t3", "t0", "other", "t3"]);
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_tasks(pb::ListTasksRequest {
                ticket_id: ticket.clone(),
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.tasks.len() <= 2);
        seen.extend(page.tasks.into_iter().map(|t| t.title));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ["t0", "t1", "t2", "t3", "t4"]);
    let by_phase = c
        .list_tasks(pb::ListTasksRequest {
            phase: IMPLEMENTATION,
            status: PENDING,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_phase.tasks.len(), 1);
    let stats = c
        .get_queue_stats(pb::GetQueueStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((stats.pending, stats.ready, stats.running), (6, 6, 0));
    assert!(stats.oldest_ready_age_seconds >= 0.0);
    assert_eq!(stats.counts.iter().map(|c| c.count).sum::<i64>(), 6);
    s.finish().await;
}

#[tokio::test]
async fn a_report_with_a_bad_usage_is_refused_and_a_good_one_kept() {
    let s = setup().await;
    let (t, mut agent, a1) = started_with_one_retry(&s, 0).await;
    let spent = omoi_proto::common::Usage {
        input_tokens: 1200,
        output_tokens: 300,
        cost_usd: 0.042,
        model: "claude-sonnet-4-5".into(),
        turns: 3,
        ..Default::default()
    };
    let bad = [
        (
            omoi_proto::common::Usage {
                input_tokens: -5,
                ..spent.clone()
            },
            "usage.input_tokens",
        ),
        (
            omoi_proto::common::Usage {
                cost_usd: f64::INFINITY,
                ..spent.clone()
            },
            "usage.cost_usd",
        ),
    ];
    for (usage, field) in bad {
        let failure = pb::FailTaskRequest {
            error_message: "connection reset".into(),
            usage: Some(usage.clone()),
            ..Default::default()
        };
        let e = agent.send_failure(&a1, failure).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains(field), "{}", e.message());
        let completion = pb::CompleteTaskRequest {
            task_id: t.id.clone(),
            attempt: a1.attempt,
            usage: Some(usage),
            ..Default::default()
        };
        let e = agent.client.complete_task(completion).await.unwrap_err();
        assert!(e.message().contains(field), "{}", e.message());
    }
    let unchanged = get(&s.client, &t.id).await;
    assert_eq!((unchanged.status, unchanged.usage), (RUNNING, None));
    let completion = pb::CompleteTaskRequest {
        task_id: t.id.clone(),
        attempt: a1.attempt,
        usage: Some(spent.clone()),
        ..Default::default()
    };
    let done = agent
        .client
        .complete_task(completion)
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!((done.status, done.usage), (COMPLETED, Some(spent)));
    s.finish().await;
}

#[tokio::test]
async fn an_assignment_not_started_within_its_lease_goes_back_to_the_queue() {
    let s = setup_with(|c| c.start_timeout_seconds = 1.0).await;
    let t = enqueue(&s.client, vec![new_task("lost", 1)]).await.remove(0);
    // An agent that takes the task and never says a word about it.
    let mut silent = ScriptedAgent::connect(&s.client, &s.agents, 1, vec![]).await.unwrap();
    let a1 = silent.next_assignment(WAIT).await.unwrap();
    assert_eq!(a1.attempt, 1);
    let revoked = silent.next_cancellation(WAIT).await.expect("told to drop it");
    assert_eq!((revoked.task_id.as_str(), revoked.attempt), (t.id.as_str(), 1));
    assert!(revoked.reason.contains("not started within 1 s"), "{}", revoked.reason);
    // Back in the queue for whoever takes it next; the lost attempt's late
    // start is refused.
    let late = silent.start(&a1).await.unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    let a2 = silent.next_assignment(WAIT).await.expect("assigned again");
    assert_eq!(a2.attempt, 2);
    silent.start(&a2).await.unwrap();
    let done = silent.complete(&a2).await.unwrap();
    assert_eq!(
        (done.status, done.retry_count),
        (COMPLETED, 0),
        "a lapsed lease spends no retry"
    );
    let events = events::read_all(&s.infra.nats_url, &s.infra.topology.stream, 6, WAIT)
        .await
        .unwrap();
    assert_eq!(
        events::history(&events, &t.id),
        [
            "TASK_CREATED",
            "TASK_ASSIGNED",
            "TASK_REQUEUED",
            "TASK_ASSIGNED",
            "TASK_STARTED",
            "TASK_COMPLETED"
        ]
    );
    s.finish().await;
}

#[tokio::test]
async fn an_operator_retries_a_failed_task_and_its_cancelled_dependents_come_back() {
    let s = setup().await;
    let root = enqueue(&s.client, vec![new_task("root", 1)]).await.remove(0);
    let child = pb::NewTask {
        depends_on: vec![root.id.clone()],
        ..new_task("child", 1)
    };
    let child = enqueue(&s.client, vec![child]).await.remove(0);
    let grandchild = pb::NewTask {
        depends_on: vec![child.id.clone()],
        ..new_task("grandchild", 1)
    };
    let grandchild = enqueue(&s.client, vec![grandchild]).await.remove(0);
    let retry = |task_id: &str| {
        let mut c = s.client.clone();
        let request = pb::RetryTaskRequest {
            task_id: task_id.to_owned(),
            reason: "the disk is back".into(),
        };
        async move { c.retry_task(request).await }
    };
    // Not finished: nothing to retry.
    assert_eq!(retry(&root.id).await.unwrap_err().code(), Code::FailedPrecondition);
    let mut agent = ScriptedAgent::connect(&s.client, &s.agents, 1, vec![]).await.unwrap();
    let a1 = agent.next_assignment(WAIT).await.unwrap();
    agent.start(&a1).await.unwrap();
    agent.fail(&a1, "No space left on device", PERMANENT).await.unwrap();
    assert_eq!(get(&s.client, &grandchild.id).await.status, CANCELLED);
    // A dependent waits for its dependency: that one goes round first.
    let refused = retry(&child.id).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains(&root.id), "{}", refused.message());

    let retried = retry(&root.id).await.unwrap().into_inner();
    let task = retried.task.unwrap();
    assert_eq!((task.status, task.retry_count, task.attempt), (PENDING, 0, 1));
    assert_eq!(task.error_message, "");
    assert_eq!(retried.restored_dependents, [child.id.clone(), grandchild.id.clone()]);
    for t in [&child, &grandchild] {
        assert_eq!(get(&s.client, &t.id).await.status, PENDING);
    }
    // Round again, to the end.
    for want in [&root, &child, &grandchild] {
        let a = agent.next_assignment(WAIT).await.unwrap();
        assert_eq!(a.task.as_ref().unwrap().id, want.id);
        agent.start(&a).await.unwrap();
        agent.complete(&a).await.unwrap();
    }
    let events = events::read_all(&s.infra.nats_url, &s.infra.topology.stream, 20, WAIT)
        .await
        .unwrap();
    assert_eq!(
        events::history(&events, &root.id),
        [
            "TASK_CREATED",
            "TASK_ASSIGNED",
            "TASK_STARTED",
            "TASK_FAILED",
            "TASK_RETRIED",
            "TASK_ASSIGNED",
            "TASK_STARTED",
            "TASK_COMPLETED"
        ]
    );
    assert_eq!(
        events::history(&events, &child.id),
        [
            "TASK_CREATED",
            "TASK_CANCELLED",
            "TASK_RETRIED",
            "TASK_ASSIGNED",
            "TASK_STARTED",
            "TASK_COMPLETED"
        ]
    );
    // Finished well: nothing to retry.
    assert_eq!(retry(&root.id).await.unwrap_err().code(), Code::FailedPrecondition);
    s.finish().await;
}

#[tokio::test]
async fn a_failure_that_says_when_a_retry_can_help_waits_that_long() {
    let s = setup().await;
    let (_, mut agent, a1) = started_with_one_retry(&s, 0).await;
    let failure = |seconds: i64| pb::FailTaskRequest {
        error_message: "rate limited".into(),
        error_class: RETRYABLE,
        retry_after: Some(prost_types::Duration { seconds, nanos: 0 }),
        ..Default::default()
    };
    let bad = agent.send_failure(&a1, failure(-1)).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("retry_after"), "{}", bad.message());
    let before = std::time::SystemTime::now();
    let retried = agent.send_failure(&a1, failure(30)).await.unwrap();
    assert_eq!(retried.status, PENDING);
    let next = retried.next_attempt_at.unwrap();
    let wait = std::time::UNIX_EPOCH + Duration::new(next.seconds as u64, next.nanos as u32);
    assert!(
        wait.duration_since(before).unwrap() >= Duration::from_secs(29),
        "retried at {wait:?}"
    );
    assert!(agent.next_assignment(QUIET).await.is_none(), "not before its time");
    s.finish().await;
}

#[tokio::test]
async fn paused_work_waits_across_a_restart_until_resumed() {
    let Setup {
        infra,
        tq,
        client,
        health,
        agents,
    } = setup().await;
    let pause = |c: &TaskQueueClient, phase: i32, reason: &str| {
        let mut c = c.clone();
        let request = pb::PauseDispatchRequest {
            phase,
            ticket_id: String::new(),
            reason: reason.to_owned(),
        };
        async move { c.pause_dispatch(request).await }
    };
    let resume = |c: &TaskQueueClient, phase: i32| {
        let mut c = c.clone();
        async move {
            c.resume_dispatch(pb::ResumeDispatchRequest {
                phase,
                ticket_id: String::new(),
            })
            .await
        }
    };
    pause(&client, INITIAL, "deploy freeze").await.unwrap();
    let again = pause(&client, INITIAL, "deploy freeze, day two")
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.pause.unwrap().reason, "deploy freeze, day two");
    let bad = pause(&client, 99, "").await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("phase"), "{}", bad.message());
    assert_eq!(
        resume(&client, IMPLEMENTATION).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    let held = enqueue(&client, vec![new_task("held", 1)]).await.remove(0);
    let mut free = new_task("free", 1);
    free.phase = IMPLEMENTATION;
    let free = enqueue(&client, vec![free]).await.remove(0);
    let mut agent = ScriptedAgent::connect(&client, &agents, 2, vec![]).await.unwrap();
    let a = agent.next_assignment(WAIT).await.unwrap();
    assert_eq!(a.task.as_ref().unwrap().id, free.id, "other phases go on");
    agent.start(&a).await.unwrap();
    agent.complete(&a).await.unwrap();
    assert!(agent.next_assignment(QUIET).await.is_none(), "the paused phase waits");
    let stats = client
        .clone()
        .get_queue_stats(pb::GetQueueStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.pauses.len(), 1);
    assert_eq!(
        (stats.pauses[0].phase, stats.pauses[0].reason.as_str()),
        (INITIAL, "deploy freeze, day two")
    );

    // A restarted replica keeps the pause.
    drop(agent);
    tq.stop().await.unwrap();
    let tq = InProcess::start(infra.task_queue_config()).await.unwrap();
    let client = tq.client();
    let mut agent = ScriptedAgent::connect(&client, &agents, 2, vec![]).await.unwrap();
    assert!(
        agent.next_assignment(QUIET).await.is_none(),
        "still paused after a restart"
    );
    let lifted = resume(&client, 0).await.unwrap().into_inner();
    assert_eq!(lifted.resumed.len(), 1);
    let a = agent.next_assignment(WAIT).await.expect("resumed");
    assert_eq!(a.task.unwrap().id, held.id);
    let events = events::read_all(&infra.nats_url, &infra.topology.stream, 8, WAIT)
        .await
        .unwrap();
    let types: Vec<&str> = events
        .iter()
        .filter(|e| e.entity_type == "queue")
        .map(|e| e.event_type.as_str())
        .collect();
    assert_eq!(types, ["QUEUE_PAUSED", "QUEUE_RESUMED"], "one event per change");
    health.stop().await.unwrap();
    tq.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

fn keyed(title: &str, priority: i32, key: &str) -> pb::NewTask {
    pb::NewTask {
        concurrency_key: key.to_owned(),
        ..new_task(title, priority)
    }
}

async fn set_limit(
    client: &TaskQueueClient,
    key: &str,
    max_running: i32,
    clear: bool,
) -> Result<pb::SetConcurrencyLimitResponse, tonic::Status> {
    client
        .clone()
        .set_concurrency_limit(pb::SetConcurrencyLimitRequest {
            key: key.to_owned(),
            max_running,
            clear,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Every assignment the agents receive until all of them stay quiet.
async fn assignments(agents: &mut [&mut ScriptedAgent]) -> Vec<(usize, pb::Assignment)> {
    let mut got = Vec::new();
    loop {
        let before = got.len();
        for (i, agent) in agents.iter_mut().enumerate() {
            while let Some(a) = agent.next_assignment(QUIET).await {
                got.push((i, a));
            }
        }
        if got.len() == before {
            return got;
        }
    }
}

fn with_key<'a>(got: &'a [(usize, pb::Assignment)], key: &str) -> Vec<&'a (usize, pb::Assignment)> {
    got.iter()
        .filter(|(_, a)| a.task.as_ref().unwrap().concurrency_key == key)
        .collect()
}

#[tokio::test]
async fn a_concurrency_limit_caps_its_key_on_every_replica_and_nothing_else() {
    let Setup {
        infra,
        tq,
        client,
        health,
        agents,
    } = setup().await;
    let other = InProcess::start(infra.task_queue_config()).await.unwrap();
    let bad = set_limit(&client, "", 1, false).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("key"), "{}", bad.message());
    let bad = set_limit(&client, "repo-a", -1, false).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("max_running"), "{}", bad.message());
    assert_eq!(
        set_limit(&client, "repo-a", 0, true).await.unwrap_err().code(),
        Code::NotFound
    );
    let mut bad_task = keyed("bad", 1, "line\nbreak");
    bad_task.title = "bad".into();
    let refused = client
        .clone()
        .enqueue_tasks(pb::EnqueueTasksRequest { tasks: vec![bad_task] })
        .await
        .unwrap_err();
    assert!(
        refused.message().contains("tasks[0].concurrency_key"),
        "{}",
        refused.message()
    );

    let limit = set_limit(&client, "repo-a", 2, false).await.unwrap().limit.unwrap();
    assert_eq!((limit.key.as_str(), limit.max_running, limit.held), ("repo-a", 2, 0));
    // The keyed tasks come first by priority; without the cap they would
    // fill every slot.
    let mut batch: Vec<_> = (0..8).map(|i| keyed(&format!("a{i}"), 5, "repo-a")).collect();
    batch.extend((0..4).map(|i| new_task(&format!("free{i}"), 1)));
    enqueue(&client, batch).await;
    let mut first = ScriptedAgent::connect(&client, &agents, 6, vec![]).await.unwrap();
    let mut second = ScriptedAgent::connect(&other.client(), &agents, 6, vec![])
        .await
        .unwrap();
    let got = assignments(&mut [&mut first, &mut second]).await;
    assert_eq!(with_key(&got, "repo-a").len(), 2, "two of the key at once: {got:?}");
    assert_eq!(with_key(&got, "").len(), 4, "unrelated work goes on");
    let stats = other
        .client()
        .get_queue_stats(pb::GetQueueStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.limits.len(), 1);
    assert_eq!((stats.limits[0].max_running, stats.limits[0].held), (2, 2));

    // One of the key ends: one more of it goes out, and no more.
    let (who, done) = with_key(&got, "repo-a")[0].clone();
    let agent = if who == 0 { &mut first } else { &mut second };
    agent.start(&done).await.unwrap();
    agent.complete(&done).await.unwrap();
    let got = assignments(&mut [&mut first, &mut second]).await;
    assert_eq!(with_key(&got, "repo-a").len(), 1, "{got:?}");

    // Raised (through the other replica): two more.
    set_limit(&other.client(), "repo-a", 4, false).await.unwrap();
    let got = assignments(&mut [&mut first, &mut second]).await;
    assert_eq!(with_key(&got, "repo-a").len(), 2, "{got:?}");

    // Setting the same cap again changes nothing and says nothing.
    set_limit(&client, "repo-a", 4, false).await.unwrap();
    // Removed: the rest go out as slots free up.
    set_limit(&client, "repo-a", 0, true).await.unwrap();
    let got = assignments(&mut [&mut first, &mut second]).await;
    assert_eq!(
        with_key(&got, "repo-a").len(),
        3,
        "every task of the key left goes out: {got:?}"
    );
    let events = events::read_all(&infra.nats_url, &infra.topology.stream, 4, WAIT)
        .await
        .unwrap();
    let limits: Vec<Option<f64>> = events
        .iter()
        .filter(|e| e.event_type == "QUEUE_LIMIT_SET")
        .map(|e| {
            let fields = &e.payload.as_ref().unwrap().fields;
            fields.get("max_running").and_then(|v| match v.kind {
                Some(prost_types::value::Kind::NumberValue(n)) => Some(n),
                _ => None,
            })
        })
        .collect();
    assert_eq!(limits, [Some(2.0), Some(4.0), None], "one event per change");
    other.stop().await.unwrap();
    health.stop().await.unwrap();
    tq.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_racing_on_two_replicas_never_exceed_a_concurrency_limit() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const TASKS: usize = 60;
    const LIMIT: usize = 3;
    let Setup {
        infra,
        tq,
        client,
        health,
        agents,
    } = setup().await;
    let other = InProcess::start(infra.task_queue_config()).await.unwrap();
    set_limit(&client, "shared", LIMIT as i32, false).await.unwrap();
    enqueue(
        &client,
        (0..TASKS).map(|i| keyed(&format!("t{i}"), 1, "shared")).collect(),
    )
    .await;
    let out = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    // The most ever out at once; the first tasks wait until the cap was
    // reached, so that it is shown usable in full, not only never passed.
    let (most, reached) = tokio::sync::watch::channel(0usize);
    let most = Arc::new(most);
    let mut workers = Vec::new();
    for i in 0..6 {
        let replica = if i % 2 == 0 { client.clone() } else { other.client() };
        let (out, done, most, mut reached) = (Arc::clone(&out), Arc::clone(&done), Arc::clone(&most), reached.clone());
        let agents = agents.clone();
        workers.push(tokio::spawn(async move {
            let mut agent = ScriptedAgent::connect(&replica, &agents, 1, vec![]).await.unwrap();
            while let Some(a) = agent.next_assignment(Duration::from_secs(2)).await {
                // Counted from delivery to just before completion: never more
                // than the queue itself holds out.
                let now = out.fetch_add(1, Ordering::SeqCst) + 1;
                most.send_modify(|m| *m = (*m).max(now));
                agent.start(&a).await.unwrap();
                tokio::time::timeout(WAIT, reached.wait_for(|m| *m >= LIMIT))
                    .await
                    .expect("the cap is reached")
                    .unwrap();
                out.fetch_sub(1, Ordering::SeqCst);
                agent.complete(&a).await.unwrap();
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), TASKS, "every task ran");
    assert_eq!(*most.borrow(), LIMIT, "the cap, never passed");
    other.stop().await.unwrap();
    health.stop().await.unwrap();
    tq.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stats_stream_sends_the_queue_again_when_it_changes() {
    use futures::StreamExt;
    let s = setup().await;
    let watch = async || {
        s.client
            .clone()
            .watch_queue_stats(pb::WatchQueueStatsRequest {})
            .await
            .unwrap()
            .into_inner()
    };
    async fn next(stats: &mut tonic::Streaming<pb::WatchQueueStatsResponse>) -> pb::GetQueueStatsResponse {
        tokio::time::timeout(WAIT, stats.next())
            .await
            .expect("stats within the wait")
            .expect("the stream goes on")
            .expect("stats")
            .stats
            .unwrap()
    }
    // The statistics change all the time (the oldest task's age), so a
    // message may come from before the change: wait for one that shows it.
    async fn until(
        stats: &mut tonic::Streaming<pb::WatchQueueStatsResponse>,
        what: &str,
        done: impl Fn(&pb::GetQueueStatsResponse) -> bool,
    ) -> pb::GetQueueStatsResponse {
        let change = async {
            loop {
                let now = next(stats).await;
                if done(&now) {
                    return now;
                }
            }
        };
        tokio::time::timeout(WAIT, change)
            .await
            .unwrap_or_else(|_| panic!("{what} within the wait"))
    }
    let pause = async |reason: &str| {
        s.client
            .clone()
            .pause_dispatch(pb::PauseDispatchRequest {
                reason: reason.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    };
    let mut first = watch().await;
    let empty = next(&mut first).await;
    assert_eq!((empty.pending, empty.ready), (0, 0));

    enqueue(&s.client, vec![new_task("a", 2), new_task("b", 2)]).await;
    until(&mut first, "queued", |q| (q.pending, q.ready) == (2, 2)).await;

    // A watcher joining later (one reader serves both) starts from what
    // the queue is now.
    let mut second = watch().await;
    let joined = next(&mut second).await;
    assert_eq!((joined.pending, joined.ready), (2, 2), "{joined:?}");

    pause("lunch").await;
    for stats in [&mut first, &mut second] {
        let paused = until(stats, "paused", |q| !q.pauses.is_empty()).await;
        assert_eq!(paused.pauses[0].reason, "lunch");
    }

    // When every watcher has gone, the next one is served by a new reader.
    drop((first, second));
    s.client
        .clone()
        .resume_dispatch(pb::ResumeDispatchRequest::default())
        .await
        .unwrap();
    let mut third = watch().await;
    let resumed = next(&mut third).await;
    assert!(resumed.pauses.is_empty(), "{resumed:?}");
    assert_eq!(resumed.pending, 2);
    pause("tea").await;
    let paused = until(&mut third, "paused again", |q| !q.pauses.is_empty()).await;
    assert_eq!(paused.pauses[0].reason, "tea");
    drop(third);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_tasks_go_after_their_retention_with_their_ticket_and_dependencies() {
    let infra = Infra::new().await.unwrap();
    let mut config = infra.task_queue_config();
    // Passes every 3 s (a tenth of it).
    config.task_retention_seconds = 30.0;
    let tq = InProcess::start(config).await.unwrap();
    let client = tq.client();
    let ticket = Uuid::now_v7().to_string();
    let with_id = |title: &str| pb::NewTask {
        id: Uuid::now_v7().to_string(),
        ..new_task(title, 1)
    };
    let (lone, young, dep, dependent) = (with_id("lone"), with_id("young"), with_id("dep"), with_id("dependent"));
    let dependent = pb::NewTask {
        depends_on: vec![dep.id.clone()],
        ..dependent
    };
    let in_ticket = |t: pb::NewTask| pb::NewTask {
        ticket_id: ticket.clone(),
        ..t
    };
    let (sibling_done, sibling_open) = (in_ticket(with_id("sibling done")), in_ticket(with_id("sibling open")));
    let all = vec![
        lone.clone(),
        young.clone(),
        dep.clone(),
        dependent.clone(),
        sibling_done.clone(),
        sibling_open.clone(),
    ];
    enqueue(&client, all.clone()).await;
    let pool = infra.db.connect().await.unwrap();
    // Finished an hour ago (or just now, for `young`); the others wait.
    let finish = |ids: Vec<&str>, age: &'static str| {
        let pool = pool.clone();
        let ids: Vec<Uuid> = ids.iter().map(|i| i.parse().unwrap()).collect();
        async move {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE tasks SET status = 'completed', updated_at = now() - interval '{age}' WHERE id = ANY($1)"
            )))
            .bind(ids)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    finish(vec![&lone.id, &dep.id, &sibling_done.id], "1 hour").await;
    finish(vec![&young.id], "0 seconds").await;
    let exists = |id: String| {
        let client = client.clone();
        async move {
            match client.clone().get_task(pb::GetTaskRequest { task_id: id }).await {
                Ok(_) => true,
                Err(s) if s.code() == Code::NotFound => false,
                Err(s) => panic!("GetTask: {s}"),
            }
        }
    };
    const PASSES: Duration = Duration::from_secs(30);
    eventually(PASSES, "the lone task gone", || async {
        (!exists(lone.id.clone()).await).then_some(())
    })
    .await;
    for (t, why) in [
        (&young, "finished within the retention"),
        (&dep, "its dependent is still pending"),
        (&sibling_done, "its ticket has a task still pending"),
    ] {
        assert!(exists(t.id.clone()).await, "{} kept: {why}", t.title);
    }
    finish(vec![&dependent.id, &sibling_open.id], "1 hour").await;
    eventually(PASSES, "the rest of the old tasks gone", || async {
        let mut left = 0;
        for t in [&dep, &dependent, &sibling_done, &sibling_open] {
            left += exists(t.id.clone()).await as usize;
        }
        (left == 0).then_some(())
    })
    .await;
    assert!(exists(young.id.clone()).await);
    assert_eq!(count_rows(&infra, "task_dependencies").await, 0);
    pool.close().await;
    tq.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_autovacuum_leaves_alone_are_vacuumed_by_the_service() {
    let infra = Infra::new().await.unwrap();
    let mut config = infra.task_queue_config();
    config.database.vacuum_interval_seconds = 0.5;
    let pool = infra.db.connect().await.unwrap();
    let tq = InProcess::start(config).await.unwrap();
    // Whatever the server's setting, the table's own says no autovacuum.
    sqlx::query("ALTER TABLE tasks SET (autovacuum_enabled = false)")
        .execute(&pool)
        .await
        .unwrap();
    let vacuums = || async {
        let n: i64 =
            sqlx::query_scalar("SELECT vacuum_count + analyze_count FROM pg_stat_user_tables WHERE relname = 'tasks'")
                .fetch_one(&pool)
                .await
                .unwrap();
        n
    };
    let before = vacuums().await;
    eventually(WAIT, "tasks vacuumed and analyzed by the service", || async {
        (vacuums().await >= before + 2).then_some(())
    })
    .await;
    pool.close().await;
    tq.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}
