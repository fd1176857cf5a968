use clap::Parser;
use omoi_executor::{Config, sandbox, serve};
use omoi_runtime::host::{exit, listen};

#[global_allocator]
static ALLOCATOR: omoi_runtime::Allocator = omoi_runtime::ALLOCATOR;

fn main() -> std::process::ExitCode {
    // The same binary starts each agent inside its sandbox.
    let mut args = std::env::args_os().skip(1).peekable();
    if args.peek().is_some_and(|a| a == sandbox::init::FLAG) {
        return sandbox::init::main(args.skip(1));
    }
    // And launches each attempt's pod when agents run in pods of their own.
    if args.peek().is_some_and(|a| a == sandbox::pod::FLAG) {
        return sandbox::pod::main(args.skip(1));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build();
    match runtime {
        Ok(rt) => rt.block_on(run()),
        Err(e) => exit("omoi-executor", Err(e.into())),
    }
}

async fn run() -> std::process::ExitCode {
    let config = Config::parse();
    let _telemetry = omoi_runtime::telemetry::init("omoi-executor", config.host.log_format, "info");
    let result = match listen(config.listen_addr) {
        Ok(incoming) => serve(config.clone(), incoming, omoi_runtime::shutdown::on_signal()).await,
        Err(e) => Err(e),
    };
    exit("omoi-executor", result)
}
