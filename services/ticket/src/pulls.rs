//! Pull requests at the end: a completed ticket created with
//! `pull_request` gets one from its branch to its base on GitHub (REST
//! `POST /repos/{owner}/{repo}/pulls`). Opening is idempotent: before
//! creating one, the forge is asked for a pull request from that branch, so
//! a restart or a lost answer never opens a second. A forge that cannot be
//! reached (or answers 5xx / 429) is asked again with backoff; a refusal
//! (no rights, no such branch) is recorded on the ticket with the forge's
//! message. Every replica runs this; a ticket is worked by one at a time.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use omoi_domain::Ticket;
use omoi_domain::event::PullRequestOpened;
use omoi_domain::git::{ForgeRepo, forge_repo};
use omoi_runtime::background::{every, policy};
use omoi_store::Store;
use omoi_store::pulls::PullRequestClaim;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The GitHub REST API, as one token sees it.
pub struct GitHub {
    api: String,
    token: Option<String>,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// What asking the forge came to.
#[derive(Debug, PartialEq)]
enum Asked {
    Opened(PullRequestOpened),
    /// Final: recorded, not asked again.
    Refused(String),
    /// Asked again later.
    Later(String),
}

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl GitHub {
    pub fn new(api: &str, token: Option<String>) -> anyhow::Result<Self> {
        let api = api.trim_end_matches('/').to_owned();
        api.parse::<http::Uri>()
            .map_err(|e| anyhow::anyhow!("OMOI_GITHUB_API_URL {api:?}: {e}"))?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| anyhow::anyhow!("no TLS roots for GitHub: {e}"))?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            api,
            token: token.filter(|t| !t.is_empty()),
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// One API call: the status and the JSON body, or why it could not be
    /// made (worth trying again).
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<(StatusCode, Value), String> {
        self.call_with(method, path, body, None)
            .await
            .map(|(status, body, _)| (status, body))
    }

    /// [`GitHub::call`], conditional on `etag` (`If-None-Match`): also the
    /// answer's ETag. A 304 comes with no body.
    async fn call_with(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        etag: Option<&str>,
    ) -> Result<(StatusCode, Value, Option<String>), String> {
        let token = self.token.as_deref().unwrap_or_default();
        let mut req = Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", self.api))
            .header("accept", "application/vnd.github+json")
            .header("x-github-api-version", "2022-11-28")
            .header("user-agent", "omoi")
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json");
        if let Some(etag) = etag {
            req = req.header("if-none-match", etag);
        }
        let req = req
            .body(Full::new(body.map(|b| Bytes::from(b.to_string())).unwrap_or_default()))
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let (status, headers, bytes) = self.send(req, &format!("{method} {path}")).await?;
        let etag = header(&headers, "etag");
        Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null), etag))
    }

    /// Sends `req` (`what` names it in errors) and reads the whole answer,
    /// within the request timeout.
    async fn send(
        &self,
        req: Request<Full<Bytes>>,
        what: &str,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), String> {
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| format!("{what}: no answer within {} s", REQUEST_TIMEOUT.as_secs()))?
            .map_err(|e| format!("{what}: {e}"))?;
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.map_err(|e| format!("{what}: {e}"))?.to_bytes();
        Ok((parts.status, parts.headers, bytes))
    }

    /// A conditional GET of `path`: GitHub answers 304 (which costs no rate
    /// limit) when nothing changed since `cached`'s ETag, and `cached`'s
    /// body is the answer again. The answer, with its ETag.
    pub async fn get_cached(&self, path: &str, cached: Option<(String, Value)>) -> Result<(String, Value), String> {
        let (etag, body) = match cached {
            Some((etag, body)) => (Some(etag), Some(body)),
            None => (None, None),
        };
        let (status, answer, new_etag) = self.call_with(Method::GET, path, None, etag.as_deref()).await?;
        match (status, body) {
            (StatusCode::NOT_MODIFIED, Some(body)) => Ok((etag.unwrap_or_default(), body)),
            (s, _) if s.is_success() => Ok((new_etag.unwrap_or_default(), answer)),
            (s, _) => Err(format!("GET {path}: {s} {}", message(&answer))),
        }
    }

    /// Finds or opens the ticket's pull request.
    async fn open(&self, ticket: &Ticket) -> Asked {
        let Some(repo) = forge_repo(&ticket.repository) else {
            return Asked::Refused(format!("{} is not a GitHub repository URL", ticket.repository));
        };
        if self.token.is_none() {
            return Asked::Later("OMOI_GITHUB_TOKEN is not set on the ticket service".into());
        }
        match self.try_open(&repo, ticket).await {
            Ok(asked) => asked,
            Err(later) => Asked::Later(later),
        }
    }

    async fn try_open(&self, repo: &ForgeRepo, ticket: &Ticket) -> Result<Asked, String> {
        let root = format!("/repos/{}", repo.full_name());
        let base = if ticket.base_ref.is_empty() {
            let (status, body) = self.call(Method::GET, &root, None).await?;
            if !status.is_success() {
                return Ok(refusal_or_later(status, &body));
            }
            match body["default_branch"].as_str() {
                Some(b) => b.to_owned(),
                None => return Err(format!("GET {root}: no default_branch in the answer")),
            }
        } else {
            ticket.base_ref.clone()
        };
        if let Some(found) = self.existing(repo, ticket, &base).await? {
            return Ok(Asked::Opened(found));
        }
        // The issue it came from, in this repository, closes with it.
        let closes = match crate::forge_news::issue_of(&ticket.source_kind, &ticket.source_url) {
            Some((owner, name, number)) if owner == repo.owner && name == repo.name => format!("\n\nCloses #{number}"),
            _ => String::new(),
        };
        let body = json!({
            "title": ticket.title,
            "head": ticket.branch,
            "base": base,
            "body": format!(
                "{}{closes}\n\n---\nOpened by omoi for ticket `{}`; each commit is one of its tasks.",
                ticket.description, ticket.id
            ),
        });
        let (status, answer) = self.call(Method::POST, &format!("{root}/pulls"), Some(body)).await?;
        if status == StatusCode::CREATED {
            return opened(&answer, ticket, &base)
                .map(Asked::Opened)
                .ok_or_else(|| format!("POST {root}/pulls: no html_url in the answer"));
        }
        // Ours already, after all (an answer lost on the way back).
        if status == StatusCode::UNPROCESSABLE_ENTITY
            && let Some(found) = self.existing(repo, ticket, &base).await?
        {
            return Ok(Asked::Opened(found));
        }
        Ok(refusal_or_later(status, &answer))
    }

    /// The check runs of check suite `suite` that did not succeed, each with
    /// its output and (a page of) its annotations.
    pub async fn failed_checks(&self, owner: &str, name: &str, suite: i64) -> Result<Vec<FailedCheck>, String> {
        let root = format!("/repos/{owner}/{name}");
        let path = format!("{root}/check-suites/{suite}/check-runs?filter=latest&per_page=100");
        let (status, body) = self.call(Method::GET, &path, None).await?;
        if !status.is_success() {
            return Err(format!("GET {path}: {status} {}", message(&body)));
        }
        let mut failed = Vec::new();
        for run in body["check_runs"].as_array().into_iter().flatten() {
            let conclusion = run["conclusion"].as_str().unwrap_or_default();
            if !matches!(conclusion, "failure" | "timed_out" | "action_required" | "cancelled") {
                continue;
            }
            let text = |k: &str| run["output"][k].as_str().unwrap_or_default().to_owned();
            let mut check = FailedCheck {
                name: run["name"].as_str().unwrap_or_default().to_owned(),
                conclusion: conclusion.to_owned(),
                url: run["html_url"].as_str().unwrap_or_default().to_owned(),
                title: text("title"),
                summary: text("summary"),
                text: text("text"),
                annotations: Vec::new(),
                log_tail: String::new(),
            };
            // An Actions job (its check run's id is the job's): its log's end.
            if run["app"]["slug"].as_str() == Some("github-actions")
                && let Some(id) = run["id"].as_i64()
            {
                match self.job_log(&root, id).await {
                    Ok(log) => check.log_tail = tail(&log, LOG_TAIL_BYTES),
                    Err(e) => tracing::info!(job = id, error = %e, "no job log for the prompt"),
                }
            }
            if run["output"]["annotations_count"].as_i64().unwrap_or(0) > 0
                && let Some(id) = run["id"].as_i64()
            {
                let path = format!("{root}/check-runs/{id}/annotations?per_page=50");
                let (status, body) = self.call(Method::GET, &path, None).await?;
                if status.is_success() {
                    check.annotations = body
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| {
                            format!(
                                "{}:{}: {}: {}",
                                a["path"].as_str().unwrap_or_default(),
                                a["start_line"].as_i64().unwrap_or_default(),
                                a["annotation_level"].as_str().unwrap_or("failure"),
                                a["message"].as_str().unwrap_or_default()
                            )
                        })
                        .collect();
                }
            }
            failed.push(check);
        }
        Ok(failed)
    }

    /// The log of Actions job `job`: GitHub answers with a redirect to where
    /// it can be downloaded for a while (no token needed there).
    async fn job_log(&self, root: &str, job: i64) -> Result<String, String> {
        let path = format!("{root}/actions/jobs/{job}/logs");
        let token = self.token.as_deref().unwrap_or_default();
        let (status, location, body) = self.fetch(&format!("{}{path}", self.api), Some(token)).await?;
        let (status, body) = match (status.is_redirection(), location) {
            (true, Some(to)) => {
                let (status, _, body) = self.fetch(&to, None).await?;
                (status, body)
            }
            _ => (status, body),
        };
        if !status.is_success() {
            return Err(format!("GET {path}: {status}"));
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// A plain GET of `url` (with the token when given): its status, where
    /// it redirects, its body.
    async fn fetch(&self, url: &str, token: Option<&str>) -> Result<(StatusCode, Option<String>, Bytes), String> {
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(url)
            .header("user-agent", "omoi")
            .header("x-github-api-version", "2022-11-28");
        if let Some(token) = token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("GET {url}: {e}"))?;
        let (status, headers, body) = self.send(req, &format!("GET {url}")).await?;
        Ok((status, header(&headers, "location"), body))
    }

    /// Comments `text` on issue `number`: Ok(true) when it took it,
    /// Ok(false) when it never will (no such issue, no rights), Err to try
    /// again later.
    pub async fn comment_on_issue(&self, owner: &str, name: &str, number: i64, text: &str) -> Result<bool, String> {
        let path = format!("/repos/{owner}/{name}/issues/{number}/comments");
        self.post(&path, json!({"body": text})).await
    }

    /// POSTs `body` to `path`: Ok(true) when GitHub took it, Ok(false)
    /// when it never will (refused, logged), Err to try again later.
    async fn post(&self, path: &str, body: Value) -> Result<bool, String> {
        let (status, answer) = self.call(Method::POST, path, Some(body)).await?;
        if status.is_success() {
            return Ok(true);
        }
        match refusal_or_later(status, &answer) {
            Asked::Later(why) => Err(why),
            refused => {
                tracing::warn!(path, answer = ?refused, "GitHub refused it");
                Ok(false)
            }
        }
    }

    /// Sets omoi's commit status on `sha`: Ok(true) when set, Ok(false)
    /// when GitHub never will, Err to try again later.
    pub async fn set_status(
        &self,
        owner: &str,
        name: &str,
        sha: &str,
        state: &str,
        description: &str,
        link: Option<&str>,
    ) -> Result<bool, String> {
        let path = format!("/repos/{owner}/{name}/statuses/{sha}");
        let mut status =
            json!({"state": state, "description": description, "context": crate::forge_news::STATUS_CONTEXT});
        if let Some(link) = link {
            status["target_url"] = json!(link);
        }
        self.post(&path, status).await
    }

    /// The comments of review `review` of pull request `number`.
    pub async fn review_comments(
        &self,
        owner: &str,
        name: &str,
        number: i64,
        review: i64,
    ) -> Result<Vec<ReviewComment>, String> {
        let path = format!("/repos/{owner}/{name}/pulls/{number}/reviews/{review}/comments?per_page=100");
        let (status, body) = self.call(Method::GET, &path, None).await?;
        if !status.is_success() {
            return Err(format!("GET {path}: {status} {}", message(&body)));
        }
        Ok(body
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| {
                Some(ReviewComment {
                    id: c["id"].as_i64()?,
                    path: c["path"].as_str().unwrap_or_default().to_owned(),
                    line: c["line"].as_i64().or_else(|| c["original_line"].as_i64()),
                    diff_hunk: c["diff_hunk"].as_str().unwrap_or_default().to_owned(),
                    body: c["body"].as_str().unwrap_or_default().to_owned(),
                })
            })
            .collect())
    }

    /// Answers review comment `comment` of pull request `number` in its
    /// thread: Ok(true) when answered, Ok(false) when GitHub will never take
    /// it (the comment is gone, no rights), Err to try again later.
    pub async fn reply(&self, owner: &str, name: &str, number: i64, comment: i64, text: &str) -> Result<bool, String> {
        let path = format!("/repos/{owner}/{name}/pulls/{number}/comments/{comment}/replies");
        self.post(&path, json!({"body": text})).await
    }

    /// A pull request from the ticket's branch, open or not, if one exists.
    async fn existing(
        &self,
        repo: &ForgeRepo,
        ticket: &Ticket,
        base: &str,
    ) -> Result<Option<PullRequestOpened>, String> {
        let path = format!(
            "/repos/{}/{}/pulls?state=all&head={}:{}",
            repo.owner, repo.name, repo.owner, ticket.branch
        );
        let (status, body) = self.call(Method::GET, &path, None).await?;
        if !status.is_success() {
            return Err(format!("GET {path}: {status} {}", message(&body)));
        }
        Ok(body
            .as_array()
            .and_then(|list| list.first())
            .and_then(|pr| opened(pr, ticket, base)))
    }
}

