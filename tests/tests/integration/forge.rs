//! The forge loop, with a stand-in GitHub: a ticket's pull request is open,
//! and GitHub's signed webhook deliveries at the console start follow-ups
//! on it — a failing check suite (its checks' output and annotations in the
//! prompt), a mention from a collaborator — each landing one more commit on
//! the branch; forged, unsigned, replayed and unauthorised deliveries start
//! nothing, and a ticket's reactions stop at its cap.

use std::time::Duration;

use omoi_proto::ticket as pb;
use omoi_tests::console::Console;
use omoi_tests::events::read_all;
use omoi_tests::github::{GitHubApi, deliver};
use omoi_tests::mesh::{Options, ProcessMesh};
use omoi_tests::repo::{git, push_commit, remote};
use omoi_tests::{Infra, file_ticket, wait_ticket, wait_ticket_where};
use serde_json::{Value, json};

const COMPLETED: i32 = 3;
const CANCELLED: i32 = 5;
const PAUSED: i32 = 6;
const TOKEN: &str = "ghs_forgeLoopToken";
const SECRET: &str = "webhook-secret-of-the-repository";
const WEB: &str = "https://github.example.com";

fn check_suite(id: i64, branch: &str, sha: &str, conclusion: &str) -> Value {
    json!({
        "action": "completed",
        "repository": {"full_name": "acme/remote", "html_url": format!("{WEB}/acme/remote")},
        "check_suite": {"id": id, "head_branch": branch, "head_sha": sha, "conclusion": conclusion}
    })
}

fn comment(id: i64, pr_url: &str, association: &str, body: &str) -> Value {
    json!({
        "action": "created",
        "repository": {"full_name": "acme/remote", "html_url": format!("{WEB}/acme/remote")},
        "issue": {"number": 1, "pull_request": {"html_url": pr_url}},
        "comment": {
            "id": id,
            "html_url": format!("{pr_url}#issuecomment-{id}"),
            "user": {"login": "reviewer"},
            "author_association": association,
            "body": body
        }
    })
}

/// A member's review of pull request 1 (`pr`) requesting changes.
fn changes_requested(pr: &str, id: i64, body: &str) -> Value {
    json!({
        "action": "submitted",
        "repository": {"full_name": "acme/remote", "html_url": format!("{WEB}/acme/remote")},
        "pull_request": {"number": 1, "html_url": pr},
        "review": {"id": id, "state": "changes_requested", "body": body,
                   "html_url": format!("{pr}#pullrequestreview-{id}"),
                   "user": {"login": "maintainer"}, "author_association": "MEMBER"}
    })
}

/// The mesh on a stand-in GitHub, its console taking webhook deliveries,
/// with `env` for the services.
struct Forge {
    infra: Infra,
    mesh: ProcessMesh,
    console: Console,
    github: GitHubApi,
    bare: std::path::PathBuf,
    root: std::path::PathBuf,
}

impl Forge {
    /// With the demo agent.
    async fn start(env: &[(&str, &str)]) -> Self {
        Self::start_with(env, vec![("OMOI_DEMO_SLEEP_MS".into(), "20".into())]).await
    }

    /// With one executor whose environment `executor` completes.
    async fn start_with(env: &[(&str, &str)], executor: Vec<(String, String)>) -> Self {
        let infra = Infra::new().await.unwrap();
        let (bare, _) = remote();
        let root = bare.parent().unwrap().to_path_buf();
        let github = GitHubApi::start(TOKEN, WEB).await.unwrap();
        let mut services: Vec<(String, String)> = vec![
            ("OMOI_GITHUB_API_URL".into(), github.url.clone()),
            ("OMOI_GITHUB_TOKEN".into(), TOKEN.into()),
            ("OMOI_PULL_REQUEST_INTERVAL_SECONDS".into(), "0.2".into()),
        ];
        services.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let options = Options {
            executors: 0,
            env: services,
            executor_env: vec![
                // GitHub-shaped URLs reach the local bare repository.
                ("GIT_CONFIG_COUNT".into(), "1".into()),
                (
                    "GIT_CONFIG_KEY_0".into(),
                    format!("url.file://{}/.insteadOf", root.display()),
                ),
                ("GIT_CONFIG_VALUE_0".into(), format!("{WEB}/acme/")),
            ],
            ..Default::default()
        };
        let mut mesh = ProcessMesh::start(&infra, options).await.unwrap();
        mesh.add_executor(&infra, &executor).await.unwrap();
        let console = Console::start_with_webhooks(
            &mesh.ticket.url,
            &mesh.task_queue.url,
            &mesh.health.url,
            None,
            Some(SECRET),
        )
        .await;
        Self {
            infra,
            mesh,
            console,
            github,
            bare,
            root,
        }
    }

