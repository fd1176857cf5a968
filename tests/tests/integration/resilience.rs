//! The task queue under replicas, restarts and broker outages, with the
//! services as real processes: no task assigned twice, none lost, and every
//! event in JetStream exactly once.

use std::collections::HashMap;
use std::time::Duration;

use omoi_proto::events::Event;
use omoi_proto::taskqueue::{self as pb};
use omoi_tests::agent::{Ledger, spawn_workers};
use omoi_tests::process::{PrivateNats, PrivatePostgres, Service, free_port};
use omoi_tests::{InProcess, Infra, TaskQueueClient, client, events, eventually, health_client, wait_serving};
use tokio_util::sync::CancellationToken;

const LONG: Duration = Duration::from_secs(120);

async fn enqueue_many(client: &TaskQueueClient, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    let mut c = client.clone();
    for chunk in (0..n).collect::<Vec<_>>().chunks(250) {
        let tasks = chunk
            .iter()
            .map(|i| pb::NewTask {
                title: format!("task {i}"),
                phase: 1 + (*i % 4) as i32,
                priority: (*i % 5) as i32,
                ..Default::default()
            })
            .collect();
        let created = c
            .enqueue_tasks(pb::EnqueueTasksRequest { tasks })
            .await
            .expect("enqueue")
            .into_inner()
            .tasks;
        ids.extend(created.into_iter().map(|t| t.id));
    }
    ids
}

async fn completed_in_db(infra: &Infra) -> (i64, i64) {
    let pool = infra.db.connect().await.unwrap();
    let row: (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'completed'), count(*) FILTER (WHERE status <> 'completed') FROM tasks",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    row
}

