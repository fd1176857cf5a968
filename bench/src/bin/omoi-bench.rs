//! omoi-bench: drives a running task-queue over real gRPC and reports
//! throughput and dispatch latency.
//!
//! It enqueues N tasks in batches (optionally paced at R tasks/s), runs M
//! simulated agents that start and complete each task as soon as they get it,
//! and measures enqueue rate, end-to-end rate, dispatch latency (task ready →
//! assignment received) and how fast the events reach JetStream.

#[global_allocator]
static ALLOCATOR: omoi_runtime::Allocator = omoi_runtime::ALLOCATOR;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use omoi_proto::convert::from_timestamp;
use omoi_proto::taskqueue::watch_assignments_response::Event as StreamEvent;
use omoi_proto::taskqueue::{self as pb};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Parser)]
#[command(name = "omoi-bench", about = "Benchmark a running omoi task-queue")]
struct Args {
    /// Instead of the task queue, load the health service: this many agents
    /// heartbeat back to back (closed loop) for --seconds.
    #[arg(long)]
    heartbeat_agents: Option<usize>,
    /// Length of the heartbeat load, in seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Heartbeat load: each agent heartbeats once every this many seconds
    /// (spread evenly) instead of back to back.
    #[arg(long)]
    interval: Option<f64>,
    /// Health service address (heartbeat load).
    #[arg(long, env = "OMOI_HEALTH_URL", default_value = "http://127.0.0.1:50053")]
    health_url: String,
    /// Tasks to run.
    #[arg(long, default_value_t = 20_000)]
    tasks: usize,
    /// Simulated agents (one WatchAssignments stream each).
    #[arg(long, default_value_t = 8)]
    agents: usize,
    /// Tasks each agent holds at once.
    #[arg(long, default_value_t = 64)]
    capacity: i32,
    /// Pace enqueues at this many tasks per second (unpaced when unset).
    #[arg(long)]
    rate: Option<f64>,
    /// Tasks per EnqueueTasks call when unpaced.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Before the run, fill the queue with this many tasks of a phase the
    /// agents do not take (REFACTORING, at the highest priority, so every
    /// claim has them in its way); the agents then take INITIAL to
    /// INTEGRATION only, and so do the measured tasks. Give 0 for the
    /// baseline with the same phases. With DATABASE_URL, the tasks and
    /// outbox tables are vacuumed after the fill, before the run.
    #[arg(long)]
    prefill: Option<usize>,
    /// Routing in play: the agents carry the label `runner=bench` and every
    /// other measured task requires it; the --prefill tasks are of the
    /// measured phases instead, requiring `runner=elsewhere`, which no
    /// agent carries (every claim has them ahead in its phases' index).
    #[arg(long)]
    requirements: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Task-queue address.
    #[arg(long, env = "OMOI_TASK_QUEUE_URL", default_value = "http://127.0.0.1:50052")]
    url: String,
    /// NATS URL, to count the published events.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// The events stream.
    #[arg(long, env = "OMOI_EVENTS_STREAM", default_value = "OMOI_EVENTS")]
    events_stream: String,
    /// Start a task-queue inside this process (configured from the
    /// environment: DATABASE_URL, NATS_URL, …) instead of using --url.
    #[arg(long)]
    spawn: bool,
    /// Delete the events stream when done (a stream of the bench's own,
    /// named with OMOI_EVENTS_STREAM).
    #[arg(long)]
    drop_stream: bool,
    /// Bearer token, when the task-queue requires one.
    #[arg(long, env = "OMOI_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// TLS, for https:// URLs.
    #[command(flatten)]
    tls: omoi_runtime::tls::TlsArgs,
}

type Client = pb::task_queue_service_client::TaskQueueServiceClient<omoi_runtime::grpc::Client>;

fn connector(args: &Args) -> anyhow::Result<omoi_runtime::grpc::Connector> {
    omoi_runtime::grpc::Connector::new(args.auth_token.as_deref(), &args.tls)
}

