use clap::Parser;
use omoi_console::{Config, serve};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = Config::parse();
    let _telemetry = omoi_runtime::telemetry::init("omoi-console", config.log_format, "info");
    let result = match tokio::net::TcpListener::bind(config.listen_addr).await {
        Ok(listener) => serve(config, listener, omoi_runtime::shutdown::on_signal()).await,
        Err(e) => Err(anyhow::anyhow!("cannot listen on {}: {e}", config.listen_addr)),
    };
    omoi_runtime::service::exit("omoi-console", result)
}
