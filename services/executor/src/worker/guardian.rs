//! The guardian on the executor: it follows a running attempt's agent
//! events (the same normalized events for every runner) through
//! `omoi_domain::guardian::Watch`, and steps in when a signal trips — a
//! nudge (the agent stopped and its session resumed with guidance naming
//! what it repeats), then stopping the attempt as a retryable failure with
//! the evidence (which the retry's prompt carries); spending pauses the
//! ticket's dispatch for a person. Each intervention is said on the run's
//! output and recorded as TASK_GUARDIAN_INTERVENED. An optional reviewer
//! (this executor's agent, asked in a session of its own) looks at the
//! attempt's recent events every `review_seconds` and trips when it finds
//! the agent not progressing; what it spends counts on the attempt.

use std::collections::VecDeque;
use std::time::Duration;

use omoi_domain::guardian::{self, Action, Evidence, Kind, Observed, Review, Trip, Watch};
use omoi_domain::usage::Usage;
use omoi_proto::common::{AgentEvent, AgentEventKind, OutputStream, Usage as UsagePb};
use omoi_proto::taskqueue as tq;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::Worker;
use crate::events::EventSink;
use crate::executions::{Execution, StopRequest};
use crate::runners::RunContext;

/// Longest a reviewer's look may take.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(300);

/// What the guardian did to a run of the agent.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Stepped {
    /// The run was stopped to be resumed with this prompt.
    Nudge(String),
    /// The attempt was stopped (its report says why).
    Stopped,
}

/// Of an attempt's earlier attempts' events (in any order), those whose
/// counts it takes up, in order: the attempts after the last one the
/// guardian ended.
fn taken_up(mut earlier: Vec<AgentEvent>) -> Vec<AgentEvent> {
    earlier.sort_by_key(|e| (e.attempt, e.seq));
    let from = earlier
        .iter()
        .filter(|e| e.stream() == OutputStream::System && guardian::ended_attempt(&e.text))
        .map(|e| e.attempt + 1)
        .max()
        .unwrap_or(0);
    earlier.retain(|e| e.attempt >= from);
    earlier
}

/// The guidance a nudge resumes the agent's session with.
fn guidance(trip: &Trip) -> String {
    let seen: Vec<String> = trip.evidence.iter().take(5).map(|e| format!("- {}", e.text)).collect();
    format!(
        "Stop. omoi's guardian interrupted you: {}.\n\n{}\n\nRepeating it will not get a different result. \
         Step back, say in one sentence why it keeps failing, and take a different approach to the task.",
        trip.reason,
        seen.join("\n")
    )
}

/// The optional reviewer of one attempt: when it looks next, the recent
/// events it is shown, and what it spent (counted on the attempt).
pub(super) struct Reviewer {
    every: Option<Duration>,
    due: tokio::time::Instant,
    started: tokio::time::Instant,
    /// The attempt's latest events, as the digest shows them.
    recent: VecDeque<(Evidence, String)>,
    pub spent: Option<Usage>,
}

impl Reviewer {
    /// Looks every `seconds` (0: never).
    pub(super) fn new(seconds: u32) -> Reviewer {
        let every = (seconds > 0).then(|| Duration::from_secs(u64::from(seconds)));
        let now = tokio::time::Instant::now();
        Reviewer {
            every,
            due: now + every.unwrap_or_default(),
            started: now,
            recent: VecDeque::new(),
            spent: None,
        }
    }

    fn heard(&mut self, e: &Observed<'_>) {
        if self.every.is_none() || e.kind == Kind::Usage {
            return;
        }
        if self.recent.len() == guardian::DIGEST_EVENTS {
            self.recent.pop_front();
        }
        self.recent.push_back((Evidence::of(e), guardian::digest_line(e)));
    }
}

/// The guardian over one attempt: its watch, its reviewer, and the last
/// event it followed.
pub(super) struct Guarding {
    pub watch: Watch,
    pub reviewer: Reviewer,
    pub seen: i64,
}

/// What the reviewer answered, the events it was shown, what it spent.
type Looked = (Result<Review, String>, Vec<Evidence>, Option<UsagePb>);

/// What the reviewer runner says: its messages (the last is its answer,
/// where the runner gives no verdict).
#[derive(Default)]
struct Heard(std::sync::Mutex<Option<String>>);

impl EventSink for Heard {
    fn emit(&self, event: AgentEvent) {
        if event.kind() == AgentEventKind::Message {
            *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(event.text);
        }
    }
}

