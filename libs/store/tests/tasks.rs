//! The store against a real PostgreSQL: every write persists what the
//! domain decided, with its events in the outbox in the same transaction.
//! Each test has a database of its own (`OMOI_TEST_DATABASE_URL` names the
//! server, default the local one).

use std::time::Duration;

use chrono::Utc;
use omoi_domain::event::{Event, EventType};
use omoi_domain::routing::Labels;
use omoi_domain::rules;
use omoi_domain::rules::Failure;
use omoi_domain::validate::NewTask;
use omoi_domain::{DomainError, Envelope, ErrorClass, GitChange, Phase, TaskStatus, Usage};
use omoi_store::tasks::{Report, Slot};
use omoi_store::{Store, StoreError};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

/// A migrated database of this test's own, dropped when the test passes.
struct Db {
    name: String,
    admin: String,
    store: Store,
}

/// The database `name` on the server `admin` names.
fn database_url(admin: &str, name: &str) -> String {
    let base = admin.rsplit_once('/').map_or(admin, |(b, _)| b);
    format!("{base}/{name}")
}

impl Db {
    async fn new() -> Db {
        let admin = std::env::var("OMOI_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let name = format!("omoi_s_{}", Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&admin).await.expect("PostgreSQL is reachable");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        let store = Store::connect_lazy(&database_url(&admin, &name), 4).unwrap();
        store.migrate().await.unwrap();
        Db { name, admin, store }
    }

    /// The URL of this test's database.
    fn store_url(&self) -> String {
        database_url(&self.admin, &self.name)
    }

    async fn drop(self) {
        self.store.close().await;
        let mut conn = PgConnection::connect(&self.admin).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {} WITH (FORCE)", self.name)))
            .execute(&mut conn)
            .await
            .unwrap();
    }

    /// The outbox, oldest first, read back as the domain's events.
    async fn events(&self) -> Vec<(Uuid, Event)> {
        let events = self.store.outbox_events().await.unwrap();
        events
            .into_iter()
            .map(|e| {
                let ty =
                    EventType::parse(&e.event_type).unwrap_or_else(|| panic!("unknown event type {}", e.event_type));
                (e.entity_id, Event::parse(ty, e.payload).unwrap())
            })
            .collect()
    }

    async fn event_types(&self) -> Vec<EventType> {
        self.events().await.into_iter().map(|(_, e)| e.event_type()).collect()
    }

    async fn clear_events(&self) {
        sqlx::query("DELETE FROM event_batches")
            .execute(self.store.pool())
            .await
            .unwrap();
    }

    async fn count_tasks(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM tasks")
            .fetch_one(self.store.pool())
            .await
            .unwrap()
    }
}

fn new_task(title: &str, priority: i32, depends_on: &[Uuid]) -> NewTask {
    NewTask {
        id: Uuid::now_v7(),
        ticket_id: None,
        title: title.to_owned(),
        description: String::new(),
        phase: Phase::Implementation,
        priority,
        depends_on: depends_on.to_vec(),
        max_retries: 3,
        timeout_seconds: 0,
        concurrency_key: None,
        session: None,
        requires: Labels::new(),
        candidate: None,
        lands_candidate: false,
    }
}

fn slot(agent_id: Uuid) -> Slot {
    Slot {
        agent_id,
        session: Uuid::now_v7(),
    }
}

fn report(task_id: Uuid, attempt: i32) -> Report {
    Report {
        task_id,
        attempt,
        result: None,
        usage: None,
        git: None,
        trace: None,
    }
}

fn failure(attempt: i32, message: &str) -> Failure {
    Failure {
        attempt,
        message: message.to_owned(),
        ..Default::default()
    }
}

/// Enqueues, assigns and starts one task; returns it running.
async fn running(db: &Db, task: NewTask, agent: Uuid) -> omoi_domain::Task {
    db.store.enqueue(&[task]).await.unwrap();
    let assigned = db
        .store
        .assign(None, &Labels::new(), &[slot(agent)], Utc::now(), true)
        .await
        .unwrap();
    assert_eq!(assigned.len(), 1);
    let started = db.store.start_batch(&[report(assigned[0].id, 1)]).await.unwrap();
    started.into_iter().next().unwrap().unwrap()
}

#[tokio::test]
async fn enqueue_records_each_task_with_its_event_or_nothing() {
    let db = Db::new().await;
    let committed = db.store.committed();
    let first = new_task("first", 1, &[]);
    let second = new_task("second", 1, &[first.id]);
    let stored = db.store.enqueue(&[first.clone(), second.clone()]).await.unwrap();
    // The relay learns of the write from the store itself.
    tokio::time::timeout(Duration::from_secs(5), committed.notified())
        .await
        .expect("a committed write wakes the outbox relay");
    assert_eq!(stored.iter().map(|t| t.id).collect::<Vec<_>>(), [first.id, second.id]);
    assert_eq!((stored[0].unmet_deps, stored[1].unmet_deps), (0, 1));
    let events = db.events().await;
    assert_eq!(events.len(), 2);
    let Event::TaskCreated(created) = &events[1].1 else {
        panic!("{events:?}")
    };
    assert_eq!(events[1].0, second.id);
    assert_eq!(created.depends_on, [first.id]);
    assert_eq!(created.unmet_dependencies, 1);

    // The same id again: refused, nothing written.
    let err = db
        .store
        .enqueue(&[new_task("x", 1, &[]), first.clone()])
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::AlreadyExists(ref m) if m.starts_with("tasks[1].id")),
        "{err}"
    );
    assert_eq!(db.count_tasks().await, 2);
    assert_eq!(db.events().await.len(), 2);
    db.drop().await;
}

