//! Chaos: a steady load of tickets through the whole mesh as separate
//! processes (a [`Fleet`]) while a seeded schedule kills every process with
//! SIGKILL and starts it again (executors under the same identity, so their
//! streams drop and come back), and stops NATS and PostgreSQL for 10–20 s
//! each. Then it checks, from the database and from the events stream read
//! back by an independent consumer, that nothing was lost, doubled or
//! stranded, and counts what happened.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use omoi_proto::common::{Phase, TicketPriority};
use omoi_proto::events::Event;
use omoi_proto::ticket::{CancelTicketRequest, CreateTicketRequest, TaskSpec};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;

use crate::fleet::{Fleet, FleetOptions};
use omoi_tests::process::{PrivateNats, PrivatePostgres};
use omoi_tests::{events, ticket_client};

/// What a chaos run does.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    pub seed: u64,
    /// Least time tickets keep coming and faults keep happening; a round of
    /// faults (every process killed once, each broker stopped once) is
    /// always finished.
    pub load: Duration,
    pub tickets_per_second: f64,
    pub executors: usize,
    /// Logs of every process; kept when the run fails.
    pub dir: PathBuf,
}

/// What a run did and found.
#[derive(Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub elapsed: Duration,
    pub tickets: BTreeMap<String, usize>,
    pub tasks: BTreeMap<String, usize>,
    pub kills: BTreeMap<String, usize>,
    /// Executors stopped with SIGTERM and started again.
    pub restarts: usize,
    pub nats_outages: usize,
    pub postgres_outages: usize,
    pub cancels_asked: usize,
    /// Failed attempts sent round again.
    pub retries: usize,
    /// Attempts taken back from agents that lost them (leases, stale agents).
    pub reclaims: usize,
    /// Assignments that went back to the queue unstarted.
    pub requeues: usize,
    /// Attempts that took up an earlier attempt's agent session.
    pub resumes: usize,
    pub events: usize,
    /// Refused or failed calls of the load (all retried), by code.
    pub call_errors: BTreeMap<String, usize>,
    /// What was wrong; empty when the run passed.
    pub violations: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kills: usize = self.kills.values().sum();
        writeln!(f, "chaos seed {} in {:.0} s", self.seed, self.elapsed.as_secs_f64())?;
        writeln!(f, "  tickets   {:?}", self.tickets)?;
        writeln!(f, "  tasks     {:?}", self.tasks)?;
        writeln!(f, "  kills     {kills} {:?}", self.kills)?;
        writeln!(f, "  restarts  {} (executors drained with SIGTERM)", self.restarts)?;
        writeln!(
            f,
            "  outages   NATS {}, PostgreSQL {}",
            self.nats_outages, self.postgres_outages
        )?;
        writeln!(
            f,
            "  cancels {}, retries {}, reclaims {}, requeues {}, sessions resumed {}",
            self.cancels_asked, self.retries, self.reclaims, self.requeues, self.resumes
        )?;
        writeln!(f, "  events    {}", self.events)?;
        writeln!(f, "  call errors (retried) {:?}", self.call_errors)?;
        if self.violations.is_empty() {
            write!(f, "  verdict   PASS: nothing lost, doubled or stranded")
        } else {
            writeln!(f, "  verdict   FAIL: {} violations", self.violations.len())?;
            for v in self.violations.iter().take(30) {
                writeln!(f, "    {v}")?;
            }
            Ok(())
        }
    }
}