    /// A one-task ticket with a pull request (`max_reactions` given or not),
    /// once its pull request is open: its id and branch.
    async fn sum_ticket(&self, max_reactions: Option<i32>) -> (String, String) {
        let t = self.pr_ticket("Write sum", 2, max_reactions).await;
        (t.id, t.branch)
    }

    /// A ticket of one task `task` (in `phase`) with a pull request, once
    /// its pull request is open.
    async fn pr_ticket(&self, task: &str, phase: i32, max_reactions: Option<i32>) -> pb::Ticket {
        let tickets = self.mesh.tickets();
        let created = file_ticket(
            &tickets,
            pb::CreateTicketRequest {
                title: "Sum a list".into(),
                description: "Write sum().".into(),
                repository: format!("{WEB}/acme/remote.git"),
                pull_request: true,
                max_reactions,
                plan: vec![pb::TaskSpec {
                    title: task.into(),
                    phase,
                    ..Default::default()
                }],
                ..Default::default()
            },
        )
        .await
        .ticket
        .unwrap();
        assert_eq!(created.max_reactions, max_reactions.unwrap_or(5));
        wait_ticket_where(&tickets, &created.id, "its pull request open", |t| {
            !t.pull_request_url.is_empty()
        })
        .await
    }

    async fn deliver(&self, event: &str, delivery: &str, body: &Value) -> (u16, String) {
        deliver(&self.console.url, Some(SECRET), event, delivery, body)
            .await
            .unwrap()
    }