fn client(args: &Args) -> anyhow::Result<Client> {
    Ok(pb::task_queue_service_client::TaskQueueServiceClient::new(
        connector(args)?.client(&args.url, "--url")?,
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    anyhow::ensure!(
        args.tasks > 0 && args.agents > 0,
        "--tasks and --agents must be positive"
    );
    let _telemetry = omoi_runtime::telemetry::init("omoi-bench", omoi_runtime::config::LogFormat::Text, "warn");
    if let Some(agents) = args.heartbeat_agents {
        return heartbeat_load(&args, agents).await;
    }
    let spawned = if args.spawn {
        let mut config = omoi_task_queue::Config::from_env();
        config.common.host.auth_token = args.auth_token.clone();
        config.common.bus.events_stream = args.events_stream.clone();
        config.common.bus.nats_url = args.nats_url.clone();
        let tq = omoi_tests::InProcess::start(config).await?;
        eprintln!("omoi-bench: task-queue serving at {}", tq.url);
        args.url = tq.url.clone();
        // The agents register with a health service on the same database.
        let mut config = omoi_health::Config::from_env();
        config.common.host.auth_token = args.auth_token.clone();
        config.common.bus.events_stream = args.events_stream.clone();
        config.common.bus.nats_url = args.nats_url.clone();
        let health = omoi_tests::InProcess::health(config).await?;
        args.health_url = health.url.clone();
        Some((tq, health))
    } else {
        None
    };
    connector(&args)?
        .wait_serving(&args.url, Duration::from_secs(30))
        .await
        .map_err(anyhow::Error::msg)?;
    let nats = async_nats::connect(&args.nats_url).await?;
    let js = async_nats::jetstream::new(nats);
    let mut events_before = stream_messages(&js, &args.events_stream).await;
    if let Some(n) = args.prefill {
        let started = Instant::now();
        prefill(&mut client(&args)?, n, args.requirements).await?;
        eprintln!(
            "omoi-bench: {n} tasks queued ahead in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        // Their TASK_CREATED events are not the run's.
        events_before += n as u64;
        let deadline = Instant::now() + Duration::from_secs(600);
        while stream_messages(&js, &args.events_stream).await < events_before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A queue that grew this deep over time would have shed the
        // garbage of its growth long ago (the outbox's published batches,
        // the tables' statistics); a bulk load leaves it all to the first
        // vacuum, which would then run through the measured run.
        if let Ok(url) = std::env::var("DATABASE_URL") {
            let started = Instant::now();
            let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await?;
            sqlx::raw_sql("VACUUM (ANALYZE) tasks, event_batches")
                .execute(&mut db)
                .await?;
            eprintln!(
                "omoi-bench: vacuumed after the fill in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    let phases: Vec<i32> = if args.prefill.is_some() {
        vec![1, 2, 3]
    } else {
        Vec::new()
    };

    let latencies = Arc::new(Mutex::new(Vec::with_capacity(args.tasks)));
    let done = Arc::new(AtomicUsize::new(0));
    let all_done = CancellationToken::new();
    let stop = CancellationToken::new();
    // Agents register and connect first, so that dispatch starts with the
    // first enqueue; they heartbeat while the bench runs.
    let health = health_client(&args).await?;
    let ids = register_agents(&health, args.agents, args.capacity, args.requirements).await?;
    let beats: Vec<_> = ids
        .iter()
        .map(|id| {
            let (mut h, id, stop) = (health.clone(), id.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let _ = h
                        .heartbeat(omoi_proto::health::HeartbeatRequest {
                            agent_id: id.clone(),
                            running_task_ids: vec![],
                        })
                        .await;
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                }
            })
        })
        .collect();
    let mut agents = Vec::new();
    for id in &ids {
        let mut c = client(&args)?;
        let stream = c
            .watch_assignments(pb::WatchAssignmentsRequest {
                agent_id: id.clone(),
                phases: phases.clone(),
                capacity: args.capacity,
            })
            .await?
            .into_inner();
        agents.push(tokio::spawn(agent(
            c,
            stream,
            Arc::clone(&latencies),
            Arc::clone(&done),
            args.tasks,
            all_done.clone(),
            stop.clone(),
        )));
    }

    let start = Instant::now();
    let mut enq = client(&args)?;
    let mut sent = 0usize;
    let mut n = 0u64;
    match args.rate {
        None => {
            while sent < args.tasks {
                let k = args.batch.min(args.tasks - sent);
                enq.enqueue_tasks(batch(sent, k, phases.len(), args.requirements))
                    .await?;
                sent += k;
            }
        }
        Some(rate) => {
            anyhow::ensure!(rate > 0.0, "--rate must be positive");
            let tick = Duration::from_millis(10);
            let mut interval = tokio::time::interval(tick);
            while sent < args.tasks {
                interval.tick().await;
                n += 1;
                let due = ((n as f64) * rate * tick.as_secs_f64()).round() as usize;
                let k = due.saturating_sub(sent).min(args.tasks - sent);
                if k > 0 {
                    enq.enqueue_tasks(batch(sent, k, phases.len(), args.requirements))
                        .await?;
                    sent += k;
                }
            }
        }
    }
    let enqueue_secs = start.elapsed().as_secs_f64();
    tokio::select! {
        _ = all_done.cancelled() => {}
        _ = tokio::time::sleep(Duration::from_secs(600)) => anyhow::bail!(
            "only {} of {} tasks completed within 600 s", done.load(Ordering::Relaxed), args.tasks
        ),
    }
    let e2e_secs = start.elapsed().as_secs_f64();
    stop.cancel();
    for a in agents.into_iter().chain(beats) {
        let _ = a.await;
    }

    // Created, assigned, started, completed: four events per task; and
    // each agent's registration.
    let task_events = 4 * args.tasks as u64;
    let expected = events_before + task_events + args.agents as u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut events_now = stream_messages(&js, &args.events_stream).await;
    while events_now < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        events_now = stream_messages(&js, &args.events_stream).await;
    }
    let events_secs = start.elapsed().as_secs_f64();
    let published = events_now
        .saturating_sub(events_before)
        .saturating_sub(args.agents as u64);

    let mut lat = latencies.lock().await.clone();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((p / 100.0) * (lat.len() - 1) as f64).round() as usize;
        lat[i.min(lat.len() - 1)]
    };
    let report = serde_json::json!({
        "tasks": args.tasks,
        "agents": args.agents,
        "capacity": args.capacity,
        "prefill": args.prefill,
        "rate": args.rate,
        "enqueue_tasks_per_s": round(args.tasks as f64 / enqueue_secs),
        "end_to_end_tasks_per_s": round(args.tasks as f64 / e2e_secs),
        "dispatch_p50_ms": round(pct(50.0)),
        "dispatch_p90_ms": round(pct(90.0)),
        "dispatch_p99_ms": round(pct(99.0)),
        "events_per_s": round(published as f64 / events_secs),
        "events_published": published,
        "events_expected": 4 * args.tasks,
        "nats_server": js.client().server_info().version,
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "omoi-bench: {} tasks, {} agents x capacity {}{}",
            args.tasks,
            args.agents,
            args.capacity,
            args.rate.map(|r| format!(", paced at {r} tasks/s")).unwrap_or_default()
        );
        println!(
            "  enqueue          {:>10.0} tasks/s",
            report["enqueue_tasks_per_s"].as_f64().unwrap_or(0.0)
        );
        println!(
            "  end to end       {:>10.0} tasks/s",
            report["end_to_end_tasks_per_s"].as_f64().unwrap_or(0.0)
        );
        println!(
            "  dispatch latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms",
            pct(50.0),
            pct(90.0),
            pct(99.0)
        );
        println!(
            "  events           {:>10.0} events/s ({published} of {} published)",
            report["events_per_s"].as_f64().unwrap_or(0.0),
            4 * args.tasks
        );
    }
    if let Some((tq, health)) = spawned {
        health.stop().await?;
        tq.stop().await?;
    }
    if args.drop_stream {
        js.delete_stream(&args.events_stream).await?;
    }
    Ok(())
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Tasks `from..from + k`, over the first `phases` phases (0: all four);
/// with `requirements`, every other one requires `runner=bench`.
fn batch(from: usize, k: usize, phases: usize, requirements: bool) -> pb::EnqueueTasksRequest {
    let phases = if phases == 0 { 4 } else { phases };
    pb::EnqueueTasksRequest {
        tasks: (from..from + k)
            .map(|i| pb::NewTask {
                title: format!("bench task {i}"),
                phase: 1 + (i % phases) as i32,
                priority: (i % 3) as i32,
                requires: if requirements && i % 2 == 0 {
                    runner("bench")
                } else {
                    Default::default()
                },
                ..Default::default()
            })
            .collect(),
    }
}

/// The label set `runner=<name>`.
fn runner(name: &str) -> std::collections::HashMap<String, String> {
    [("runner".to_owned(), name.to_owned())].into()
}

/// `n` tasks at priority 3 (above every measured task), which the run's
/// agents never take: REFACTORING ones, or with `requirements` ones of
/// their phases requiring `runner=elsewhere`.
async fn prefill(client: &mut Client, n: usize, requirements: bool) -> anyhow::Result<()> {
    let mut sent = 0;
    while sent < n {
        let k = 1000.min(n - sent);
        let tasks = (sent..sent + k)
            .map(|i| pb::NewTask {
                title: format!("queued ahead {i}"),
                phase: if requirements { 1 + (i % 3) as i32 } else { 4 },
                priority: 3,
                requires: if requirements {
                    runner("elsewhere")
                } else {
                    Default::default()
                },
                ..Default::default()
            })
            .collect();
        client.enqueue_tasks(pb::EnqueueTasksRequest { tasks }).await?;
        sent += k;
    }
    Ok(())
}

async fn stream_messages(js: &async_nats::jetstream::Context, name: &str) -> u64 {
    match js.get_stream(name).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

async fn agent(
    client: Client,
    mut stream: tonic::Streaming<pb::WatchAssignmentsResponse>,
    latencies: Arc<Mutex<Vec<f64>>>,
    done: Arc<AtomicUsize>,
    total: usize,
    all_done: CancellationToken,
    stop: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return,
            m = stream.message() => m,
        };
        let Ok(Some(msg)) = msg else { return };
        let Some(StreamEvent::Assignment(a)) = msg.event else {
            continue;
        };
        let received = SystemTime::now();
        let Some(task) = a.task else { continue };
        let ready = [task.created_at.as_ref(), task.next_attempt_at.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(from_timestamp)
            .max();
        if let Some(ready) = ready {
            let ready: SystemTime = ready.into();
            let ms = received.duration_since(ready).unwrap_or_default().as_secs_f64() * 1000.0;
            latencies.lock().await.push(ms);
        }
        let (mut c, done, all_done) = (client.clone(), Arc::clone(&done), all_done.clone());
        tokio::spawn(async move {
            let started = c
                .start_task(pb::StartTaskRequest {
                    task_id: task.id.clone(),
                    attempt: a.attempt,
                })
                .await;
            if started.is_ok()
                && c.complete_task(pb::CompleteTaskRequest {
                    task_id: task.id,
                    attempt: a.attempt,
                    result: None,
                    ..Default::default()
                })
                .await
                .is_ok()
                && done.fetch_add(1, Ordering::Relaxed) + 1 == total
            {
                all_done.cancel();
            }
        });
    }
}

type Health = omoi_proto::health::agent_health_service_client::AgentHealthServiceClient<omoi_runtime::grpc::Client>;

async fn health_client(args: &Args) -> anyhow::Result<Health> {
    let connector = connector(args)?;
    connector
        .wait_serving(&args.health_url, Duration::from_secs(30))
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(Health::new(connector.client(&args.health_url, "--health-url")?))
}

/// Registers `n` agents with the health service; their ids.
/// `n` agents; with `requirements`, labelled `runner=bench`.
async fn register_agents(health: &Health, n: usize, capacity: i32, requirements: bool) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let agent = health
            .clone()
            .register_agent(omoi_proto::health::RegisterAgentRequest {
                agent_type: "bench".to_owned(),
                capacity,
                labels: if requirements {
                    runner("bench")
                } else {
                    Default::default()
                },
                ..Default::default()
            })
            .await?
            .into_inner()
            .agent
            .ok_or_else(|| anyhow::anyhow!("RegisterAgent answered no agent"))?;
        ids.push(agent.id);
    }
    Ok(ids)
}

