//! The omoi API as Rust types: messages, gRPC clients and servers for every
//! service, and the encoded descriptor set that server reflection serves.

#![allow(clippy::all, clippy::pedantic)]

/// Encoded `FileDescriptorSet` of every omoi proto file (with its imports),
/// for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/omoi_descriptor.bin"));

pub mod omoi {
    pub mod common {
        pub mod v1 {
            tonic::include_proto!("omoi.common.v1");
        }
    }
    pub mod events {
        pub mod v1 {
            tonic::include_proto!("omoi.events.v1");
        }
    }
    pub mod taskqueue {
        pub mod v1 {
            tonic::include_proto!("omoi.taskqueue.v1");
        }
    }
    pub mod ticket {
        pub mod v1 {
            tonic::include_proto!("omoi.ticket.v1");
        }
    }
    pub mod health {
        pub mod v1 {
            tonic::include_proto!("omoi.health.v1");
        }
    }
    pub mod executor {
        pub mod v1 {
            tonic::include_proto!("omoi.executor.v1");
        }
    }
    pub mod notify {
        pub mod v1 {
            tonic::include_proto!("omoi.notify.v1");
        }
    }
}

pub use omoi::common::v1 as common;
pub use omoi::events::v1 as events;
pub use omoi::executor::v1 as executor;
pub use omoi::health::v1 as health;
pub use omoi::notify::v1 as notify;
pub use omoi::taskqueue::v1 as taskqueue;
pub use omoi::ticket::v1 as ticket;
pub use prost_types;

pub mod candidates;
pub mod convert;
pub mod domain;
