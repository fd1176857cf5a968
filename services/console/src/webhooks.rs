//! GitHub's webhooks (`POST /webhooks/github`): each delivery's
//! `X-Hub-Signature-256` (HMAC-SHA256 of the raw body, keyed with
//! `OMOI_GITHUB_WEBHOOK_SECRET`) is checked in constant time before the body
//! is read; a delivery with none or a wrong one is answered 401 and does
//! nothing. The events omoi reacts to become a typed `React` request to the
//! ticket service, which decides (and acts on each delivery once); the
//! others are answered 202 and ignored.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderMap, StatusCode};
use omoi_proto::ticket::{self as pb, ticket_service_client::TicketServiceClient};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::Console;

/// The largest delivery GitHub sends.
pub const MAX_DELIVERY_BYTES: usize = 25 * 1024 * 1024;

/// Whether `signature` (`sha256=<hex>`) is the HMAC-SHA256 of `body` under
/// `secret`.
pub fn signed(secret: &[u8], body: &[u8], signature: Option<&str>) -> bool {
    let Some(hex) = signature.and_then(|s| s.strip_prefix("sha256=")) else {
        return false;
    };
    let Some(given) = unhex(hex) else { return false };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

fn unhex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// What a delivery asks of the ticket service.
#[derive(Debug, Clone, PartialEq)]
pub enum Asked {
    React(Box<pb::ReactRequest>),
    Intake(pb::IntakeRequest),
}

/// What a delivery of event `event` asks of omoi: a reaction or an issue's
/// change to decide, or None for an event (or action) omoi does not act
/// on; Err for a body that is not the event's JSON.
pub fn read(event: &str, delivery_id: &str, body: &[u8]) -> Result<Option<Asked>, String> {
    let p: Value = serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let action = p["action"].as_str().unwrap_or_default();
    if event == "issues" {
        let action = match action {
            "labeled" => pb::IssueAction::Labeled,
            "unlabeled" => pb::IssueAction::Unlabeled,
            "closed" => pb::IssueAction::Closed,
            _ => return Ok(None),
        };
        let issue = &p["issue"];
        return Ok(Some(Asked::Intake(pb::IntakeRequest {
            delivery_id: delivery_id.to_owned(),
            action: action.into(),
            repository: s(&p["repository"]["full_name"]),
            clone_url: s(&p["repository"]["clone_url"]),
            issue_number: issue["number"].as_i64().unwrap_or_default(),
            issue_url: s(&issue["html_url"]),
            title: s(&issue["title"]),
            body: s(&issue["body"]),
            label: s(&p["label"]["name"]),
        })));
    }
    let base = pb::ReactRequest {
        delivery_id: delivery_id.to_owned(),
        repository: s(&p["repository"]["full_name"]),
        ..Default::default()
    };
    Ok(match (event, action) {
        ("check_suite", "completed") => {
            let suite = &p["check_suite"];
            let head_sha = s(&suite["head_sha"]);
            Some(pb::ReactRequest {
                kind: pb::ReactionKind::CiFailure.into(),
                branch: s(&suite["head_branch"]),
                check_suite_id: suite["id"].as_i64().unwrap_or_default(),
                conclusion: s(&suite["conclusion"]),
                url: format!("{}/commit/{head_sha}/checks", s(&p["repository"]["html_url"])),
                head_sha,
                ..base
            })
        }
        // A commit status that failed, on a branch (omoi's first).
        ("status", _) if matches!(p["state"].as_str(), Some("failure" | "error")) => {
            let branches: Vec<String> = p["branches"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|b| b["name"].as_str().map(str::to_owned))
                .collect();
            let branch = branches
                .iter()
                .find(|b| b.starts_with("omoi/"))
                .or(branches.first())
                .cloned()
                .unwrap_or_default();
            let head_sha = s(&p["sha"]);
            Some(pb::ReactRequest {
                kind: pb::ReactionKind::CiFailure.into(),
                branch,
                conclusion: s(&p["state"]),
                url: format!("{}/commit/{head_sha}", s(&p["repository"]["html_url"])),
                head_sha,
                status: Some(pb::CommitStatus {
                    context: s(&p["context"]),
                    description: s(&p["description"]),
                    target_url: s(&p["target_url"]),
                }),
                ..base
            })
        }
        // A push to a branch: the pull requests into it may conflict now
        // (the ticket service asks GitHub which do).
        ("push", _)
            if p["deleted"].as_bool() != Some(true)
                && p["ref"].as_str().is_some_and(|r| r.starts_with("refs/heads/")) =>
        {
            Some(pb::ReactRequest {
                kind: pb::ReactionKind::Conflict.into(),
                base_ref: s(&p["ref"]).trim_start_matches("refs/heads/").to_owned(),
                base_sha: s(&p["after"]),
                url: s(&p["compare"]),
                ..base
            })
        }
        // A comment on a pull request's conversation (issues carry no
        // `pull_request`), or on its diff.
        ("issue_comment", "created") if p["issue"]["pull_request"].is_object() => {
            Some(mention(base, &p["comment"], s(&p["issue"]["pull_request"]["html_url"])))
        }
        ("pull_request_review_comment", "created") => {
            Some(mention(base, &p["comment"], s(&p["pull_request"]["html_url"])))
        }
        // A review requesting changes (its comments are read from GitHub).
        ("pull_request_review", "submitted")
            if p["review"]["state"]
                .as_str()
                .is_some_and(|state| state.eq_ignore_ascii_case("changes_requested")) =>
        {
            let review = &p["review"];
            Some(pb::ReactRequest {
                kind: pb::ReactionKind::Review.into(),
                pull_request_url: s(&p["pull_request"]["html_url"]),
                pull_number: p["pull_request"]["number"].as_i64().unwrap_or_default(),
                url: s(&review["html_url"]),
                author: s(&review["user"]["login"]),
                author_association: s(&review["author_association"]),
                body: s(&review["body"]),
                review_id: review["id"].as_i64().unwrap_or_default(),
                ..base
            })
        }
        _ => None,
    }
    .map(|r| Asked::React(Box::new(r))))
}

fn mention(base: pb::ReactRequest, comment: &Value, pull_request_url: String) -> pb::ReactRequest {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    pb::ReactRequest {
        kind: pb::ReactionKind::Mention.into(),
        pull_request_url,
        url: s(&comment["html_url"]),
        author: s(&comment["user"]["login"]),
        author_association: s(&comment["author_association"]),
        body: s(&comment["body"]),
        comment_id: comment["id"].as_i64().unwrap_or_default(),
        ..base
    }
}

/// `POST /webhooks/github`.
pub async fn github(State(console): State<Arc<Console>>, headers: HeaderMap, body: Bytes) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let Some(secret) = &console.webhook_secret else {
        let why = "GitHub webhooks are not configured here (OMOI_GITHUB_WEBHOOK_SECRET)";
        return (StatusCode::NOT_FOUND, why).into_response();
    };
    if !signed(secret.as_bytes(), &body, header("x-hub-signature-256")) {
        tracing::warn!(
            delivery = header("x-github-delivery").unwrap_or_default(),
            "webhook delivery with a missing or wrong signature refused"
        );
        return (StatusCode::UNAUTHORIZED, "missing or wrong X-Hub-Signature-256").into_response();
    }
    let (Some(event), Some(delivery)) = (header("x-github-event"), header("x-github-delivery")) else {
        return (
            StatusCode::BAD_REQUEST,
            "X-GitHub-Event and X-GitHub-Delivery are required",
        )
            .into_response();
    };
    if event == "ping" {
        return (StatusCode::OK, "pong").into_response();
    }
    let asked = match read(event, delivery, &body) {
        Ok(Some(r)) => r,
        Ok(None) => return (StatusCode::ACCEPTED, format!("{event} is not acted on")).into_response(),
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    let mut tickets = TicketServiceClient::new(console.ticket.clone());
    let answered = match asked {
        Asked::React(request) => tickets.react(*request).await.map(|r| {
            let r = r.into_inner();
            let task = r.task.map(|t| t.id).unwrap_or_default();
            json!({"reacted": r.reacted, "reason": r.reason, "task_id": task})
        }),
        Asked::Intake(request) => tickets.intake(request).await.map(|r| {
            let r = r.into_inner();
            let ticket = r.ticket.map(|t| t.id).unwrap_or_default();
            json!({"outcome": r.outcome, "ticket_id": ticket})
        }),
    };
    match answered {
        Ok(answer) => (
            StatusCode::OK,
            [(http::header::CONTENT_TYPE, "application/json")],
            answer.to_string(),
        )
            .into_response(),
        Err(s) => {
            // GitHub shows the answer on the delivery; a 5xx invites a redelivery.
            let code = match s.code() {
                tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
                tonic::Code::NotFound => StatusCode::NOT_FOUND,
                tonic::Code::FailedPrecondition => StatusCode::CONFLICT,
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::BAD_GATEWAY,
            };
            (code, s.message().to_owned()).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &[u8], body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(body);
        let bytes = mac.finalize().into_bytes();
        format!(
            "sha256={}",
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        )
    }

    #[test]
    fn only_the_secrets_signature_of_these_very_bytes_passes() {
        let body = br#"{"action":"created"}"#;
        let good = sign(b"s3cret", body);
        assert!(signed(b"s3cret", body, Some(&good)));
        assert!(!signed(b"other", body, Some(&good)));
        assert!(!signed(b"s3cret", br#"{"action":"deleted"}"#, Some(&good)));
        assert!(!signed(b"s3cret", body, None));
        assert!(!signed(b"s3cret", body, Some(good.trim_start_matches("sha256="))));
        assert!(!signed(b"s3cret", body, Some("sha256=zz")));
        assert!(!signed(b"s3cret", body, Some("sha256=")));
    }

    #[test]
    fn deliveries_read_as_reactions_or_nothing() {
        let suite = json!({
            "action": "completed",
            "repository": {"full_name": "acme/r", "html_url": "https://github.com/acme/r"},
            "check_suite": {"id": 9, "head_branch": "omoi/x", "head_sha": "abc", "conclusion": "failure"}
        });
        let react = |event: &str, body: &Value| match read(event, "d", body.to_string().as_bytes()).unwrap() {
            Some(Asked::React(r)) => Some(*r),
            _ => None,
        };
        let r = react("check_suite", &suite).unwrap();
        assert_eq!(r.kind, pb::ReactionKind::CiFailure as i32);
        assert_eq!(
            (r.check_suite_id, r.branch.as_str(), r.conclusion.as_str()),
            (9, "omoi/x", "failure")
        );
        assert_eq!(r.url, "https://github.com/acme/r/commit/abc/checks");
        let on_issue = json!({"action": "created", "issue": {"number": 1}, "comment": {"body": "@omoi"}});
        assert_eq!(
            read("issue_comment", "d2", on_issue.to_string().as_bytes()).unwrap(),
            None
        );
        assert_eq!(read("push", "d3", b"{}").unwrap(), None);
        let failed = json!({
            "state": "error", "sha": "abc", "context": "ci/jenkins", "description": "build broke",
            "branches": [{"name": "main"}, {"name": "omoi/0123-x"}],
            "repository": {"full_name": "acme/r", "html_url": "https://github.com/acme/r"}
        });
        let r = react("status", &failed).unwrap();
        assert_eq!(
            (r.branch.as_str(), r.status.unwrap().context.as_str()),
            ("omoi/0123-x", "ci/jenkins")
        );
        let pending = json!({"state": "pending", "sha": "abc"});
        assert_eq!(react("status", &pending), None);
        let push = json!({"ref": "refs/heads/main", "after": "abc", "compare": "https://x/compare/a...b",
                          "repository": {"full_name": "o/r"}});
        let r = react("push", &push).unwrap();
        assert_eq!(
            (
                r.kind,
                r.base_ref.as_str(),
                r.base_sha.as_str(),
                r.pull_request_url.as_str()
            ),
            (pb::ReactionKind::Conflict as i32, "main", "abc", "")
        );
        let tag = json!({"ref": "refs/tags/v1", "after": "abc", "repository": {"full_name": "o/r"}});
        assert_eq!(react("push", &tag), None);
        let deleted = json!({"ref": "refs/heads/old", "deleted": true, "repository": {"full_name": "o/r"}});
        assert_eq!(react("push", &deleted), None);
        let approved = json!({"action": "submitted", "review": {"state": "approved"}});
        assert_eq!(
            read("pull_request_review", "d5", approved.to_string().as_bytes()).unwrap(),
            None
        );
        let changes = json!({
            "action": "submitted",
            "pull_request": {"number": 4, "html_url": "https://github.com/acme/r/pull/4"},
            "review": {"id": 11, "state": "changes_requested", "body": null, "user": {"login": "rev"}}
        });
        let r = react("pull_request_review", &changes).unwrap();
        assert_eq!(
            (r.kind, r.review_id, r.pull_number),
            (pb::ReactionKind::Review as i32, 11, 4)
        );
        assert!(read("check_suite", "d4", b"not json").is_err());
        let labeled = json!({
            "action": "labeled", "label": {"name": "omoi"},
            "repository": {"full_name": "acme/r", "clone_url": "https://github.com/acme/r.git"},
            "issue": {"number": 7, "html_url": "https://github.com/acme/r/issues/7", "title": "Sum", "body": "b"}
        });
        match read("issues", "d7", labeled.to_string().as_bytes()).unwrap() {
            Some(Asked::Intake(i)) => assert_eq!((i.issue_number, i.label.as_str()), (7, "omoi")),
            other => panic!("{other:?}"),
        }
        assert_eq!(read("issues", "d8", br#"{"action":"opened"}"#).unwrap(), None);
    }
}