#[tokio::test]
async fn claims_go_by_priority_then_age_each_with_an_assigned_event() {
    let db = Db::new().await;
    let low = new_task("low", 1, &[]);
    let high = new_task("high", 5, &[]);
    let blocked = new_task("blocked", 9, &[low.id]);
    db.store.enqueue(&[low.clone(), high.clone(), blocked]).await.unwrap();
    db.clear_events().await;
    let agent = Uuid::now_v7();
    let got = db
        .store
        .assign(
            None,
            &Labels::new(),
            &[slot(agent), slot(agent), slot(agent)],
            Utc::now(),
            true,
        )
        .await
        .unwrap();
    assert_eq!(got.iter().map(|t| t.id).collect::<Vec<_>>(), [high.id, low.id]);
    assert!(got.iter().all(|t| t.status == TaskStatus::Assigned && t.attempt == 1));
    let events = db.events().await;
    assert_eq!(events.len(), 2);
    for ((id, e), t) in events.iter().zip(&got) {
        assert_eq!(*id, t.id);
        assert_eq!(e.agent_id(), Some(agent));
    }
    // Other phases are not handed out.
    db.store.enqueue(&[new_task("more", 1, &[])]).await.unwrap();
    let none = db
        .store
        .assign(
            Some(&[Phase::Refactoring]),
            &Labels::new(),
            &[slot(agent)],
            Utc::now(),
            true,
        )
        .await
        .unwrap();
    assert!(none.is_empty());
    db.drop().await;
}

/// The claim's statement differs by how many slots it fills (a constant
/// LIMIT per power of two, the parameter above 512): whatever the size, it
/// hands out exactly that many of the best ready tasks, and the extra rows
/// its phase heads looked at are free again for the next claim.
#[tokio::test]
async fn claims_of_every_size_hand_out_exactly_their_slots_best_first() {
    let db = Db::new().await;
    let tasks: Vec<NewTask> = (0..1200)
        .map(|i| NewTask {
            phase: Phase::ALL[i % 4],
            ..new_task(&format!("t{i}"), (i % 7) as i32, &[])
        })
        .collect();
    db.store.enqueue(&tasks).await.unwrap();
    // Dispatch order: highest priority, then oldest.
    let mut order: Vec<(i32, usize)> = tasks.iter().enumerate().map(|(i, t)| (-t.priority, i)).collect();
    order.sort();
    let mut expected = order.into_iter().map(|(_, i)| tasks[i].id);
    let agent = Uuid::now_v7();
    for n in [1, 3, 5, 8, 17, 100, 513, 553] {
        let slots: Vec<Slot> = (0..n).map(|_| slot(agent)).collect();
        let got = db
            .store
            .assign(None, &Labels::new(), &slots, Utc::now(), false)
            .await
            .unwrap();
        let want: Vec<Uuid> = expected.by_ref().take(n).collect();
        assert_eq!(got.len(), n, "a claim of {n} slots");
        assert_eq!(
            got.iter().map(|t| t.id).collect::<Vec<_>>(),
            want,
            "a claim of {n} slots"
        );
    }
    // 1,200 − 1,200: nothing left, and nothing handed out twice.
    let more = db
        .store
        .assign(None, &Labels::new(), &[slot(agent)], Utc::now(), false)
        .await
        .unwrap();
    assert!(more.is_empty());
    db.drop().await;
}

/// On a deep queue the claim is not planned again on every call: its
/// prepared statement goes over to the generic plan after PostgreSQL's five
/// custom ones (`pg_prepared_statements` counts both, per connection).
#[tokio::test]
async fn the_claim_keeps_its_generic_plan_on_a_deep_queue() {
    let db = Db::new().await;
    // A quarter of them require labels, some of which no claim below carries.
    sqlx::query(
        "INSERT INTO requirement_sets (id, requires)
         VALUES (1, '{\"runner\": \"codex\"}'), (2, '{\"runner\": \"gemini\"}')",
    )
    .execute(db.store.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO tasks (id, title, phase, priority, status, max_retries, requirement, requires)
         SELECT gen_random_uuid(), 'deep', 1 + i % 4, i % 10, 'pending', 3, s.id,
                CASE WHEN s.id <> 0 THEN s.requires END
         FROM generate_series(1, 200000) i
         JOIN requirement_sets s ON s.id = CASE i % 8 WHEN 0 THEN 1 WHEN 1 THEN 2 ELSE 0 END",
    )
    .execute(db.store.pool())
    .await
    .unwrap();
    sqlx::query("ANALYZE tasks").execute(db.store.pool()).await.unwrap();
    let url = db.store_url();
    let one = Store::connect_lazy(&url, 1).unwrap();
    let agent = Uuid::now_v7();
    // Claims of one slot for agents of every phase, of two for agents of
    // three phases (labelled codex or not): two statements.
    let some = [Phase::Initial, Phase::Implementation, Phase::Integration];
    let codex = labels(&[("runner", "codex")]);
    for (i, (n, phases)) in [(1, None), (2, Some(&some[..]))].repeat(7).into_iter().enumerate() {
        let slots: Vec<Slot> = (0..n).map(|_| slot(agent)).collect();
        let labels = if i % 3 == 0 { &codex } else { &Labels::new() };
        let got = one.assign(phases, labels, &slots, Utc::now(), false).await.unwrap();
        assert_eq!(got.len(), n);
        assert!(got.iter().all(|t| t.requires.is_empty() || t.requires == *labels));
    }
    let plans: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements
         WHERE statement LIKE 'WITH %picked AS MATERIALIZED%' ORDER BY statement",
    )
    .fetch_all(one.pool())
    .await
    .unwrap();
    // Each ran seven times: five custom plans, then the generic one kept.
    assert_eq!(plans.len(), 2, "{plans:?}");
    for (generic, custom) in plans {
        assert_eq!(custom, 5, "custom plans");
        assert_eq!(generic, 2, "generic plans");
    }
    one.close().await;
    db.drop().await;
}

#[tokio::test]
async fn connections_never_compile_statements_to_machine_code_nor_run_parallel_workers() {
    let db = Db::new().await;
    let jit: String = sqlx::query_scalar("SHOW jit").fetch_one(db.store.pool()).await.unwrap();
    assert_eq!(jit, "off");
    let workers: String = sqlx::query_scalar("SHOW max_parallel_workers_per_gather")
        .fetch_one(db.store.pool())
        .await
        .unwrap();
    assert_eq!(workers, "0");
    // Acknowledged work waits for the WAL flush.
    let sync: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(db.store.pool())
        .await
        .unwrap();
    assert_eq!(sync, "on");
    db.drop().await;
}

