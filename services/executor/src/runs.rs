//! The executor's runs: their state, their output (kept in memory for
//! StreamExecutionOutput, published on JetStream for everyone), and stopping
//! them.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use omoi_domain::Phase;
use omoi_proto::common::{OutputLine, OutputStream};
use omoi_proto::convert::timestamp;
use omoi_proto::domain::WireEnum;
use omoi_proto::executor::{self as pb, ExecutionState};
use prost::Message;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::runner::OutputSink;

/// Lines kept per run for StreamExecutionOutput.
const MAX_LINES: usize = 10_000;
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
}

pub struct Run {
    pub task_id: Uuid,
    pub attempt: i32,
    pub ticket_id: String,
    pub phase: Phase,
    pub workspace: PathBuf,
    pub started_at: DateTime<Utc>,
    pub stop: CancellationToken,
    stop_request: Mutex<Option<StopRequest>>,
    state: Mutex<State>,
    lines: Mutex<VecDeque<OutputLine>>,
    sequence: AtomicI64,
    live: broadcast::Sender<OutputLine>,
    agent_id: String,
    publish: Option<(async_nats::Client, String)>,
}

impl Run {
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

    pub fn is_finished(&self) -> bool {
        lock(&self.state).finished_at.is_some()
    }

    /// The last `n` lines of one stream.
    pub fn tail(&self, stream: OutputStream, n: usize) -> Vec<String> {
        let lines = lock(&self.lines);
        let mut out: Vec<String> = lines
            .iter()
            .rev()
            .filter(|l| l.stream == stream as i32)
            .take(n)
            .map(|l| l.line.clone())
            .collect();
        out.reverse();
        out
    }

    /// The lines so far and a receiver of the ones to come.
    pub fn subscribe(&self) -> (Vec<OutputLine>, broadcast::Receiver<OutputLine>) {
        let lines = lock(&self.lines);
        // Subscribing under the lock: no line falls between the two.
        let rx = self.live.subscribe();
        (lines.iter().cloned().collect(), rx)
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
        }
    }
}

impl OutputSink for Run {
    fn line(&self, stream: OutputStream, text: String) {
        let line = OutputLine {
            task_id: self.task_id.to_string(),
            attempt: self.attempt,
            sequence: self.sequence.fetch_add(1, Ordering::Relaxed),
            stream: stream as i32,
            line: text,
            emitted_at: Some(timestamp(Utc::now())),
            agent_id: self.agent_id.clone(),
        };
        if let Some((nats, subject)) = &self.publish {
            let (nats, subject, payload) = (nats.clone(), subject.clone(), line.encode_to_vec());
            tokio::spawn(async move {
                let _ = nats.publish(subject, payload.into()).await;
            });
        }
        {
            let mut lines = lock(&self.lines);
            if lines.len() == MAX_LINES {
                lines.pop_front();
            }
            lines.push_back(line.clone());
        }
        let _ = self.live.send(line);
    }
}

/// Every run of this executor: the ones in progress and the recent ones.
pub struct Runs {
    agent_id: String,
    nats: Option<async_nats::Client>,
    topology: omoi_bus::Topology,
    active: Mutex<HashMap<Uuid, Arc<Run>>>,
    recent: Mutex<VecDeque<Arc<Run>>>,
}

pub struct NewRun {
    pub task_id: Uuid,
    pub attempt: i32,
    pub ticket_id: String,
    pub phase: Phase,
    pub workspace: PathBuf,
}

impl Runs {
    pub fn new(agent_id: Uuid, nats: Option<async_nats::Client>, topology: omoi_bus::Topology) -> Self {
        Self {
            agent_id: agent_id.to_string(),
            nats,
            topology,
            active: Mutex::new(HashMap::new()),
            recent: Mutex::new(VecDeque::new()),
        }
    }

    pub fn begin(&self, new: NewRun) -> Arc<Run> {
        let run = Arc::new(Run {
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
            }),
            lines: Mutex::new(VecDeque::new()),
            sequence: AtomicI64::new(0),
            live: broadcast::channel(1024).0,
            agent_id: self.agent_id.clone(),
            publish: self
                .nats
                .clone()
                .map(|n| (n, self.topology.output_subject(&new.task_id.to_string()))),
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

    pub fn end(&self, run: &Run) {
        let mut active = lock(&self.active);
        if active.get(&run.task_id).is_some_and(|r| r.attempt == run.attempt) {
            active.remove(&run.task_id);
        }
    }

    pub fn active(&self) -> Vec<Arc<Run>> {
        lock(&self.active).values().cloned().collect()
    }

    pub fn running_ids(&self) -> Vec<String> {
        lock(&self.active).keys().map(ToString::to_string).collect()
    }

    pub fn get_active(&self, task_id: Uuid) -> Option<Arc<Run>> {
        lock(&self.active).get(&task_id).cloned()
    }

    /// The newest run of a task, in progress or recent.
    pub fn latest(&self, task_id: Uuid) -> Option<Arc<Run>> {
        self.get_active(task_id)
            .or_else(|| lock(&self.recent).iter().rev().find(|r| r.task_id == task_id).cloned())
    }

    /// Newest first.
    pub fn recent(&self, limit: usize) -> Vec<Arc<Run>> {
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
