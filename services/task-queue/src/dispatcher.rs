//! The dispatcher: pushes ready tasks to the agents connected to this replica
//! over their WatchAssignments streams, and tells agents to stop attempts
//! that were cancelled or timed out.
//!
//! It sleeps until woken (enqueue, completion, connect, a peer replica's
//! wake on NATS, or the next backed-off retry) with a slow sweep as a safety
//! net. Replicas share nothing but the database: claims use
//! `FOR UPDATE SKIP LOCKED`, so a task is never handed out twice.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use omoi_bus::Topology;
use omoi_domain::Phase;
use omoi_domain::routing::Labels;
use omoi_domain::rules::Revoked;
use omoi_proto::taskqueue::{self as pb, watch_assignments_response::Event as StreamEvent};
use omoi_store::Store;
use omoi_store::tasks::Slot;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use uuid::Uuid;

type Outbound = mpsc::UnboundedSender<Result<pb::WatchAssignmentsResponse, Status>>;

/// Agents taking the same phases (`None`: all) with the same labels share
/// a claim.
type ClaimGroup = (Option<Vec<Phase>>, Labels);

/// Most tasks claimed in one statement.
const MAX_SLOTS_PER_ROUND: usize = 1000;

struct Connection {
    agent_id: Uuid,
    /// Sorted; `None` accepts every phase.
    phases: Option<Vec<Phase>>,
    capacity: i64,
    tx: Outbound,
}

pub struct Dispatcher {
    store: Store,
    sessions: Mutex<HashMap<Uuid, Connection>>,
    /// Set (under the sessions lock) by `close_all`: no stream opens after.
    closed: AtomicBool,
    wake: Notify,
    /// Why it was woken since its last look: work may be ready (`work`),
    /// or agents' capacity was freed (`freed`), which needs a round only
    /// when the last one left ready work for want of capacity
    /// (`capacity_short`).
    work: AtomicBool,
    freed: AtomicBool,
    capacity_short: AtomicBool,
    nats: Option<async_nats::Client>,
    topology: Topology,
    replica: Uuid,
    sweep: Duration,
    /// Silence after which an agent gets no new work.
    silent_after: Duration,
    /// Claims whose answer was lost (the database went away mid-statement):
    /// they may have committed, so their tasks are looked up and delivered.
    unsure: Mutex<Vec<(chrono::DateTime<chrono::Utc>, Vec<Slot>)>>,
}