/// A header's value, when it is text.
fn header(headers: &http::HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// A check run that did not succeed, as its prompt tells it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FailedCheck {
    pub name: String,
    pub conclusion: String,
    pub url: String,
    pub title: String,
    pub summary: String,
    pub text: String,
    /// `path:line: level: message`.
    pub annotations: Vec<String>,
    /// The end of its Actions job's log, when it is one.
    pub log_tail: String,
}

/// How much of a failed job's log a prompt gets: its end.
const LOG_TAIL_BYTES: usize = 4 * 1024;

/// The last `max` bytes of `log`, from a line's start.
fn tail(log: &str, max: usize) -> String {
    if log.len() <= max {
        return log.to_owned();
    }
    let start = log.ceil_char_boundary(log.len() - max);
    let cut = &log[start..];
    cut.split_once('\n').map_or(cut, |(_, rest)| rest).to_owned()
}

/// A review's comment on a line of the pull request's diff.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReviewComment {
    pub id: i64,
    pub path: String,
    pub line: Option<i64>,
    pub diff_hunk: String,
    pub body: String,
}

/// The pull request a GitHub answer describes.
fn opened(pr: &Value, ticket: &Ticket, base: &str) -> Option<PullRequestOpened> {
    Some(PullRequestOpened {
        url: pr["html_url"].as_str()?.to_owned(),
        number: pr["number"].as_i64().unwrap_or_default(),
        branch: ticket.branch.clone(),
        base: pr["base"]["ref"].as_str().unwrap_or(base).to_owned(),
    })
}

