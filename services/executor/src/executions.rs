//! The execution registry: the executor's runs, their state, their agent events (kept in memory for
//! StreamExecutionOutput, published on JetStream in order for everyone), and
//! stopping them.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use omoi_domain::Phase;
use omoi_proto::common::{AgentEvent, AgentEventKind, OutputStream, Usage};
use omoi_proto::convert::timestamp;
use omoi_proto::domain::WireEnum;
use omoi_proto::executor::{self as pb, ExecutionState};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::events::EventSink;
use crate::publish::Publisher;

/// Events kept per run for StreamExecutionOutput.
const MAX_EVENTS: usize = 10_000;
/// Finished runs remembered for ListExecutions.
const RECENT: usize = 200;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a run is being stopped, and whether the executor reports the failure.
#[derive(Debug, Clone)]
pub struct StopRequest {
    pub reason: String,
    /// False when the queue itself took the attempt back (cancel, timeout):
    /// a report would be refused anyway.
    pub report: bool,
}

#[derive(Debug, Clone)]
struct State {
    state: ExecutionState,
    finished_at: Option<DateTime<Utc>>,
    exit_code: i32,
    summary: String,
    error_message: String,
    changed_files: Vec<String>,
    usage: Option<Usage>,
}

/// A run's events so far: the newest `MAX_EVENTS` of them and the count.
struct Log {
    events: VecDeque<AgentEvent>,
    next_seq: i64,
}

pub struct Execution {
    pub task_id: Uuid,
    pub attempt: i32,
    pub ticket_id: String,
    pub phase: Phase,
    pub workspace: PathBuf,
    pub started_at: DateTime<Utc>,
    pub stop: CancellationToken,
    stop_request: Mutex<Option<StopRequest>>,
    state: Mutex<State>,
    log: Mutex<Log>,
    live: broadcast::Sender<AgentEvent>,
    agent_id: String,
    publisher: Option<Publisher>,
}

impl Execution {
    pub fn stop_with(&self, request: StopRequest) {
        lock(&self.stop_request).get_or_insert(request);
        self.stop.cancel();
    }

    pub fn stop_request(&self) -> Option<StopRequest> {
        lock(&self.stop_request).clone()
    }

    pub fn set_state(&self, state: ExecutionState) {
        lock(&self.state).state = state;
    }

    pub fn finish(&self, state: ExecutionState, exit_code: i32, summary: String, error: String, changed: Vec<String>) {
        let mut s = lock(&self.state);
        s.state = state;
        s.finished_at = Some(Utc::now());
        s.exit_code = exit_code;
        s.summary = summary;
        s.error_message = error;
        s.changed_files = changed;
    }

    pub fn set_usage(&self, usage: Option<Usage>) {
        lock(&self.state).usage = usage;
    }

    /// Waits (up to `within`) until every event so far is on JetStream, so
    /// that a follower of the task sees all of them before its end.
    pub async fn flush(&self, within: Duration) -> bool {
        let count = lock(&self.log).next_seq;
        match &self.publisher {
            Some(p) => p.flush(count, within).await,
            None => true,
        }
    }

    /// The seq of the last event so far (-1: none).
    pub fn last_seq(&self) -> i64 {
        lock(&self.log).next_seq - 1
    }

    pub fn is_finished(&self) -> bool {
        lock(&self.state).finished_at.is_some()
    }

    /// The last `n` raw lines of one stream.
    pub fn tail(&self, stream: OutputStream, n: usize) -> Vec<String> {
        let log = lock(&self.log);
        let mut out: Vec<String> = log
            .events
            .iter()
            .rev()
            .filter(|e| e.kind() == AgentEventKind::Output && e.stream() == stream)
            .take(n)
            .map(|e| e.text.clone())
            .collect();
        out.reverse();
        out
    }

    /// The events so far and a receiver of the ones to come.
    pub fn subscribe(&self) -> (Vec<AgentEvent>, broadcast::Receiver<AgentEvent>) {
        let log = lock(&self.log);
        // Subscribing under the lock: no event falls between the two.
        let rx = self.live.subscribe();
        (log.events.iter().cloned().collect(), rx)
    }

    pub fn to_proto(&self) -> pb::Execution {
        let s = lock(&self.state).clone();
        pb::Execution {
            task_id: self.task_id.to_string(),
            attempt: self.attempt,
            ticket_id: self.ticket_id.clone(),
            phase: self.phase.wire(),
            state: s.state as i32,
            workspace: self.workspace.display().to_string(),
            started_at: Some(timestamp(self.started_at)),
            finished_at: s.finished_at.map(timestamp),
            exit_code: s.exit_code,
            summary: s.summary,
            error_message: s.error_message,
            changed_files: s.changed_files,
            usage: s.usage,
        }
    }
}

