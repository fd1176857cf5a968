//! Compiles `proto/` with protox (pure Rust), so building omoi needs no `protoc`.

use std::path::PathBuf;

const FILES: &[&str] = &[
    "omoi/common/v1/common.proto",
    "omoi/events/v1/events.proto",
    "omoi/taskqueue/v1/taskqueue.proto",
    "omoi/ticket/v1/ticket.proto",
    "omoi/health/v1/health.proto",
    "omoi/executor/v1/executor.proto",
    "omoi/notify/v1/notify.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut compiler = protox::Compiler::new([&root])?;
    compiler
        .include_source_info(true)
        .include_imports(true)
        .open_files(FILES)?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // Encoded by the compiler itself: the prost types would drop the
    // methods' `google.api.http` options the console's transcoder reads.
    std::fs::write(out.join("omoi_descriptor.bin"), compiler.encode_file_descriptor_set())?;
    let fds = compiler.file_descriptor_set();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
