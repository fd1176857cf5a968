//! Reactions: what the forge asks of a ticket's pull request, turned into a
//! follow-up task's prompt. A failing check suite brings its failed checks
//! (read from GitHub: their output and annotations), a mention its comment.

use std::sync::Arc;
use std::time::Duration;

use omoi_domain::git::forge_repo;
use omoi_runtime::background::every;
use omoi_store::Store;
use tokio_util::sync::CancellationToken;

use crate::pulls::{FailedCheck, GitHub, ReviewComment};
use crate::requests::{Asked, Reaction};
use crate::tasks::TicketTasks;

/// Most of a prompt one check's output may take.
const MAX_CHECK_BYTES: usize = 8 * 1024;
/// Most of a prompt the failures may take in all.
const MAX_FAILURES_BYTES: usize = 32 * 1024;

/// A reaction's follow-up, as the forge's side of it says.
#[derive(Debug, Clone, PartialEq)]
pub struct Ask {
    /// `ci_failure`, `mention` or `review`.
    pub kind: &'static str,
    /// What it answers (one reaction each): the commit, the comment, the review.
    pub key: String,
    /// The follow-up's prompt.
    pub message: String,
    /// Review comments to answer once the follow-up landed, and their pull
    /// request's number.
    pub reply_to: Vec<i64>,
    pub pull_number: i64,
    /// The files it concerns (review comments', annotations'): the task
    /// that last changed one of them is the one followed up.
    pub paths: Vec<String>,
}

/// How this deployment reacts.
pub struct Forge {
    pub github: Arc<GitHub>,
    /// What a comment must name to be a request (`@omoi`).
    pub mention: String,
    /// The reactions a ticket may have unless it says otherwise.
    pub max_reactions: i32,
    /// Repositories (`owner/name`, lowercase) whose labelled issues become
    /// tickets, and the label.
    pub repositories: Vec<String>,
    pub issue_label: String,
}

impl Forge {
    /// Whether this deployment takes issues from `repository`.
    pub fn serves(&self, repository: &str) -> bool {
        self.repositories.iter().any(|r| r.eq_ignore_ascii_case(repository))
    }
}

impl Forge {
    /// The follow-up reaction `r` asks for (its comments and checks read
    /// from GitHub).
    pub async fn follow_up(&self, r: &Reaction) -> Ask {
        let (owner, name) = r.repository.split_once('/').unwrap_or_default();
        let ask = |kind, key: String, message| Ask {
            kind,
            key,
            message,
            reply_to: Vec::new(),
            pull_number: 0,
            paths: Vec::new(),
        };
        match &r.asked {
            Asked::CiFailure { suite_id, head_sha, .. } => {
                let failed = self.github.failed_checks(owner, name, *suite_id).await;
                // Annotations read `path:line: level: message`.
                let paths = failed
                    .iter()
                    .flatten()
                    .flat_map(|c| &c.annotations)
                    .filter_map(|a| a.split_once(':').map(|(path, _)| path.to_owned()))
                    .collect();
                Ask {
                    paths,
                    ..ask("ci_failure", head_sha.clone(), ci_prompt(head_sha, &r.url, failed))
                }
            }
            Asked::Mention {
                pull_request_url,
                author,
                body,
                comment_id,
            } => ask(
                "mention",
                comment_id.to_string(),
                format!(
                    "{author} asked on the pull request {pull_request_url} ({url}):\n\n{body}\n\n\
                     Do what they ask on this branch; your work lands as a new commit on the pull request.",
                    url = r.url
                ),
            ),
            Asked::Review {
                pull_request_url,
                pull_number,
                review_id,
                author,
                body,
            } => {
                let comments = self.github.review_comments(owner, name, *pull_number, *review_id).await;
                Ask {
                    reply_to: comments.iter().flatten().map(|c| c.id).collect(),
                    paths: comments.iter().flatten().map(|c| c.path.clone()).collect(),
                    pull_number: *pull_number,
                    ..ask(
                        "review",
                        review_id.to_string(),
                        review_prompt(author, pull_request_url, &r.url, body, comments),
                    )
                }
            }
            Asked::Conflict {
                pull_request_url,
                head_sha,
                base_ref,
                base_sha,
            } => ask(
                "conflict",
                format!("{head_sha}..{base_sha}"),
                conflict_prompt(pull_request_url, base_ref, base_sha),
            ),
        }
    }
}

