//! Reactions: what the forge asks of a ticket's pull request, turned into a
//! follow-up task's prompt. A failing check suite brings its failed checks
//! (read from GitHub: their output and annotations), a mention its comment.

use std::sync::Arc;

use crate::pulls::{FailedCheck, GitHub};
use crate::requests::{Asked, Reaction};

/// Most of a prompt one check's output may take.
const MAX_CHECK_BYTES: usize = 8 * 1024;
/// Most of a prompt the failures may take in all.
const MAX_FAILURES_BYTES: usize = 32 * 1024;

/// How this deployment reacts.
pub struct Forge {
    pub github: Arc<GitHub>,
    /// What a comment must name to be a request (`@omoi`).
    pub mention: String,
    /// The reactions a ticket may have unless it says otherwise.
    pub max_reactions: i32,
}

impl Forge {
    /// What the reaction is (`ci_failure`, `mention`), what it answers (one
    /// reaction each), and the follow-up's prompt.
    pub async fn follow_up(&self, r: &Reaction) -> (&'static str, String, String) {
        match &r.asked {
            Asked::CiFailure { suite_id, head_sha, .. } => {
                let (owner, name) = r.repository.split_once('/').unwrap_or_default();
                let failed = self.github.failed_checks(owner, name, *suite_id).await;
                ("ci_failure", head_sha.clone(), ci_prompt(head_sha, &r.url, failed))
            }
            Asked::Mention {
                pull_request_url,
                author,
                body,
                comment_id,
            } => (
                "mention",
                comment_id.to_string(),
                format!(
                    "{author} asked on the pull request {pull_request_url} ({url}):\n\n{body}\n\n\
                     Do what they ask on this branch; your work lands as a new commit on the pull request.",
                    url = r.url
                ),
            ),
        }
    }
}

/// The prompt of a failed check suite: each failed check's name, output
/// and annotations, bounded; what could not be read is said.
fn ci_prompt(head_sha: &str, url: &str, failed: Result<Vec<FailedCheck>, String>) -> String {
    let short = &head_sha[..head_sha.len().min(12)];
    let mut p = format!("The checks on the pull request failed on commit {short} ({url}).\n");
    match failed {
        Ok(checks) if checks.is_empty() => {
            p.push_str("\nGitHub names no failed check run of the suite; run the project's checks and fix what fails.\n");
        }
        Ok(checks) => {
            for c in checks {
                let mut part = format!("\n### {} ({})", c.name, c.conclusion);
                if !c.url.is_empty() {
                    part.push_str(&format!(" {}", c.url));
                }
                part.push('\n');
                for text in [&c.title, &c.summary, &c.text].into_iter().filter(|t| !t.trim().is_empty()) {
                    part.push_str(text.trim());
                    part.push('\n');
                }
                if !c.annotations.is_empty() {
                    part.push_str("Annotations:\n");
                    for a in &c.annotations {
                        part.push_str(&format!("- {a}\n"));
                    }
                }
                p.push_str(&bounded(&part, MAX_CHECK_BYTES));
                if p.len() > MAX_FAILURES_BYTES {
                    p = bounded(&p, MAX_FAILURES_BYTES);
                    break;
                }
            }
        }
        Err(e) => p.push_str(&format!(
            "\nThe failed checks' details could not be read from GitHub ({e}); run the project's checks and fix what fails.\n"
        )),
    }
    p.push_str("\nFind the cause and fix it on this branch so that the checks pass; your work lands as a new commit on the pull request.");
    p
}

/// `text` cut to at most `max` bytes (on a character boundary), saying so.
fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}\n[… cut: {} more bytes]\n", &text[..end], text.len() - end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_suites_prompt_names_each_check_with_its_output_and_annotations() {
        let checks = vec![FailedCheck {
            name: "test".into(),
            conclusion: "failure".into(),
            url: "https://github.example.com/acme/r/runs/7".into(),
            title: "1 test failed".into(),
            summary: "empty_list panicked".into(),
            text: "thread 'empty_list' panicked at src/lib.rs:9".into(),
            annotations: vec!["src/lib.rs:9: failure: index out of bounds".into()],
        }];
        let p = ci_prompt(
            &"a".repeat(40),
            "https://github.example.com/acme/r/commit/aaa",
            Ok(checks),
        );
        assert!(
            p.starts_with("The checks on the pull request failed on commit aaaaaaaaaaaa"),
            "{p}"
        );
        for part in [
            "### test (failure) https://github.example.com/acme/r/runs/7",
            "1 test failed",
            "empty_list panicked",
            "- src/lib.rs:9: failure: index out of bounds",
        ] {
            assert!(p.contains(part), "{part:?} not in {p}");
        }
        let unread = ci_prompt(&"b".repeat(40), "u", Err("GET …: 403".into()));
        assert!(
            unread.contains("could not be read from GitHub (GET …: 403)"),
            "{unread}"
        );
    }

    #[test]
    fn a_long_output_is_cut_and_says_so() {
        let long = "é".repeat(10_000);
        let cut = bounded(&long, 101);
        assert!(cut.len() < 200 && cut.contains("more bytes]"), "{cut}");
    }
}