/// Runs the mesh under chaos and checks it; the report says whether it
/// passed (an `Err` is a failure of the harness itself).
pub async fn run(o: &ChaosOptions) -> anyhow::Result<Report> {
    let started = Instant::now();
    let pg = Arc::new(PrivatePostgres::start()?);
    let mut nats = PrivateNats::start().await?;
    let database_url = pg.url("omoi");
    let fleet_options = FleetOptions {
        database_url: database_url.clone(),
        nats_url: nats.url(),
        replicas: 2,
        executors: o.executors,
        // Room for the sessions' turns below: the agents mostly wait.
        executor_capacity: 8,
        dir: o.dir.clone(),
        env: [
            // Lost work comes back in seconds rather than minutes.
            ("OMOI_HEARTBEAT_INTERVAL_SECONDS", "1"),
            ("OMOI_STALE_AFTER_SECONDS", "5"),
            ("OMOI_STALE_CHECK_INTERVAL_SECONDS", "0.5"),
            ("OMOI_HEARTBEAT_FLUSH_MS", "100"),
            ("OMOI_LEASE_SECONDS", "5"),
            ("OMOI_START_TIMEOUT_SECONDS", "10"),
            ("OMOI_TIMEOUT_CHECK_INTERVAL_SECONDS", "0.5"),
            ("OMOI_ENQUEUE_RETRY_SECONDS", "0.5"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        executor_env: vec![
            ("OMOI_DEMO_SLEEP_MS".into(), "20".into()),
            // Every ticket's integration task fails its first attempt
            // with a retryable error.
            ("OMOI_DEMO_FAIL_FIRST".into(), "PHASE_INTEGRATION".into()),
            // Every task works three turns of 500 ms in a session
            // checkpointed every second, which a killed executor's next
            // attempt resumes.
            ("OMOI_DEMO_TURNS".into(), "3".into()),
            ("OMOI_DEMO_TURN_MS".into(), "500".into()),
            ("OMOI_CHECKPOINT_SECONDS".into(), "1".into()),
        ],
    };
    let mut fleet = Fleet::start(&fleet_options).await?;
    let load = Load::start(o.seed, fleet.urls("omoi-ticket"), o.tickets_per_second);

    let mut report = Report {
        seed: o.seed,
        ..Default::default()
    };
    let mut rng = StdRng::seed_from_u64(o.seed);
    let chaos_started = Instant::now();
    let mut first_round = true;
    while first_round || chaos_started.elapsed() < o.load {
        first_round = false;
        let mut faults: Vec<Fault> = (0..fleet.procs.len()).map(Fault::Kill).collect();
        faults.extend(
            (0..fleet.procs.len())
                .filter(|i| fleet.procs[*i].name.starts_with("executor"))
                .map(Fault::Term),
        );
        faults.extend([Fault::NatsOutage, Fault::PostgresOutage]);
        faults.shuffle(&mut rng);
        for fault in faults {
            tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..5_000))).await;
            match fault {
                Fault::Kill(i) => {
                    let p = &mut fleet.procs[i];
                    tracing::info!(process = %p.name, "chaos: SIGKILL");
                    p.kill9().await?;
                    tokio::time::sleep(Duration::from_millis(rng.random_range(200..2_000))).await;
                    p.start().await?;
                    *report.kills.entry(p.name.clone()).or_default() += 1;
                }
                Fault::Term(i) => {
                    // A drain: runs in progress are reported back as
                    // retryable, then it comes back as the same agent.
                    let p = &mut fleet.procs[i];
                    tracing::info!(process = %p.name, "chaos: SIGTERM");
                    let code = p.terminate(Duration::from_secs(60)).await?;
                    if code != Some(0) {
                        report.violations.push(format!("{} exited {code:?} on SIGTERM", p.name));
                    }
                    p.start().await?;
                    report.restarts += 1;
                }
                Fault::NatsOutage => {
                    tracing::info!("chaos: NATS down");
                    nats.stop().await?;
                    tokio::time::sleep(Duration::from_millis(rng.random_range(10_000..20_000))).await;
                    nats.restart().await?;
                    report.nats_outages += 1;
                }
                Fault::PostgresOutage => {
                    tracing::info!("chaos: PostgreSQL down");
                    let p = pg.clone();
                    tokio::task::spawn_blocking(move || p.crash()).await??;
                    tokio::time::sleep(Duration::from_millis(rng.random_range(10_000..20_000))).await;
                    let p = pg.clone();
                    tokio::task::spawn_blocking(move || p.up()).await??;
                    report.postgres_outages += 1;
                }
            }
        }
    }
    let (created, call_errors) = load.finish().await?;
    report.cancels_asked = created.iter().filter(|t| t.cancel).count();
    report.call_errors = call_errors;

    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url)
        .await?;
    settle(&pool, created.len()).await?;
    let state = State::read(&pool).await?;
    pool.close().await;
    // The fleet runs with the default stream.
    let stream = omoi_bus::Topology::default().stream;
    let events = events::read_all(&nats.url(), &stream, 0, Duration::from_secs(1)).await?;
    check(&created, &state, &events, &mut report);
    for unclean in fleet.stop().await? {
        report.violations.push(format!("clean stop: {unclean}"));
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Kill(usize),
    /// SIGTERM and start again (executors).
    Term(usize),
    NatsOutage,
    PostgresOutage,
}

