//! `omoi watch` on a terminal: the ticket's tasks as a table redrawn in
//! place — phase, status, attempt, agent, elapsed time, cost, title — under
//! a line about the ticket, until the ticket ends. Piped (or with
//! `--events`), `watch` prints the ticket's events as lines instead.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use omoi_proto::convert::from_timestamp;
use omoi_proto::taskqueue::Task;
use omoi_proto::ticket as pb;

use crate::{Tickets, short, short_name, status_name, task_status_name};

/// How often the table is redrawn when nothing happened (elapsed times).
const TICK: Duration = Duration::from_millis(500);

pub async fn watch(client: &mut Tickets, ticket_id: &str) -> anyhow::Result<()> {
    let mut events = client
        .watch_ticket(pb::WatchTicketRequest {
            ticket_id: ticket_id.to_owned(),
        })
        .await?
        .into_inner();
    let mut table = Table::new();
    let mut latest = fetch(client, ticket_id).await?;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dirty = false;
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(_)) => dirty = true,
                Some(Err(status)) => {
                    table.finish();
                    return Err(status.into());
                }
                // The ticket ended (or was never going to change again).
                None => break,
            },
            _ = tick.tick() => {
                // At most one read per tick, however many events came.
                if dirty {
                    latest = fetch(client, ticket_id).await?;
                    dirty = false;
                }
                table.draw(&latest, Utc::now());
            }
        }
    }
    let last = fetch(client, ticket_id).await?;
    table.draw(&last, Utc::now());
    table.finish();
    Ok(())
}

async fn fetch(client: &mut Tickets, ticket_id: &str) -> anyhow::Result<pb::GetTicketResponse> {
    Ok(client
        .get_ticket(pb::GetTicketRequest {
            ticket_id: ticket_id.to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner())
}

/// The lines on screen: the ticket's, then one per task in phase order.
struct Table {
    screen: MultiProgress,
    header: ProgressBar,
    rows: HashMap<String, ProgressBar>,
}

impl Table {
    fn new() -> Self {
        let screen = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let header = screen.add(line());
        Self {
            screen,
            header,
            rows: HashMap::new(),
        }
    }

    fn draw(&mut self, r: &pb::GetTicketResponse, now: DateTime<Utc>) {
        let t = r.ticket.clone().unwrap_or_default();
        self.header.set_message(ticket_line(&t));
        let mut tasks: Vec<&Task> = r.tasks.iter().collect();
        tasks.sort_by_key(|task| (task.phase, task.created_at.as_ref().map(|c| (c.seconds, c.nanos))));
        for task in tasks {
            let row = self
                .rows
                .entry(task.id.clone())
                .or_insert_with(|| self.screen.add(line()));
            row.set_message(task_row(task, now));
        }
    }

    /// Leaves the last picture on screen.
    fn finish(&self) {
        self.header.finish();
        for row in self.rows.values() {
            row.finish();
        }
    }
}

fn line() -> ProgressBar {
    ProgressBar::new_spinner().with_style(ProgressStyle::with_template("{msg}").expect("a valid template"))
}

fn ticket_line(t: &pb::Ticket) -> String {
    let spent = t.usage.as_ref().map_or(0.0, |u| u.cost_usd);
    let budget = t.max_cost_usd.map(|b| format!(" of ${b:.2}")).unwrap_or_default();
    let mut line = format!(
        "ticket {}  {}  {:?}  spent ${spent:.4}{budget}",
        short(&t.id),
        status_name(t.status),
        t.title
    );
    if !t.paused_reason.is_empty() {
        line.push_str(&format!("  paused: {}", t.paused_reason));
    }
    if !t.branch.is_empty() {
        line.push_str(&format!("  branch {}", t.branch));
    }
    if !t.pull_request_url.is_empty() {
        line.push_str(&format!("  {}", t.pull_request_url));
    }
    line
}

/// One task: phase, status, attempt, agent, elapsed, cost, title.
fn task_row(t: &Task, now: DateTime<Utc>) -> String {
    let phase = short_name(
        omoi_proto::common::Phase::try_from(t.phase)
            .unwrap_or(omoi_proto::common::Phase::Unspecified)
            .as_str_name(),
        "PHASE_",
    );
    let started = t.started_at.as_ref().and_then(from_timestamp);
    let ended = t.completed_at.as_ref().and_then(from_timestamp);
    let elapsed = match (started, ended) {
        (Some(s), Some(e)) => seconds(e - s),
        (Some(s), None) => seconds(now - s),
        _ => "-".to_owned(),
    };
    let agent = if t.assigned_agent_id.is_empty() {
        "-"
    } else {
        short(&t.assigned_agent_id)
    };
    let cost = t
        .usage
        .as_ref()
        .map(|u| format!("${:.4}", u.cost_usd))
        .unwrap_or_else(|| "-".to_owned());
    format!(
        "  {phase:<14} {:<10} {:>2}  {agent:<12} {elapsed:>8}  {cost:>9}  {}",
        task_status_name(t.status),
        t.attempt,
        t.title
    )
}

fn seconds(d: chrono::TimeDelta) -> String {
    let s = d.num_milliseconds().max(0) as f64 / 1000.0;
    if s < 60.0 {
        format!("{s:.1}s")
    } else {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_task_shows_its_time_so_far_and_a_finished_one_its_run() {
        let at = |s: i64| Some(prost_types::Timestamp { seconds: s, nanos: 0 });
        let mut t = Task {
            title: "Implement: greet".into(),
            phase: 2,
            status: 3,
            attempt: 1,
            assigned_agent_id: "01a2128e-36b9-73db-8064-8ae8709b6ff3".into(),
            started_at: at(1_000),
            ..Default::default()
        };
        let now = DateTime::from_timestamp(1_075, 0).unwrap();
        let row = task_row(&t, now);
        assert!(row.contains("IMPLEMENTATION"), "{row}");
        assert!(row.contains("RUNNING"), "{row}");
        assert!(row.contains("8ae8709b6ff3"), "{row}");
        assert!(row.contains("1m15s"), "{row}");
        t.completed_at = at(1_012);
        t.status = 4;
        t.usage = Some(omoi_proto::common::Usage {
            cost_usd: 0.25,
            ..Default::default()
        });
        let row = task_row(&t, now);
        assert!(row.contains("12.0s") && row.contains("$0.2500"), "{row}");
    }
}