impl Worker {
    /// Follows `run`'s events after the last one seen with its watch until
    /// a trip (or its reviewer) calls for action; then acts on the run
    /// (`turn` is this run of the agent) and says what it did. Never
    /// returns while nothing trips.
    pub(super) async fn guard(
        &self,
        run: &Execution,
        ctx: &RunContext,
        task: &tq::Task,
        guarding: &mut Guarding,
        turn: &CancellationToken,
    ) -> Stepped {
        let Guarding {
            watch,
            reviewer,
            seen: after,
        } = guarding;
        let (past, mut live) = run.subscribe();
        let mut pending: VecDeque<AgentEvent> = past.into();
        let mut looking: Option<std::pin::Pin<Box<dyn std::future::Future<Output = Looked> + Send + '_>>> = None;
        loop {
            let event = match pending.pop_front() {
                Some(e) => e,
                None => tokio::select! {
                    received = live.recv() => match received {
                        Ok(e) => e,
                        Err(RecvError::Lagged(_)) => continue,
                        Err(RecvError::Closed) => return std::future::pending().await,
                    },
                    () = tokio::time::sleep_until(reviewer.due), if looking.is_none() && reviewer.every.is_some() => {
                        let shown: Vec<(Evidence, String)> = reviewer.recent.iter().cloned().collect();
                        let minutes = reviewer.started.elapsed().as_secs_f64() / 60.0;
                        looking = Some(Box::pin(self.look(run, ctx, task, minutes, shown)));
                        continue;
                    }
                    looked = async { looking.as_mut().expect("a look under way").await }, if looking.is_some() => {
                        looking = None;
                        reviewer.due = tokio::time::Instant::now() + reviewer.every.unwrap_or_default();
                        let (answer, shown, usage) = looked;
                        if let Some(u) = usage {
                            crate::events::count_usage(&u);
                            reviewer.spent.get_or_insert_with(Usage::default).add(&Usage::from(u));
                        }
                        match answer {
                            Ok(review) => {
                                let trip = watch.reviewed(&review, &shown, run.attempt);
                                if let Some(trip) = trip {
                                    return self.act(run, watch, trip, turn).await;
                                }
                                run.line(OutputStream::System, "guardian: the reviewer finds it progressing".to_owned());
                            }
                            Err(why) => run.line(OutputStream::System, format!("guardian: {why}")),
                        }
                        continue;
                    }
                },
            };
            if event.seq <= *after {
                continue;
            }
            *after = event.seq;
            let usage = event.usage.clone().map(Usage::from);
            let observed = omoi_proto::domain::observed(&event, usage.as_ref());
            reviewer.heard(&observed);
            let Some(trip) = watch.observe(&observed).into_iter().next() else {
                continue;
            };
            return self.act(run, watch, trip, turn).await;
        }
    }

    /// Steps in as `trip` calls for, and says so.
    async fn act(&self, run: &Execution, watch: &Watch, trip: Trip, turn: &CancellationToken) -> Stepped {
        let action = watch.action(&trip);
        let said = trip.said(action);
        run.line(OutputStream::System, said.clone());
        self.record_intervention(run, &trip, action).await;
        match action {
            Action::Nudge => {
                turn.cancel();
                Stepped::Nudge(guidance(&trip))
            }
            Action::Stop => {
                run.stop_with(StopRequest {
                    reason: said,
                    report: true,
                });
                Stepped::Stopped
            }
            Action::Pause => {
                self.pause_ticket(run, &said).await;
                run.stop_with(StopRequest {
                    reason: said,
                    report: true,
                });
                Stepped::Stopped
            }
        }
    }

    /// One look of the reviewer (this executor's agent, in a session of its
    /// own, in the attempt's workspace, told to use no tool) at the task and
    /// the attempt's recent events.
    async fn look(
        &self,
        run: &Execution,
        ctx: &RunContext,
        task: &tq::Task,
        minutes: f64,
        shown: Vec<(Evidence, String)>,
    ) -> Looked {
        let digest: Vec<String> = shown.iter().map(|(_, line)| line.clone()).collect();
        let shown: Vec<Evidence> = shown.into_iter().map(|(e, _)| e).collect();
        let looking = RunContext {
            prompt: guardian::review_prompt(&task.title, &task.description, minutes, &digest),
            resume: None,
            session: Default::default(),
            timeout: Some(REVIEW_TIMEOUT),
            ..ctx.clone()
        };
        let heard = Heard::default();
        let outcome = match self.runner.run(&looking, &heard, &run.stop.child_token()).await {
            Ok(o) => o,
            Err(e) => return (Err(format!("the reviewer could not run: {e}")), shown, None),
        };
        let usage = outcome.usage.clone();
        let said_last = || heard.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        let answer = super::answer_of("reviewer", outcome, said_last);
        (answer.and_then(|a| guardian::review(&a)), shown, usage)
    }

