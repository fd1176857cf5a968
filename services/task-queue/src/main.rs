use clap::Parser;
use omoi_task_queue::config::Command;
use omoi_task_queue::{Config, migrate, redact, serve};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = Config::parse();
    let _telemetry = omoi_runtime::telemetry::init("omoi-task-queue", config.common.log_format, "info");
    let result = match config.command {
        Some(Command::Migrate) => migrate(&config).await,
        Some(Command::Serve) | None => match omoi_runtime::grpc::bind(config.listen_addr) {
            Ok(incoming) => serve(config.clone(), incoming, omoi_runtime::shutdown::on_signal()).await,
            Err(e) => Err(anyhow::anyhow!(
                "cannot listen on {} ({e}); set OMOI_LISTEN_ADDR or --listen-addr to a free address",
                config.listen_addr
            )),
        },
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), database = %redact(&config.common.database_url), "omoi-task-queue failed");
            eprintln!("omoi-task-queue: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