/// GitHub's error message: `message`, and what `errors` add.
fn message(body: &Value) -> String {
    let mut out = body["message"].as_str().unwrap_or_default().to_owned();
    for e in body["errors"].as_array().into_iter().flatten() {
        if let Some(m) = e["message"].as_str().or_else(|| e["code"].as_str()) {
            out.push_str(&format!("; {m}"));
        }
    }
    out
}

/// A non-success answer: a server's trouble or a rate limit is worth
/// another try; anything else is the forge saying no.
fn refusal_or_later(status: StatusCode, body: &Value) -> Asked {
    let text = format!("GitHub answered {status}: {}", message(body));
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        Asked::Later(text)
    } else {
        Asked::Refused(text)
    }
}

/// The wait before the next attempt after `attempts` failed ones.
fn delay(attempts: i32) -> Duration {
    policy::FORGE.delay_with_factor(attempts.max(0) as u32, 1.0)
}

/// Opens the pull requests of completed tickets until `shutdown`, looking
/// for due ones every `interval`; a ticket whose outcome could not be
/// recorded is asked about again on a later pass.
pub async fn run(store: Store, github: std::sync::Arc<GitHub>, interval: Duration, shutdown: CancellationToken) {
    let (store, github) = (&store, &github);
    every("opening pull requests", interval, &shutdown, move || async move {
        while let Some(claim) = store.next_pull_request().await? {
            open_and_record(github, claim).await?;
        }
        Ok::<_, omoi_store::StoreError>(())
    })
    .await
}

