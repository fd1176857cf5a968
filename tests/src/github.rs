//! A stand-in for GitHub (the parts omoi uses): a repository's default
//! branch, pull requests listed by head and opened, a check suite's check
//! runs and a check run's annotations, behind a bearer token; and webhook
//! deliveries signed as GitHub signs them. Knobs let a test lose an answer
//! or have a repository refuse.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::http::{Reply, Server};

/// A pull request as the stand-in keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct PullRequest {
    pub repo: String,
    pub number: i64,
    pub head: String,
    pub base: String,
    pub title: String,
    pub body: String,
}

pub struct GitHubApi {
    pub url: String,
    state: Arc<State>,
    _server: Server,
}

struct State {
    token: String,
    /// The html address's root, e.g. https://github.example.com.
    web: String,
    pulls: Mutex<Vec<PullRequest>>,
    /// Every request: method, path and query.
    calls: Mutex<Vec<String>>,
    /// The next opening succeeds but its answer is a 502.
    lose_next_answer: AtomicBool,
    /// Repositories (`owner/name`) whose openings are refused with a 403.
    locked: Mutex<Vec<String>>,
    /// Check runs by check suite id, annotations by check run id.
    suites: Mutex<std::collections::HashMap<i64, Vec<Value>>>,
    annotations: Mutex<std::collections::HashMap<i64, Vec<Value>>>,
    /// Review comments by review id; the replies posted: (comment id, body).
    reviews: Mutex<std::collections::HashMap<i64, Vec<Value>>>,
    replies: Mutex<Vec<(i64, String)>>,
    /// Comments on issues: (issue number, body).
    issue_comments: Mutex<Vec<(i64, String)>>,
    /// Commit statuses set, in order (GitHub's JSON with the commit's `sha`).
    statuses: Mutex<Vec<Value>>,
    /// Pull requests' head commits, by number; check suites by commit;
    /// reviews by pull request number.
    heads: Mutex<std::collections::HashMap<i64, String>>,
    commit_suites: Mutex<std::collections::HashMap<String, Vec<Value>>>,
    pull_reviews: Mutex<std::collections::HashMap<i64, Vec<Value>>>,
    /// GETs answered 304 Not Modified.
    not_modified: std::sync::atomic::AtomicUsize,
    /// While set, a check suite's check runs are answered only once
    /// `released` (`asked` says one is waiting).
    hold_checks: AtomicBool,
    asked: tokio::sync::Notify,
    released: tokio::sync::Notify,
    /// Actions jobs' logs, by job id, downloaded from `{url}/job-logs/{id}`
    /// where the API redirects; whether a download carried a token.
    job_logs: Mutex<std::collections::HashMap<i64, String>>,
    url: Mutex<String>,
    token_on_download: AtomicBool,
    /// Bare repositories by `owner/name`: their pull requests' heads, bases
    /// and mergeability are read from them (mergeability, as GitHub works
    /// it out in the background, is unknown — null — the first time a head
    /// and base are asked about).
    repositories: Mutex<std::collections::HashMap<String, std::path::PathBuf>>,
    merges_asked: Mutex<std::collections::HashSet<(String, String)>>,
}

impl GitHubApi {
    pub async fn start(token: &str, web: &str) -> anyhow::Result<Self> {
        let state = Arc::new(State {
            token: token.to_owned(),
            web: web.to_owned(),
            pulls: Mutex::new(Vec::new()),
            calls: Mutex::new(Vec::new()),
            lose_next_answer: AtomicBool::new(false),
            locked: Mutex::new(Vec::new()),
            suites: Mutex::default(),
            annotations: Mutex::default(),
            reviews: Mutex::default(),
            replies: Mutex::default(),
            issue_comments: Mutex::default(),
            statuses: Mutex::default(),
            heads: Mutex::default(),
            commit_suites: Mutex::default(),
            pull_reviews: Mutex::default(),
            not_modified: Default::default(),
            hold_checks: AtomicBool::new(false),
            asked: tokio::sync::Notify::new(),
            released: tokio::sync::Notify::new(),
            job_logs: Mutex::default(),
            url: Mutex::default(),
            token_on_download: AtomicBool::new(false),
            repositories: Mutex::default(),
            merges_asked: Mutex::default(),
        });
        let server = Server::start(Arc::clone(&state), handle).await?;
        *state.url.lock().unwrap() = server.url.clone();
        Ok(Self {
            url: server.url.clone(),
            state,
            _server: server,
        })
    }

    pub fn pulls(&self) -> Vec<PullRequest> {
        self.state.pulls.lock().unwrap().clone()
    }

