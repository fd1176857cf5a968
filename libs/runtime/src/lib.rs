//! The host every omoi binary runs on, with a database or without: its
//! settings, the gRPC server (health, reflection, auth, TLS, metrics),
//! client channels, telemetry and W3C trace context, the shapes of
//! background work, and shutdown. What a database service adds on top is
//! `omoi-base`.

pub mod auth;
pub mod background;
pub mod config;
pub mod grpc;
pub mod host;
pub mod metrics;
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