impl EventSink for Execution {
    fn emit(&self, mut event: AgentEvent) {
        event.task_id = self.task_id.to_string();
        event.attempt = self.attempt;
        event.agent_id.clone_from(&self.agent_id);
        event.at = Some(timestamp(Utc::now()));
        // Numbered, kept and queued for publishing under one lock, so that
        // the stream gets them in their order.
        let mut log = lock(&self.log);
        event.seq = log.next_seq;
        log.next_seq += 1;
        if log.events.len() == MAX_EVENTS {
            log.events.pop_front();
        }
        log.events.push_back(event.clone());
        if let Some(p) = &self.publisher {
            p.send(event.clone());
        }
        let _ = self.live.send(event);
    }
}

/// Every run of this executor: the ones in progress and the recent ones.
pub struct Executions {
    agent_id: String,
    jetstream: Option<async_nats::jetstream::Context>,
    topology: omoi_bus::Topology,
    active: Mutex<HashMap<Uuid, Arc<Execution>>>,
    recent: Mutex<VecDeque<Arc<Execution>>>,
}

pub struct NewExecution {
    pub task_id: Uuid,
    pub attempt: i32,
    pub ticket_id: String,
    pub phase: Phase,
    pub workspace: PathBuf,
}

impl Executions {
    pub fn new(agent_id: Uuid, nats: Option<async_nats::Client>, topology: omoi_bus::Topology) -> Self {
        Self {
            agent_id: agent_id.to_string(),
            jetstream: nats.map(async_nats::jetstream::new),
            topology,
            active: Mutex::new(HashMap::new()),
            recent: Mutex::new(VecDeque::new()),
        }
    }

    pub fn begin(&self, new: NewExecution) -> Arc<Execution> {
        let run = Arc::new(Execution {
            task_id: new.task_id,
            attempt: new.attempt,
            ticket_id: new.ticket_id,
            phase: new.phase,
            workspace: new.workspace,
            started_at: Utc::now(),
            stop: CancellationToken::new(),
            stop_request: Mutex::new(None),
            state: Mutex::new(State {
                state: ExecutionState::Preparing,
                finished_at: None,
                exit_code: 0,
                summary: String::new(),
                error_message: String::new(),
                changed_files: Vec::new(),
                usage: None,
            }),
            log: Mutex::new(Log {
                events: VecDeque::new(),
                next_seq: 0,
            }),
            live: broadcast::channel(1024).0,
            agent_id: self.agent_id.clone(),
            publisher: self.jetstream.clone().map(|js| {
                Publisher::start(
                    js,
                    self.topology.output_subject(&new.task_id.to_string()),
                    format!("{}:{}", new.task_id, new.attempt),
                )
            }),
        });
        lock(&self.active).insert(run.task_id, Arc::clone(&run));
        {
            let mut recent = lock(&self.recent);
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(Arc::clone(&run));
        }
        run
    }

    pub fn end(&self, run: &Execution) {
        let mut active = lock(&self.active);
        if active.get(&run.task_id).is_some_and(|r| r.attempt == run.attempt) {
            active.remove(&run.task_id);
        }
    }

    pub fn active(&self) -> Vec<Arc<Execution>> {
        lock(&self.active).values().cloned().collect()
    }

    pub fn running_ids(&self) -> Vec<String> {
        lock(&self.active).keys().map(ToString::to_string).collect()
    }

    pub fn get_active(&self, task_id: Uuid) -> Option<Arc<Execution>> {
        lock(&self.active).get(&task_id).cloned()
    }

    /// The newest run of a task, in progress or recent.
    pub fn latest(&self, task_id: Uuid) -> Option<Arc<Execution>> {
        self.get_active(task_id)
            .or_else(|| lock(&self.recent).iter().rev().find(|r| r.task_id == task_id).cloned())
    }

    /// Newest first.
    pub fn recent(&self, limit: usize) -> Vec<Arc<Execution>> {
        lock(&self.recent).iter().rev().take(limit).cloned().collect()
    }

    /// Stops the run of `task_id` if it is that attempt (any attempt when None).
    pub fn stop(&self, task_id: Uuid, attempt: Option<i32>, request: StopRequest) -> bool {
        match self.get_active(task_id) {
            Some(run) if attempt.is_none_or(|a| a == run.attempt) => {
                run.stop_with(request);
                true
            }
            _ => false,
        }
    }
}