    pub fn calls(&self) -> Vec<String> {
        self.state.calls.lock().unwrap().clone()
    }

    pub fn lose_next_answer(&self) {
        self.state.lose_next_answer.store(true, Ordering::SeqCst);
    }

    pub fn lock(&self, repo: &str) {
        self.state.locked.lock().unwrap().push(repo.to_owned());
    }

    /// Review `review` holds `comments` (GitHub's JSON).
    pub fn review(&self, review: i64, comments: Vec<Value>) {
        self.state.reviews.lock().unwrap().insert(review, comments);
    }

    /// Repository `repo` (`owner/name`) is the bare repository `bare`.
    pub fn serve_repository(&self, repo: &str, bare: &std::path::Path) {
        self.state
            .repositories
            .lock()
            .unwrap()
            .insert(repo.to_owned(), bare.to_path_buf());
    }

    /// Pull request `number`'s head is `sha`.
    pub fn pull_head(&self, number: i64, sha: &str) {
        self.state.heads.lock().unwrap().insert(number, sha.to_owned());
    }

    /// Commit `sha` has check suite `suite` (GitHub's JSON).
    pub fn commit_suite(&self, sha: &str, suite: Value) {
        self.state
            .commit_suites
            .lock()
            .unwrap()
            .entry(sha.to_owned())
            .or_default()
            .push(suite);
    }

    /// Actions job `job`'s log.
    pub fn job_log(&self, job: i64, log: &str) {
        self.state.job_logs.lock().unwrap().insert(job, log.to_owned());
    }

    /// Whether a log download carried the API token (it must not).
    pub fn token_on_download(&self) -> bool {
        self.state.token_on_download.load(Ordering::SeqCst)
    }

    /// Holds the answers to check-run reads until [`GitHubApi::release_checks`].
    pub fn hold_checks(&self) {
        self.state.hold_checks.store(true, Ordering::SeqCst);
    }

    /// Waits until a check-run read is being held.
    pub async fn checks_held(&self) {
        self.state.asked.notified().await;
    }

    pub fn release_checks(&self) {
        self.state.hold_checks.store(false, Ordering::SeqCst);
        self.state.released.notify_waiters();
    }

    /// How many GETs were answered 304 Not Modified.
    pub fn not_modified(&self) -> usize {
        self.state.not_modified.load(Ordering::SeqCst)
    }

    /// The commit statuses set, in order, each with its commit's `sha`.
    pub fn statuses(&self) -> Vec<Value> {
        self.state.statuses.lock().unwrap().clone()
    }

    /// The comments posted on issues: (issue number, body).
    pub fn issue_comments(&self) -> Vec<(i64, String)> {
        self.state.issue_comments.lock().unwrap().clone()
    }

    /// The replies posted to review comments: (comment id, body).
    pub fn replies(&self) -> Vec<(i64, String)> {
        self.state.replies.lock().unwrap().clone()
    }

    /// Check suite `suite` holds check run `run` (GitHub's JSON), whose
    /// annotations are `annotations`.
    pub fn check_run(&self, suite: i64, run: Value, annotations: Vec<Value>) {
        let id = run["id"].as_i64().expect("a check run has an id");
        self.state.suites.lock().unwrap().entry(suite).or_default().push(run);
        self.state.annotations.lock().unwrap().insert(id, annotations);
    }
}

/// A webhook delivery as GitHub sends it: the event, its id, and the body
/// signed with `secret` (None: unsigned).
pub async fn deliver(
    url: &str,
    secret: Option<&str>,
    event: &str,
    delivery: &str,
    body: &Value,
) -> anyhow::Result<(u16, String)> {
    use hmac::{Hmac, KeyInit, Mac};
    let body = body.to_string();
    let signature = secret.map(|s| {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(s.as_bytes()).expect("any key");
        mac.update(body.as_bytes());
        let bytes = mac.finalize().into_bytes();
        format!(
            "sha256={}",
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        )
    });
    let mut headers = vec![
        ("x-github-event", event),
        ("x-github-delivery", delivery),
        ("content-type", "application/json"),
    ];
    if let Some(s) = &signature {
        headers.push(("x-hub-signature-256", s));
    }
    let (status, _, answer) =
        crate::http::send("POST", &format!("{url}/webhooks/github"), Some(body), &headers).await?;
    Ok((status, answer))
}

