//! What people are asked and told: `omoi inbox` (tickets waiting for a
//! person: phases awaiting approval with the work to approve, pauses),
//! `omoi approve`, `omoi request-changes`, a ticket's gates as `omoi get`
//! prints them; and the subscriptions that notify them (`omoi subscribe`,
//! `subscriptions`, `deliveries`, `unsubscribe`).

use omoi_proto::common::TicketStatus;
use omoi_proto::taskqueue::Task;
use omoi_proto::ticket::{self as pb, GateState};

use omoi_proto::notify::{self as notify, notification_service_client::NotificationServiceClient};
use omoi_runtime::grpc::Connector;

use crate::ops::{self, Output, phase_name};
use crate::{Tickets, print_ticket, short_commit, short_name, status_name};

/// Longest part of a task's summary the inbox quotes.
const SUMMARY_LINES: usize = 12;

fn gate_state(s: i32) -> &'static str {
    short_name(
        GateState::try_from(s).unwrap_or(GateState::Unspecified).as_str_name(),
        "GATE_STATE_",
    )
}

/// A ticket's gates, one line each.
pub fn gate_lines(t: &pb::Ticket) -> Vec<String> {
    t.gates
        .iter()
        .map(|g| {
            let mut line = format!("gate {}: {}", phase_name(g.phase), gate_state(g.state));
            if g.rounds > 1 {
                line.push_str(&format!(" (asked {} times)", g.rounds));
            }
            if !g.decided_by.is_empty() {
                line.push_str(&format!(", last decided by {}", g.decided_by));
            }
            if !g.comment.is_empty() {
                line.push_str(&format!(": {:?}", first_line(&g.comment, 100)));
            }
            line
        })
        .collect()
}

fn first_line(s: &str, chars: usize) -> String {
    s.lines().next().unwrap_or_default().chars().take(chars).collect()
}

/// `omoi approve`.
pub async fn approve(client: &mut Tickets, ticket_id: String, comment: String, phase: i32) -> anyhow::Result<()> {
    let r = client
        .approve(pb::ApproveRequest {
            ticket_id,
            comment,
            phase,
        })
        .await?
        .into_inner();
    print_ticket(&r.ticket.unwrap_or_default(), &[]);
    Ok(())
}

/// `omoi request-changes`.
pub async fn request_changes(
    client: &mut Tickets,
    ticket_id: String,
    comment: String,
    phase: i32,
) -> anyhow::Result<()> {
    let r = client
        .request_changes(pb::RequestChangesRequest {
            ticket_id,
            comment,
            phase,
        })
        .await?
        .into_inner();
    let task = r.task.unwrap_or_default();
    print_ticket(&r.ticket.unwrap_or_default(), std::slice::from_ref(&task));
    Ok(())
}

/// `omoi inbox`: the tickets awaiting approval (with the work to approve)
/// and the paused ones (with why), oldest request first; each linked to
/// the console when OMOI_CONSOLE_URL is set.
pub async fn inbox(client: &mut Tickets, out: Output) -> anyhow::Result<()> {
    let mut waiting = Vec::new();
    for status in [TicketStatus::AwaitingApproval, TicketStatus::Paused] {
        let mut token = String::new();
        loop {
            let page = client
                .list_tickets(pb::ListTicketsRequest {
                    page_size: 1000,
                    page_token: token,
                    status: status.into(),
                })
                .await?
                .into_inner();
            waiting.extend(page.tickets);
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
    }
    waiting.reverse();
    if out == Output::Json {
        let all = pb::ListTicketsResponse {
            tickets: waiting,
            next_page_token: String::new(),
        };
        println!("{}", ops::json(&all, "omoi.ticket.v1.ListTicketsResponse")?);
        return Ok(());
    }
    if waiting.is_empty() {
        println!("Nothing waits for a person.");
        return Ok(());
    }
    for t in &waiting {
        println!("ticket {}  {}  {:?}", t.id, status_name(t.status), t.title);
        if !t.paused_reason.is_empty() {
            println!("  paused: {}", t.paused_reason);
        }
        let awaiting = GateState::AwaitingApproval as i32;
        if !t.gates.iter().any(|g| g.state == awaiting) {
            continue;
        }
        let tasks = client
            .get_ticket(pb::GetTicketRequest {
                ticket_id: t.id.clone(),
                view: pb::TicketView::Full.into(),
            })
            .await?
            .into_inner()
            .tasks;
        for g in t.gates.iter().filter(|g| g.state == awaiting) {
            println!(
                "  the {} phase awaits approval (asked {} time{})",
                phase_name(g.phase).to_ascii_lowercase(),
                g.rounds,
                if g.rounds == 1 { "" } else { "s" }
            );
            for id in &g.review_task_ids {
                if let Some(task) = tasks.iter().find(|task| &task.id == id) {
                    print_reviewed(task);
                }
            }
        }
        println!(
            "  omoi approve {id} [--comment ...]   omoi request-changes {id} \"what to change\"",
            id = t.id
        );
        if let Some(console) = std::env::var("OMOI_CONSOLE_URL").ok().filter(|c| !c.is_empty()) {
            println!("  {}/tickets/{}", console.trim_end_matches('/'), t.id);
        }
    }
    Ok(())
}

/// A task whose work is to be approved: what it changed, what it said.
fn print_reviewed(task: &Task) {
    let diff = task
        .git
        .as_ref()
        .filter(|g| g.commit != g.base_commit)
        .map(|g| {
            format!(
                "  commit {}: {} files, +{} -{}",
                short_commit(&g.commit),
                g.files_changed,
                g.insertions,
                g.deletions
            )
        })
        .unwrap_or_default();
    println!(
        "    {} ({}){diff}",
        task.title,
        phase_name(task.phase).to_ascii_lowercase()
    );
    let result = task
        .result
        .as_ref()
        .map(omoi_proto::convert::struct_to_json)
        .unwrap_or_default();
    if let Some(summary) = result.get("summary").and_then(|s| s.as_str()) {
        for line in summary.lines().take(SUMMARY_LINES) {
            println!("      {line}");
        }
        if summary.lines().count() > SUMMARY_LINES {
            println!("      ...");
        }
    }
}

pub type Notifications = NotificationServiceClient<omoi_runtime::grpc::Client>;

/// NotificationService, which the ticket service serves.
pub fn notifications(url: &str, connector: &Connector) -> anyhow::Result<Notifications> {
    Ok(NotificationServiceClient::new(
        connector.client(url, "OMOI_TICKET_URL")?,
    ))
}

fn format_name(f: i32) -> &'static str {
    short_name(
        notify::SubscriptionFormat::try_from(f)
            .unwrap_or(notify::SubscriptionFormat::Unspecified)
            .as_str_name(),
        "SUBSCRIPTION_FORMAT_",
    )
}

