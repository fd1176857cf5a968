//! omoi's integration tests, one binary (it links every service once): the
//! services against real PostgreSQL and NATS, in-process or as the
//! processes pods run, the real agent CLIs against stand-in model APIs,
//! real git against local remotes, a real browser for the console. A
//! module per concern; `cargo test --test integration <module>::` runs one.
//! The chaos run is bench/'s (`bench/tests/chaos.rs`).

mod agents;
mod attempt_pods;
mod auth;
mod bad_input;
mod browser;
mod cli;
mod console;
mod end_to_end;
mod forge;
mod git;
mod health;
mod leases;
mod openhands;
mod people;
mod pods;
mod replicas;
mod resilience;
mod runtime;
mod sandbox;
mod sessions;
mod task_queue;
mod tickets;
mod tls;
mod traces;
mod up;