/// Claims, starts and completions write their events in the statement
/// that changes the tasks: what the outbox holds must be exactly what the
/// domain makes of the changed tasks (`rules::assigned`, `started`,
/// `completed`), with the right ids, order and trace contexts.
#[tokio::test]
async fn batch_statements_write_the_events_the_domain_makes() {
    let db = Db::new().await;
    let committed = db.store.committed();
    let ticket = Uuid::now_v7();
    let tasks: Vec<NewTask> = (0..3)
        .map(|i| NewTask {
            ticket_id: (i != 1).then_some(ticket),
            ..new_task(&format!("t{i}"), 3 - i, &[])
        })
        .collect();
    // Enqueued without dependencies: one statement, committed on its own.
    let stored = db.store.enqueue(&tasks).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), committed.notified())
        .await
        .expect("an enqueue wakes the outbox relay");
    let created: Vec<Envelope> = stored.iter().map(rules::created).collect();
    assert_outbox(&db, &created, &[None; 3]).await;
    // With dependencies, stored and in the batch (a transaction): the
    // unmet ones counted, the edges in the order a read gives them.
    let x = new_task("x", 1, &[stored[2].id, stored[0].id]);
    let y = new_task("y", 1, &[x.id]);
    let waiting = db.store.enqueue(&[x, y]).await.unwrap();
    assert_eq!(waiting.iter().map(|t| t.unmet_deps).collect::<Vec<_>>(), [2, 1]);
    let created: Vec<Envelope> = waiting.iter().map(rules::created).collect();
    assert_outbox(&db, &created, &[None; 2]).await;
    // The enqueue's trace context, as a traced request leaves it.
    let enqueue_trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    sqlx::query("UPDATE tasks SET trace_context = $1")
        .bind(enqueue_trace)
        .execute(db.store.pool())
        .await
        .unwrap();
    db.clear_events().await;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());

    // Claimed without limits: one statement, committed on its own.
    let claimed = db
        .store
        .assign(
            None,
            &Labels::new(),
            &[slot(a), slot(b), slot(a), slot(b)],
            Utc::now(),
            false,
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), committed.notified())
        .await
        .expect("a claim wakes the outbox relay");
    assert_eq!(claimed.len(), 3);
    let assigned: Vec<Envelope> = claimed.iter().map(rules::assigned).collect();
    assert_outbox(&db, &assigned, &[Some(enqueue_trace); 3]).await;

    // Started, one report with a trace of its own; a report that does not
    // apply makes no event.
    let report_trace = "00-1bf7651916cd43dd8448eb211c80319c-c7ad6b7169203331-01";
    let reports = [
        Report {
            trace: Some(report_trace.to_owned()),
            ..report(claimed[2].id, 1)
        },
        report(Uuid::now_v7(), 1),
        report(claimed[0].id, 1),
        report(claimed[1].id, 1),
    ];
    let started = db.store.start_batch(&reports).await.unwrap();
    assert!(started[1].is_err());
    let started: Vec<_> = started.into_iter().filter_map(|r| r.ok()).collect();
    let expected: Vec<Envelope> = started.iter().map(rules::started).collect();
    assert_outbox(
        &db,
        &expected,
        &[Some(report_trace), Some(enqueue_trace), Some(enqueue_trace)],
    )
    .await;

    // Completed with a result, usage (an empty one tells nothing) and a git
    // change (the event leaves out its patch).
    let git = GitChange {
        branch: "omoi/t".into(),
        base_commit: "a".repeat(40),
        commit: "b".repeat(40),
        files_changed: 2,
        insertions: 10,
        deletions: 1,
        patch: "diff --git a/x b/x".into(),
        patch_truncated: true,
        branch_diff: Some(omoi_domain::git::BranchDiff {
            merge_base: "c".repeat(40),
            files_changed: 3,
            insertions: 12,
            deletions: 1,
            patch: "diff --git a/y b/y".into(),
            patch_truncated: false,
        }),
    };
    let usage = Usage {
        input_tokens: 12,
        cost_usd: 0.5,
        model: "m".into(),
        turns: 1,
        ..Default::default()
    };
    let reports = [
        Report {
            result: Some(serde_json::json!({"summary": "done", "n": [1, 2.5, null]})),
            usage: Some(usage),
            git: Some(git),
            trace: Some(report_trace.to_owned()),
            ..report(claimed[1].id, 1)
        },
        Report {
            usage: Some(Usage::default()),
            ..report(claimed[0].id, 1)
        },
    ];
    let done = db.store.complete_batch(&reports).await.unwrap().results;
    let expected: Vec<Envelope> = done
        .iter()
        .zip(&reports)
        .map(|(t, r)| rules::completed(t.as_ref().unwrap(), r.usage.clone()))
        .collect();
    assert_outbox(&db, &expected, &[Some(report_trace), Some(enqueue_trace)]).await;
    db.drop().await;
}

/// The outbox holds exactly `expected` (then is emptied): same entities,
/// tickets, types and payloads, in order, with fresh distinct ids and the
/// given trace contexts.
async fn assert_outbox(db: &Db, expected: &[Envelope], traces: &[Option<&str>]) {
    let stored = db.store.outbox_events().await.unwrap();
    let got: Vec<_> = stored
        .iter()
        .map(|e| {
            (
                e.entity_type.as_str(),
                e.entity_id,
                e.ticket_id,
                e.event_type.as_str(),
                e.payload.clone(),
                e.trace_context.as_deref(),
            )
        })
        .collect();
    let want: Vec<_> = expected
        .iter()
        .zip(traces)
        .map(|(e, trace)| {
            (
                e.entity().as_str(),
                e.entity_id,
                e.ticket_id,
                e.event.event_type().as_str(),
                e.event.payload(),
                *trace,
            )
        })
        .collect();
    assert_eq!(got, want);
    let mut ids: Vec<Uuid> = stored.iter().map(|e| e.id).collect();
    assert!(ids.iter().all(|id| id.get_version_num() == 7), "{ids:?}");
    ids.dedup();
    assert_eq!(ids.len(), stored.len(), "event ids are distinct");
    let age = Utc::now() - stored[0].occurred_at;
    assert!(age.num_seconds().abs() < 60, "occurred_at is now: {age}");
    db.clear_events().await;
}