/// A ticket the mesh acknowledged.
#[derive(Debug, Clone)]
pub struct Created {
    pub id: String,
    pub cancel: bool,
}

/// The load: tickets created at a steady rate, each retried (with its
/// request id, so never twice) until acknowledged; some cancelled soon
/// after.
struct Load {
    stop: tokio_util::sync::CancellationToken,
    handle: tokio::task::JoinHandle<Vec<tokio::task::JoinHandle<Created>>>,
    errors: Errors,
}

type Errors = Arc<Mutex<BTreeMap<String, usize>>>;

impl Load {
    fn start(seed: u64, urls: Vec<String>, per_second: f64) -> Self {
        let stop = tokio_util::sync::CancellationToken::new();
        let errors = Errors::default();
        let clients: Vec<_> = urls.iter().map(|u| ticket_client(u)).collect();
        let (s, e) = (stop.clone(), errors.clone());
        let handle = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut calls = Vec::new();
            for k in 0u64.. {
                tokio::select! {
                    _ = s.cancelled() => break,
                    _ = every.tick() => {}
                }
                calls.push(tokio::spawn(one_ticket(seed, k, clients.clone(), e.clone())));
            }
            calls
        });
        Self { stop, handle, errors }
    }

    /// Stops creating; waits (up to five minutes) for every create and
    /// cancel in flight to be acknowledged.
    async fn finish(self) -> anyhow::Result<(Vec<Created>, BTreeMap<String, usize>)> {
        self.stop.cancel();
        let calls = self.handle.await?;
        let mut created = Vec::with_capacity(calls.len());
        for c in calls {
            match tokio::time::timeout(Duration::from_secs(300), c).await {
                Ok(t) => created.push(t?),
                Err(_) => anyhow::bail!("a CreateTicket or CancelTicket was not acknowledged in five minutes"),
            }
        }
        let errors = self.errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Ok((created, errors))
    }
}

/// Ticket `k` of the load: the default plan, or (two in five) a diamond of
/// four tasks; one in ten cancelled up to three seconds after it is made.
async fn one_ticket(seed: u64, k: u64, clients: Vec<omoi_tests::TicketClient>, errors: Errors) -> Created {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ k);
    let plan = if rng.random_bool(0.4) {
        let spec = |title: &str, phase: Phase, depends_on: Vec<i32>| TaskSpec {
            title: title.to_owned(),
            phase: phase as i32,
            depends_on,
            ..Default::default()
        };
        vec![
            spec("design", Phase::Initial, vec![]),
            spec("backend", Phase::Implementation, vec![0]),
            spec("frontend", Phase::Implementation, vec![0]),
            spec("wire up", Phase::Integration, vec![1, 2]),
        ]
    } else {
        Vec::new()
    };
    let cancel = rng.random_bool(0.1);
    let request = CreateTicketRequest {
        title: format!("chaos ticket {k}"),
        priority: rng.random_range(TicketPriority::Low as i32..=TicketPriority::Critical as i32),
        plan,
        request_id: format!("chaos-{seed}-{k}"),
        ..Default::default()
    };
    let id = persist(&clients, k as usize, &errors, |mut c| {
        let request = request.clone();
        async move {
            c.create_ticket(request)
                .await
                .map(|r| r.into_inner().ticket.unwrap_or_default().id)
        }
    })
    .await;
    if cancel {
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..3_000))).await;
        let ticket_id = id.clone();
        persist(&clients, k as usize, &errors, |mut c| {
            let ticket_id = ticket_id.clone();
            async move {
                match c
                    .cancel_ticket(CancelTicketRequest {
                        ticket_id,
                        reason: "chaos".into(),
                    })
                    .await
                {
                    // Finished before the cancel came: nothing to do.
                    Err(s) if s.code() == tonic::Code::FailedPrecondition => Ok(()),
                    r => r.map(|_| ()),
                }
            }
        })
        .await;
    }
    Created { id, cancel }
}