impl Dispatcher {
    pub fn new(
        store: Store,
        nats: Option<async_nats::Client>,
        topology: Topology,
        sweep: Duration,
        silent_after: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            sessions: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            wake: Notify::new(),
            work: AtomicBool::new(false),
            freed: AtomicBool::new(false),
            capacity_short: AtomicBool::new(true),
            nats,
            topology,
            replica: Uuid::new_v4(),
            sweep,
            silent_after,
            unsure: Mutex::new(Vec::new()),
        })
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<Uuid, Connection>> {
        // A poisoned map is still consistent: every mutation is a single insert or remove.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn connected_agents(&self) -> usize {
        self.sessions().len()
    }

    /// Registers an agent's stream. Assigned tasks the agent left on earlier
    /// streams go back to the queue first: it reconnected, so they were lost.
    /// None once `close_all` ran: a stream opened then would keep the
    /// stopping server waiting for it.
    pub async fn connect(
        self: &Arc<Self>,
        agent_id: Uuid,
        phases: Option<Vec<Phase>>,
        capacity: i64,
    ) -> Result<Option<AgentStream>, omoi_store::StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Ok(None);
        }
        let session = Uuid::new_v4();
        let requeued = self.store.requeue_agent_except(agent_id, session).await?;
        if !requeued.is_empty() {
            tracing::info!(%agent_id, count = requeued.len(), "requeued tasks of an earlier stream");
        }
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut sessions = self.sessions();
            if self.closed.load(Ordering::Acquire) {
                return Ok(None);
            }
            sessions.insert(
                session,
                Connection {
                    agent_id,
                    phases,
                    capacity,
                    tx,
                },
            );
        }
        tracing::info!(%agent_id, %session, capacity, "agent stream opened");
        self.note(Wake::Work);
        Ok(Some(AgentStream {
            inner: UnboundedReceiverStream::new(rx),
            _guard: Disconnect {
                dispatcher: Arc::clone(self),
                session,
            },
        }))
    }

    /// The stream is gone: forget it and put back what it had not started.
    fn disconnect(self: &Arc<Self>, session: Uuid) {
        let Some(conn) = self.sessions().remove(&session) else {
            return;
        };
        tracing::info!(agent_id = %conn.agent_id, %session, "agent stream closed");
        let this = Arc::clone(self);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { this.requeue(session).await });
        }
    }

    async fn requeue(&self, session: Uuid) {
        match self.store.requeue_session(session).await {
            Ok(ids) if !ids.is_empty() => {
                omoi_runtime::metrics::TASK_OUTCOMES
                    .with_label_values(&["requeued"])
                    .inc_by(ids.len() as u64);
                tracing::info!(%session, count = ids.len(), "requeued unstarted tasks of a closed stream");
                self.wake();
            }
            Ok(_) => {}
            // Not lost: the agent's next connection, or stale-agent
            // handling, puts them back.
            Err(e) => tracing::warn!(%session, error = %e, "requeue after stream close failed"),
        }
    }

    /// Ends the streams of an agent declared stale, so that nothing more is
    /// handed to it; a live agent reconnects and is served again.
    pub async fn evict(&self, agent_id: Uuid) {
        let gone: Vec<Uuid> = {
            let mut sessions = self.sessions();
            let ids: Vec<Uuid> = sessions
                .iter()
                .filter(|(_, c)| c.agent_id == agent_id)
                .map(|(s, _)| *s)
                .collect();
            for id in &ids {
                sessions.remove(id);
            }
            ids
        };
        for session in gone {
            tracing::info!(%agent_id, %session, "closing the stream of a stale agent");
            self.requeue(session).await;
        }
    }

    /// Ends every stream (shutdown) and puts their unstarted tasks back.
    pub async fn close_all(&self) {
        let drained: Vec<(Uuid, Connection)> = {
            let mut sessions = self.sessions();
            self.closed.store(true, Ordering::Release);
            sessions.drain().collect()
        };
        for (session, conn) in drained {
            drop(conn.tx);
            self.requeue(session).await;
        }
    }

    /// Wakes this replica's dispatch loop and, through NATS, the others':
    /// work may be ready.
    pub fn wake(&self) {
        self.note(Wake::Work);
        self.tell_peers(Wake::Work);
    }

    /// Tells this replica's dispatch loop and the others' that agents'
    /// capacity was freed (a completion that released nothing): a replica
    /// looks again only if its last round left ready work unclaimed for
    /// want of it.
    pub fn capacity_freed(&self) {
        self.note(Wake::Freed);
        self.tell_peers(Wake::Freed);
    }

    fn tell_peers(&self, wake: Wake) {
        if let Some(nats) = &self.nats {
            let nats = nats.clone();
            let subject = self.topology.control_subject("wake");
            let payload = wake.payload(self.replica);
            tokio::spawn(async move {
                let _ = nats.publish(subject, payload.into()).await;
            });
        }
    }

    /// Records why this replica's dispatch loop is woken, and wakes it.
    fn note(&self, wake: Wake) {
        let reason = match wake {
            Wake::Work => &self.work,
            Wake::Freed => &self.freed,
        };
        reason.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Tells the agent holding an attempt to stop, wherever it is connected.
    pub fn revoke(&self, revoked: &Revoked) {
        self.revoke_local(revoked);
        if let Some(nats) = &self.nats {
            let nats = nats.clone();
            let subject = self.topology.control_subject("revoke");
            let message = RevokeMessage {
                origin: self.replica,
                revoked: revoked.clone(),
            };
            let body = serde_json::to_vec(&message).unwrap_or_default();
            tokio::spawn(async move {
                let _ = nats.publish(subject, body.into()).await;
            });
        }
    }

    fn revoke_local(&self, revoked: &Revoked) {
        let message = pb::WatchAssignmentsResponse {
            event: Some(StreamEvent::Cancellation(pb::Cancellation {
                task_id: revoked.task_id.to_string(),
                attempt: revoked.attempt,
                reason: revoked.reason.clone(),
            })),
        };
        for conn in self.sessions().values().filter(|c| c.agent_id == revoked.agent_id) {
            let _ = conn.tx.send(Ok(message.clone()));
        }
    }

    /// Follows peer replicas' wake-ups and revocations until `shutdown`.
    pub async fn follow_peers(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(nats) = self.nats.clone() else {
            return;
        };
        let subscribe = |name: &str| nats.subscribe(self.topology.control_subject(name));
        let (mut wakes, mut revokes) = match (subscribe("wake").await, subscribe("revoke").await) {
            (Ok(w), Ok(r)) => (w, r),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "cannot follow peer replicas; relying on the sweep");
                return;
            }
        };
        let me = self.replica.to_string();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(msg) = wakes.next() => {
                    if let Some(wake) = Wake::parse(&msg.payload, &me) {
                        self.note(wake);
                    }
                }
                Some(msg) = revokes.next() => {
                    if let Some(r) = parse_revoke(&msg.payload, self.replica) {
                        self.revoke_local(&r);
                    }
                }
                else => return,
            }
        }
    }

    /// The dispatch loop.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut due = true;
        let mut until = Instant::now();
        loop {
            if due {
                let next = match self.round().await {
                    Ok(next) => next,
                    Err(e) => {
                        tracing::warn!(error = %e, "dispatch round failed");
                        self.capacity_short.store(true, Ordering::Release);
                        Some(Instant::now() + Duration::from_millis(500))
                    }
                };
                let sweep = Instant::now() + self.sweep;
                until = next.map_or(sweep, |n| n.min(sweep));
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {
                    // Both flags are taken, so that a wake of either kind
                    // that came during the round is looked at once.
                    let work = self.work.swap(false, Ordering::AcqRel);
                    let freed = self.freed.swap(false, Ordering::AcqRel);
                    due = work || (freed && self.capacity_short.load(Ordering::Acquire));
                }
                _ = tokio::time::sleep_until(until) => due = true,
            }
        }
    }

    /// Fills every connected agent's free capacity. Returns when the next
    /// backed-off task becomes ready, if some capacity stayed free.
    async fn round(&self) -> Result<Option<Instant>, omoi_store::StoreError> {
        // One stream per agent: the newest.
        let conns: Vec<(Uuid, Uuid, Option<Vec<Phase>>, i64)> = {
            let sessions = self.sessions();
            let mut newest: HashMap<Uuid, (Uuid, &Connection)> = HashMap::new();
            for (session, conn) in sessions.iter() {
                newest.insert(conn.agent_id, (*session, conn));
            }
            newest
                .into_values()
                .map(|(s, c)| (s, c.agent_id, c.phases.clone(), c.capacity))
                .collect()
        };
        if conns.is_empty() {
            self.capacity_short.store(true, Ordering::Release);
            return Ok(None);
        }
        self.recover_unsure().await?;
        let agents: Vec<Uuid> = conns.iter().map(|c| c.1).collect();
        let view = self.store.round_view(&agents, self.silent_after.as_secs_f64()).await?;
        let held = &view.held;

        // Whether ready work may be left waiting for capacity: an agent
        // had none free or was not heard from lately, or a claim filled
        // every slot it was given.
        let mut short = false;
        let mut groups: HashMap<ClaimGroup, Vec<(Slot, i64)>> = HashMap::new();
        for (session, agent_id, phases, capacity) in conns {
            // Not listed: silent, stale or gone; no new work until heard.
            let Some(held) = held.get(&agent_id) else {
                short = true;
                continue;
            };
            let free = capacity - held;
            if free > 0 {
                let labels = view.labels.get(&agent_id).cloned().unwrap_or_default();
                groups
                    .entry((phases, labels))
                    .or_default()
                    .push((Slot { agent_id, session }, free));
            } else {
                short = true;
            }
        }
        let mut unfilled = false;
        for ((phases, labels), agents) in groups {
            let slots = interleave(agents, MAX_SLOTS_PER_ROUND);
            let stamp = chrono::Utc::now();
            let tasks = match self
                .store
                .assign(phases.as_deref(), &labels, &slots, stamp, view.limits)
                .await
            {
                Ok(tasks) => tasks,
                Err(e) => {
                    self.remember_unsure(stamp, slots);
                    return Err(e);
                }
            };
            if tasks.len() < slots.len() {
                unfilled = true;
            } else {
                short = true;
            }
            self.deliver(&slots, tasks).await;
        }
        self.capacity_short.store(short, Ordering::Release);
        if !unfilled {
            return Ok(None);
        }
        Ok(view.next_retry.map(|at| {
            let wait = (at - chrono::Utc::now()).to_std().unwrap_or_default();
            Instant::now() + wait + Duration::from_millis(5)
        }))
    }

    /// Delivers what claims with a lost answer did commit (at most once:
    /// each is looked up once, successfully).
    async fn recover_unsure(&self) -> Result<(), omoi_store::StoreError> {
        loop {
            let next = self.unsure.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let Some((stamp, slots)) = next else { return Ok(()) };
            let sessions: Vec<Uuid> = slots.iter().map(|s| s.session).collect();
            match self.store.assigned_in_round(stamp, &sessions).await {
                Ok(tasks) => {
                    if !tasks.is_empty() {
                        tracing::info!(
                            count = tasks.len(),
                            "delivering assignments whose claim lost its answer"
                        );
                    }
                    self.deliver(&slots, tasks).await;
                }
                Err(e) => {
                    self.remember_unsure(stamp, slots);
                    return Err(e);
                }
            }
        }
    }

    /// A claim failed without an answer: it may have committed, so the next
    /// round looks its tasks up by `stamp`.
    fn remember_unsure(&self, stamp: chrono::DateTime<chrono::Utc>, slots: Vec<Slot>) {
        self.unsure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((stamp, slots));
    }

    async fn deliver(&self, slots: &[Slot], tasks: Vec<omoi_store::Task>) {
        let session_of: HashMap<Uuid, Uuid> = slots.iter().map(|s| (s.agent_id, s.session)).collect();
        let mut dead = Vec::new();
        {
            let sessions = self.sessions();
            let now = chrono::Utc::now();
            for task in tasks {
                let ready = task.created_at.max(task.next_attempt_at);
                let waited = (now - ready).to_std().unwrap_or_default();
                omoi_runtime::metrics::DISPATCH_SECONDS.observe(waited.as_secs_f64());
                let Some(agent) = task.assigned_agent_id else {
                    continue;
                };
                let Some(session) = session_of.get(&agent) else {
                    continue;
                };
                let message = pb::WatchAssignmentsResponse {
                    event: Some(StreamEvent::Assignment(pb::Assignment {
                        attempt: task.attempt,
                        trace_context: dispatch_trace(&task, agent),
                        task: Some(pb::Task::from(&task)),
                    })),
                };
                let sent = sessions.get(session).is_some_and(|c| c.tx.send(Ok(message)).is_ok());
                if !sent {
                    dead.push(*session);
                }
            }
        }
        dead.sort_unstable();
        dead.dedup();
        for session in dead {
            // The stream closed while we claimed: its disconnect may have
            // run before the claim committed, so put the tasks back here.
            self.requeue(session).await;
        }
    }
}

