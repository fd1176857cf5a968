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