#[tokio::test]
async fn reports_apply_once_and_completion_releases_dependents() {
    let db = Db::new().await;
    let agent = Uuid::now_v7();
    let first = new_task("first", 1, &[]);
    let second = new_task("second", 1, &[first.id]);
    db.store.enqueue(std::slice::from_ref(&second)).await.unwrap_err();
    db.store.enqueue(&[first.clone(), second.clone()]).await.unwrap();
    let t = db
        .store
        .assign(None, &Labels::new(), &[slot(agent)], Utc::now(), true)
        .await
        .unwrap();
    assert_eq!(t.len(), 1, "the dependent waits");

    // Wrong attempt, and completing before starting: refused.
    let stale = db.store.start_batch(&[report(first.id, 2)]).await.unwrap();
    assert!(matches!(
        stale[0],
        Err(StoreError::Domain(omoi_domain::DomainError::StaleAttempt { .. }))
    ));
    let early = db.store.complete_batch(&[report(first.id, 1)]).await.unwrap().results;
    assert!(matches!(
        early[0],
        Err(StoreError::Domain(omoi_domain::DomainError::IllegalTransition { .. }))
    ));

    // A start retried after its answer was lost succeeds again, once.
    db.clear_events().await;
    for _ in 0..2 {
        let started = db.store.start_batch(&[report(first.id, 1)]).await.unwrap();
        assert_eq!(started[0].as_ref().unwrap().status, TaskStatus::Running);
    }
    let done = Report {
        result: Some(serde_json::json!({"summary": "ok"})),
        ..report(first.id, 1)
    };
    let completed = db.store.complete_batch(&[done]).await.unwrap();
    assert_eq!(completed.released, 1, "the dependent lost its one unmet dependency");
    let completed = completed.results;
    assert_eq!(completed[0].as_ref().unwrap().status, TaskStatus::Completed);
    let events = db.events().await;
    assert_eq!(
        events.iter().map(|(_, e)| e.event_type()).collect::<Vec<_>>(),
        [EventType::TaskStarted, EventType::TaskCompleted]
    );
    let Event::TaskCompleted(c) = &events[1].1 else {
        panic!()
    };
    assert_eq!(c.result, Some(serde_json::json!({"summary": "ok"})));
    assert_eq!(db.store.get(second.id).await.unwrap().unmet_deps, 0);
    let next = db
        .store
        .assign(None, &Labels::new(), &[slot(agent)], Utc::now(), true)
        .await
        .unwrap();
    assert_eq!(next[0].id, second.id);
    db.drop().await;
}

/// A completion of a task nothing depended on is one statement; a
/// dependent added while that statement waits for the task's row must
/// still be released. The edge here is inserted bare, as any writer of
/// edges might (the table's trigger marks the dependency).
#[tokio::test]
async fn a_dependent_added_while_its_dependency_completes_is_released() {
    let db = Db::new().await;
    let first = running(&db, new_task("first", 1, &[]), Uuid::now_v7()).await;
    let second = Uuid::now_v7();
    let mut adding = db.store.pool().begin().await.unwrap();
    sqlx::query(
        "INSERT INTO tasks (id, title, description, phase, priority, status, unmet_deps, max_retries)
         VALUES ($1, 'second', '', 1, 1, 'pending', 1, 3)",
    )
    .bind(second)
    .execute(&mut *adding)
    .await
    .unwrap();
    sqlx::query("INSERT INTO task_dependencies (task_id, depends_on) VALUES ($1, $2)")
        .bind(second)
        .bind(first.id)
        .execute(&mut *adding)
        .await
        .unwrap();
    let store = db.store.clone();
    let completing = tokio::spawn(async move { store.complete_batch(&[report(first.id, 1)]).await });
    // The completion waits for the row the uncommitted writer holds.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(db.store.pool())
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(!completing.is_finished(), "the completion did not wait for the row");
        assert!(std::time::Instant::now() < deadline, "the completion never waited");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    adding.commit().await.unwrap();
    let done = completing.await.unwrap().unwrap();
    assert_eq!(done.results[0].as_ref().unwrap().status, TaskStatus::Completed);
    assert_eq!(done.released, 1);
    assert_eq!(
        db.store.get(second).await.unwrap().unmet_deps,
        0,
        "the dependent waits for nothing"
    );
    db.drop().await;
}

/// Enqueues of dependents race the completions of their dependencies
/// (several at once on each): every enqueue and completion succeeds, and
/// no dependent is left waiting for a completed task.
#[tokio::test]
async fn dependents_enqueued_while_their_dependencies_complete_are_never_stranded() {
    let db = Db::new().await;
    let agent = Uuid::now_v7();
    let mut firsts = Vec::new();
    for i in 0..12 {
        firsts.push(running(&db, new_task(&format!("first {i}"), 1, &[]), agent).await);
    }
    let mut work = tokio::task::JoinSet::new();
    let mut dependents = Vec::new();
    for first in &firsts {
        for j in 0..3 {
            let task = new_task(&format!("after {j}"), 1, &[first.id]);
            dependents.push(task.id);
            let store = db.store.clone();
            work.spawn(async move { store.enqueue(&[task]).await.map(|_| ()) });
        }
        let (store, id) = (db.store.clone(), first.id);
        work.spawn(async move {
            let done = store.complete_batch(&[report(id, 1)]).await?;
            done.results.into_iter().next().unwrap().map(|_| ())
        });
    }
    while let Some(outcome) = work.join_next().await {
        outcome.unwrap().unwrap();
    }
    for id in dependents {
        assert_eq!(db.store.get(id).await.unwrap().unmet_deps, 0, "dependent {id} stranded");
    }
    db.drop().await;
}