/// Calls until a replica answers OK, going round the replicas; counts the
/// errors by code.
async fn persist<T, F, Fut>(clients: &[omoi_tests::TicketClient], first: usize, errors: &Errors, call: F) -> T
where
    F: Fn(omoi_tests::TicketClient) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    for attempt in 0.. {
        let client = clients[(first + attempt) % clients.len()].clone();
        match tokio::time::timeout(Duration::from_secs(10), call(client)).await {
            Ok(Ok(v)) => return v,
            Ok(Err(s)) => {
                *errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(format!("{:?}", s.code()))
                    .or_default() += 1
            }
            Err(_) => {
                *errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry("no answer in 10 s".into())
                    .or_default() += 1
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    unreachable!("the loop returns")
}

/// Waits (up to five minutes) until every ticket and task is final, the
/// ticket service has heard every task's end, and the outbox is empty.
async fn settle(pool: &PgPool, tickets: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let row: (i64, i64, i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM tickets),
                    (SELECT count(*) FROM tickets WHERE status NOT IN ('completed', 'failed', 'cancelled')),
                    (SELECT count(*) FROM tasks WHERE status IN ('pending', 'assigned', 'running')),
                    (SELECT count(*) FROM ticket_tasks WHERE outcome IS NULL),
                    (SELECT coalesce(sum(n), 0)::bigint FROM event_batches)",
        )
        .fetch_one(pool)
        .await?;
        if row.0 >= tickets as i64 && row.1 == 0 && row.2 == 0 && row.3 == 0 && row.4 == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            let stuck: Vec<(String, i32, Option<uuid::Uuid>, i64)> = sqlx::query_as(
                "SELECT status, attempt, assigned_agent_id, count(*) FROM tasks
                 WHERE status IN ('pending', 'assigned', 'running') GROUP BY 1, 2, 3 ORDER BY 4 DESC LIMIT 20",
            )
            .fetch_all(pool)
            .await?;
            anyhow::bail!(
                "not settled in five minutes (tickets, unfinished tickets, unfinished tasks, \
                 tasks the ticket service has not seen end, outbox): {row:?}; unfinished tasks \
                 (status, attempt, agent, count): {stuck:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What the database holds at the end.
struct State {
    tickets: HashMap<String, String>,
    /// id → (ticket, status, attempt)
    tasks: HashMap<String, (String, String, i32)>,
    /// task → the outcome the ticket service recorded
    outcomes: HashMap<String, Option<String>>,
    /// completed task → its result's summary (the demo agent's says which
    /// attempt did each turn of its session)
    summaries: HashMap<String, String>,
}

impl State {
    async fn read(pool: &PgPool) -> anyhow::Result<Self> {
        let tickets: Vec<(uuid::Uuid, String)> =
            sqlx::query_as("SELECT id, status FROM tickets").fetch_all(pool).await?;
        let tasks: Vec<(uuid::Uuid, Option<uuid::Uuid>, String, i32)> =
            sqlx::query_as("SELECT id, ticket_id, status, attempt FROM tasks")
                .fetch_all(pool)
                .await?;
        let outcomes: Vec<(uuid::Uuid, Option<String>)> = sqlx::query_as("SELECT task_id, outcome FROM ticket_tasks")
            .fetch_all(pool)
            .await?;
        let summaries: Vec<(uuid::Uuid, Option<String>)> =
            sqlx::query_as("SELECT id, result->>'summary' FROM tasks WHERE status = 'completed'")
                .fetch_all(pool)
                .await?;
        Ok(Self {
            tickets: tickets.into_iter().map(|(i, s)| (i.to_string(), s)).collect(),
            tasks: tasks
                .into_iter()
                .map(|(i, t, s, a)| (i.to_string(), (t.map(|t| t.to_string()).unwrap_or_default(), s, a)))
                .collect(),
            outcomes: outcomes.into_iter().map(|(i, o)| (i.to_string(), o)).collect(),
            summaries: summaries
                .into_iter()
                .map(|(i, s)| (i.to_string(), s.unwrap_or_default()))
                .collect(),
        })
    }
}

/// A completed task's session as the demo agent summed it up (`turns
/// <turn>:<attempt> …`): every turn once and in order, by attempts that
/// never go back, none later than the last; and every attempt that resumed
/// an earlier one's session (TASK_RESUMED) carried on its conversation,
/// not an empty one: turns of that earlier attempt, or one before it, are
/// in it.
fn conversation(id: &str, summary: &str, last: i32, resumed: &[&Event], v: &mut Vec<String>) {
    let Some(turns) = summary.split("turns ").nth(1) else {
        return;
    };
    let turns: Vec<(usize, i32)> = turns
        .split_whitespace()
        .filter_map(|t| {
            let (turn, attempt) = t.split_once(':')?;
            Some((turn.parse().ok()?, attempt.parse().ok()?))
        })
        .collect();
    let in_order = turns.iter().enumerate().all(|(i, t)| t.0 == i + 1);
    let forward = turns.windows(2).all(|w| w[0].1 <= w[1].1) && turns.iter().all(|t| t.1 <= last);
    if turns.is_empty() || !in_order || !forward {
        v.push(format!("task {id}: its session's turns went wrong: {summary:?}"));
    }
    for e in resumed {
        let from = number(e, "resumed_from_attempt");
        let carried =
            from.is_some_and(|from| attempt(e).is_some_and(|a| from < a) && turns.iter().any(|t| t.1 <= from));
        if !carried {
            v.push(format!(
                "task {id}: attempt {:?} resumed attempt {from:?} but its conversation holds none of it: {summary:?}",
                attempt(e)
            ));
        }
    }
}

/// A number of an event's payload.
fn number(e: &Event, field: &str) -> Option<i32> {
    use prost_types::value::Kind;
    match e.payload.as_ref()?.fields.get(field)?.kind.as_ref()? {
        Kind::NumberValue(n) => Some(*n as i32),
        _ => None,
    }
}

/// The attempt an event is about, from its payload.
fn attempt(e: &Event) -> Option<i32> {
    number(e, "attempt")
}

fn error_text(e: &Event) -> String {
    use prost_types::value::Kind;
    match e
        .payload
        .as_ref()
        .and_then(|p| p.fields.get("error"))
        .and_then(|v| v.kind.as_ref())
    {
        Some(Kind::StringValue(s)) => s.clone(),
        _ => String::new(),
    }
}

/// Every promise, checked against the database and the stream; violations
/// and counts go into the report.
fn check(created: &[Created], state: &State, stream: &[Event], report: &mut Report) {
    let v = &mut report.violations;
    report.events = stream.len();
    let mut ids = HashSet::new();
    let mut by_entity: HashMap<&str, Vec<&Event>> = HashMap::new();
    for e in stream {
        if !ids.insert(e.id.as_str()) {
            v.push(format!("event {} is in the stream twice", e.id));
        }
        by_entity.entry(e.entity_id.as_str()).or_default().push(e);
    }
    let of = |id: &str, t: &str| -> Vec<&Event> {
        by_entity
            .get(id)
            .map(|es| es.iter().copied().filter(|e| e.event_type == t).collect())
            .unwrap_or_default()
    };

    // Tickets: every acknowledged one is there, no other, each final with
    // its events once.
    let asked: HashMap<&str, bool> = created.iter().map(|c| (c.id.as_str(), c.cancel)).collect();
    if state.tickets.len() != asked.len() {
        v.push(format!(
            "{} tickets acknowledged, {} in the database",
            asked.len(),
            state.tickets.len()
        ));
    }
    let mut tasks_of: HashMap<&str, Vec<&str>> = HashMap::new();
    for (id, (ticket, _, _)) in &state.tasks {
        tasks_of.entry(ticket.as_str()).or_default().push(id.as_str());
    }
    for (id, status) in &state.tickets {
        *report.tickets.entry(status.clone()).or_default() += 1;
        let Some(cancel_asked) = asked.get(id.as_str()) else {
            v.push(format!("ticket {id} was never acknowledged to the load"));
            continue;
        };
        if of(id, "TICKET_CREATED").len() != 1 {
            v.push(format!(
                "ticket {id}: {} TICKET_CREATED",
                of(id, "TICKET_CREATED").len()
            ));
        }
        let ends: Vec<&str> = by_entity
            .get(id.as_str())
            .into_iter()
            .flatten()
            .map(|e| e.event_type.as_str())
            .filter(|t| matches!(*t, "TICKET_COMPLETED" | "TICKET_FAILED" | "TICKET_CANCELLED"))
            .collect();
        let expected_end = format!("TICKET_{}", status.to_uppercase());
        if ends != [expected_end.as_str()] {
            v.push(format!("ticket {id} is {status} but its final events are {ends:?}"));
        }
        let tasks: Vec<&str> = tasks_of.get(id.as_str()).cloned().unwrap_or_default();
        if tasks.is_empty() {
            v.push(format!("ticket {id} has no tasks"));
        }
        let statuses: Vec<&str> = tasks.iter().map(|t| state.tasks[*t].1.as_str()).collect();
        let agrees = match status.as_str() {
            "completed" => statuses.iter().all(|s| *s == "completed"),
            "failed" => statuses.iter().any(|s| matches!(*s, "failed" | "timed_out")),
            "cancelled" => *cancel_asked && statuses.iter().all(|s| *s != "pending" && *s != "running"),
            _ => false,
        };
        if !agrees {
            v.push(format!(
                "ticket {id} is {status} (cancel asked: {cancel_asked}) with tasks {statuses:?}"
            ));
        }
    }

    // Tasks: created once, every attempt assigned once, every attempt but
    // the last ended by an event that explains the re-run, completed at
    // most once and by its last attempt, and the ticket service told.
    for (id, (ticket, status, last)) in &state.tasks {
        *report.tasks.entry(status.clone()).or_default() += 1;
        if !state.tickets.contains_key(ticket) {
            v.push(format!("task {id} belongs to no ticket ({ticket:?})"));
        }
        if of(id, "TASK_CREATED").len() != 1 {
            v.push(format!("task {id}: {} TASK_CREATED", of(id, "TASK_CREATED").len()));
        }
        let mut assigned: Vec<i32> = of(id, "TASK_ASSIGNED").iter().filter_map(|e| attempt(e)).collect();
        assigned.sort_unstable();
        if assigned != (1..=*last).collect::<Vec<_>>() {
            v.push(format!(
                "task {id} at attempt {last} was assigned as attempts {assigned:?}"
            ));
        }
        let completed = of(id, "TASK_COMPLETED");
        let completed_attempts: Vec<Option<i32>> = completed.iter().map(|e| attempt(e)).collect();
        let expected: Vec<Option<i32>> = if status == "completed" {
            vec![Some(*last)]
        } else {
            Vec::new()
        };
        if completed_attempts != expected {
            v.push(format!(
                "task {id} is {status} at attempt {last}; TASK_COMPLETED for {completed_attempts:?}"
            ));
        }
        for e in of(id, "TASK_RETRIED") {
            let text = error_text(e);
            if text.starts_with("lease lapsed") || text.contains("stopped heartbeating") {
                report.reclaims += 1;
            } else {
                report.retries += 1;
            }
        }
        report.requeues += of(id, "TASK_REQUEUED").len();
        let resumed = of(id, "TASK_RESUMED");
        report.resumes += resumed.len();
        if let Some(summary) = state.summaries.get(id) {
            conversation(id, summary, *last, &resumed, v);
        }
        let mut ended: Vec<i32> = ["TASK_RETRIED", "TASK_REQUEUED", "TASK_TIMED_OUT"]
            .iter()
            .flat_map(|t| of(id, t))
            .filter_map(attempt)
            .collect();
        ended.sort_unstable();
        ended.dedup();
        let rerun: Vec<i32> = (1..*last).filter(|a| !ended.contains(a)).collect();
        if !rerun.is_empty() {
            v.push(format!(
                "task {id}: attempts {rerun:?} were followed by another with no retry, reclaim or requeue event"
            ));
        }
        let last_event = by_entity
            .get(id.as_str())
            .and_then(|es| es.last())
            .map(|e| e.event_type.as_str());
        let expected_last = format!("TASK_{}", status.to_uppercase());
        if last_event != Some(expected_last.as_str()) {
            v.push(format!("task {id} is {status}; its last event is {last_event:?}"));
        }
        let outcome = state.outcomes.get(id).cloned().flatten();
        let expected_outcome = match status.as_str() {
            "timed_out" => "failed",
            s => s,
        };
        if outcome.as_deref() != Some(expected_outcome) {
            v.push(format!(
                "task {id} is {status}; the ticket service recorded {outcome:?}"
            ));
        }
    }
    for (id, es) in &by_entity {
        let entity = es[0].entity_type.as_str();
        let known = match entity {
            "task" => state.tasks.contains_key(*id),
            "ticket" => state.tickets.contains_key(*id),
            _ => true,
        };
        if !known {
            v.push(format!("{entity} {id} has events but is not in the database"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(entity: &str, id: &str, t: &str, attempt: Option<i32>) -> Event {
        let mut fields = BTreeMap::new();
        if let Some(a) = attempt {
            fields.insert(
                "attempt".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::NumberValue(a as f64)),
                },
            );
        }
        Event {
            id: uuid::Uuid::new_v4().to_string(),
            event_type: t.to_owned(),
            entity_type: entity.to_owned(),
            entity_id: id.to_owned(),
            payload: Some(prost_types::Struct { fields }),
            ..Default::default()
        }
    }

    /// A ticket with one task that completed on its second attempt after a
    /// retry: the run as it should be.
    fn good() -> (Vec<Created>, State, Vec<Event>) {
        let created = vec![Created {
            id: "k".into(),
            cancel: false,
        }];
        let state = State {
            tickets: [("k".to_owned(), "completed".to_owned())].into(),
            tasks: [("t".to_owned(), ("k".to_owned(), "completed".to_owned(), 2))].into(),
            outcomes: [("t".to_owned(), Some("completed".to_owned()))].into(),
            summaries: [(
                "t".to_owned(),
                "PHASE_INITIAL done: 2 file(s) written; turns 1:1 2:2".to_owned(),
            )]
            .into(),
        };
        let stream = vec![
            event("ticket", "k", "TICKET_CREATED", None),
            event("task", "t", "TASK_CREATED", None),
            event("task", "t", "TASK_ASSIGNED", Some(1)),
            event("task", "t", "TASK_STARTED", Some(1)),
            event("task", "t", "TASK_RETRIED", Some(1)),
            event("task", "t", "TASK_ASSIGNED", Some(2)),
            event("task", "t", "TASK_STARTED", Some(2)),
            event("task", "t", "TASK_COMPLETED", Some(2)),
            event("ticket", "k", "TICKET_COMPLETED", None),
        ];
        (created, state, stream)
    }

    fn violations(created: &[Created], state: &State, stream: &[Event]) -> Vec<String> {
        let mut report = Report::default();
        check(created, state, stream, &mut report);
        report.violations
    }

    #[test]
    fn a_session_that_went_wrong_or_a_resume_that_carried_nothing_is_found() {
        let (created, mut state, mut stream) = good();
        let mut resumed = event("task", "t", "TASK_RESUMED", Some(2));
        resumed.payload.as_mut().unwrap().fields.insert(
            "resumed_from_attempt".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(1.0)),
            },
        );
        stream.insert(7, resumed);
        assert!(violations(&created, &state, &stream).is_empty());
        for (summary, found) in [
            ("turns 1:1 1:2 2:2", "turns went wrong"),
            ("turns 1:2 2:1", "turns went wrong"),
            ("turns 1:1 2:3", "turns went wrong"),
            ("turns 1:2 2:2", "holds none of it"),
        ] {
            state.summaries.insert("t".into(), format!("done; {summary}"));
            let v = violations(&created, &state, &stream);
            assert!(v.iter().any(|v| v.contains(found)), "{summary}: {v:?}");
        }
    }

    #[test]
    fn a_clean_run_passes_and_is_counted() {
        let (created, state, stream) = good();
        let mut report = Report::default();
        check(&created, &state, &stream, &mut report);
        assert!(report.violations.is_empty(), "{:?}", report.violations);
        assert_eq!((report.retries, report.events), (1, 9));
    }

    #[test]
    fn a_doubled_event_is_found() {
        let (created, state, mut stream) = good();
        stream.push(stream[7].clone());
        let v = violations(&created, &state, &stream);
        assert!(v.iter().any(|v| v.contains("in the stream twice")), "{v:?}");
        assert!(v.iter().any(|v| v.contains("TASK_COMPLETED for")), "{v:?}");
    }

    #[test]
    fn a_completion_done_twice_is_found() {
        let (created, state, mut stream) = good();
        stream.insert(4, event("task", "t", "TASK_COMPLETED", Some(1)));
        let v = violations(&created, &state, &stream);
        assert!(
            v.iter().any(|v| v.contains("TASK_COMPLETED for [Some(1), Some(2)]")),
            "{v:?}"
        );
    }

    #[test]
    fn a_rerun_nothing_explains_is_found() {
        let (created, state, mut stream) = good();
        stream.remove(4);
        let v = violations(&created, &state, &stream);
        assert!(v.iter().any(|v| v.contains("attempts [1] were followed")), "{v:?}");
    }

    #[test]
    fn a_lost_event_a_stranded_task_and_a_lost_ticket_are_found() {
        let (created, mut state, mut stream) = good();
        stream.remove(8);
        let v = violations(&created, &state, &stream);
        assert!(v.iter().any(|v| v.contains("final events are []")), "{v:?}");

        let (_, _, stream) = good();
        state.tasks.insert("t".into(), ("k".into(), "running".into(), 2));
        let v = violations(&created, &state, &stream);
        assert!(v.iter().any(|v| v.contains("with tasks [\"running\"]")), "{v:?}");

        let (_, state, stream) = good();
        let mut lost = created.clone();
        lost.push(Created {
            id: "gone".into(),
            cancel: false,
        });
        let v = violations(&lost, &state, &stream);
        assert!(
            v.iter()
                .any(|v| v.contains("2 tickets acknowledged, 1 in the database")),
            "{v:?}"
        );
    }

    #[test]
    fn a_ticket_service_that_missed_a_task_event_is_found() {
        let (created, mut state, stream) = good();
        state.outcomes.insert("t".into(), None);
        let v = violations(&created, &state, &stream);
        assert!(
            v.iter().any(|v| v.contains("the ticket service recorded None")),
            "{v:?}"
        );
    }
}