fn reply(status: StatusCode, body: Value) -> Reply {
    Ok(Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a response"))
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Reply {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or_default().to_owned();
    state
        .calls
        .lock()
        .unwrap()
        .push(format!("{} {path}?{query}", parts.method));
    let auth = parts.headers.get("authorization").and_then(|v| v.to_str().ok());
    // Where the API sends log downloads: no token asked for (nor wanted).
    if let Some(job) = path.strip_prefix("/job-logs/") {
        if auth.is_some() {
            state.token_on_download.store(true, Ordering::SeqCst);
        }
        let log = job
            .parse::<i64>()
            .ok()
            .and_then(|j| state.job_logs.lock().unwrap().get(&j).cloned());
        return match log {
            Some(log) => Ok(Response::new(Full::new(Bytes::from(log)))),
            None => reply(StatusCode::NOT_FOUND, json!({"message": "Not Found"})),
        };
    }
    if auth != Some(&format!("Bearer {}", state.token)) {
        return reply(StatusCode::UNAUTHORIZED, json!({"message": "Bad credentials"}));
    }
    let body: Value = match body.collect().await {
        Ok(b) => serde_json::from_slice(&b.to_bytes()).unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    let parts_of: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (repo, rest) = match parts_of.as_slice() {
        ["repos", owner, name, rest @ ..] => (format!("{owner}/{name}"), rest.to_vec()),
        _ => return reply(StatusCode::NOT_FOUND, json!({"message": "Not Found"})),
    };
    match (parts.method, rest.as_slice()) {
        (Method::GET, []) => reply(StatusCode::OK, json!({"full_name": repo, "default_branch": "main"})),
        (Method::GET, ["pulls"]) => {
            let head = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("head="))
                .map(|h| h.split_once(':').map_or(h, |(_, b)| b).to_owned());
            let list: Vec<Value> = state
                .pulls
                .lock()
                .unwrap()
                .iter()
                .filter(|p| p.repo == repo && head.as_ref().is_none_or(|h| *h == p.head))
                .map(|p| pull_json(&state.web, p))
                .collect();
            reply(StatusCode::OK, Value::Array(list))
        }
        (Method::POST, ["pulls"]) => {
            if state.locked.lock().unwrap().contains(&repo) {
                return reply(
                    StatusCode::FORBIDDEN,
                    json!({"message": "Resource not accessible by integration"}),
                );
            }
            let head = body["head"].as_str().unwrap_or_default().to_owned();
            let mut pulls = state.pulls.lock().unwrap();
            if pulls.iter().any(|p| p.repo == repo && p.head == head) {
                return reply(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!({"message": "Validation Failed",
                           "errors": [{"message": format!("A pull request already exists for {head}.")}]}),
                );
            }
            let pr = PullRequest {
                repo: repo.clone(),
                number: pulls.len() as i64 + 1,
                head,
                base: body["base"].as_str().unwrap_or_default().to_owned(),
                title: body["title"].as_str().unwrap_or_default().to_owned(),
                body: body["body"].as_str().unwrap_or_default().to_owned(),
            };
            let answer = pull_json(&state.web, &pr);
            pulls.push(pr);
            if state.lose_next_answer.swap(false, Ordering::SeqCst) {
                return reply(StatusCode::BAD_GATEWAY, json!({"message": "upstream went away"}));
            }
            reply(StatusCode::CREATED, answer)
        }
        (Method::GET, ["check-suites", suite, "check-runs"]) => {
            if state.hold_checks.load(Ordering::SeqCst) {
                let released = state.released.notified();
                state.asked.notify_one();
                released.await;
            }
            let runs = suite
                .parse::<i64>()
                .ok()
                .and_then(|s| state.suites.lock().unwrap().get(&s).cloned())
                .unwrap_or_default();
            reply(StatusCode::OK, json!({"total_count": runs.len(), "check_runs": runs}))
        }
        (Method::GET, ["pulls", _, "reviews", review, "comments"]) => {
            let list = review
                .parse::<i64>()
                .ok()
                .and_then(|r| state.reviews.lock().unwrap().get(&r).cloned())
                .unwrap_or_default();
            reply(StatusCode::OK, Value::Array(list))
        }
        (Method::GET, ["pulls", number]) => {
            let Ok(number) = number.parse::<i64>() else {
                return reply(StatusCode::NOT_FOUND, json!({"message": "Not Found"}));
            };
            let pr = state
                .pulls
                .lock()
                .unwrap()
                .iter()
                .find(|p| p.repo == repo && p.number == number)
                .cloned();
            let Some(pr) = pr else {
                return reply(StatusCode::NOT_FOUND, json!({"message": "Not Found"}));
            };
            let mut answer = pull_json(&state.web, &pr);
            answer["state"] = json!("open");
            answer["head"]["sha"] = json!(state.heads.lock().unwrap().get(&number).cloned().unwrap_or_default());
            let bare = state.repositories.lock().unwrap().get(&repo).cloned();
            if let Some(bare) = bare {
                let tip = |branch: &str| crate::repo::git(&bare, &["rev-parse", &format!("refs/heads/{branch}")]);
                let (head, base) = (tip(&pr.head), tip(&pr.base));
                // Known from the second look at this head and base on.
                let known = !state.merges_asked.lock().unwrap().insert((head.clone(), base.clone()));
                answer["mergeable"] = if known {
                    let clean = std::process::Command::new("git")
                        .arg("-C")
                        .arg(&bare)
                        .args(["merge-tree", "--write-tree", &base, &head])
                        .stdout(std::process::Stdio::null())
                        .status()
                        .expect("git runs")
                        .success();
                    json!(clean)
                } else {
                    Value::Null
                };
                answer["head"]["sha"] = json!(head);
                answer["base"]["sha"] = json!(base);
            }
            conditional(&state, &parts.headers, answer)
        }
        (Method::GET, ["commits", sha, "check-suites"]) => {
            let suites = state
                .commit_suites
                .lock()
                .unwrap()
                .get(*sha)
                .cloned()
                .unwrap_or_default();
            conditional(
                &state,
                &parts.headers,
                json!({"total_count": suites.len(), "check_suites": suites}),
            )
        }
        (Method::GET, ["pulls", number, "reviews"]) => {
            let reviews = number
                .parse::<i64>()
                .ok()
                .and_then(|n| state.pull_reviews.lock().unwrap().get(&n).cloned())
                .unwrap_or_default();
            conditional(&state, &parts.headers, Value::Array(reviews))
        }
        (Method::POST, ["statuses", sha]) => {
            let mut status = body.clone();
            status["sha"] = json!(sha);
            state.statuses.lock().unwrap().push(status.clone());
            reply(StatusCode::CREATED, status)
        }
        (Method::POST, ["issues", number, "comments"]) => {
            let Ok(number) = number.parse::<i64>() else {
                return reply(StatusCode::NOT_FOUND, json!({"message": "Not Found"}));
            };
            let text = body["body"].as_str().unwrap_or_default().to_owned();
            state.issue_comments.lock().unwrap().push((number, text.clone()));
            reply(StatusCode::CREATED, json!({"id": number * 100, "body": text}))
        }
        (Method::POST, ["pulls", _, "comments", comment, "replies"]) => {
            let Ok(comment) = comment.parse::<i64>() else {
                return reply(StatusCode::NOT_FOUND, json!({"message": "Not Found"}));
            };
            let text = body["body"].as_str().unwrap_or_default().to_owned();
            state.replies.lock().unwrap().push((comment, text.clone()));
            reply(
                StatusCode::CREATED,
                json!({"id": comment * 10, "in_reply_to_id": comment, "body": text}),
            )
        }
        (Method::GET, ["actions", "jobs", job, "logs"]) => Ok(Response::builder()
            .status(StatusCode::FOUND)
            .header("location", format!("{}/job-logs/{job}", state.url.lock().unwrap()))
            .body(Full::new(Bytes::new()))
            .expect("a response")),
        (Method::GET, ["check-runs", run, "annotations"]) => {
            let list = run
                .parse::<i64>()
                .ok()
                .and_then(|r| state.annotations.lock().unwrap().get(&r).cloned())
                .unwrap_or_default();
            reply(StatusCode::OK, Value::Array(list))
        }
        _ => reply(StatusCode::NOT_FOUND, json!({"message": "Not Found"})),
    }
}

/// `body` with its ETag, or 304 Not Modified when the request's
/// `If-None-Match` names it.
fn conditional(state: &State, headers: &http::HeaderMap, body: Value) -> Reply {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    body.to_string().hash(&mut hasher);
    let etag = format!("\"{:016x}\"", hasher.finish());
    if headers.get("if-none-match").and_then(|v| v.to_str().ok()) == Some(etag.as_str()) {
        state.not_modified.fetch_add(1, Ordering::SeqCst);
        return Ok(Response::builder()
            .status(StatusCode::NOT_MODIFIED)
            .header("etag", etag)
            .body(Full::new(Bytes::new()))
            .expect("a response"));
    }
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("etag", etag)
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a response"))
}

fn pull_json(web: &str, p: &PullRequest) -> Value {
    json!({
        "number": p.number,
        "html_url": format!("{web}/{}/pull/{}", p.repo, p.number),
        "title": p.title,
        "head": {"ref": p.head},
        "base": {"ref": p.base},
    })
}