#[tokio::test]
async fn a_retryable_failure_waits_its_backoff() {
    let db = Db::new().await;
    let agent = Uuid::now_v7();
    let task = running(&db, new_task("t", 1, &[]), agent).await;
    db.clear_events().await;
    let before = Utc::now();
    let outcome = db.store.fail(task.id, &failure(1, "connection reset")).await.unwrap();
    assert_eq!(outcome.task.status, TaskStatus::Pending);
    assert_eq!(outcome.task.retry_count, 1);
    assert_eq!(outcome.task.assigned_agent_id, None);
    assert_eq!(outcome.task.error_class, Some(ErrorClass::Retryable));
    assert!(outcome.revoked.is_none(), "the reporter is the holder");
    let (low, high) = omoi_domain::backoff::bounds(0);
    let wait = (outcome.task.next_attempt_at - before).to_std().unwrap();
    assert!(
        wait + Duration::from_millis(50) >= low && wait <= high + Duration::from_secs(1),
        "{wait:?}"
    );
    let events = db.events().await;
    let Event::TaskRetried(r) = &events[0].1 else {
        panic!("{events:?}")
    };
    assert_eq!((r.retry_count, r.max_retries, r.agent_id), (1, 3, Some(agent)));
    // Not ready before its time.
    assert!(
        db.store
            .assign(None, &Labels::new(), &[slot(agent)], Utc::now(), true)
            .await
            .unwrap()
            .is_empty()
    );
    // A report of the old attempt changes nothing.
    assert!(db.store.fail(task.id, &failure(1, "again")).await.is_err());
    assert_eq!(db.events().await.len(), 1);
    db.drop().await;
}

#[tokio::test]
async fn usage_adds_up_over_attempts_and_each_event_tells_its_own() {
    let db = Db::new().await;
    let agent = Uuid::now_v7();
    let task = running(&db, new_task("t", 1, &[]), agent).await;
    assert_eq!(task.usage, None);
    let first = Usage {
        input_tokens: 100,
        output_tokens: 10,
        cost_usd: 0.25,
        model: "claude-sonnet-4-5".into(),
        turns: 2,
        ..Default::default()
    };
    let second = Usage {
        input_tokens: 50,
        cache_read_tokens: 7,
        cost_usd: 0.5,
        cost_estimated: true,
        model: "gpt-5-codex".into(),
        turns: 1,
        ..Default::default()
    };
    let report_first = Failure {
        usage: Some(first.clone()),
        ..failure(1, "connection reset")
    };
    let retried = db.store.fail(task.id, &report_first).await.unwrap();
    assert_eq!(retried.task.usage.as_ref(), Some(&first));
    // Due now rather than after its backoff.
    sqlx::query("UPDATE tasks SET next_attempt_at = now()")
        .execute(db.store.pool())
        .await
        .unwrap();
    let again = db
        .store
        .assign(None, &Labels::new(), &[slot(agent)], Utc::now(), true)
        .await
        .unwrap();
    db.store.start_batch(&[report(again[0].id, 2)]).await.unwrap();
    let done = Report {
        usage: Some(second.clone()),
        ..report(task.id, 2)
    };
    let completed = db
        .store
        .complete_batch(&[done])
        .await
        .unwrap()
        .results
        .remove(0)
        .unwrap();
    let sum = completed.usage.expect("the sum is kept");
    assert_eq!(
        (sum.input_tokens, sum.output_tokens, sum.cache_read_tokens),
        (150, 10, 7)
    );
    assert!((sum.cost_usd - 0.75).abs() < 1e-9);
    assert!(sum.cost_estimated, "part of it was estimated");
    assert_eq!(sum.model, "claude-sonnet-4-5, gpt-5-codex");
    assert_eq!(sum.turns, 3);
    assert_eq!(db.store.get(task.id).await.unwrap().usage, Some(sum));
    let reported: Vec<(EventType, Option<Usage>)> = db
        .events()
        .await
        .into_iter()
        .map(|(_, e)| (e.event_type(), e.attempt_usage().cloned()))
        .filter(|(_, u)| u.is_some())
        .collect();
    assert_eq!(
        reported,
        [
            (EventType::TaskRetried, Some(first)),
            (EventType::TaskCompleted, Some(second))
        ]
    );
    db.drop().await;
}

#[tokio::test]
async fn a_candidates_end_whatever_it_is_releases_the_task_choosing_among_them() {
    let db = Db::new().await;
    let agent = Uuid::now_v7();
    let chooser_id = Uuid::now_v7();
    let candidate = |n: i32| NewTask {
        candidate: Some((chooser_id, n)),
        ..new_task(&format!("candidate {n}"), 1, &[])
    };
    let (one, two) = (candidate(1), candidate(2));
    let chooser = NewTask {
        id: chooser_id,
        ..new_task("choose", 1, &[one.id, two.id])
    };
    let after = new_task("after", 1, &[chooser_id]);
    let stored = db
        .store
        .enqueue(&[one.clone(), two.clone(), chooser.clone(), after.clone()])
        .await
        .unwrap();
    assert_eq!(stored[1].candidate, Some((chooser_id, 2)));
    let got = db
        .store
        .assign(None, &Labels::new(), &[slot(agent), slot(agent)], Utc::now(), true)
        .await
        .unwrap();
    assert_eq!(got.len(), 2, "the candidates run side by side");
    db.store
        .start_batch(&[report(one.id, 1), report(two.id, 1)])
        .await
        .unwrap();
    // One fails for good: the choice is not cancelled, it waits for the other.
    let failed = db.store.fail(one.id, &failure(1, "permission denied")).await.unwrap();
    assert!(failed.cancelled_dependents.is_empty());
    let waiting = db.store.get(chooser_id).await.unwrap();
    assert_eq!((waiting.status, waiting.unmet_deps), (TaskStatus::Pending, 1));
    db.store.complete_batch(&[report(two.id, 1)]).await.unwrap();
    let ready = db.store.get(chooser_id).await.unwrap();
    assert_eq!((ready.status, ready.unmet_deps), (TaskStatus::Pending, 0));
    // The choosing task's own failure cancels what comes after it, as any.
    let t = db
        .store
        .assign(None, &Labels::new(), &[slot(agent)], Utc::now(), true)
        .await
        .unwrap();
    assert_eq!(t[0].id, chooser_id);
    db.store.start_batch(&[report(chooser_id, 1)]).await.unwrap();
    let gave_up = db
        .store
        .fail(chooser_id, &failure(1, "permission denied"))
        .await
        .unwrap();
    assert_eq!(gave_up.cancelled_dependents, [after.id]);

    // Going round again, as RetryTicket does it (in plan order): the failed
    // candidate first, then the choosing task, which its failed candidate
    // does not keep from going round and which waits for that candidate
    // again instead of choosing among the others at once.
    db.store.retry(one.id, "again", false).await.unwrap();
    let again = db.store.retry(chooser_id, "again", false).await.unwrap();
    assert_eq!(again.restored, [after.id]);
    let waiting = db.store.get(chooser_id).await.unwrap();
    assert_eq!((waiting.status, waiting.unmet_deps), (TaskStatus::Pending, 1));
    let t = db
        .store
        .assign(None, &Labels::new(), &[slot(agent), slot(agent)], Utc::now(), true)
        .await
        .unwrap();
    assert_eq!(
        t.iter().map(|t| t.id).collect::<Vec<_>>(),
        [one.id],
        "only the candidate is ready"
    );
    db.store.start_batch(&[report(one.id, 2)]).await.unwrap();
    db.store.complete_batch(&[report(one.id, 2)]).await.unwrap();
    assert_eq!(db.store.get(chooser_id).await.unwrap().unmet_deps, 0);
    db.drop().await;
}

