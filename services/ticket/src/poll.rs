//! For deployments GitHub cannot reach with webhooks
//! (`OMOI_GITHUB_POLL_SECONDS`): the open pull requests of tickets that may
//! still react are looked at over REST — their head's check suites and
//! their reviews — with conditional requests (an unchanged answer is a 304,
//! which costs no rate limit), and what a webhook would have brought goes
//! the same way: a `React` request, acted on once per failed commit and per
//! review whether a delivery or a look found it first. A pull request that
//! no longer merges cleanly is a conflict reaction, found by these looks or
//! by the look a push to its base asks for (`merge_checks`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use omoi_domain::Ticket;
use omoi_domain::git::forge_repo;
use omoi_proto::ticket as pb;
use omoi_runtime::background::every;
use omoi_store::turns::Turn;
use serde_json::Value;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::pulls::GitHub;
use crate::service::Tickets;

/// The tickets looked at in one pass, most recently changed first.
pub const PER_PASS: i64 = 200;

/// How long a moved base's pull request is asked about.
const MERGE_CHECK_FOR: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

/// Looks every `interval` until `shutdown`.
pub async fn run(tickets: Arc<Tickets>, github: Arc<GitHub>, interval: Duration, shutdown: CancellationToken) {
    let cache = Mutex::new(HashMap::new());
    let (tickets, github, cache) = (&tickets, &github, &cache);
    every("looking at pull requests", interval, &shutdown, move || async move {
        // One replica looks at a time: the others' looks would only cost
        // rate limit.
        let Some(turn) = tickets
            .store()
            .take_turn(Turn::PullRequestLook)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(());
        };
        for ticket in tickets
            .store()
            .tickets_with_pull_requests(PER_PASS)
            .await
            .map_err(|e| e.to_string())?
        {
            if let Err(e) = look(tickets, github, cache, &ticket).await {
                tracing::warn!(ticket_id = %ticket.id, error = %e, "could not look at the pull request");
            }
        }
        turn.release().await.map_err(|e| e.to_string())
    })
    .await
}