fn conflict_prompt(pull_request_url: &str, base: &str, base_sha: &str) -> String {
    format!(
        "The pull request {pull_request_url} no longer merges cleanly into its base branch `{base}` (now at \
         {base_sha}): `{base}` moved on with changes that conflict with this branch's.\n\n\
         This directory has the branch `{base}` at its current head. Merge it into this branch \
         (`git merge {base}`), resolve every conflict so that both sides' intent is kept, check that the \
         project still builds and its tests pass, and commit the merge (`git commit --no-edit`). Do not \
         rebase: the merge lands on the pull request as a merge commit, and is refused while a conflict \
         marker is left in a file."
    )
}

/// Answers the review comments of reactions whose follow-up landed, each
/// in its thread naming the commit, looking every `interval` until
/// `shutdown`. A comment GitHub will never take an answer to (gone, no
/// rights) is given up; GitHub away is asked again on a later pass.
pub async fn answer_reviews(
    store: Store,
    github: Arc<GitHub>,
    tasks: Arc<TicketTasks>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let (store, github, tasks) = (&store, &github, &tasks);
    every("answering review comments", interval, &shutdown, move || async move {
        for due in store.replies_due(20).await.map_err(|e| e.to_string())? {
            let Some(repo) = forge_repo(&due.repository) else {
                continue;
            };
            let task = tasks.queue.get(due.task_id).await.map_err(|s| s.message().to_owned())?;
            let commit = task.git.as_ref().map(|g| g.commit.as_str()).unwrap_or_default();
            let text = if commit.is_empty() {
                format!("Looked into this in omoi task `{}`: no change was needed.", due.task_id)
            } else {
                format!("Addressed in {commit} (omoi task `{}`).", due.task_id)
            };
            for comment in due.comments {
                github
                    .reply(&repo.owner, &repo.name, due.pull_number, comment, &text)
                    .await?;
                store.replied(due.task_id, comment).await.map_err(|e| e.to_string())?;
            }
        }
        Ok::<_, String>(())
    })
    .await
}

/// The prompt of a review that requested changes: what it says, and each
/// of its comments with the lines it is about.
fn review_prompt(
    author: &str,
    pull_request_url: &str,
    url: &str,
    body: &str,
    comments: Result<Vec<ReviewComment>, String>,
) -> String {
    let mut p = format!("{author} requested changes on the pull request {pull_request_url} ({url}).\n");
    if !body.trim().is_empty() {
        p.push_str(&format!("\n{}\n", body.trim()));
    }
    match comments {
        Ok(comments) => {
            for c in comments {
                let at = c.line.map(|l| format!(":{l}")).unwrap_or_default();
                let part = format!(
                    "\n### {}{at}\n```diff\n{}\n```\n{}\n",
                    c.path,
                    c.diff_hunk.trim_end(),
                    c.body.trim()
                );
                p.push_str(&bounded(&part, MAX_CHECK_BYTES));
                if p.len() > MAX_FAILURES_BYTES {
                    p = bounded(&p, MAX_FAILURES_BYTES);
                    break;
                }
            }
        }
        Err(e) => p.push_str(&format!("\nIts comments could not be read from GitHub ({e}).\n")),
    }
    p.push_str("\nMake the changes asked for on this branch; your work lands as a new commit on the pull request, and each comment is answered with it.");
    p
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
                if !c.log_tail.trim().is_empty() {
                    part.push_str(&format!("The end of its log:\n```\n{}\n```\n", c.log_tail.trim_end()));
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
    let end = text.floor_char_boundary(max);
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
            log_tail: "error: test failed, to rerun pass `--lib`\n".into(),
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
            "The end of its log:\n```\nerror: test failed, to rerun pass `--lib`\n```",
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
    fn a_reviews_prompt_holds_each_comment_with_its_lines() {
        let comments = vec![ReviewComment {
            id: 1,
            path: "src/lib.rs".into(),
            line: Some(3),
            diff_hunk: "@@ -1,3 +1,3 @@\n-a\n+b".into(),
            body: "Handle the empty list.".into(),
        }];
        let p = review_prompt(
            "rev",
            "https://g/acme/r/pull/1",
            "https://g/r#review-1",
            "Two things.",
            Ok(comments),
        );
        for part in [
            "rev requested changes",
            "Two things.",
            "### src/lib.rs:3",
            "+b",
            "Handle the empty list.",
        ] {
            assert!(p.contains(part), "{part:?} not in {p}");
        }
    }

    #[test]
    fn a_long_output_is_cut_and_says_so() {
        let long = "é".repeat(10_000);
        let cut = bounded(&long, 101);
        assert!(cut.len() < 200 && cut.contains("more bytes]"), "{cut}");
    }
}