/// A span for handing `task` to `agent`, in the trace of the request that
/// enqueued it; its context goes with the assignment to the agent's run.
fn dispatch_trace(task: &omoi_store::Task, agent: Uuid) -> HashMap<String, String> {
    let Some(traceparent) = task.trace_context.as_deref() else {
        return HashMap::new();
    };
    let span = tracing::info_span!(
        "dispatch",
        otel.name = "dispatch",
        otel.kind = "producer",
        task_id = %task.id,
        attempt = task.attempt,
        agent_id = %agent,
    );
    omoi_runtime::trace::adopt_traceparent(&span, Some(traceparent));
    span.in_scope(omoi_runtime::trace::current_carrier)
}

/// Round-robin slots over agents, so that the highest-priority tasks spread
/// across agents instead of filling the first one.
fn interleave(mut agents: Vec<(Slot, i64)>, max: usize) -> Vec<Slot> {
    agents.sort_by_key(|(s, _)| s.agent_id);
    let mut out = Vec::new();
    loop {
        let mut any = false;
        for (slot, free) in agents.iter_mut() {
            if *free > 0 && out.len() < max {
                out.push(*slot);
                *free -= 1;
                any = true;
            }
        }
        if !any {
            return out;
        }
    }
}

/// A wake-up told to the other replicas on the control subject `wake`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// Work may be ready: the sender's id.
    Work,
    /// Only capacity was freed: the sender's id and `freed`.
    Freed,
}