#[tokio::test]
async fn a_permanent_failure_cancels_its_dependents_transitively() {
    let db = Db::new().await;
    let agent = Uuid::now_v7();
    let root = new_task("root", 1, &[]);
    let child = new_task("child", 1, &[root.id]);
    let grandchild = new_task("grandchild", 1, &[child.id]);
    db.store
        .enqueue(&[root.clone(), child.clone(), grandchild.clone()])
        .await
        .unwrap();
    let t = db
        .store
        .assign(None, &Labels::new(), &[slot(agent)], Utc::now(), true)
        .await
        .unwrap();
    db.store.start_batch(&[report(t[0].id, 1)]).await.unwrap();
    db.clear_events().await;
    let outcome = db.store.fail(root.id, &failure(1, "permission denied")).await.unwrap();
    assert_eq!(outcome.task.status, TaskStatus::Failed);
    assert_eq!(outcome.cancelled_dependents.len(), 2);
    for id in [child.id, grandchild.id] {
        let t = db.store.get(id).await.unwrap();
        assert_eq!(t.status, TaskStatus::Cancelled);
        assert!(t.error_message.unwrap().contains("failed: permission denied"));
    }
    let events = db.events().await;
    assert_eq!(
        events.iter().map(|(_, e)| e.event_type()).collect::<Vec<_>>(),
        [
            EventType::TaskFailed,
            EventType::TaskCancelled,
            EventType::TaskCancelled
        ]
    );
    let Event::TaskCancelled(c) = &events[1].1 else {
        panic!()
    };
    assert_eq!(c.cause_task_id, Some(root.id));
    assert_eq!(c.previous_status, TaskStatus::Pending);
    // A dependency that will never complete refuses new dependents.
    let late = db.store.enqueue(&[new_task("late", 1, &[root.id])]).await.unwrap_err();
    assert!(
        matches!(late, StoreError::Domain(DomainError::DependencyEnded { ref field, .. }) if field == "tasks[0].depends_on[0]"),
        "{late}"
    );
    db.drop().await;
}

#[tokio::test]
async fn cancelling_a_running_task_revokes_its_attempt() {
    let db = Db::new().await;
    let agent = Uuid::now_v7();
    let task = running(&db, new_task("t", 1, &[]), agent).await;
    let outcome = db.store.cancel(task.id, "no longer needed").await.unwrap();
    assert_eq!(outcome.task.status, TaskStatus::Cancelled);
    let revoked = outcome.revoked.unwrap();
    assert_eq!((revoked.agent_id, revoked.attempt), (agent, 1));
    assert!(db.store.cancel(task.id, "again").await.is_err(), "already cancelled");
    assert_eq!(
        db.event_types().await.last(),
        Some(&EventType::TaskCancelled),
        "one cancellation event"
    );
    db.drop().await;
}

#[tokio::test]
async fn expired_attempts_time_out_and_stale_agents_lose_their_work() {
    let db = Db::new().await;
    let agent = Uuid::now_v7();
    let task = running(
        &db,
        NewTask {
            timeout_seconds: 1,
            max_retries: 0,
            ..new_task("slow", 1, &[])
        },
        agent,
    )
    .await;
    sqlx::query("UPDATE tasks SET deadline_at = now() - interval '1 second'")
        .execute(db.store.pool())
        .await
        .unwrap();
    db.clear_events().await;
    let outcomes = db.store.time_out_expired(10).await.unwrap();
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].task.status, TaskStatus::Failed, "no retries left");
    assert_eq!(outcomes[0].revoked.as_ref().map(|r| r.task_id), Some(task.id));
    assert_eq!(db.event_types().await, [EventType::TaskTimedOut, EventType::TaskFailed]);

    let other = running(&db, new_task("held", 1, &[]), agent).await;
    db.clear_events().await;
    let reclaimed = db.store.reclaim_agent(agent, Utc::now()).await.unwrap();
    assert_eq!(reclaimed.len(), 1);
    assert_eq!(reclaimed[0].task.id, other.id);
    assert_eq!(reclaimed[0].task.status, TaskStatus::Pending);
    assert_eq!(db.event_types().await, [EventType::TaskRetried]);
    db.drop().await;
}

#[tokio::test]
async fn a_closed_stream_gives_back_what_it_never_started() {
    let db = Db::new().await;
    let agent = Uuid::now_v7();
    db.store
        .enqueue(&[new_task("a", 1, &[]), new_task("b", 1, &[])])
        .await
        .unwrap();
    let s = slot(agent);
    let got = db
        .store
        .assign(None, &Labels::new(), &[s, s], Utc::now(), true)
        .await
        .unwrap();
    db.store.start_batch(&[report(got[0].id, 1)]).await.unwrap();
    db.clear_events().await;
    let back = db.store.requeue_session(s.session).await.unwrap();
    assert_eq!(back, [got[1].id]);
    let events = db.events().await;
    let Event::TaskRequeued(r) = &events[0].1 else {
        panic!("{events:?}")
    };
    assert_eq!((r.attempt, r.reason.as_str()), (1, "stream closed"));
    let again = db
        .store
        .assign(None, &Labels::new(), &[slot(agent)], Utc::now(), true)
        .await
        .unwrap();
    assert_eq!(
        (again[0].id, again[0].attempt),
        (got[1].id, 2),
        "its attempt stays spent"
    );
    db.drop().await;
}