fn print_subscription(s: &notify::Subscription) {
    println!(
        "subscription {}  {:<5} {}  {}",
        s.id,
        format_name(s.format).to_ascii_lowercase(),
        s.url,
        s.event_types.join(",")
    );
}

/// `omoi subscribe`.
pub async fn subscribe(
    n: &mut Notifications,
    url: String,
    events: Vec<String>,
    format: &str,
    secret: String,
    out: Output,
) -> anyhow::Result<()> {
    let format = match format.to_ascii_lowercase().as_str() {
        "json" => notify::SubscriptionFormat::Json,
        "slack" => notify::SubscriptionFormat::Slack,
        other => anyhow::bail!("format {other:?}: use json or slack"),
    };
    let r = n
        .create_subscription(notify::CreateSubscriptionRequest {
            url,
            event_types: events,
            format: format.into(),
            secret,
        })
        .await?
        .into_inner();
    if out == Output::Json {
        println!("{}", ops::json(&r, "omoi.notify.v1.CreateSubscriptionResponse")?);
        return Ok(());
    }
    print_subscription(&r.subscription.unwrap_or_default());
    Ok(())
}

/// `omoi subscriptions`.
pub async fn subscriptions(n: &mut Notifications, out: Output) -> anyhow::Result<()> {
    let r = n
        .list_subscriptions(notify::ListSubscriptionsRequest {})
        .await?
        .into_inner();
    if out == Output::Json {
        println!("{}", ops::json(&r, "omoi.notify.v1.ListSubscriptionsResponse")?);
        return Ok(());
    }
    if r.subscriptions.is_empty() {
        println!("No subscriptions.");
    }
    r.subscriptions.iter().for_each(print_subscription);
    Ok(())
}

/// `omoi deliveries`.
pub async fn deliveries(n: &mut Notifications, subscription_id: String, limit: i32, out: Output) -> anyhow::Result<()> {
    let r = n
        .list_deliveries(notify::ListDeliveriesRequest {
            subscription_id,
            page_size: limit,
            page_token: String::new(),
        })
        .await?
        .into_inner();
    if out == Output::Json {
        println!("{}", ops::json(&r, "omoi.notify.v1.ListDeliveriesResponse")?);
        return Ok(());
    }
    for d in &r.deliveries {
        let state = short_name(
            notify::DeliveryState::try_from(d.state)
                .unwrap_or(notify::DeliveryState::Unspecified)
                .as_str_name(),
            "DELIVERY_STATE_",
        );
        let tries: Vec<String> = d
            .attempts
            .iter()
            .map(|a| match a.status_code {
                0 => format!("- ({}, {} ms)", a.error, a.latency_ms),
                code => format!("{code} ({} ms)", a.latency_ms),
            })
            .collect();
        println!(
            "{}  {:<26} {:<9} ticket {}  tries: {}",
            d.event_id,
            d.event_type,
            state.to_ascii_lowercase(),
            d.ticket_id,
            tries.join(", ")
        );
    }
    Ok(())
}

/// `omoi unsubscribe`.
pub async fn unsubscribe(n: &mut Notifications, subscription_id: String) -> anyhow::Result<()> {
    n.delete_subscription(notify::DeleteSubscriptionRequest {
        subscription_id: subscription_id.clone(),
    })
    .await?;
    println!("subscription {subscription_id} removed");
    Ok(())
}