/// Closed-loop heartbeat load on the health service.
async fn heartbeat_load(args: &Args, agents: usize) -> anyhow::Result<()> {
    use omoi_proto::health as hp;
    anyhow::ensure!(
        agents > 0 && args.seconds > 0.0 && args.interval.is_none_or(|i| i > 0.0),
        "--heartbeat-agents, --seconds and --interval must be positive"
    );
    // With --spawn, the health service runs as a process of its own, so
    // that its CPU time and memory can be read.
    let mut args = args.clone();
    let spawned = if args.spawn {
        let port = omoi_tests::process::free_port();
        let mut env: Vec<(String, String)> = ["DATABASE_URL", "OMOI_SUBJECT_PREFIX", "OMOI_EVENTS_STREAM"]
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect();
        env.push(("NATS_URL".into(), args.nats_url.clone()));
        env.push(("OMOI_LISTEN_ADDR".into(), format!("127.0.0.1:{port}")));
        let interval = args.interval.unwrap_or(30.0).ceil().max(1.0) as u32;
        env.push(("OMOI_HEARTBEAT_INTERVAL_SECONDS".into(), interval.to_string()));
        let health = omoi_tests::process::Service::spawn("omoi-health", port, &env)?;
        args.health_url = health.url.clone();
        Some(health)
    } else {
        None
    };
    let client = health_client(&args).await?;
    let ids = register_agents(&client, agents, 1, false).await?;
    let pid = spawned.as_ref().and_then(|h| h.child.id());
    let cpu_before = pid.map(omoi_bench::soak::cpu_seconds);
    let until = Instant::now() + Duration::from_secs_f64(args.seconds);
    let start = Instant::now();
    let mut workers = Vec::new();
    for (i, id) in ids.into_iter().enumerate() {
        let mut c = client.clone();
        let every = args.interval.map(Duration::from_secs_f64);
        // Paced agents start spread over one interval, as a fleet's would.
        let offset = every.map(|e| e.mul_f64(i as f64 / agents as f64));
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            let mut next = Instant::now() + offset.unwrap_or_default();
            loop {
                if every.is_some() {
                    if next >= until {
                        break;
                    }
                    tokio::time::sleep_until(next.into()).await;
                }
                if Instant::now() >= until {
                    break;
                }
                let t = Instant::now();
                let r = c
                    .heartbeat(hp::HeartbeatRequest {
                        agent_id: id.clone(),
                        running_task_ids: vec![],
                    })
                    .await;
                match r {
                    Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1000.0),
                    Err(_) => errors += 1,
                }
                if let Some(e) = every {
                    next += e;
                }
            }
            (lat, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (l, e) = w.await?;
        lat.extend(l);
        errors += e;
    }
    let secs = start.elapsed().as_secs_f64();
    // The health service's share of a core while it took the load, and its
    // memory at the end.
    let (cpu, rss) = match (pid, cpu_before) {
        (Some(pid), Some(before)) => (
            Some(round(100.0 * (omoi_bench::soak::cpu_seconds(pid) - before) / secs)),
            Some(round(rss_mb(pid))),
        ),
        _ => (None, None),
    };
    if let Some(health) = spawned {
        health.terminate(Duration::from_secs(30)).await?;
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lat.get(((p / 100.0) * (lat.len().max(1) - 1) as f64).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let report = serde_json::json!({
        "agents": agents,
        "seconds": round(secs),
        "heartbeats": lat.len(),
        "errors": errors,
        "heartbeats_per_s": round(lat.len() as f64 / secs),
        "heartbeat_p50_ms": round(pct(50.0)),
        "heartbeat_p99_ms": round(pct(99.0)),
        "interval_s": args.interval,
        "health_cpu_percent_of_a_core": cpu,
        "health_rss_mb": rss,
    });
    if args.json {
        println!("{report}");
    } else {
        let pace = args
            .interval
            .map_or("back to back".to_owned(), |i| format!("every {i} s"));
        println!("omoi-bench: {agents} agents heartbeating {pace} for {secs:.1} s");
        println!(
            "  heartbeats       {:>10.0} /s ({} in all, {errors} errors)",
            lat.len() as f64 / secs,
            lat.len()
        );
        println!("  latency          p50 {:.2} ms, p99 {:.2} ms", pct(50.0), pct(99.0));
        if let (Some(cpu), Some(rss)) = (cpu, rss) {
            println!("  health service   {cpu:.1} % of a core, {rss:.1} MB RSS");
        }
    }
    Ok(())
}

fn rss_mb(pid: u32) -> f64 {
    omoi_bench::soak::rss(pid) as f64 / (1024.0 * 1024.0)
}
