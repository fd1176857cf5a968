//! omoi under load, as the commands of bench/ run it: the chaos run (every
//! process killed and restarted, NATS and PostgreSQL stopped, then every
//! promise checked), the soak (hours at half the peak, every resource
//! sampled and judged), and the fleets of service processes both drive.
//! The benchmark itself is the `omoi-bench` binary.

pub mod chaos;
pub mod fleet;
pub mod soak;
