//! Soak: the mesh (task-queue, health and ticket services as processes)
//! under a steady load at half its measured peak for a long time, sampling
//! every process's memory and descriptors, the database connections, the
//! outbox backlog, the tasks table and the events stream, then judging
//! whether they stayed flat.
//!
//! The load is what a busy cluster does: simulated agents (registered with
//! the health service, heartbeating, one WatchAssignments stream each)
//! start and complete every task they are given; tasks are enqueued at the
//! paced rate; a ticket (the four phase tasks) is created every second.
//! Retention is short (a minute for tasks and tickets, two for events) so
//! that an hour's run shows whether anything grows without bound.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use omoi_proto::taskqueue::watch_assignments_response::Event as StreamEvent;
use omoi_proto::taskqueue::{self as pb};
use tokio_util::sync::CancellationToken;

use crate::fleet::{Fleet, FleetOptions};
use omoi_tests::{Infra, TaskQueueClient};

#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub duration: Duration,
    /// Tasks enqueued per second; unset = half the peak measured first.
    pub rate: Option<f64>,
    pub sample_every: Duration,
    pub agents: usize,
    pub capacity: i32,
    /// Logs of the processes.
    pub dir: PathBuf,
}

/// One look at the mesh.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub at: Duration,
    /// Tasks completed per second since the last sample.
    pub done_per_s: f64,
    /// name → (RSS in bytes, open descriptors)
    pub procs: BTreeMap<String, (u64, u64)>,
    pub db_connections: i64,
    pub outbox: i64,
    pub tasks: i64,
    pub tickets: i64,
    pub stream_messages: u64,
    pub stream_bytes: u64,
}

#[derive(Debug, Default)]
pub struct SoakReport {
    /// Each process's (RSS, descriptors) before the load.
    pub idle: BTreeMap<String, (u64, u64)>,
    pub peak: Option<f64>,
    pub rate: f64,
    pub warm_up: Duration,
    pub samples: Vec<Sample>,
    /// Non-OK answers to the load's calls, by method and code.
    pub errors: BTreeMap<String, u64>,
    pub completed: u64,
    /// Each judgement: what, its figures, whether it holds.
    pub verdicts: Vec<(String, bool)>,
}

impl SoakReport {
    pub fn passed(&self) -> bool {
        self.verdicts.iter().all(|(_, ok)| *ok)
    }
}

const MB: f64 = 1024.0 * 1024.0;

impl fmt::Display for SoakReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(peak) = self.peak {
            writeln!(f, "peak {peak:.0} tasks/s measured; soak at {:.0} tasks/s", self.rate)?;
        } else {
            writeln!(f, "soak at {:.0} tasks/s", self.rate)?;
        }
        let idle: Vec<String> = self
            .idle
            .iter()
            .map(|(n, (rss, fds))| format!("{n} {:.1} MB, {fds} fds", *rss as f64 / MB))
            .collect();
        writeln!(f, "idle: {}", idle.join("; "))?;
        let names: Vec<&String> = self
            .samples
            .first()
            .map(|s| s.procs.keys().collect())
            .unwrap_or_default();
        write!(f, "| t (s) | done/s |")?;
        for n in &names {
            write!(f, " {n} RSS MB | fds |")?;
        }
        writeln!(f, " db conns | outbox | tasks | tickets | stream msgs | stream MB |")?;
        write!(f, "|---:|---:|")?;
        for _ in &names {
            write!(f, "---:|---:|")?;
        }
        writeln!(f, "---:|---:|---:|---:|---:|---:|")?;
        for s in &self.samples {
            write!(f, "| {:.0} | {:.0} |", s.at.as_secs_f64(), s.done_per_s)?;
            for n in &names {
                let (rss, fds) = s.procs.get(*n).copied().unwrap_or_default();
                write!(f, " {:.1} | {fds} |", rss as f64 / MB)?;
            }
            writeln!(
                f,
                " {} | {} | {} | {} | {} | {:.1} |",
                s.db_connections,
                s.outbox,
                s.tasks,
                s.tickets,
                s.stream_messages,
                s.stream_bytes as f64 / MB
            )?;
        }
        writeln!(
            f,
            "{} tasks completed; warm-up {:.0} s; errors {:?}",
            self.completed,
            self.warm_up.as_secs_f64(),
            self.errors
        )?;
        for (what, ok) in &self.verdicts {
            writeln!(f, "{} {what}", if *ok { "PASS" } else { "FAIL" })?;
        }
        write!(
            f,
            "verdict: {}",
            if self.passed() { "PASS (flat and clean)" } else { "FAIL" }
        )
    }
}