impl Wake {
    fn payload(self, origin: Uuid) -> String {
        match self {
            Wake::Work => origin.to_string(),
            Wake::Freed => format!("{origin} freed"),
        }
    }

    /// A peer's wake; `None` for our own. Anything else unknown is taken
    /// as work, so that no wake-up is lost.
    fn parse(payload: &[u8], me: &str) -> Option<Wake> {
        let text = std::str::from_utf8(payload).unwrap_or_default();
        let (origin, kind) = text.split_once(' ').unwrap_or((text, ""));
        if origin == me {
            return None;
        }
        Some(if kind == "freed" { Wake::Freed } else { Wake::Work })
    }
}

/// A revocation told to the other replicas: the agent may be connected to
/// any of them.
#[derive(serde::Serialize, serde::Deserialize)]
struct RevokeMessage {
    /// The replica that sent it (and already acted on it).
    origin: Uuid,
    #[serde(flatten)]
    revoked: Revoked,
}

/// A peer's revocation; `None` for our own and for unreadable ones.
fn parse_revoke(payload: &[u8], me: Uuid) -> Option<Revoked> {
    let message: RevokeMessage = serde_json::from_slice(payload).ok()?;
    (message.origin != me).then_some(message.revoked)
}

/// An agent's assignment stream; closing it returns its unstarted tasks.
pub struct AgentStream {
    inner: UnboundedReceiverStream<Result<pb::WatchAssignmentsResponse, Status>>,
    _guard: Disconnect,
}