/// Looks every `interval` until `shutdown` whether the pull requests whose
/// base a push moved (`Store::check_mergeable`) still merge cleanly; one
/// that does not is a conflict reaction. GitHub works mergeability out
/// after the push: a pull request it has not yet is asked again next time.
pub async fn merge_checks(tickets: Arc<Tickets>, github: Arc<GitHub>, interval: Duration, shutdown: CancellationToken) {
    let (tickets, github) = (&tickets, &github);
    every("looking at moved bases", interval, &shutdown, move || async move {
        let Some(turn) = tickets
            .store()
            .take_turn(Turn::MergeCheck)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(());
        };
        for (ticket, since) in tickets
            .store()
            .merge_checks_due(PER_PASS)
            .await
            .map_err(|e| e.to_string())?
        {
            // GitHub works it out within seconds; one it never answers
            // about is not asked about for ever.
            let given_up = chrono::Utc::now() - since > MERGE_CHECK_FOR;
            let answered = match merge_check(tickets, github, &ticket).await {
                Ok(answered) => answered,
                Err(e) => {
                    tracing::warn!(ticket_id = %ticket.id, error = %e, "could not ask whether the pull request merges");
                    false
                }
            };
            if !answered && given_up {
                tracing::warn!(ticket_id = %ticket.id, "no answer on whether the pull request merges; no longer asked");
            }
            if answered || given_up {
                tickets
                    .store()
                    .merge_checked(ticket.id, since)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        turn.release().await.map_err(|e| e.to_string())
    })
    .await
}

/// Whether GitHub answered about the ticket's pull request (and a conflict
/// it found is answered with a reaction).
async fn merge_check(tickets: &Tickets, github: &GitHub, ticket: &Ticket) -> Result<bool, String> {
    let Some((repo, number)) = pull_request_of(ticket) else {
        return Ok(true);
    };
    let full_name = repo.full_name();
    let (_, pr) = github
        .get_cached(&format!("/repos/{full_name}/pulls/{number}"), None)
        .await?;
    if pr["state"].as_str() != Some("open") {
        return Ok(true);
    }
    if pr["mergeable"].is_null() {
        return Ok(false);
    }
    if let Some(ask) = conflict(ticket, &full_name, &pr) {
        react(tickets, ticket, ask).await?;
    }
    Ok(true)
}

/// The ticket's forge repository and pull request number.
fn pull_request_of(ticket: &Ticket) -> Option<(omoi_domain::git::ForgeRepo, i64)> {
    let repo = forge_repo(&ticket.repository)?;
    let number = ticket
        .pull_request_url
        .rsplit_once("/pull/")
        .and_then(|(_, n)| n.parse::<i64>().ok())?;
    Some((repo, number))
}

/// A conflict reaction when GitHub says pull request `pr` no longer merges
/// cleanly; once per head and base, however often it is seen.
fn conflict(ticket: &Ticket, full_name: &str, pr: &Value) -> Option<pb::ReactRequest> {
    if pr["mergeable"].as_bool() != Some(false) {
        return None;
    }
    let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let (head, base) = (s(&pr["head"]["sha"]), s(&pr["base"]["sha"]));
    let short = |sha: &str| sha.chars().take(40).collect::<String>();
    Some(pb::ReactRequest {
        delivery_id: format!("conflict-{}-{}", short(&head), short(&base)),
        kind: pb::ReactionKind::Conflict.into(),
        repository: full_name.to_owned(),
        pull_request_url: ticket.pull_request_url.clone(),
        url: ticket.pull_request_url.clone(),
        head_sha: head,
        base_ref: s(&pr["base"]["ref"]),
        base_sha: base,
        ..Default::default()
    })
}

/// Asks for reaction `ask` as a delivery would.
async fn react(tickets: &Tickets, ticket: &Ticket, ask: pb::ReactRequest) -> Result<(), String> {
    let asked = ask.delivery_id.clone();
    match tickets.react_to(ask).await {
        Ok(r) if r.reacted => {
            tracing::info!(ticket_id = %ticket.id, found = %asked, "reacting to what a look found");
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(e) => Err(format!("{asked}: {}", tonic::Status::from(e).message())),
    }
}

/// What GitHub answered each path last, by its ETag.
type Cache = Mutex<HashMap<String, (String, Value)>>;

async fn get(github: &GitHub, cache: &Cache, path: &str) -> Result<Value, String> {
    let cached = cache.lock().await.get(path).cloned();
    let (etag, body) = github.get_cached(path, cached).await?;
    if !etag.is_empty() {
        cache.lock().await.insert(path.to_owned(), (etag, body.clone()));
    }
    Ok(body)
}

/// One ticket's pull request: its head's failed check suites and the
/// reviews that requested changes, each as a reaction.
async fn look(tickets: &Tickets, github: &GitHub, cache: &Cache, ticket: &Ticket) -> Result<(), String> {
    let Some((repo, number)) = pull_request_of(ticket) else {
        return Ok(());
    };
    let full_name = repo.full_name();
    let root = format!("/repos/{full_name}");
    let pr = get(github, cache, &format!("{root}/pulls/{number}")).await?;
    if pr["state"].as_str() != Some("open") {
        return Ok(());
    }
    let head = pr["head"]["sha"].as_str().unwrap_or_default().to_owned();
    let mut asks: Vec<pb::ReactRequest> = conflict(ticket, &full_name, &pr).into_iter().collect();
    let suites = get(github, cache, &format!("{root}/commits/{head}/check-suites")).await?;
    for suite in suites["check_suites"].as_array().into_iter().flatten() {
        // The ticket service says which conclusions ask for a fix; the rest
        // need not be asked about.
        if suite["status"].as_str() != Some("completed") || suite["conclusion"].as_str() == Some("success") {
            continue;
        }
        let id = suite["id"].as_i64().unwrap_or_default();
        asks.push(pb::ReactRequest {
            delivery_id: format!("poll-suite-{id}"),
            kind: pb::ReactionKind::CiFailure.into(),
            repository: full_name.clone(),
            branch: ticket.branch.clone(),
            url: format!("{}/checks", ticket.pull_request_url),
            check_suite_id: id,
            head_sha: head.clone(),
            conclusion: suite["conclusion"].as_str().unwrap_or_default().to_owned(),
            ..Default::default()
        });
    }
    let reviews = get(github, cache, &format!("{root}/pulls/{number}/reviews?per_page=100")).await?;
    for review in reviews.as_array().into_iter().flatten() {
        if review["state"].as_str() != Some("CHANGES_REQUESTED") {
            continue;
        }
        let id = review["id"].as_i64().unwrap_or_default();
        let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        asks.push(pb::ReactRequest {
            delivery_id: format!("poll-review-{id}"),
            kind: pb::ReactionKind::Review.into(),
            repository: full_name.clone(),
            pull_request_url: ticket.pull_request_url.clone(),
            pull_number: number,
            url: s(&review["html_url"]),
            author: s(&review["user"]["login"]),
            author_association: s(&review["author_association"]),
            body: s(&review["body"]),
            review_id: id,
            ..Default::default()
        });
    }
    for ask in asks {
        react(tickets, ticket, ask).await?;
    }
    Ok(())
}