/// Runs the soak on the machine's PostgreSQL and NATS (a database, subject
/// prefix and stream of its own, removed at the end).
pub async fn run(o: &SoakOptions) -> anyhow::Result<SoakReport> {
    let infra = Infra::new().await?;
    let env: Vec<(String, String)> = [
        ("OMOI_SUBJECT_PREFIX", infra.topology.prefix.as_str()),
        ("OMOI_EVENTS_STREAM", infra.topology.stream.as_str()),
        ("OMOI_TASK_RETENTION_SECONDS", "60"),
        ("OMOI_TICKET_RETENTION_SECONDS", "60"),
        ("OMOI_EVENTS_MAX_AGE_SECONDS", "120"),
        ("OMOI_HEARTBEAT_INTERVAL_SECONDS", "5"),
        ("OMOI_DB_MAX_CONNECTIONS", "8"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let fleet = Fleet::start(&FleetOptions {
        database_url: infra.db.url.clone(),
        nats_url: infra.nats_url.clone(),
        replicas: 1,
        executors: 0,
        executor_capacity: 1,
        dir: o.dir.clone(),
        env,
        executor_env: Vec::new(),
    })
    .await?;
    let result = soak(o, &infra, &fleet).await;
    let unclean = fleet.stop().await?;
    infra.cleanup().await?;
    let mut report = result?;
    report.verdicts.push((
        format!("every process exits 0 on SIGTERM {unclean:?}"),
        unclean.is_empty(),
    ));
    Ok(report)
}

async fn soak(o: &SoakOptions, infra: &Infra, fleet: &Fleet) -> anyhow::Result<SoakReport> {
    let queue = omoi_tests::client(&fleet.urls("omoi-task-queue")[0]);
    let health = omoi_tests::health_client(&fleet.urls("omoi-health")[0]);
    let tickets = omoi_tests::ticket_client(&fleet.urls("omoi-ticket")[0]);
    let pool = infra.db.connect().await?;
    let js = async_nats::jetstream::new(async_nats::connect(&infra.nats_url).await?);
    let mut report = SoakReport::default();
    // Each process's memory before any load, once it settled.
    tokio::time::sleep(Duration::from_secs(2)).await;
    report.idle = look(fleet, &pool, &js, &infra.db.name, &infra.topology.stream)
        .await?
        .procs;
    let load = Load::default();
    let stop = CancellationToken::new();
    let agents = load.agents(&queue, &health, o.agents, o.capacity, &stop).await?;

    report.rate = match o.rate {
        Some(r) => r,
        None => {
            let peak = load.peak(&queue, 20_000).await?;
            report.peak = Some(peak);
            peak / 2.0
        }
    };
    anyhow::ensure!(report.rate > 0.0, "the rate must be positive");
    report.warm_up = (o.duration / 5).max(Duration::from_secs(150)).min(o.duration / 2);

    let pacing = CancellationToken::new();
    let paced = tokio::spawn(load.clone().paced(queue.clone(), tickets, report.rate, pacing.clone()));
    let start = Instant::now();
    let mut last = (start, load.completed.load(Ordering::Relaxed));
    let mut every = tokio::time::interval(o.sample_every);
    every.tick().await;
    while start.elapsed() < o.duration {
        every.tick().await;
        let done = load.completed.load(Ordering::Relaxed);
        let mut s = look(fleet, &pool, &js, &infra.db.name, &infra.topology.stream).await?;
        s.at = start.elapsed();
        s.done_per_s = (done - last.1) as f64 / last.0.elapsed().as_secs_f64();
        last = (Instant::now(), done);
        eprintln!(
            "{:>5.0} s  {:>6.0} done/s  outbox {:>5}  tasks {:>7}  {}",
            s.at.as_secs_f64(),
            s.done_per_s,
            s.outbox,
            s.tasks,
            s.procs
                .iter()
                .map(|(n, (rss, fds))| format!("{n} {:.1} MB {fds} fds", *rss as f64 / MB))
                .collect::<Vec<_>>()
                .join(", ")
        );
        report.samples.push(s);
    }
    pacing.cancel();
    let enqueued = paced.await??;
    // What was enqueued is all done and published, within a minute.
    let drained = async {
        loop {
            let outbox: i64 = sqlx::query_scalar("SELECT coalesce(sum(n), 0)::bigint FROM event_batches")
                .fetch_one(&pool)
                .await?;
            if load.completed.load(Ordering::Relaxed) >= enqueued && outbox == 0 {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let drained = tokio::time::timeout(Duration::from_secs(60), drained).await.is_ok();
    stop.cancel();
    for a in agents {
        let _ = a.await;
    }
    pool.close().await;
    report.completed = load.completed.load(Ordering::Relaxed);
    report.errors = load.errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
    judge(&mut report, drained);
    Ok(report)
}

/// RSS and open descriptors of each process, and the database's and the
/// stream's figures.
async fn look(
    fleet: &Fleet,
    pool: &sqlx::PgPool,
    js: &async_nats::jetstream::Context,
    database: &str,
    stream: &str,
) -> anyhow::Result<Sample> {
    let mut s = Sample::default();
    for p in &fleet.procs {
        if let Some(pid) = p.pid() {
            s.procs.insert(p.name.clone(), (rss(pid), fds(pid)));
        }
    }
    (s.db_connections, s.outbox, s.tasks, s.tickets) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = $1),
                (SELECT coalesce(sum(n), 0)::bigint FROM event_batches),
                (SELECT count(*) FROM tasks), (SELECT count(*) FROM tickets)",
    )
    .bind(database)
    .fetch_one(pool)
    .await?;
    let info = js.get_stream(stream).await?.info().await?.state.clone();
    s.stream_messages = info.messages;
    s.stream_bytes = info.bytes;
    Ok(s)
}

/// A process's resident memory, in bytes (0 when it is gone).
pub fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// CPU seconds (user and system) a process has used so far (0 when it is
/// gone); /proc counts in USER_HZ, which is 100 on Linux.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces), from "state".
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// The mean of the first and of the last quarter of `values`.
fn ends(values: &[f64]) -> (f64, f64) {
    let q = (values.len() / 4).max(1);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    (mean(&values[..q]), mean(&values[values.len() - q..]))
}

/// Whether `values` stayed flat: the last quarter's mean within `tolerance`
/// (a fraction) of the first quarter's, or within `slack` of it.
pub fn flat(values: &[f64], tolerance: f64, slack: f64) -> (bool, String) {
    if values.len() < 4 {
        return (false, format!("too few samples ({})", values.len()));
    }
    let (first, last) = ends(values);
    let change = if first > 0.0 { (last - first) / first } else { 0.0 };
    let ok = (last - first).abs() <= slack || change.abs() <= tolerance;
    (ok, format!("{first:.1} -> {last:.1} ({:+.1} %)", change * 100.0))
}

/// Whether what a retention window holds stayed bounded: `values` per unit
/// of `rate` (rows per completed task a second: the seconds of work they
/// hold), the last quarter's within `tolerance` of the first quarter's. A
/// table or stream under retention grows with the rate the mesh keeps,
/// which drifts with the machine's speed; one that retention does not bound
/// grows whatever the rate.
pub fn bounded(values: &[f64], rate: &[f64], tolerance: f64) -> (bool, String) {
    if values.len() < 4 || values.len() != rate.len() {
        return (false, format!("too few samples ({})", values.len()));
    }
    let ((v0, v1), (r0, r1)) = (ends(values), ends(rate));
    if r0 <= 0.0 || r1 <= 0.0 {
        return (false, format!("no load ({r0:.0} -> {r1:.0} tasks/s)"));
    }
    let (first, last) = (v0 / r0, v1 / r1);
    let change = (last - first) / first.max(f64::MIN_POSITIVE);
    let how = format!(
        "{v0:.0} -> {v1:.0} at {r0:.0} -> {r1:.0} tasks/s: {first:.1} -> {last:.1} s of work ({:+.1} %)",
        change * 100.0
    );
    (change.abs() <= tolerance, how)
}

/// The events each task makes (created, assigned, started, completed).
const EVENTS_PER_TASK: f64 = 4.0;

fn judge(r: &mut SoakReport, drained: bool) {
    let after: Vec<&Sample> = r.samples.iter().filter(|s| s.at >= r.warm_up).collect();
    let series = |f: &dyn Fn(&Sample) -> f64| after.iter().map(|s| f(s)).collect::<Vec<f64>>();
    let mut v = Vec::new();
    let names: Vec<String> = r
        .samples
        .first()
        .map(|s| s.procs.keys().cloned().collect())
        .unwrap_or_default();
    for n in &names {
        let (ok, how) = flat(&series(&|s| s.procs.get(n).map_or(0.0, |p| p.0 as f64 / MB)), 0.10, 1.0);
        v.push((format!("{n} RSS flat (MB, ±10 %): {how}"), ok));
        let (ok, how) = flat(&series(&|s| s.procs.get(n).map_or(0.0, |p| p.1 as f64)), 0.10, 2.0);
        v.push((format!("{n} descriptors flat (±10 % or 2): {how}"), ok));
    }
    let (ok, how) = flat(&series(&|s| s.db_connections as f64), 0.10, 2.0);
    v.push((format!("database connections flat: {how}"), ok));
    let done = series(&|s| s.done_per_s);
    for (what, f) in [
        ("tasks table", &(|s: &Sample| s.tasks as f64) as &dyn Fn(&Sample) -> f64),
        ("events stream (messages)", &|s: &Sample| s.stream_messages as f64),
    ] {
        let (ok, how) = bounded(&series(f), &done, 0.10);
        v.push((format!("{what} bounded by its retention: {how}"), ok));
    }
    // Two seconds of the load's events.
    let bound = (r.rate * EVENTS_PER_TASK * 2.0).max(1000.0);
    let worst = after.iter().map(|s| s.outbox).max().unwrap_or(0);
    v.push((
        format!("outbox backlog bounded (at most {worst} events after warm-up, limit {bound:.0}) and drained at the end ({drained})"),
        (worst as f64) <= bound && drained,
    ));
    let mean = done.iter().sum::<f64>() / done.len().max(1) as f64;
    v.push((
        format!("the load held ({mean:.0} of {:.0} tasks/s after warm-up)", r.rate),
        mean >= 0.9 * r.rate,
    ));
    let errors: u64 = r.errors.values().sum();
    v.push((format!("no error status from any call ({errors})"), errors == 0));
    r.verdicts = v;
}

/// The soak's load and what it counts.
#[derive(Clone, Default)]
struct Load {
    completed: Arc<AtomicU64>,
    errors: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl Load {
    fn error(&self, method: &str, s: &tonic::Status) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(format!("{method} {:?}", s.code()))
            .or_default() += 1;
    }

    /// Registers `n` agents, heartbeats for them every 5 s and works their
    /// assignment streams until `stop`.
    async fn agents(
        &self,
        queue: &TaskQueueClient,
        health: &omoi_tests::HealthClient,
        n: usize,
        capacity: i32,
        stop: &CancellationToken,
    ) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
        let mut handles = Vec::new();
        for _ in 0..n {
            let mut h = health.clone();
            let agent_id = omoi_tests::agent::register(&mut h, "soak", capacity).await?;
            let (id, load, stop2) = (agent_id.clone(), self.clone(), stop.clone());
            handles.push(tokio::spawn(async move {
                while !stop2.is_cancelled() {
                    if let Err(s) = h
                        .heartbeat(omoi_proto::health::HeartbeatRequest {
                            agent_id: id.clone(),
                            running_task_ids: vec![],
                        })
                        .await
                    {
                        load.error("Heartbeat", &s);
                    }
                    tokio::select! {
                        _ = stop2.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                }
            }));
            let mut q = queue.clone();
            let mut stream = q
                .watch_assignments(pb::WatchAssignmentsRequest {
                    agent_id,
                    phases: vec![],
                    capacity,
                })
                .await?
                .into_inner();
            let (load, stop) = (self.clone(), stop.clone());
            handles.push(tokio::spawn(async move {
                loop {
                    let msg = tokio::select! {
                        _ = stop.cancelled() => return,
                        m = stream.message() => m,
                    };
                    let a = match msg {
                        Ok(Some(m)) => match m.event {
                            Some(StreamEvent::Assignment(a)) => a,
                            _ => continue,
                        },
                        Ok(None) => return,
                        Err(s) => return load.error("WatchAssignments", &s),
                    };
                    let Some(task) = a.task else { continue };
                    let (mut c, load) = (q.clone(), load.clone());
                    tokio::spawn(async move {
                        let (task_id, attempt) = (task.id, a.attempt);
                        let started = c
                            .start_task(pb::StartTaskRequest {
                                task_id: task_id.clone(),
                                attempt,
                            })
                            .await;
                        if let Err(s) = started {
                            return load.error("StartTask", &s);
                        }
                        match c
                            .complete_task(pb::CompleteTaskRequest {
                                task_id,
                                attempt,
                                ..Default::default()
                            })
                            .await
                        {
                            Ok(_) => {
                                load.completed.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(s) => load.error("CompleteTask", &s),
                        }
                    });
                }
            }));
        }
        Ok(handles)
    }

    /// Enqueues `n` tasks as fast as it can and waits until they are done:
    /// the peak, in tasks per second.
    async fn peak(&self, queue: &TaskQueueClient, n: u64) -> anyhow::Result<f64> {
        let before = self.completed.load(Ordering::Relaxed);
        let start = Instant::now();
        let mut sent = 0;
        while sent < n {
            let k = 500.min(n - sent);
            queue.clone().enqueue_tasks(batch(sent, k)).await?;
            sent += k;
        }
        while self.completed.load(Ordering::Relaxed) - before < n {
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(300),
                "the peak run did not finish in five minutes"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    }

    /// Enqueues at `rate` tasks/s and creates a ticket a second until
    /// `stop`; how many tasks it enqueued (the tickets' included).
    async fn paced(
        self,
        queue: TaskQueueClient,
        tickets: omoi_tests::TicketClient,
        rate: f64,
        stop: CancellationToken,
    ) -> anyhow::Result<u64> {
        let before = self.completed.load(Ordering::Relaxed);
        let tick = Duration::from_millis(10);
        let mut every = tokio::time::interval(tick);
        let start = Instant::now();
        let (mut sent, mut ticket_tasks, mut n) = (0u64, 0u64, 0u64);
        while !stop.is_cancelled() {
            every.tick().await;
            n += 1;
            let due = ((n as f64) * rate * tick.as_secs_f64()).round() as u64;
            let k = due.saturating_sub(sent);
            if k > 0 {
                match queue.clone().enqueue_tasks(batch(sent, k)).await {
                    Ok(_) => sent += k,
                    Err(s) => self.error("EnqueueTasks", &s),
                }
            }
            if start.elapsed().as_secs() >= ticket_tasks / 4 {
                let created = tickets
                    .clone()
                    .create_ticket(omoi_proto::ticket::CreateTicketRequest {
                        title: format!("soak ticket {}", ticket_tasks / 4),
                        ..Default::default()
                    })
                    .await;
                match created {
                    Ok(_) => ticket_tasks += 4,
                    Err(s) => self.error("CreateTicket", &s),
                }
            }
        }
        Ok(before + sent + ticket_tasks)
    }
}

fn batch(from: u64, k: u64) -> pb::EnqueueTasksRequest {
    pb::EnqueueTasksRequest {
        tasks: (from..from + k)
            .map(|i| pb::NewTask {
                title: format!("soak task {i}"),
                phase: 1 + (i % 4) as i32,
                priority: (i % 3) as i32,
                ..Default::default()
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::{bounded, flat};

    #[test]
    fn retention_bounds_follow_the_rate_and_catch_growth() {
        let rate = [1400.0, 1400.0, 1450.0, 1500.0, 1700.0, 1850.0, 1900.0, 1900.0];
        // A minute's work, as the mesh sped up by a third: bounded.
        let held: Vec<f64> = rate.iter().map(|r| r * 61.0).collect();
        assert!(bounded(&held, &rate, 0.10).0);
        // The same rows at a steady rate: growth retention does not stop.
        let steady = [1400.0; 8];
        assert!(!bounded(&held, &steady, 0.10).0);
        assert!(!bounded(&held, &[0.0; 8], 0.10).0, "no load");
        assert!(!bounded(&held[..2], &rate[..2], 0.10).0, "too few samples");
    }

    #[test]
    fn flat_allows_noise_and_catches_growth() {
        assert!(flat(&[20.0, 21.0, 20.5, 20.0, 21.0, 20.8, 20.2, 21.1], 0.10, 1.0).0);
        // A leak: a third more by the end.
        assert!(!flat(&[20.0, 22.0, 24.0, 26.0, 28.0, 30.0, 32.0, 34.0], 0.10, 1.0).0);
        // Small counts move by a little without failing.
        assert!(flat(&[12.0, 12.0, 13.0, 12.0, 13.0, 14.0, 13.0, 14.0], 0.10, 2.0).0);
        assert!(!flat(&[10.0, 10.0], 0.10, 2.0).0, "too few samples");
    }
}
