//! Errors as gRPC statuses (the mapping lives in omoi-runtime).

pub use omoi_runtime::status::{from_domain as domain_status, from_store as status};
