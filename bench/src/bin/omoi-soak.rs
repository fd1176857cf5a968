//! omoi-soak: the task-queue, health and ticket services as processes under
//! a steady load at half their measured peak (or --rate) for --minutes,
//! sampling each process's RSS and descriptors, the database connections,
//! the outbox backlog, the tasks table and the events stream; prints the
//! table and a verdict (flat after warm-up, no error status, backlog
//! bounded). `bash bench/soak.sh` builds and runs it.

#[global_allocator]
static ALLOCATOR: omoi_runtime::Allocator = omoi_runtime::ALLOCATOR;

use std::time::Duration;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "omoi-soak",
    about = "Soak the omoi mesh and judge whether its resources stay flat"
)]
struct Args {
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Tasks enqueued per second; unset = half the peak, measured first.
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds between samples.
    #[arg(long, default_value_t = 10.0)]
    sample_seconds: f64,
    /// Simulated agents (one assignment stream each).
    #[arg(long, default_value_t = 8)]
    agents: usize,
    /// Tasks each agent holds at once.
    #[arg(long, default_value_t = 64)]
    capacity: i32,
}

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let args = Args::parse();
    anyhow::ensure!(
        args.minutes > 0.0 && args.sample_seconds > 0.0 && args.agents > 0 && args.capacity > 0,
        "--minutes, --sample-seconds, --agents and --capacity must be positive"
    );
    let _ = omoi_runtime::telemetry::init("omoi-soak", omoi_runtime::config::LogFormat::Text, "warn");
    let dir = std::env::temp_dir().join(format!("omoi-soak-{}", std::process::id()));
    let report = omoi_bench::soak::run(&omoi_bench::soak::SoakOptions {
        duration: Duration::from_secs_f64(args.minutes * 60.0),
        rate: args.rate,
        sample_every: Duration::from_secs_f64(args.sample_seconds),
        agents: args.agents,
        capacity: args.capacity,
        dir: dir.clone(),
    })
    .await?;
    println!("{report}");
    if report.passed() {
        let _ = std::fs::remove_dir_all(&dir);
        Ok(std::process::ExitCode::SUCCESS)
    } else {
        println!("logs: {}", dir.display());
        Ok(std::process::ExitCode::FAILURE)
    }
}
