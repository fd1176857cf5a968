//! Keeping each ticket in step with its tasks: a durable consumer of the
//! task events moves the ticket's status, sums its usage and records its
//! branch's head; a ticket whose budget is spent, or which the guardian
//! paused, has its tasks held back until a person sends it on.

use std::sync::Arc;

use omoi_domain::ticket::{TaskOutcome, TicketStatus, event_starts};
use omoi_domain::{Entity, Event};
use omoi_store::tickets::{GuardianPause, TaskReport};
use tokio_util::sync::CancellationToken;

use crate::tasks::TicketTasks;

const CONSUMER: &str = "omoi-ticket-status";

/// Follows the task events until `shutdown` (through the durable consumer
/// `omoi-ticket-status`: each event applied once, redelivered until it is).
pub async fn follow(
    tasks: Arc<TicketTasks>,
    nats: async_nats::Client,
    topology: omoi_bus::Topology,
    shutdown: CancellationToken,
) {
    let filter = topology.entity_filter(Entity::Task);
    omoi_bus::consumer::consume(
        nats,
        topology,
        CONSUMER.to_owned(),
        filter,
        shutdown,
        move |event_id, envelope| {
            let this = Arc::clone(&tasks);
            async move {
                let event_type = envelope.event.event_type();
                let started = event_starts(event_type);
                let outcome = TaskOutcome::of_event(event_type);
                let usage = envelope.event.attempt_usage();
                // An operator's retry: the task's outcome is open again.
                let reopened = matches!(&envelope.event, Event::TaskRetried(r) if r.manual);
                let (head_commit, summary, result) = match &envelope.event {
                    Event::TaskCompleted(c) => (
                        c.git.as_ref().filter(|g| g.committed()).map(|g| g.commit.as_str()),
                        c.result
                            .as_ref()
                            .and_then(|r| r.get("summary"))
                            .and_then(|s| s.as_str()),
                        c.result.as_ref(),
                    ),
                    _ => (None, None, None),
                };
                let guardian = match &envelope.event {
                    Event::TaskGuardianIntervened(g) if g.action == "pause" => Some(GuardianPause::Paused(&g.reason)),
                    Event::TaskStarted(_) => Some(GuardianPause::SentOn),
                    _ => None,
                };
                if envelope.ticket_id.is_none()
                    || (!started && outcome.is_none() && usage.is_none() && !reopened && guardian.is_none())
                {
                    return Ok(());
                }
                let task_id = envelope.entity_id;
                let report = TaskReport {
                    started,
                    outcome,
                    usage,
                    reopened,
                    head_commit,
                    summary,
                    result,
                    guardian,
                };
                let applied = this
                    .store
                    .apply_task_event(CONSUMER, event_id, task_id, &report)
                    .await
                    .map_err(|e| e.to_string())?;
                let Some(applied) = applied else { return Ok(()) };
                let ticket = &applied.ticket;
                if applied.changed {
                    tracing::info!(ticket_id = %ticket.id, status = %ticket.status, "ticket status changed");
                }
                // Its budget is spent, or the guardian paused it: the queue
                // holds its tasks back. Said
                // again on every event of a paused ticket (a redelivery
                // included), so a crash between the two is made good.
                if ticket.status == TicketStatus::Paused {
                    this.queue
                        .pause(ticket.id, &ticket.paused_reason)
                        .await
                        .map_err(|s| format!("pausing the ticket's dispatch: {}", s.message()))?;
                }
                Ok(())
            }
        },
    )
    .await;
}
