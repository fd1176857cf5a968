//! What the forge hears of its tickets, from a durable consumer of the
//! ticket events: the issue a ticket came from gets a comment when the
//! ticket is taken on, when its pull request opens, and when it fails or
//! pauses; the branch head of a ticket with a pull request gets a commit
//! status `omoi` (pending while a follow-up works, then success, failure or
//! error), linking to the ticket in the console. At least once: what GitHub
//! could not take (5xx, no answer) is tried again; what it refuses for good
//! is logged and let go.

use std::sync::Arc;

use omoi_domain::git::forge_repo;
use omoi_domain::{Entity, Event, Ticket};
use omoi_store::Store;
use tokio_util::sync::CancellationToken;

use crate::pulls::GitHub;

const CONSUMER: &str = "omoi-ticket-forge";

/// The context of omoi's commit statuses.
pub const STATUS_CONTEXT: &str = "omoi";

/// The issue a ticket came from (its source): its repository's owner and
/// name, and its number; None for a ticket that came from elsewhere.
pub fn issue_of(source_kind: &str, source_url: &str) -> Option<(String, String, i64)> {
    if source_kind != "github_issue" {
        return None;
    }
    let (repo_url, number) = source_url.rsplit_once("/issues/")?;
    let repo = forge_repo(repo_url)?;
    Some((repo.owner, repo.name, number.parse().ok()?))
}

/// What the issue is told of `event` of `ticket`, if anything.
fn comment(ticket: &Ticket, event: &Event, console: &str) -> Option<String> {
    let link = if console.is_empty() {
        format!("`{}`", ticket.id)
    } else {
        format!("[`{}`]({console}/tickets/{})", ticket.id, ticket.id)
    };
    Some(match event {
        Event::TicketCreated(_) => format!(
            "omoi is working on this as ticket {link}; its work lands on branch `{}` and ends in a pull request.",
            ticket.branch
        ),
        Event::TicketPullRequestOpened(pr) => format!("The pull request for this issue is open: {}", pr.url),
        Event::TicketFailed(c) => format!(
            "Ticket {link} failed{}.",
            c.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
        ),
        Event::TicketPaused(c) => format!(
            "Ticket {link} is paused{}.",
            c.reason
                .as_deref()
                .or(Some(ticket.paused_reason.as_str()))
                .filter(|r| !r.is_empty())
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ),
        _ => return None,
    })
}

/// The commit status `event` of `ticket` sets on its branch head: (state,
/// description), if any.
fn status(ticket: &Ticket, event: &Event) -> Option<(&'static str, String)> {
    let reason = |c: &omoi_domain::event::TicketChanged| c.reason.clone().unwrap_or_default();
    let cut = |s: String| s.chars().take(140).collect::<String>();
    Some(match event {
        Event::TicketReopened(c) => ("pending", cut(format!("omoi is at work: {}", reason(c)))),
        Event::TicketCompleted(_) => ("success", "omoi's ticket completed".to_owned()),
        Event::TicketFailed(c) => ("failure", cut(format!("omoi's ticket failed: {}", reason(c)))),
        Event::TicketCancelled(_) => ("error", "omoi's ticket was cancelled".to_owned()),
        Event::TicketPaused(_) => (
            "pending",
            cut(format!("omoi's ticket is paused: {}", ticket.paused_reason)),
        ),
        _ => return None,
    })
}

/// How long before the consumer's creation it starts reading.
const FIRST_START_MARGIN: std::time::Duration = std::time::Duration::from_secs(300);

/// Follows the ticket events until `shutdown`, telling the forge.
pub async fn follow(
    store: Store,
    github: Arc<GitHub>,
    console: String,
    nats: async_nats::Client,
    topology: omoi_bus::Topology,
    shutdown: CancellationToken,
) {
    let filter = topology.entity_filter(Entity::Ticket);
    // Created by the first replica to start with it, the consumer begins
    // about then (a margin for clocks and the start itself), not at the
    // stream's first event: tickets that ended before it existed are not
    // told about again.
    let since = time::OffsetDateTime::now_utc() - FIRST_START_MARGIN;
    omoi_bus::consumer::consume_since(nats, topology, CONSUMER.to_owned(), filter, Some(since), shutdown, move |_, envelope| {
        let (store, github, console) = (store.clone(), Arc::clone(&github), console.clone());
        async move {
            if !matches!(
                envelope.event,
                Event::TicketCreated(_)
                    | Event::TicketPullRequestOpened(_)
                    | Event::TicketFailed(_)
                    | Event::TicketPaused(_)
                    | Event::TicketReopened(_)
                    | Event::TicketCompleted(_)
                    | Event::TicketCancelled(_)
            ) {
                return Ok(());
            }
            let ticket = match store.get_ticket(envelope.entity_id).await {
                Ok((t, _)) => t,
                // Deleted since (retention): nobody to tell.
                Err(omoi_store::StoreError::NotFound { .. }) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            };
            let link = (!console.is_empty()).then(|| format!("{console}/tickets/{}", ticket.id));
            if ticket.pull_request
                && !ticket.head_commit.is_empty()
                && let (Some(repo), Some((state, description))) =
                    (forge_repo(&ticket.repository), status(&ticket, &envelope.event))
            {
                let set = github
                    .set_status(&repo.owner, &repo.name, &ticket.head_commit, state, &description, link.as_deref())
                    .await?;
                if !set {
                    tracing::warn!(ticket_id = %ticket.id, "the branch head would not take omoi's status");
                }
            }
            if let (Some((owner, name, number)), Some(text)) = (
                issue_of(&ticket.source_kind, &ticket.source_url),
                comment(&ticket, &envelope.event, &console),
            ) && !github.comment_on_issue(&owner, &name, number, &text).await?
            {
                tracing::warn!(ticket_id = %ticket.id, issue = %ticket.source_url, "the issue would not take a comment");
            }
            Ok(())
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issues_ticket_names_its_issue() {
        let url = "https://github.com/acme/r/issues/42";
        assert_eq!(issue_of("github_issue", url), Some(("acme".into(), "r".into(), 42)));
        assert_eq!(issue_of("", ""), None);
        assert_eq!(issue_of("github_issue", "https://github.com/acme/r/pull/42"), None);
    }
}
