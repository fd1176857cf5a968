//! omoi-chaos: the whole mesh (two replicas of each service, executors
//! running the demo agent) under a steady load of tickets while a seeded
//! schedule kills every process and stops NATS and PostgreSQL; then checks
//! that nothing was lost, doubled or stranded and prints the counts.
//! `bash bench/chaos.sh` builds and runs it.

use std::time::Duration;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "omoi-chaos", about = "Run the omoi mesh under chaos and check its promises")]
struct Args {
    /// Seed of the fault schedule and the load (the same seed, the same
    /// faults in the same order).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Least minutes of load and faults (rounds of faults repeat until
    /// then; one round is always finished).
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Tickets created per second.
    #[arg(long, default_value_t = 2.0)]
    tickets_per_second: f64,
    #[arg(long, default_value_t = 3)]
    executors: usize,
    /// Where the processes' logs go (kept when the run fails).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let args = Args::parse();
    let _ = omoi_runtime::telemetry::init("omoi-chaos", omoi_runtime::config::LogFormat::Text, "info");
    let dir = args
        .dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("omoi-chaos-{}-{}", args.seed, std::process::id())));
    let options = omoi_bench::chaos::ChaosOptions {
        seed: args.seed,
        load: Duration::from_secs_f64(args.minutes * 60.0),
        tickets_per_second: args.tickets_per_second,
        executors: args.executors,
        dir: dir.clone(),
    };
    let report = omoi_bench::chaos::run(&options).await?;
    println!("{report}");
    if report.violations.is_empty() {
        let _ = std::fs::remove_dir_all(&dir);
        Ok(std::process::ExitCode::SUCCESS)
    } else {
        println!("  logs      {}", dir.display());
        Ok(std::process::ExitCode::FAILURE)
    }
}
