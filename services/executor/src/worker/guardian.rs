//! The guardian on the executor: it follows a running attempt's agent
//! events (the same normalized events for every runner) through
//! `omoi_domain::guardian::Watch`, and steps in when a signal trips — a
//! nudge (the agent stopped and its session resumed with guidance naming
//! what it repeats), then stopping the attempt as a retryable failure with
//! the evidence (which the retry's prompt carries); spending pauses the
//! ticket's dispatch for a person. Each intervention is said on the run's
//! output and recorded as TASK_GUARDIAN_INTERVENED.

use omoi_domain::guardian::{Action, Trip, Watch};
use omoi_domain::usage::Usage;
use omoi_proto::common::{AgentEvent, OutputStream};
use omoi_proto::taskqueue as tq;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::Worker;
use crate::events::EventSink;
use crate::executions::{Execution, StopRequest};

/// What the guardian did to a run of the agent.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Stepped {
    /// The run was stopped to be resumed with this prompt.
    Nudge(String),
    /// The attempt was stopped (its report says why).
    Stopped,
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

impl Worker {
    /// Follows `run`'s events from `after` (the last seq already seen) with
    /// `watch` until a trip calls for action; then acts on the run (`turn`
    /// is this run of the agent) and says what it did. Never returns while
    /// nothing trips.
    pub(super) async fn guard(
        &self,
        run: &Execution,
        watch: &mut Watch,
        after: &mut i64,
        turn: &CancellationToken,
    ) -> Stepped {
        let (past, mut live) = run.subscribe();
        let mut pending: std::collections::VecDeque<AgentEvent> = past.into();
        loop {
            let event = match pending.pop_front() {
                Some(e) => e,
                None => match live.recv().await {
                    Ok(e) => e,
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return std::future::pending().await,
                },
            };
            if event.seq <= *after {
                continue;
            }
            *after = event.seq;
            let usage = event.usage.clone().map(Usage::from);
            let observed = omoi_proto::domain::observed(&event, usage.as_ref());
            let Some(trip) = watch.observe(&observed).into_iter().next() else {
                continue;
            };
            let action = watch.action(&trip);
            let seqs: Vec<String> = trip.evidence.iter().map(|e| e.seq.to_string()).collect();
            let said = format!(
                "guardian: {} — {} (events {})",
                action.as_str(),
                trip.reason,
                seqs.join(", ")
            );
            run.line(OutputStream::System, said.clone());
            self.record_intervention(run, &trip, action).await;
            return match action {
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
            };
        }
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
