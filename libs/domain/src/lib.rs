//! Pure domain rules of omoi: no I/O, every rule unit-tested here.

pub mod agent;
pub mod backoff;
pub mod candidates;
pub mod check;
pub mod classify;
pub mod error;
pub mod event;
pub mod gate;
pub mod git;
pub mod graph;
pub mod guardian;
pub mod notify;
pub mod routing;
pub mod rules;
pub mod session;
pub mod status;
pub mod task;
pub mod ticket;
pub mod usage;
pub mod validate;

pub use agent::{Agent, AgentStatus};
pub use error::{DomainError, FieldError};
pub use event::{Entity, Envelope, Event, EventType};
pub use git::GitChange;
pub use session::AgentSession;
pub use task::{Action, ErrorClass, Phase, Task, TaskStatus};
pub use ticket::{Ticket, TicketStatus};
pub use usage::Usage;