#[tokio::test]
async fn the_relay_takes_whole_batches_of_events_in_order_up_to_its_limit() {
    let db = Db::new().await;
    // Three writes: 3, 5 and 2 events, one outbox row each.
    let mut written = Vec::new();
    for n in [3, 5, 2] {
        let tasks: Vec<NewTask> = (0..n).map(|i| new_task(&format!("t{i}"), 1, &[])).collect();
        written.extend(db.store.enqueue(&tasks).await.unwrap().into_iter().map(|t| t.id));
    }
    assert_eq!(db.store.outbox_backlog().await.unwrap(), 10);
    let mut relay = db.store.relay_session().await.unwrap();
    let mut other = db.store.relay_session().await.unwrap();
    // A limit smaller than the first batch still takes it, whole and alone.
    let first = relay.take(2).await.unwrap().expect("batches to take");
    assert_eq!((first.seqs.len(), first.events.len()), (1, 3));
    // While one relay holds the lock, another takes nothing.
    assert!(other.take(8).await.unwrap().is_none());
    relay.release().await.unwrap();
    // Up to the limit, never splitting a batch.
    let taken = relay.take(8).await.unwrap().expect("batches to take");
    assert_eq!((taken.seqs.len(), taken.events.len()), (2, 8));
    let ids: Vec<Uuid> = taken.events.iter().map(|e| e.entity_id).collect();
    assert_eq!(ids, written[..8], "in the order written");
    assert!(other.take(8).await.unwrap().is_none());
    relay.finish(&taken.seqs).await.unwrap();
    let rest = db.store.outbox_events().await.unwrap();
    assert_eq!(rest.iter().map(|e| e.entity_id).collect::<Vec<_>>(), written[8..]);
    // Finished, the lock is free: the other relay takes the rest, each
    // event with the id it was written with.
    let again = other.take(100).await.unwrap().expect("the rest to take");
    assert_eq!(
        again.events.iter().map(|e| e.id).collect::<Vec<_>>(),
        rest.iter().map(|e| e.id).collect::<Vec<_>>()
    );
    // A relay that dies holding the lock frees it with its session.
    drop(other);
    let mut third = db.store.relay_session().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let retaken = loop {
        if let Some(taken) = third.take(100).await.unwrap() {
            break taken;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dead session's lock was never freed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!(retaken.seqs, again.seqs);
    third.finish(&retaken.seqs).await.unwrap();
    assert_eq!(db.store.outbox_backlog().await.unwrap(), 0);
    // An empty outbox gives the lock back at once.
    assert!(third.take(100).await.unwrap().is_none());
    let n = new_task("late", 1, &[]);
    db.store.enqueue(&[n]).await.unwrap();
    assert!(relay.take(100).await.unwrap().is_some());
    third.close().await;
    db.drop().await;
}

#[tokio::test]
async fn a_round_that_saw_no_limit_still_honours_one_set_since() {
    let db = Db::new().await;
    let agent = Uuid::now_v7();
    let keyed = NewTask {
        concurrency_key: Some("repo".into()),
        ..new_task("keyed", 5, &[])
    };
    let plain = new_task("plain", 1, &[]);
    db.store.enqueue(&[keyed.clone(), plain.clone()]).await.unwrap();
    // The round's view: no limit, nothing backed off.
    let view = db.store.round_view(&[agent], 60.0).await.unwrap();
    assert!(!view.limits && view.next_retry.is_none() && view.held.is_empty());
    // A limit of none running, set before the claim.
    db.store.set_limit("repo", 0).await.unwrap();
    let got = db
        .store
        .assign(
            None,
            &Labels::new(),
            &[slot(agent), slot(agent)],
            Utc::now(),
            view.limits,
        )
        .await
        .unwrap();
    assert_eq!(
        got.iter().map(|t| t.id).collect::<Vec<_>>(),
        [plain.id],
        "the limited key waits"
    );
    assert!(db.store.round_view(&[agent], 60.0).await.unwrap().limits);
    db.drop().await;
}

#[tokio::test]
async fn agent_outcomes_count_each_event_once_however_often_it_is_delivered() {
    let db = Db::new().await;
    let register = |id| omoi_store::agents::Registration {
        id: Some(id),
        agent_type: "executor".into(),
        phases: vec![Phase::Initial],
        capacity: 1,
        labels: serde_json::json!({}),
    };
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    db.store.register_agent(&register(a)).await.unwrap();
    db.store.register_agent(&register(b)).await.unwrap();
    let (e1, e2, e3, e4) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    // A batch with one event twice (redelivered within one fetch).
    db.store
        .count_agent_outcomes("health", &[(e1, a, true), (e2, a, false), (e1, a, true), (e3, b, true)])
        .await
        .unwrap();
    // A redelivered batch, partly new.
    db.store
        .count_agent_outcomes("health", &[(e2, a, false), (e3, b, true), (e4, b, false)])
        .await
        .unwrap();
    db.store.count_agent_outcomes("health", &[]).await.unwrap();
    let counts = |id| {
        let store = db.store.clone();
        async move {
            let agent = store.get_agent(id).await.unwrap();
            (agent.completed_tasks, agent.failed_tasks)
        }
    };
    assert_eq!(counts(a).await, (1, 1));
    assert_eq!(counts(b).await, (1, 1));
    db.store.count_agent_outcomes("other", &[(e1, a, true)]).await.unwrap();
    assert_eq!(counts(a).await, (2, 1), "another consumer counts on its own");
    db.drop().await;
}

#[tokio::test]
async fn a_turn_is_one_replicas_at_a_time_and_free_again_when_its_holder_is_gone() {
    use omoi_store::turns::Turn;
    let db = Db::new().await;
    // Another replica: a store of its own on the same database.
    let other = Store::connect_lazy(&db.store_url(), 4).unwrap();
    let held = db.store.take_turn(Turn::PullRequestLook).await.unwrap().expect("free");
    assert!(other.take_turn(Turn::PullRequestLook).await.unwrap().is_none());
    // Another turn is not this one.
    let merge = other.take_turn(Turn::MergeCheck).await.unwrap().expect("another turn");
    merge.release().await.unwrap();
    held.release().await.unwrap();
    let theirs = other
        .take_turn(Turn::PullRequestLook)
        .await
        .unwrap()
        .expect("given back");
    assert!(db.store.take_turn(Turn::PullRequestLook).await.unwrap().is_none());
    // Its holder gone without giving it back (a replica that died): free
    // once its connection is closed.
    drop(theirs);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let again = loop {
        if let Some(held) = db.store.take_turn(Turn::PullRequestLook).await.unwrap() {
            break held;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dead holder's turn stays taken"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    again.release().await.unwrap();
    other.close().await;
    db.drop().await;
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// A task requiring labels goes only to agents carrying them all, however
/// many such tasks wait ahead of the others; and while no healthy agent
/// (taking its phase) carries them, it is counted as unsatisfied.
#[tokio::test]
async fn tasks_go_only_to_agents_carrying_the_labels_they_require() {
    let db = Db::new().await;
    let codex = labels(&[("runner", "codex")]);
    let codex_gpu = labels(&[("runner", "codex"), ("gpu", "true")]);
    let required = |title: &str, priority: i32, requires: &Labels| NewTask {
        requires: requires.clone(),
        ..new_task(title, priority, &[])
    };
    // Many tasks for codex ahead of one anybody may take.
    let mut batch: Vec<NewTask> = (0..50).map(|i| required(&format!("codex {i}"), 9, &codex)).collect();
    batch.push(required("gpu", 8, &codex_gpu));
    let anyone = new_task("anyone", 1, &[]);
    batch.push(anyone.clone());
    let stored = db.store.enqueue(&batch).await.unwrap();
    assert_eq!(stored[0].requires, codex);
    assert_eq!(db.store.get(stored[50].id).await.unwrap().requires, codex_gpu);

    let unsatisfied = db.store.unsatisfied().await.unwrap();
    assert_eq!(unsatisfied.len(), 2, "{unsatisfied:?}");
    assert_eq!((&unsatisfied[0].requires, unsatisfied[0].tasks), (&codex, 50));
    assert_eq!(
        (&unsatisfied[1].requires, unsatisfied[1].phase),
        (&codex_gpu, Phase::Implementation)
    );

    let claude = Uuid::now_v7();
    let claude_labels = labels(&[("runner", "claude-code")]);
    let got = db
        .store
        .assign(None, &claude_labels, &[slot(claude), slot(claude)], Utc::now(), false)
        .await
        .unwrap();
    assert_eq!(got.iter().map(|t| t.id).collect::<Vec<_>>(), [anyone.id]);

    // A codex agent without a GPU takes the codex tasks, not the GPU one;
    // one with a GPU takes that too (its labels satisfy both sets).
    let codex_agent = Uuid::now_v7();
    let slots: Vec<Slot> = (0..60).map(|_| slot(codex_agent)).collect();
    let got = db.store.assign(None, &codex, &slots, Utc::now(), false).await.unwrap();
    assert_eq!(got.len(), 50);
    assert!(got.iter().all(|t| t.requires == codex));
    let gpu_labels = labels(&[("runner", "codex"), ("gpu", "true"), ("model", "gpt-5")]);
    let got = db
        .store
        .assign(
            Some(&[Phase::Implementation]),
            &gpu_labels,
            &slots[..2],
            Utc::now(),
            true,
        )
        .await
        .unwrap();
    assert_eq!(got.iter().map(|t| t.title.as_str()).collect::<Vec<_>>(), ["gpu"]);

    // Agents that register change what is unsatisfied: one carrying the
    // labels but not taking the phase does not count.
    db.store.enqueue(&[required("later", 1, &codex_gpu)]).await.unwrap();
    let register = |phases: Vec<Phase>, labels: &Labels| omoi_store::agents::Registration {
        id: None,
        agent_type: "executor".into(),
        phases,
        capacity: 1,
        labels: serde_json::to_value(labels).unwrap(),
    };
    db.store
        .register_agent(&register(vec![Phase::Initial], &gpu_labels))
        .await
        .unwrap();
    assert_eq!(db.store.unsatisfied().await.unwrap().len(), 1);
    db.store.register_agent(&register(vec![], &gpu_labels)).await.unwrap();
    assert!(db.store.unsatisfied().await.unwrap().is_empty());
    db.drop().await;
}

/// The same set of labels, enqueued concurrently for the first time by
/// several batches, is stored once and every task finds it.
#[tokio::test]
async fn a_new_requirement_enqueued_concurrently_is_stored_once() {
    let db = Db::new().await;
    let need = labels(&[("runner", "gemini"), ("zone", "eu")]);
    let batches: Vec<_> = (0..8)
        .map(|i| {
            let store = db.store.clone();
            let task = NewTask {
                requires: need.clone(),
                ..new_task(&format!("t{i}"), 1, &[])
            };
            tokio::spawn(async move { store.enqueue(&[task]).await })
        })
        .collect();
    for b in batches {
        assert_eq!(b.await.unwrap().unwrap()[0].requires, need);
    }
    let sets: i64 = sqlx::query_scalar("SELECT count(*) FROM requirement_sets WHERE requires <> '{}'")
        .fetch_one(db.store.pool())
        .await
        .unwrap();
    assert_eq!(sets, 1);
    let got = db
        .store
        .assign(
            None,
            &need,
            &(0..8).map(|_| slot(Uuid::now_v7())).collect::<Vec<_>>(),
            Utc::now(),
            false,
        )
        .await
        .unwrap();
    assert_eq!(got.len(), 8);
    db.drop().await;
}
