//! What every omoi binary shares: common configuration, telemetry, the gRPC
//! server's health, reflection and auth, client channels, and shutdown.

pub mod auth;
pub mod changes;
pub mod config;
pub mod grpc;
pub mod host;
pub mod metrics;
pub mod service;
pub mod shutdown;
pub mod status;
pub mod telemetry;
pub mod tls;
pub mod trace;

pub use tokio_util::sync::CancellationToken;

/// The allocator every omoi binary declares (`#[global_allocator] static
/// ALLOCATOR: omoi_runtime::Allocator = omoi_runtime::ALLOCATOR;`): under
/// load, glibc's malloc serialises the runtime's worker threads on its arena
/// locks; mimalloc keeps a heap per thread.
pub type Allocator = mimalloc::MiMalloc;
pub const ALLOCATOR: Allocator = mimalloc::MiMalloc;
