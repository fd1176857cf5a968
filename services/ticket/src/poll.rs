//! For deployments GitHub cannot reach with webhooks
//! (`OMOI_GITHUB_POLL_SECONDS`): the open pull requests of tickets that may
//! still react are looked at over REST — their head's check suites and
//! their reviews — with conditional requests (an unchanged answer is a 304,
//! which costs no rate limit), and what a webhook would have brought goes
//! the same way: a `React` request, acted on once per failed commit and per
//! review whether a delivery or a look found it first.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use omoi_domain::Ticket;
use omoi_domain::git::forge_repo;
use omoi_proto::ticket as pb;
use omoi_runtime::background::every;
use serde_json::Value;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::pulls::GitHub;
use crate::service::Tickets;

/// The tickets looked at in one pass, most recently changed first.
const PER_PASS: i64 = 200;

/// Looks every `interval` until `shutdown`.
pub async fn run(tickets: Arc<Tickets>, github: Arc<GitHub>, interval: Duration, shutdown: CancellationToken) {
    let cache = Mutex::new(HashMap::new());
    let (tickets, github, cache) = (&tickets, &github, &cache);
    every("looking at pull requests", interval, &shutdown, move || async move {
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
        Ok::<_, String>(())
    })
    .await
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
    let Some(repo) = forge_repo(&ticket.repository) else {
        return Ok(());
    };
    let Some(number) = ticket
        .pull_request_url
        .rsplit_once("/pull/")
        .and_then(|(_, n)| n.parse::<i64>().ok())
    else {
        return Ok(());
    };
    let root = format!("/repos/{}/{}", repo.owner, repo.name);
    let full_name = format!("{}/{}", repo.owner, repo.name);
    let pr = get(github, cache, &format!("{root}/pulls/{number}")).await?;
    if pr["state"].as_str() != Some("open") {
        return Ok(());
    }
    let head = pr["head"]["sha"].as_str().unwrap_or_default().to_owned();
    let mut asks = Vec::new();
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
        let asked = ask.delivery_id.clone();
        match tickets.react_to(ask).await {
            Ok(r) if r.reacted => {
                tracing::info!(ticket_id = %ticket.id, found = %asked, "reacting to what a look found")
            }
            Ok(_) => {}
            Err(e) => return Err(format!("{asked}: {}", tonic::Status::from(e).message())),
        }
    }
    Ok(())
}
