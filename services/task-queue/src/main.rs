use clap::Parser;
use omoi_base::{Command, migrate};
use omoi_runtime::host::{exit, listen};
use omoi_task_queue::{Config, serve};

#[global_allocator]
static ALLOCATOR: omoi_runtime::Allocator = omoi_runtime::ALLOCATOR;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = Config::parse();
    let _telemetry = omoi_runtime::telemetry::init("omoi-task-queue", config.common.host.log_format, "info");
    let result = match config.command {
        Some(Command::Migrate) => migrate(&config.common.database).await,
        Some(Command::Serve) | None => match listen(config.listen_addr) {
            Ok(incoming) => serve(config.clone(), incoming, omoi_runtime::shutdown::on_signal()).await,
            Err(e) => Err(e),
        },
    };
    exit("omoi-task-queue", result)
}
