use clap::Parser;
use omoi_console::{Config, serve};

#[global_allocator]
static ALLOCATOR: omoi_runtime::Allocator = omoi_runtime::ALLOCATOR;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = Config::parse();
    let _telemetry = omoi_runtime::telemetry::init("omoi-console", config.log_format, "info");
    let result = match tokio::net::TcpListener::bind(config.listen_addr).await {
        Ok(listener) => serve(config, listener, omoi_runtime::shutdown::on_signal()).await,
        Err(e) => Err(anyhow::anyhow!("cannot listen on {}: {e}", config.listen_addr)),
    };
    omoi_runtime::host::exit("omoi-console", result)
}