struct Disconnect {
    dispatcher: Arc<Dispatcher>,
    session: Uuid,
}

impl Drop for Disconnect {
    fn drop(&mut self) {
        self.dispatcher.disconnect(self.session);
    }
}

impl Stream for AgentStream {
    type Item = Result<pb::WatchAssignmentsResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn interleave_spreads_slots_round_robin() {
        let a = Slot {
            agent_id: Uuid::from_u128(1),
            session: Uuid::from_u128(10),
        };
        let b = Slot {
            agent_id: Uuid::from_u128(2),
            session: Uuid::from_u128(20),
        };
        let slots = interleave(vec![(b, 1), (a, 3)], 100);
        assert_eq!(slots, vec![a, b, a, a]);
        assert_eq!(interleave(vec![(a, 3), (b, 3)], 4).len(), 4);
        assert!(interleave(vec![(a, 0)], 10).is_empty());
    }

    #[test]
    fn wakes_from_peers_keep_their_kind_and_own_ones_are_ignored() {
        let (me, peer) = (Uuid::from_u128(5), Uuid::from_u128(6));
        let me_text = me.to_string();
        let parse = |w: Wake, from: Uuid| Wake::parse(w.payload(from).as_bytes(), &me_text);
        assert_eq!(parse(Wake::Work, peer), Some(Wake::Work));
        assert_eq!(parse(Wake::Freed, peer), Some(Wake::Freed));
        assert_eq!(parse(Wake::Work, me), None);
        assert_eq!(parse(Wake::Freed, me), None);
        // An older replica's, or anything unreadable: work, to be safe.
        assert_eq!(Wake::parse(b"\xff\xfe", &me_text), Some(Wake::Work));
        assert_eq!(Wake::parse(b"x something-new", &me_text), Some(Wake::Work));
    }

    #[test]
    fn revocations_from_self_or_malformed_are_ignored() {
        let me = Uuid::from_u128(5);
        let other = json!({"origin": Uuid::from_u128(6), "agent_id": Uuid::from_u128(1),
                           "task_id": Uuid::from_u128(2), "attempt": 3, "reason": "cancelled"});
        let r = parse_revoke(other.to_string().as_bytes(), me).unwrap();
        assert_eq!(r.attempt, 3);
        let own = json!({"origin": me, "agent_id": Uuid::from_u128(1),
                         "task_id": Uuid::from_u128(2), "attempt": 3, "reason": "x"});
        assert!(parse_revoke(own.to_string().as_bytes(), me).is_none());
        assert!(parse_revoke(b"not json", me).is_none());
    }
}