    /// Takes up the counts of the earlier attempts `run` goes on from (a
    /// retry of the same session: its executor was lost, its agent failed
    /// or ran out of time), read from their durable events, so that a loop
    /// spanning an executor's restart is caught as if it had not; none
    /// where the guardian ended the attempt before (the retry was told why,
    /// and starts afresh). Events the queue cannot give are not counted.
    pub(super) async fn count_on(&self, run: &Execution, watch: &mut Watch) {
        let request = tq::StreamTaskOutputRequest {
            task_id: run.task_id.to_string(),
            follow: false,
        };
        let mut events = Vec::new();
        match self.queue.clone().stream_task_output(request).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(m)) => events.extend(m.event.filter(|e| e.attempt < run.attempt)),
                        Ok(None) => break,
                        Err(s) => {
                            tracing::warn!(task_id = %run.task_id, error = %s.message(), "the guardian read part of the earlier attempts' events");
                            break;
                        }
                    }
                }
            }
            Err(s) => {
                tracing::warn!(task_id = %run.task_id, error = %s.message(), "the guardian could not read the earlier attempts' events");
                return;
            }
        }
        let taken = taken_up(events);
        if taken.is_empty() {
            return;
        }
        let attempts: std::collections::BTreeSet<i32> = taken.iter().map(|e| e.attempt).collect();
        for event in &taken {
            let usage = event.usage.clone().map(Usage::from);
            // What tripped then was acted on then; it still counts towards
            // the nudges before a stop.
            watch.observe(&omoi_proto::domain::observed(event, usage.as_ref()));
        }
        let attempts: Vec<String> = attempts.iter().map(i32::to_string).collect();
        run.line(
            OutputStream::System,
            format!(
                "guardian: counting on from attempt {} ({} events)",
                attempts.join(", "),
                taken.len()
            ),
        );
    }

    /// TASK_GUARDIAN_INTERVENED, delivered as a report is.
    async fn record_intervention(&self, run: &Execution, trip: &Trip, action: Action) {
        let request = tq::RecordInterventionRequest {
            task_id: run.task_id.to_string(),
            attempt: run.attempt,
            signal: trip.signal.as_str().to_owned(),
            action: action.as_str().to_owned(),
            reason: trip.reason.clone(),
            evidence: trip
                .evidence
                .iter()
                .map(|e| tq::InterventionEvidence {
                    seq: e.seq,
                    text: e.text.clone(),
                    attempt: e.attempt,
                })
                .collect(),
            seq: trip.seq,
        };
        super::report("RecordIntervention", || {
            let (mut q, request) = (self.queue.clone(), request.clone());
            async move { q.record_intervention(request).await }
        })
        .await;
    }

    /// Holds the ticket's dispatch for a person: its spending is not the
    /// agent's to fix.
    async fn pause_ticket(&self, run: &Execution, reason: &str) {
        if run.ticket_id.is_empty() {
            return;
        }
        let request = tq::PauseDispatchRequest {
            ticket_id: run.ticket_id.clone(),
            reason: reason.to_owned(),
            ..Default::default()
        };
        if let Err(s) = self.queue.clone().pause_dispatch(request).await {
            tracing::warn!(ticket_id = %run.ticket_id, error = %s.message(), "the guardian could not pause the ticket");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(attempt: i32, seq: i64, text: &str, stream: OutputStream) -> AgentEvent {
        AgentEvent {
            attempt,
            seq,
            text: text.to_owned(),
            stream: stream as i32,
            ..Default::default()
        }
    }

    #[test]
    fn a_retry_takes_up_the_attempts_since_the_guardian_last_ended_one() {
        let line = "guardian: stop — the same Bash call 3 times: make (events 1, 2, 3)";
        let earlier = vec![
            event(3, 1, "make", OutputStream::Stdout),
            event(1, 2, line, OutputStream::System),
            event(2, 1, "make", OutputStream::Stdout),
            event(1, 1, "make", OutputStream::Stdout),
            event(3, 0, "ls", OutputStream::Stdout),
        ];
        let taken: Vec<(i32, i64)> = taken_up(earlier.clone()).iter().map(|e| (e.attempt, e.seq)).collect();
        assert_eq!(taken, [(2, 1), (3, 0), (3, 1)]);
        // The agent saying so is not the guardian.
        let mocked = vec![
            event(1, 1, line, OutputStream::Stdout),
            event(1, 2, "make", OutputStream::Stdout),
        ];
        assert_eq!(taken_up(mocked).len(), 2);
        // A nudge ends nothing.
        let nudged = vec![event(
            1,
            1,
            "guardian: nudge — the same … (events 1)",
            OutputStream::System,
        )];
        assert_eq!(taken_up(nudged).len(), 1);
        let stopped_last = vec![
            event(1, 1, "make", OutputStream::Stdout),
            event(1, 2, line, OutputStream::System),
        ];
        assert!(taken_up(stopped_last).is_empty());
    }
}