/// The tasks not completed yet, by status, attempt and agent: what a
/// failure to finish shows.
async fn unfinished(infra: &Infra) -> String {
    let pool = infra.db.connect().await.unwrap();
    let rows: Vec<(String, i32, Option<uuid::Uuid>, i64)> = sqlx::query_as(
        "SELECT status, attempt, assigned_agent_id, count(*) FROM tasks WHERE status <> 'completed'
         GROUP BY 1, 2, 3 ORDER BY 4 DESC LIMIT 20",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    format!("{rows:?}")
}

/// Waits until the ledger has all `n` completions; fails showing what is
/// left unfinished.
async fn wait_all_completed(infra: &Infra, ledger: &Ledger, n: usize) {
    let deadline = tokio::time::Instant::now() + LONG;
    while ledger.completed() < n {
        if tokio::time::Instant::now() > deadline {
            panic!(
                "{} of {n} tasks completed; unfinished (status, attempt, agent, count): {}",
                ledger.completed(),
                unfinished(infra).await
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A health service and `agents` workers registered with it, taking work
/// from the task queues at `urls`.
async fn workers(
    infra: &Infra,
    urls: Vec<String>,
    agents: usize,
    capacity: i32,
    ledger: &Ledger,
    stop: &CancellationToken,
) -> (InProcess, Vec<tokio::task::JoinHandle<()>>) {
    let health = InProcess::health(infra.health_config()).await.unwrap();
    let handles = spawn_workers(
        urls,
        health_client(&health.url),
        agents,
        capacity,
        ledger.clone(),
        stop.clone(),
    );
    (health, handles)
}

/// The stream's task events, once it holds at least `at_least` events.
async fn task_events(infra: &Infra, at_least: u64) -> Vec<Event> {
    events::read_all(&infra.nats_url, &infra.topology.stream, at_least, LONG)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.entity_type == "task")
        .collect()
}

async fn outbox_backlog(infra: &Infra) -> i64 {
    let pool = infra.db.connect().await.unwrap();
    let n = sqlx::query_scalar("SELECT coalesce(sum(n), 0)::bigint FROM event_batches")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    n
}

/// Every task has exactly one event of each of `types`, and nothing is doubled.
fn assert_exactly_once(events: &[Event], ids: &[String], types: &[&str]) {
    let mut seen = HashMap::new();
    for e in events {
        assert!(
            seen.insert(e.id.clone(), ()).is_none(),
            "event {} published twice",
            e.id
        );
    }
    for t in types {
        let per = events::per_entity(events, t);
        for id in ids {
            assert_eq!(per.get(id).copied().unwrap_or(0), 1, "{t} for task {id}");
        }
        assert_eq!(per.len(), ids.len(), "{t} for unknown tasks");
    }
}

fn spawn_task_queue(infra: &Infra, port: u16) -> Service {
    Service::spawn(
        "omoi-task-queue",
        port,
        &infra.task_queue_env(&format!("127.0.0.1:{port}")),
    )
    .expect("spawn")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_and_eight_agents_run_two_thousand_tasks_exactly_once() {
    const N: usize = 2000;
    let infra = Infra::new().await.unwrap();
    let (pa, pb_) = (free_port(), free_port());
    let a = spawn_task_queue(&infra, pa);
    let b = spawn_task_queue(&infra, pb_);
    wait_serving(&a.url, LONG).await.unwrap();
    wait_serving(&b.url, LONG).await.unwrap();

    let ledger = Ledger::default();
    let stop = CancellationToken::new();
    let (health, workers) = workers(&infra, vec![a.url.clone(), b.url.clone()], 8, 16, &ledger, &stop).await;
    // Enqueue through both replicas.
    let mut ids = enqueue_many(&client(&a.url), N / 2).await;
    ids.extend(enqueue_many(&client(&b.url), N / 2).await);
    eventually(LONG, "all tasks completed", || async {
        (ledger.completed() == N).then_some(())
    })
    .await;
    stop.cancel();
    for w in workers {
        let _ = w.await;
    }
    assert!(ledger.snapshot().values().all(|n| *n == 1), "a task completed twice");
    assert_eq!(completed_in_db(&infra).await, (N as i64, 0));
    let pool = infra.db.connect().await.unwrap();
    let max_attempt: i32 = sqlx::query_scalar("SELECT max(attempt) FROM tasks")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(max_attempt, 1, "a task was assigned more than once");
    pool.close().await;

    // The task events, and each worker's AGENT_REGISTERED.
    let events = task_events(&infra, 4 * N as u64 + 8).await;
    assert_eq!(events.len(), 4 * N);
    assert_exactly_once(
        &events,
        &ids,
        &["TASK_CREATED", "TASK_ASSIGNED", "TASK_STARTED", "TASK_COMPLETED"],
    );
    assert_eq!(a.terminate(LONG).await.unwrap().code(), Some(0));
    assert_eq!(b.terminate(LONG).await.unwrap().code(), Some(0));
    health.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_mid_run_loses_and_doubles_no_event() {
    const N: usize = 600;
    let mut nats = PrivateNats::start().await.unwrap();
    let mut infra = Infra::new().await.unwrap();
    infra.nats_url = nats.url();
    let tq = InProcess::start(infra.task_queue_config()).await.unwrap();
    let ledger = Ledger::default();
    let stop = CancellationToken::new();
    let (health, workers) = workers(&infra, vec![tq.url.clone()], 4, 8, &ledger, &stop).await;
    let mut ids = enqueue_many(&tq.client(), N / 2).await;
    eventually(LONG, "some progress", || async {
        (ledger.completed() >= N / 6).then_some(())
    })
    .await;

    nats.stop().await.unwrap();
    // State changes still commit while NATS is away; their events wait.
    ids.extend(enqueue_many(&tq.client(), N / 2).await);
    let before = ledger.completed();
    eventually(LONG, "progress without NATS", || async {
        (ledger.completed() > before + 50).then_some(())
    })
    .await;
    assert!(outbox_backlog(&infra).await > 0, "events must wait in the outbox");
    eventually(LONG, "NOT_SERVING while NATS is down", || async {
        omoi_tests::wait_serving(&tq.url, Duration::from_millis(200))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    // A 20 s outage: longer than every publish timeout and backoff step.
    tokio::time::sleep(Duration::from_secs(20)).await;
    nats.restart().await.unwrap();
    wait_serving(&tq.url, LONG).await.unwrap();

    eventually(LONG, "all tasks completed", || async {
        (ledger.completed() == N).then_some(())
    })
    .await;
    eventually(LONG, "outbox drained", || async {
        (outbox_backlog(&infra).await == 0).then_some(())
    })
    .await;
    stop.cancel();
    for w in workers {
        let _ = w.await;
    }
    let events = task_events(&infra, 4 * N as u64 + 4).await;
    assert_eq!(events.len(), 4 * N, "every event exactly once");
    assert_exactly_once(
        &events,
        &ids,
        &["TASK_CREATED", "TASK_ASSIGNED", "TASK_STARTED", "TASK_COMPLETED"],
    );
    tq.stop().await.unwrap();
    health.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

/// A relay that published a batch and died before deleting it publishes the
/// batch again when it starts: the stream still stores each event once (its
/// duplicate window knows the ids), and an event new in such a batch is not
/// held back by the copies beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_published_again_after_a_crash_stores_each_event_once() {
    const N: usize = 300;
    let infra = Infra::new().await.unwrap();
    let tq = InProcess::start(infra.task_queue_config()).await.unwrap();
    let pool = infra.db.connect().await.unwrap();
    // Every batch the outbox is given, kept for the test to give it again.
    sqlx::raw_sql(
        "CREATE TABLE kept_batches (seq bigserial PRIMARY KEY, n integer, events json);
         CREATE FUNCTION keep_batch() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO kept_batches (n, events) VALUES (NEW.n, NEW.events); RETURN NEW; END $$;
         CREATE TRIGGER keep_batch AFTER INSERT ON event_batches FOR EACH ROW EXECUTE FUNCTION keep_batch();",
    )
    .execute(&pool)
    .await
    .unwrap();
    let ids = enqueue_many(&tq.client(), N).await;
    let first = task_events(&infra, N as u64).await;
    assert_eq!(first.len(), N);
    eventually(LONG, "outbox drained", || async {
        (outbox_backlog(&infra).await == 0).then_some(())
    })
    .await;
    tq.stop().await.unwrap();

    // As if the relay had died after publishing and before deleting: every
    // batch is back in the outbox, and one of them holds a new event
    // between events already published.
    let fresh = uuid::Uuid::new_v4();
    sqlx::raw_sql(
        "DROP TRIGGER keep_batch ON event_batches;
         INSERT INTO event_batches (n, events) SELECT n, events FROM kept_batches ORDER BY seq;",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO event_batches (n, events)
         SELECT 3, json_build_array(e -> 0, (e::jsonb -> 1) || jsonb_build_object('id', $1::text), e -> 2)
         FROM (SELECT events AS e FROM kept_batches WHERE n >= 3 ORDER BY seq LIMIT 1) b",
    )
    .bind(fresh.to_string())
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(outbox_backlog(&infra).await, N as i64 + 3);

    let again = InProcess::start(infra.task_queue_config()).await.unwrap();
    eventually(LONG, "outbox drained again", || async {
        (outbox_backlog(&infra).await == 0).then_some(())
    })
    .await;
    let events = task_events(&infra, N as u64 + 1).await;
    assert_eq!(events.len(), N + 1, "every event once, and the new one");
    let (new, old): (Vec<Event>, Vec<Event>) = events.into_iter().partition(|e| e.id == fresh.to_string());
    assert_eq!(new.len(), 1, "the new event in a republished batch");
    assert_exactly_once(&old, &ids, &["TASK_CREATED"]);

    again.stop().await.unwrap();
    pool.close().await;
    infra.cleanup().await.unwrap();
}

enum Stop {
    /// SIGTERM: a clean stop that must exit 0 and flush the outbox.
    Term,
    /// SIGKILL: the process dies mid-whatever.
    Kill,
}

/// Runs N tasks through a task-queue process that is stopped mid-run and
/// started again on the same port and database: every task completes exactly
/// once and its events are in JetStream exactly once.
async fn restart_mid_run(how: Stop) {
    const N: usize = 2000;
    let infra = Infra::new().await.unwrap();
    let port = free_port();
    let first = spawn_task_queue(&infra, port);
    wait_serving(&first.url, LONG).await.unwrap();
    let url = first.url.clone();
    let ledger = Ledger::default();
    let stop = CancellationToken::new();
    let (health, workers) = workers(&infra, vec![url.clone()], 4, 8, &ledger, &stop).await;
    let ids = enqueue_many(&client(&url), N).await;
    eventually(LONG, "some progress", || async {
        (ledger.completed() >= N / 4).then_some(())
    })
    .await;
    match how {
        Stop::Term => {
            let status = first.terminate(LONG).await.unwrap();
            assert_eq!(status.code(), Some(0), "clean exit on SIGTERM");
            assert!(ledger.completed() < N, "stopped mid-run");
            assert_eq!(outbox_backlog(&infra).await, 0, "outbox flushed at shutdown");
        }
        Stop::Kill => first.kill9().await.unwrap(),
    }

    let second = spawn_task_queue(&infra, port);
    wait_serving(&second.url, LONG).await.unwrap();
    wait_all_completed(&infra, &ledger, N).await;
    stop.cancel();
    for w in workers {
        let _ = w.await;
    }
    assert!(ledger.snapshot().values().all(|n| *n == 1), "a task completed twice");
    assert_eq!(completed_in_db(&infra).await, (N as i64, 0));
    eventually(LONG, "outbox drained", || async {
        (outbox_backlog(&infra).await == 0).then_some(())
    })
    .await;
    let events = events::read_all(&infra.nats_url, &infra.topology.stream, 2 * N as u64, LONG)
        .await
        .unwrap();
    assert_exactly_once(&events, &ids, &["TASK_CREATED", "TASK_COMPLETED"]);
    second.terminate(LONG).await.unwrap();
    health.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_run_loses_nothing() {
    restart_mid_run(Stop::Term).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_and_restart_completes_every_task_once() {
    restart_mid_run(Stop::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_crash_mid_run_loses_no_acknowledged_work() {
    const N: usize = 600;
    let pg = PrivatePostgres::start().unwrap();
    let mut infra = Infra::new().await.unwrap();
    // This test's database lives on the private server.
    infra.db.url = pg.url("omoi");
    let tq = InProcess::start(infra.task_queue_config()).await.unwrap();
    let ledger = Ledger::default();
    let stop = CancellationToken::new();
    let ids = enqueue_many(&tq.client(), N).await;
    let (health, workers) = workers(&infra, vec![tq.url.clone()], 4, 8, &ledger, &stop).await;
    eventually(LONG, "some progress", || async {
        (ledger.completed() >= N / 4).then_some(())
    })
    .await;

    pg.crash().unwrap();
    let acknowledged_before = ledger.snapshot();
    eventually(LONG, "NOT_SERVING while the database is down", || async {
        omoi_tests::wait_serving(&tq.url, Duration::from_millis(200))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.up().unwrap();
    wait_serving(&tq.url, LONG).await.unwrap();

    eventually(LONG, "all tasks completed", || async {
        (ledger.completed() == N).then_some(())
    })
    .await;
    stop.cancel();
    for w in workers {
        let _ = w.await;
    }
    assert!(ledger.snapshot().values().all(|n| *n == 1), "a task completed twice");
    let pool = sqlx::PgPool::connect(&infra.db.url).await.unwrap();
    let completed: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM tasks WHERE status = 'completed'")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(completed.len(), N);
    for id in acknowledged_before.keys() {
        assert!(
            completed.contains(&id.parse().unwrap()),
            "acknowledged completion of {id} lost"
        );
    }
    pool.close().await;
    eventually(LONG, "events published", || async {
        let events = events::read_all(
            &infra.nats_url,
            &infra.topology.stream,
            2 * N as u64,
            Duration::from_secs(1),
        )
        .await
        .ok()?;
        (events::per_entity(&events, "TASK_COMPLETED").len() == N).then_some(events)
    })
    .await;
    let events = events::read_all(&infra.nats_url, &infra.topology.stream, 4 * N as u64, LONG)
        .await
        .unwrap();
    assert_exactly_once(&events, &ids, &["TASK_CREATED", "TASK_COMPLETED"]);
    tq.stop().await.unwrap();
    // The stream, and the unused database made on the shared server; the
    // test's own database goes with the private server.
    health.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}