    async fn stop(self) {
        self.console.stop().await;
        self.mesh.stop().await.unwrap();
        self.infra.cleanup().await.unwrap();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ci_failures_and_mentions_on_the_pull_request_become_follow_ups_once_each() {
    let forge = Forge::start(&[]).await;
    let (mesh, console, github, bare, infra) = (&forge.mesh, &forge.console, &forge.github, &forge.bare, &forge.infra);
    let tickets = mesh.tickets();
    let (id, branch) = forge.sum_ticket(Some(3)).await;
    let ticket = wait_ticket(&tickets, &id, COMPLETED).await.ticket.unwrap();
    assert_eq!((ticket.max_reactions, ticket.reactions), (3, 0));
    let pr = ticket.pull_request_url.clone();
    let commits = || git(bare, &["rev-list", "--count", &format!("main..{branch}")]);
    assert_eq!(commits(), "1");
    let tasks_now = |r: &pb::GetTicketResponse| r.tasks.len();
    let settled = wait_ticket(&tickets, &id, COMPLETED).await;
    assert_eq!(tasks_now(&settled), 1);

    // Forged, unsigned: refused before anything is read.
    let suite = check_suite(77, &branch, &"c".repeat(40), "failure");
    let (status, _) = deliver(&console.url, Some("not-the-secret"), "check_suite", "d-forged", &suite)
        .await
        .unwrap();
    assert_eq!(status, 401);
    let (status, _) = deliver(&console.url, None, "check_suite", "d-unsigned", &suite)
        .await
        .unwrap();
    assert_eq!(status, 401);
    // Something omoi does not react to; a comment by someone who may not ask.
    let (status, _) = forge.deliver("star", "d-star", &json!({"action": "created"})).await;
    assert_eq!(status, 202);
    let (status, answer) = forge
        .deliver(
            "issue_comment",
            "d-drive-by",
            &comment(500, &pr, "NONE", "@omoi delete the tests"),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("may not ask"), "{answer}");
    assert_eq!(tasks_now(&wait_ticket(&tickets, &id, COMPLETED).await), 1);

    // A failing check suite: its failed check's output and annotation in
    // the follow-up's prompt, one more commit, the ticket completed again.
    let log = (1..=500).map(|i| format!("compiling step {i}\n")).collect::<String>()
        + "thread 'sum_of_empty_list' panicked at src/lib.rs:3:5\nerror: test failed, to rerun pass `--lib`\n";
    github.job_log(9001, &log);
    github.check_run(
        77,
        json!({
            "id": 9001, "name": "test", "conclusion": "failure", "app": {"slug": "github-actions"},
            "html_url": format!("{WEB}/acme/remote/runs/9001"),
            "output": {"title": "1 test failed", "summary": "sum_of_empty_list panicked",
                       "text": "assertion failed: sum(&[]) == 0", "annotations_count": 1}
        }),
        vec![
            json!({"path": "src/lib.rs", "start_line": 3, "annotation_level": "failure",
                    "message": "index out of bounds: the len is 0"}),
        ],
    );
    github.check_run(
        77,
        json!({"id": 9002, "name": "lint", "conclusion": "success", "output": {"title": "clean"}}),
        vec![],
    );
    let (status, answer) = forge.deliver("check_suite", "d-ci-1", &suite).await;
    assert_eq!(status, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["reacted"], json!(true), "{answer}");
    let done = wait_ticket(&tickets, &id, COMPLETED).await;
    assert_eq!(tasks_now(&done), 2);
    let fix = done.tasks.iter().find(|t| t.id == answer["task_id"]).unwrap();
    for part in [
        "### test (failure)",
        "1 test failed",
        "assertion failed: sum(&[]) == 0",
        "src/lib.rs:3: failure: index out of bounds: the len is 0",
        "error: test failed, to rerun pass `--lib`",
    ] {
        assert!(fix.description.contains(part), "{part:?} not in {}", fix.description);
    }
    assert!(!fix.description.contains("lint"), "{}", fix.description);
    // The log's end, not all of it; fetched without the token.
    assert!(!fix.description.contains("compiling step 1\n"), "{}", fix.description);
    assert!(!github.token_on_download());
    assert_eq!(commits(), "2");
    // The branch head says so: pending while the fix worked (on the head
    // it started from), success on the new head, each linking nowhere (no
    // console address here).
    let heads = git(bare, &["rev-list", "--max-count=2", &branch]);
    let heads: Vec<&str> = heads.lines().collect();
    let statuses = omoi_tests::eventually(Duration::from_secs(30), "the new head's status", || async {
        let s = github.statuses();
        s.iter()
            .any(|st| st["sha"] == heads[0] && st["state"] == "success")
            .then_some(s)
    })
    .await;
    let on = |sha: &str| -> Vec<String> {
        statuses
            .iter()
            .filter(|st| st["sha"] == sha)
            .map(|st| format!("{}:{}", st["context"].as_str().unwrap(), st["state"].as_str().unwrap()))
            .collect()
    };
    assert_eq!(on(heads[1]), ["omoi:success", "omoi:pending"], "{statuses:#?}");
    assert_eq!(on(heads[0]), ["omoi:success"], "{statuses:#?}");
    // Redelivered, or the same commit's suite again: nothing more.
    let (_, again) = forge.deliver("check_suite", "d-ci-1", &suite).await;
    assert!(again.contains("acted on before"), "{again}");
    let status = json!({
        "state": "failure", "sha": "c".repeat(40), "context": "ci/jenkins", "description": "build broke",
        "target_url": "https://ci.example.com/1", "branches": [{"name": branch}],
        "repository": {"full_name": "acme/remote", "html_url": format!("{WEB}/acme/remote")}
    });
    let (_, same_commit) = forge.deliver("status", "d-status-1", &status).await;
    assert!(
        same_commit.contains("acted on before"),
        "one reaction per failed commit: {same_commit}"
    );

    // A person pushes to the pull request; then a collaborator's mention:
    // one more follow-up with their words, on top of that person's commit.
    let person = push_commit(
        bare,
        &branch,
        "NOTES.md",
        "Mind the empty case.\n",
        "Notes from a person",
    );
    let (status, answer) = forge
        .deliver(
            "issue_comment",
            "d-mention-1",
            &comment(501, &pr, "COLLABORATOR", "Thanks! @omoi also cover the empty case."),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let done = wait_ticket(&tickets, &id, COMPLETED).await;
    assert_eq!(tasks_now(&done), 3);
    assert!(
        done.tasks
            .iter()
            .any(|t| t.description.contains("reviewer asked") && t.description.contains("also cover the empty case")),
        "{:#?}",
        done.tasks
    );
    assert_eq!(commits(), "4");
    assert_eq!(done.ticket.as_ref().unwrap().reactions, 2);
    let answer: Value = serde_json::from_str(&answer).unwrap();
    let mentioned = done.tasks.iter().find(|t| t.id == answer["task_id"]).unwrap();
    let git_of = mentioned.git.as_ref().unwrap();
    assert_eq!(
        git_of.base_commit, person,
        "the follow-up starts from the branch's head"
    );
    assert_eq!(git(bare, &["rev-parse", &format!("{}^", git_of.commit)]), person);

    // A review requesting changes, with two comments: one follow-up holding
    // both, then an answer in each thread naming the commit.
    github.review(
        31,
        vec![
            json!({"id": 701, "path": "src/lib.rs", "line": 2, "diff_hunk": "@@ -1 +1,2 @@\n+fn sum()",
                   "body": "Take a slice, not a Vec."}),
            json!({"id": 702, "path": "README.md", "line": 1, "diff_hunk": "@@ -0,0 +1 @@\n+# r",
                   "body": "Document sum()."}),
        ],
    );
    let review = changes_requested(&pr, 31, "Two things.");
    let (status, answer) = forge.deliver("pull_request_review", "d-review-1", &review).await;
    assert_eq!(status, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["reacted"], json!(true), "{answer}");
    let done = wait_ticket(&tickets, &id, COMPLETED).await;
    let fix = done.tasks.iter().find(|t| t.id == answer["task_id"]).unwrap();
    for part in [
        "maintainer requested changes",
        "Two things.",
        "### src/lib.rs:2",
        "Take a slice",
        "### README.md:1",
        "Document sum().",
    ] {
        assert!(fix.description.contains(part), "{part:?} not in {}", fix.description);
    }
    assert_eq!(commits(), "5");
    let commit = fix.git.as_ref().unwrap().commit.clone();
    let replies = omoi_tests::eventually(Duration::from_secs(60), "both threads answered", || async {
        let r = github.replies();
        (r.len() >= 2).then_some(r)
    })
    .await;
    let mut answered: Vec<i64> = replies.iter().map(|(c, _)| *c).collect();
    answered.sort();
    assert_eq!(answered, vec![701, 702], "{replies:?}");
    assert!(replies.iter().all(|(_, text)| text.contains(&commit)), "{replies:?}");

    // The cap: a fourth reaction starts nothing, and the ticket waits for
    // a person, saying why.
    let one_more = comment(502, &pr, "OWNER", "@omoi one more thing");
    let (_, capped) = forge.deliver("issue_comment", "d-mention-2", &one_more).await;
    assert!(capped.contains("reactions are used up"), "{capped}");
    let paused = wait_ticket(&tickets, &id, PAUSED).await;
    let held = paused.ticket.as_ref().unwrap();
    assert_eq!((tasks_now(&paused), held.reactions), (4, 3));
    assert!(
        held.paused_reason
            .contains(&format!("its 3 reactions are used up: mention: {pr}#issuecomment-502")),
        "{}",
        held.paused_reason
    );
    let (_, again) = forge
        .deliver(
            "issue_comment",
            "d-mention-3",
            &comment(503, &pr, "OWNER", "@omoi and this"),
        )
        .await;
    assert!(again.contains("the ticket is paused"), "{again}");
    // Its cap raised, it is done again; GitHub's redelivery of the turned
    // away comment is answered then.
    let raised = tickets
        .clone()
        .update_ticket(pb::UpdateTicketRequest {
            ticket: Some(pb::Ticket {
                id: id.clone(),
                max_reactions: 4,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["max_reactions".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .ticket
        .unwrap();
    assert_eq!(
        (raised.status, raised.max_reactions, raised.paused_reason.as_str()),
        (COMPLETED, 4, "")
    );
    let (_, answered) = forge.deliver("issue_comment", "d-mention-2", &one_more).await;
    assert!(answered.contains("\"reacted\":true"), "{answered}");
    // Answered means reopened: it completes once the follow-up did.
    let after = wait_ticket(&tickets, &id, COMPLETED).await;
    assert_eq!((tasks_now(&after), after.ticket.as_ref().unwrap().reactions), (5, 4));
    // The ticket lists them: kind, cause, the task each made.
    let made: Vec<(String, bool)> = after
        .reactions
        .iter()
        .map(|r| (r.kind.clone(), after.tasks.iter().any(|t| t.id == r.task_id)))
        .collect();
    assert_eq!(
        made,
        [
            ("ci_failure".to_owned(), true),
            ("mention".to_owned(), true),
            ("review".to_owned(), true),
            ("mention".to_owned(), true)
        ]
    );
    assert_eq!(github.replies().len(), 2, "each thread answered once");

    // Each reaction is an event: its kind and what caused it.
    let events = read_all(&infra.nats_url, &infra.topology.stream, 0, Duration::ZERO)
        .await
        .unwrap();
    let reactions: Vec<Value> = events
        .iter()
        .filter(|e| e.event_type == "TICKET_REACTION")
        .map(|e| omoi_proto::convert::struct_to_json(e.payload.as_ref().unwrap()))
        .collect();
    let kinds: Vec<&str> = reactions.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ci_failure", "mention", "review", "mention"], "{reactions:?}");
    assert_eq!(reactions[1]["url"], format!("{pr}#issuecomment-501"));

    // A person sees them on the ticket's page.
    omoi_tests::browser::run(
        "reactions.py",
        &[
            ("OMOI_CONSOLE_URL", &console.url),
            ("OMOI_TICKET", &id),
            ("OMOI_EXPECT", "ci_failure,mention,review,mention"),
            ("OMOI_EXPECT_USED", "4 of 4 used"),
        ],
        &["reactions"],
        Duration::from_secs(120),
    )
    .await;

    forge.stop().await;
}

fn issue_event(action: &str, number: i64, label: &str, title: &str) -> Value {
    json!({
        "action": action,
        "label": {"name": label},
        "repository": {"full_name": "acme/remote", "html_url": format!("{WEB}/acme/remote"),
                       "clone_url": format!("{WEB}/acme/remote.git")},
        "issue": {"number": number, "html_url": format!("{WEB}/acme/remote/issues/{number}"),
                  "title": title, "body": "The README needs a greeting."}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_labelled_issue_becomes_a_ticket_whose_pull_request_closes_it() {
    let forge = Forge::start(&[
        ("OMOI_GITHUB_REPOSITORIES", "acme/remote"),
        ("OMOI_CONSOLE_URL", "https://omoi.example.com/"),
    ])
    .await;
    let tickets = forge.mesh.tickets();

    // Another label, another repository: nothing.
    let (_, answer) = forge
        .deliver("issues", "i-0", &issue_event("labeled", 7, "bug", "Greet"))
        .await;
    assert!(answer.contains("is not"), "{answer}");
    let mut elsewhere = issue_event("labeled", 8, "omoi", "Greet");
    elsewhere["repository"]["full_name"] = json!("other/repo");
    let (_, answer) = forge.deliver("issues", "i-1", &elsewhere).await;
    assert!(answer.contains("takes no issues from other/repo"), "{answer}");

    // Labelled omoi: a ticket, once, whose source is the issue.
    let (status, answer) = forge
        .deliver("issues", "i-2", &issue_event("labeled", 7, "omoi", "Greet people"))
        .await;
    assert_eq!(status, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["outcome"], "created", "{answer}");
    let id = answer["ticket_id"].as_str().unwrap().to_owned();
    let (_, again) = forge
        .deliver("issues", "i-3", &issue_event("labeled", 7, "omoi", "Greet people"))
        .await;
    assert!(
        again.contains("has its ticket already") && again.contains(&id),
        "{again}"
    );
    let done = wait_ticket_where(&tickets, &id, "its pull request open", |t| {
        !t.pull_request_url.is_empty()
    })
    .await;
    let source = done.source.clone().unwrap();
    assert_eq!(
        (source.kind.as_str(), source.url.as_str()),
        ("github_issue", format!("{WEB}/acme/remote/issues/7").as_str())
    );
    assert_eq!(done.title, "Greet people");
    assert!(done.description.contains("The README needs a greeting."));
    let pulls = forge.github.pulls();
    assert_eq!(pulls.len(), 1);
    assert!(pulls[0].body.contains("Closes #7"), "{}", pulls[0].body);

    // The issue heard when work started and when the pull request opened.
    let said = omoi_tests::eventually(Duration::from_secs(30), "two comments on the issue", || async {
        let c = forge.github.issue_comments();
        (c.len() >= 2).then_some(c)
    })
    .await;
    assert!(said.iter().all(|(n, _)| *n == 7), "{said:?}");
    assert!(
        said[0].1.contains(&format!("(https://omoi.example.com/tickets/{id})")) && said[0].1.contains(&done.branch),
        "{said:?}"
    );
    assert!(said[1].1.contains(&done.pull_request_url), "{said:?}");
    // Its branch head's status links to the ticket in the console.
    let link = format!("https://omoi.example.com/tickets/{id}");
    let statuses = forge.github.statuses();
    assert!(
        statuses.iter().any(|st| st["sha"] == done.head_commit.as_str()
            && st["state"] == "success"
            && st["target_url"] == link.as_str()),
        "{statuses:#?}"
    );

    // Closing the issue of a ticket still at work cancels it.
    let (_, answer) = forge
        .deliver(
            "issues",
            "i-4",
            &issue_event("labeled", 9, "omoi", "Refactor everything"),
        )
        .await;
    let answer: Value = serde_json::from_str(&answer).unwrap();
    let running = answer["ticket_id"].as_str().unwrap().to_owned();
    let (_, closed) = forge
        .deliver("issues", "i-5", &issue_event("closed", 9, "", "Refactor everything"))
        .await;
    assert!(closed.contains("cancelled"), "{closed}");
    wait_ticket(&tickets, &running, CANCELLED).await;
    // A finished ticket's issue closing changes nothing.
    let (_, answer) = forge
        .deliver("issues", "i-6", &issue_event("closed", 7, "", "Greet people"))
        .await;
    assert!(answer.contains("already"), "{answer}");
    wait_ticket(&tickets, &id, COMPLETED).await;

    forge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_webhooks_a_look_at_the_pull_request_finds_the_failed_checks() {
    let forge = Forge::start(&[("OMOI_GITHUB_POLL_SECONDS", "0.3")]).await;
    let tickets = forge.mesh.tickets();
    let (id, branch) = forge.sum_ticket(None).await;
    let head = git(&forge.bare, &["rev-parse", &branch]);
    forge.github.pull_head(1, &head);
    // Looked at, unchanged: conditional requests answered 304.
    omoi_tests::eventually(Duration::from_secs(30), "unchanged answers", || async {
        (forge.github.not_modified() >= 3).then_some(())
    })
    .await;
    assert_eq!(tasks(&tickets, &id).await, 1);

    // The head's suite fails: found, and followed up like a delivery.
    forge.github.check_run(
        88,
        json!({"id": 9100, "name": "test", "conclusion": "failure",
               "output": {"title": "1 test failed", "text": "assertion failed: sum(&[]) == 0"}}),
        vec![],
    );
    forge.github.commit_suite(
        &head,
        json!({"id": 88, "status": "completed", "conclusion": "failure", "head_sha": head, "head_branch": branch}),
    );
    let done = wait_ticket_where(&tickets, &id, "a follow-up", |t| t.reactions == 1).await;
    assert_eq!(done.reactions, 1);
    let settled = wait_ticket(&tickets, &id, COMPLETED).await;
    assert_eq!(settled.tasks.len(), 2);
    assert!(
        settled.tasks[1].description.contains("assertion failed: sum(&[]) == 0"),
        "{}",
        settled.tasks[1].description
    );
    assert_eq!(
        git(&forge.bare, &["rev-list", "--count", &format!("main..{branch}")]),
        "2"
    );
    // Looked at again and again, acted on once.
    let before = forge.github.not_modified();
    omoi_tests::eventually(Duration::from_secs(30), "more looks", || async {
        (forge.github.not_modified() > before + 2).then_some(())
    })
    .await;
    assert_eq!(tasks(&tickets, &id).await, 2);

    forge.stop().await;
}

async fn tasks(tickets: &omoi_tests::TicketClient, id: &str) -> usize {
    tickets
        .clone()
        .get_ticket(pb::GetTicketRequest {
            ticket_id: id.to_owned(),
            view: pb::TicketView::Full.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .tasks
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mention_resumes_claude_codes_session_within_seconds_of_the_delivery() {
    let api = omoi_tests::model_api::ModelApi::start().await.unwrap();
    let home = std::env::temp_dir().join(format!("omoi-forge-home-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&home).unwrap();
    let claude = api.executor_env(omoi_tests::model_api::Cli::Claude, &home, "sk-ant-forge");
    let forge = Forge::start_with(&[], claude).await;
    let tickets = forge.mesh.tickets();
    let open = forge.pr_ticket("write hello.txt", 1, None).await;
    let (id, branch) = (open.id.clone(), open.branch.clone());
    let first_calls = api.asked().len();

    // A collaborator asks; the agent that wrote the code is back at it.
    let delivered = chrono::Utc::now();
    let (status, answer) = forge
        .deliver(
            "issue_comment",
            "d-claude-1",
            &comment(
                900,
                &open.pull_request_url,
                "COLLABORATOR",
                "@omoi please also add file=extra.txt",
            ),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let done = wait_ticket(&tickets, &id, COMPLETED).await;
    assert_eq!(done.tasks.len(), 2);
    let asked = api.asked();
    let (at, _, conversation) = &asked[first_calls];
    let latency = (*at - delivered).to_std().unwrap();
    eprintln!(
        "webhook delivery → the follow-up's first model call: {} ms",
        latency.as_millis()
    );
    assert!(latency < Duration::from_secs(30), "{latency:?}");
    // The same conversation, taken up: the first task's turns come first.
    let text = conversation.to_string();
    assert!(text.contains("hello.txt") && text.contains("file=extra.txt"), "{text}");
    let files = git(&forge.bare, &["ls-tree", "--name-only", &branch]);
    assert!(files.lines().any(|f| f == "extra.txt"), "{files}");

    forge.stop().await;
    let _ = std::fs::remove_dir_all(home);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_request_its_base_moved_away_from_gets_the_base_merged_in_by_its_agent() {
    let api = omoi_tests::model_api::ModelApi::start().await.unwrap();
    let home = std::env::temp_dir().join(format!("omoi-forge-home-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&home).unwrap();
    let claude = api.executor_env(omoi_tests::model_api::Cli::Claude, &home, "sk-ant-forge");
    let forge = Forge::start_with(&[], claude).await;
    forge.github.serve_repository("acme/remote", &forge.bare);
    let (tickets, bare) = (forge.mesh.tickets(), &forge.bare);
    let open = forge.pr_ticket("write hello.txt", 1, None).await;
    let (id, branch) = (open.id.clone(), open.branch.clone());
    let clean = |base: &str| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(bare)
            .args(["merge-tree", "--write-tree", base, &branch])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    assert!(clean("main"));

    // Someone lands a change to the same file on main: the pull request
    // no longer merges. GitHub says main moved; omoi asks GitHub about its
    // pull requests into it (which works mergeability out first).
    let moved = push_commit(bare, "main", "hello.txt", "hello from main\n", "Greet from main");
    assert!(!clean("main"));
    let push = json!({
        "ref": "refs/heads/main", "after": moved, "compare": format!("{WEB}/acme/remote/compare/a...b"),
        "repository": {"full_name": "acme/remote", "html_url": format!("{WEB}/acme/remote")}
    });
    let (status, answer) = forge.deliver("push", "d-push-1", &push).await;
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer.contains("the pull requests of 1 tickets will be looked at"),
        "{answer}"
    );

    // A follow-up merges main in, resolving the conflict in the agent's
    // session: one merge commit on the branch, whose second parent is
    // main's head; the pull request merges cleanly again.
    let done = omoi_tests::eventually(Duration::from_secs(90), "the merge landed", || async {
        let t = omoi_tests::read_ticket(&tickets, &id).await.ok()?;
        (t.tasks.len() == 2 && t.ticket.as_ref()?.status == COMPLETED).then_some(t)
    })
    .await;
    let merge = done.tasks.iter().find(|t| t.title.starts_with("Follow-up")).unwrap();
    assert!(
        merge.description.contains("(`git merge main`)"),
        "{}",
        merge.description
    );
    let head = git(bare, &["rev-parse", &branch]);
    assert_eq!(merge.git.as_ref().unwrap().commit, head);
    let parents = git(bare, &["rev-list", "--parents", "-n", "1", &branch]);
    let parents: Vec<&str> = parents.split(' ').collect();
    assert_eq!((parents.len(), parents[2]), (3, moved.as_str()), "{parents:?}");
    assert!(clean("main"), "the pull request merges cleanly again");
    let hello = git(bare, &["show", &format!("{branch}:hello.txt")]);
    assert!(
        hello.contains("hello from claude") && hello.contains("hello from main") && !hello.contains("<<<<<<<"),
        "{hello}"
    );
    assert_eq!(
        done.reactions.iter().map(|r| r.kind.as_str()).collect::<Vec<_>>(),
        ["conflict"]
    );
    // Told again (a redelivery, another push): looked at until GitHub
    // answers, and nothing more to merge.
    let looks = || {
        forge
            .github
            .calls()
            .iter()
            .filter(|c| c.starts_with("GET /repos/acme/remote/pulls/1?"))
            .count()
    };
    let before = looks();
    let (_, again) = forge.deliver("push", "d-push-2", &push).await;
    assert!(again.contains("will be looked at"), "{again}");
    omoi_tests::eventually(Duration::from_secs(30), "two more looks", || async {
        (looks() >= before + 2).then_some(())
    })
    .await;
    assert_eq!(omoi_tests::read_ticket(&tickets, &id).await.unwrap().tasks.len(), 2);
    let events = read_all(&forge.infra.nats_url, &forge.infra.topology.stream, 0, Duration::ZERO)
        .await
        .unwrap();
    let kinds: Vec<String> = events
        .iter()
        .filter(|e| e.event_type == "TICKET_REACTION")
        .map(|e| omoi_proto::convert::struct_to_json(e.payload.as_ref().unwrap())["kind"].to_string())
        .collect();
    assert_eq!(kinds, ["\"conflict\""]);

    forge.stop().await;
    let _ = std::fs::remove_dir_all(home);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_review_goes_back_to_the_agent_that_last_changed_the_files_it_comments_on() {
    let forge = Forge::start(&[]).await;
    let tickets = forge.mesh.tickets();
    // A plan, then its implementation: PLAN.md from the first task,
    // src/feature.rs from the second (the demo agent's files).
    let task = |title: &str, phase: i32, depends_on: Vec<i32>| pb::TaskSpec {
        title: title.into(),
        phase,
        depends_on,
        ..Default::default()
    };
    let created = file_ticket(
        &tickets,
        pb::CreateTicketRequest {
            title: "Plan and build".into(),
            repository: format!("{WEB}/acme/remote.git"),
            pull_request: true,
            plan: vec![task("Plan it", 1, vec![]), task("Build it", 2, vec![0])],
            ..Default::default()
        },
    )
    .await
    .ticket
    .unwrap();
    let open = wait_ticket_where(&tickets, &created.id, "its pull request open", |t| {
        !t.pull_request_url.is_empty()
    })
    .await;
    let pr = open.pull_request_url.clone();
    forge.github.review(
        41,
        vec![json!({"id": 801, "path": "PLAN.md", "line": 3, "diff_hunk": "@@ -0,0 +1,3 @@", "body": "Add a step."})],
    );
    let review = changes_requested(&pr, 41, "The plan first.");
    let (_, answer) = forge.deliver("pull_request_review", "d-review-plan", &review).await;
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["reacted"], json!(true), "{answer}");
    let done = wait_ticket(&tickets, &created.id, COMPLETED).await;
    let by_id = |id: &Value| done.tasks.iter().find(|t| t.id == *id).unwrap();
    let plan = done.tasks.iter().find(|t| t.title == "Plan it").unwrap();
    // The planning agent is back at it (its phase, its work before): not
    // the last task's.
    let fix = by_id(&answer["task_id"]);
    assert_eq!(fix.phase, plan.phase, "{fix:?}");
    assert_eq!(fix.depends_on, std::slice::from_ref(&plan.id), "{fix:?}");
    forge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_whose_handling_the_ticket_service_died_in_is_acted_on_once_when_redelivered() {
    let mut forge = Forge::start(&[]).await;
    let (id, branch) = forge.sum_ticket(None).await;
    forge.github.check_run(
        5,
        json!({"id": 51, "name": "test", "conclusion": "failure", "output": {"title": "red"}}),
        vec![],
    );
    // The ticket service reads the failed checks — and dies meanwhile.
    forge.github.hold_checks();
    let suite = check_suite(5, &branch, &"d".repeat(40), "failure");
    let (url, body) = (forge.console.url.clone(), suite.clone());
    let first = tokio::spawn(async move { deliver(&url, Some(SECRET), "check_suite", "d-crash", &body).await });
    forge.github.checks_held().await;
    forge.mesh.restart_ticket().await.unwrap();
    forge.github.release_checks();
    let (status, answer) = first.await.unwrap().unwrap();
    assert!(status >= 500, "{status} {answer}");
    let tickets = forge.mesh.tickets();
    assert_eq!(
        tasks(&tickets, &id).await,
        1,
        "nothing came of the interrupted delivery"
    );
    // GitHub redelivers it (twice): one follow-up.
    let (status, answer) = forge.deliver("check_suite", "d-crash", &suite).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("\"reacted\":true"), "{answer}");
    let (_, again) = forge.deliver("check_suite", "d-crash", &suite).await;
    assert!(again.contains("acted on before"), "{again}");
    let done = wait_ticket(&tickets, &id, COMPLETED).await;
    assert_eq!((done.tasks.len(), done.ticket.unwrap().reactions), (2, 1));

    forge.stop().await;
}