/// Asks the forge for the claimed ticket's pull request and records the answer:
/// opened, refused for good, or to ask again after its backoff.
async fn open_and_record(github: &GitHub, claim: PullRequestClaim) -> omoi_store::Result<()> {
    let ticket_id = claim.ticket.id;
    match github.open(&claim.ticket).await {
        Asked::Opened(o) => {
            tracing::info!(%ticket_id, url = %o.url, "pull request opened");
            claim.opened(o).await
        }
        Asked::Refused(m) => {
            tracing::warn!(%ticket_id, error = %m, "pull request refused");
            claim.refused(&m).await
        }
        Asked::Later(m) => {
            let wait = delay(claim.attempts);
            tracing::info!(%ticket_id, error = %m, retry_in_s = wait.as_secs(), "pull request not opened yet");
            claim.retry_after(&m, wait).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_refusals_unless_the_forge_is_in_trouble() {
        let body = json!({"message": "Validation Failed", "errors": [{"message": "No commits between main and x"}]});
        assert_eq!(
            refusal_or_later(StatusCode::UNPROCESSABLE_ENTITY, &body),
            Asked::Refused(
                "GitHub answered 422 Unprocessable Entity: Validation Failed; No commits between main and x".into()
            )
        );
        assert!(matches!(
            refusal_or_later(StatusCode::BAD_GATEWAY, &Value::Null),
            Asked::Later(_)
        ));
        assert!(matches!(
            refusal_or_later(StatusCode::TOO_MANY_REQUESTS, &Value::Null),
            Asked::Later(_)
        ));
        assert!(matches!(
            refusal_or_later(StatusCode::FORBIDDEN, &Value::Null),
            Asked::Refused(_)
        ));
    }

    #[test]
    fn a_logs_tail_starts_on_a_line() {
        let log = (1..=1000).map(|i| format!("line {i}\n")).collect::<String>();
        let t = tail(&log, 100);
        assert!(
            t.len() <= 100 && t.starts_with("line ") && t.ends_with("line 1000\n"),
            "{t}"
        );
        assert_eq!(tail("short", 100), "short");
    }

    #[test]
    fn attempts_back_off_to_ten_minutes() {
        assert_eq!(delay(0), Duration::from_secs(2));
        assert_eq!(delay(3), Duration::from_secs(16));
        assert_eq!(delay(50), Duration::from_secs(600));
    }
}
