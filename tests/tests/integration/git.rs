//! A ticket's work lands on one branch of a real repository (a local bare
//! one as the remote): a commit per task, each phase building on the last,
//! pushed by executors running as separate processes; a failed attempt
//! leaves nothing behind, and parallel tasks' pushes never overwrite each
//! other.

use std::path::{Path, PathBuf};
use std::time::Duration;

use omoi_proto::taskqueue as tq;
use omoi_proto::ticket as pb;
use omoi_tests::events::{payloads, read_all};
use omoi_tests::git_http::GitServer;
use omoi_tests::github::GitHubApi;
use omoi_tests::mesh::{Options, ProcessMesh};
use omoi_tests::process::LOG_FILE;
use omoi_tests::repo::{git, remote};
use omoi_tests::{Infra, eventually, file_ticket, wait_ticket, wait_ticket_where};

const COMPLETED: i32 = 3;
const FAILED: i32 = 4;
const WAIT: Duration = Duration::from_secs(60);

fn task_git(t: &tq::Task) -> &omoi_proto::common::GitChange {
    t.git
        .as_ref()
        .unwrap_or_else(|| panic!("task {} has no git result", t.title))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tickets_phases_land_as_one_commit_each_on_its_branch_and_a_failed_attempt_leaves_nothing() {
    let infra = Infra::new().await.unwrap();
    let mut options = Options::default();
    options
        .executor_env
        .push(("OMOI_DEMO_FAIL_FIRST".into(), "PHASE_IMPLEMENTATION".into()));
    let mesh = ProcessMesh::start(&infra, options).await.unwrap();
    let (bare, main) = remote();
    let tickets = mesh.tickets();
    let created = file_ticket(
        &tickets,
        pb::CreateTicketRequest {
            title: "Add OAuth login".into(),
            description: "Billing needs OAuth.".into(),
            repository: bare.display().to_string(),
            ..Default::default()
        },
    )
    .await;
    let ticket = created.ticket.unwrap();
    let short = &ticket.id[ticket.id.len() - 12..];
    assert_eq!(ticket.branch, format!("omoi/{short}-add-oauth-login"));
    let done = wait_ticket(&tickets, &ticket.id, COMPLETED).await;
    let mut tasks = done.tasks.clone();
    tasks.sort_by_key(|t| t.phase);

    // One commit per phase, in phase order, on top of main.
    let branch = &ticket.branch;
    let commits: Vec<String> = git(&bare, &["rev-list", "--reverse", &format!("main..{branch}")])
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(commits.len(), 4, "{commits:?}");
    assert_eq!(done.ticket.as_ref().unwrap().head_commit, commits[3]);
    let mut base = main.clone();
    for (t, commit) in tasks.iter().zip(&commits) {
        let g = task_git(t);
        assert_eq!(&g.branch, branch);
        assert_eq!(&g.commit, commit, "{}", t.title);
        assert_eq!(
            g.base_commit, base,
            "{} starts where the phase before it ended",
            t.title
        );
        assert_eq!(git(&bare, &["rev-parse", &format!("{commit}^")]), base);
        assert!(g.files_changed >= 2 && g.insertions > 0, "{g:?}");
        assert!(g.patch.starts_with("diff --git"), "{}", g.patch);
        let message = git(&bare, &["log", "-1", "--format=%B", commit]);
        let phase = omoi_proto::common::Phase::try_from(t.phase).unwrap().as_str_name();
        let phase = phase.trim_start_matches("PHASE_").to_ascii_lowercase();
        assert!(message.starts_with(&format!("{phase}: {}", t.title)), "{message}");
        assert!(message.contains(&format!("Omoi-Task: {}", t.id)), "{message}");
        assert!(message.contains(&format!("Omoi-Attempt: {}", t.attempt)), "{message}");
        // The whole change so far: the branch against main, as git has it.
        let d = g.branch_diff.as_ref().expect("the branch against its base");
        assert_eq!(d.merge_base, main);
        assert_eq!(
            d.patch,
            git(&bare, &["diff", "--no-color", &main, commit]),
            "{}",
            t.title
        );
        assert_eq!(
            git(&bare, &["log", "-1", "--format=%an <%ae>", commit]),
            "omoi <omoi@localhost>"
        );
        base = commit.clone();
    }

    // Each phase saw the files and the summary of the phase before it.
    let log = |phase: &str| git(&bare, &["show", &format!("{branch}:agent-log/{phase}.md")]);
    let implementation = log("implementation");
    assert!(implementation.contains("found: PLAN.md"), "{implementation}");
    assert!(implementation.contains("told: PHASE_INITIAL done"), "{implementation}");
    let refactoring = log("refactoring");
    assert!(
        refactoring.contains("found: PLAN.md, src/feature.rs, tests/feature.rs"),
        "{refactoring}"
    );
    assert!(refactoring.contains("told: PHASE_INTEGRATION done"), "{refactoring}");

    // The implementation's first attempt failed after writing a file: it is
    // nowhere on the branch, and the retry started from the same base.
    let implement = &tasks[1];
    assert_eq!(implement.attempt, 2);
    assert_eq!(task_git(implement).base_commit, commits[0]);
    let files = git(&bare, &["ls-tree", "-r", "--name-only", branch]);
    assert!(!files.contains("STRAY.md"), "{files}");
    for f in ["README.md", "PLAN.md", "src/feature.rs", "tests/feature.rs", "NOTES.md"] {
        assert!(files.lines().any(|l| l == f), "{f} missing from {files}");
    }
    // Nothing else moved: main is where it was, and no other branch exists.
    assert_eq!(git(&bare, &["rev-parse", "main"]), main);
    assert_eq!(
        git(&bare, &["for-each-ref", "--format=%(refname)"]),
        format!("refs/heads/main\nrefs/heads/{branch}")
    );
    // Each phase after the first took over its predecessor's checkout on
    // the executor (its work on the branch): the implementation's first
    // attempt did; its retry started afresh (the failed attempt's
    // workspace is kept to inspect).
    let mut reused = Vec::new();
    for t in &tasks {
        let output = omoi_tests::task_output(&mesh.task_queue.url, &t.id).await;
        reused.push(
            output
                .iter()
                .filter(|l| l.contains("earlier checkout of the ticket"))
                .count(),
        );
    }
    assert_eq!(reused, [0, 1, 1, 1]);
    // The agent's workspace (the last one, which nothing took over) has
    // no way to reach the remote.
    let result = omoi_proto::convert::struct_to_json(tasks[3].result.as_ref().unwrap());
    let ws = Path::new(result["workspace"].as_str().unwrap());
    assert_eq!(git(ws, &["remote"]), "");
    assert_eq!(git(ws, &["status", "--porcelain"]), "");
    assert!(!ws.with_extension("git").exists(), "the executor's clone is removed");

    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
    let _ = std::fs::remove_dir_all(bare.parent().unwrap());
}

/// A retry on the executor whose attempt failed takes over that attempt's
/// checkout when the workspace policy removes it anyway: what the failed
/// attempt wrote is cleaned away first, so none of it reaches the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_reuses_the_failed_attempts_checkout_with_nothing_of_it_left() {
    let infra = Infra::new().await.unwrap();
    let mut options = Options::default();
    options.executor_env.extend([
        ("OMOI_DEMO_FAIL_FIRST".into(), "PHASE_IMPLEMENTATION".into()),
        ("OMOI_WORKSPACE_POLICY".into(), "remove".into()),
    ]);
    let mesh = ProcessMesh::start(&infra, options).await.unwrap();
    let (bare, main) = remote();
    let tickets = mesh.tickets();
    let created = file_ticket(
        &tickets,
        pb::CreateTicketRequest {
            title: "Retry in place".into(),
            repository: bare.display().to_string(),
            plan: vec![pb::TaskSpec {
                title: "Build it".into(),
                phase: omoi_proto::common::Phase::Implementation as i32,
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await;
    let ticket = created.ticket.unwrap();
    let done = wait_ticket(&tickets, &ticket.id, COMPLETED).await;
    let task = &done.tasks[0];
    assert_eq!(task.attempt, 2);
    let output = omoi_tests::task_output(&mesh.task_queue.url, &task.id).await;
    let reused: Vec<&String> = output
        .iter()
        .filter(|l| l.contains("earlier checkout of the ticket"))
        .collect();
    assert_eq!(reused.len(), 1, "the retry reused the checkout: {output:?}");
    let g = task_git(task);
    assert_eq!(g.base_commit, main);
    let files = git(&bare, &["diff", "--name-only", &main, &g.commit]);
    assert!(!files.contains("STRAY.md"), "{files}");
    assert!(files.lines().any(|f| f == "src/feature.rs"), "{files}");
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
    let _ = std::fs::remove_dir_all(bare.parent().unwrap());
}

/// A ticket's check command runs on each task's committed work, in its
/// workspace: its verdict, exit status and output are recorded on the task
/// and in its timeline, and what it leaves behind is never committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tickets_check_runs_on_each_tasks_committed_work_and_is_recorded() {
    let infra = Infra::new().await.unwrap();
    let mesh = ProcessMesh::start(
        &infra,
        Options {
            executors: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (bare, _) = remote();
    let tickets = mesh.tickets();
    let spec = |title: &str, phase: i32, depends_on: Vec<i32>| pb::TaskSpec {
        title: title.into(),
        phase,
        depends_on,
        ..Default::default()
    };
    let check = "echo checking; touch check-ran.txt; test -f src/feature.rs";
    let created = file_ticket(
        &tickets,
        pb::CreateTicketRequest {
            title: "Checked work".into(),
            repository: bare.display().to_string(),
            check_command: format!("  {check}\n"),
            plan: vec![spec("Plan", 1, vec![]), spec("Build", 2, vec![0])],
            ..Default::default()
        },
    )
    .await;
    let ticket = created.ticket.unwrap();
    assert_eq!(ticket.check_command, check);
    let done = wait_ticket(&tickets, &ticket.id, COMPLETED).await;
    let mut tasks = done.tasks.clone();
    tasks.sort_by_key(|t| t.phase);
    // The plan phase wrote no src/feature.rs: its check failed (recorded,
    // the task still completed); the build phase's passed.
    for (t, passed) in tasks.iter().zip([false, true]) {
        let result = omoi_proto::convert::struct_to_json(t.result.as_ref().unwrap());
        let c = &result["check"];
        assert_eq!(c["command"], check, "{}", t.title);
        assert_eq!(c["passed"], passed, "{}: {c}", t.title);
        assert_eq!(c["exit_code"], if passed { 0 } else { 1 }, "{c}");
        assert_eq!(c["timed_out"], false);
        assert!(c["duration_ms"].as_u64().is_some(), "{c}");
        assert_eq!(c["output_tail"], serde_json::json!(["checking"]), "{c}");
        // Run in the workspace, after the commit: what it left is there
        // (in the build's: the plan's went on to be the build's, cleaned),
        // and nowhere on the branch.
        let ws = Path::new(result["workspace"].as_str().unwrap());
        assert_eq!(ws.join("check-ran.txt").exists(), passed, "{}", t.title);
        let lines = omoi_tests::task_output(&mesh.task_queue.url, &t.id).await;
        assert!(lines.contains(&format!("check: {check}")), "{lines:?}");
        let verdict = if passed { "check passed" } else { "check failed" };
        assert!(lines.iter().any(|l| l.starts_with(verdict)), "{lines:?}");
    }
    let files = git(&bare, &["ls-tree", "-r", "--name-only", &ticket.branch]);
    assert!(!files.contains("check-ran.txt"), "{files}");
    assert!(files.lines().any(|l| l == "src/feature.rs"), "{files}");

    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
    let _ = std::fs::remove_dir_all(bare.parent().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_tasks_push_one_after_the_other_and_their_dependent_builds_on_both() {
    let infra = Infra::new().await.unwrap();
    let options = Options {
        // Long enough that both roots run at once on the two executors.
        executor_env: vec![("OMOI_DEMO_SLEEP_MS".into(), "400".into())],
        ..Default::default()
    };
    let mesh = ProcessMesh::start(&infra, options).await.unwrap();
    let (bare, main) = remote();
    let spec = |title: &str, phase: i32, depends_on: Vec<i32>| pb::TaskSpec {
        title: title.into(),
        phase,
        depends_on,
        ..Default::default()
    };
    let tickets = mesh.tickets();
    let ticket = file_ticket(
        &tickets,
        pb::CreateTicketRequest {
            title: "Two at once".into(),
            repository: format!("file://{}", bare.display()),
            base_ref: "main".into(),
            plan: vec![
                spec("Plan it", 1, vec![]),
                pb::TaskSpec {
                    concurrency_key: "test-runners".into(),
                    ..spec("Test it", 3, vec![])
                },
                spec("Tidy up", 4, vec![0, 1]),
            ],
            ..Default::default()
        },
    )
    .await
    .ticket
    .unwrap();
    let done = wait_ticket(&tickets, &ticket.id, COMPLETED).await;
    let by_title = |title: &str| done.tasks.iter().find(|t| t.title == title).unwrap();
    let (plan, test, tidy) = (by_title("Plan it"), by_title("Test it"), by_title("Tidy up"));
    // A ticket's tasks share its repository's concurrency key unless the
    // plan names another.
    assert_eq!(plan.concurrency_key, format!("file://{}", bare.display()));
    assert_eq!(test.concurrency_key, "test-runners");
    // Both roots started from main; the second to push went on top of the
    // first, never over it.
    assert_eq!(task_git(plan).base_commit, main);
    assert_eq!(task_git(test).base_commit, main);
    let history = git(
        &bare,
        &[
            "rev-list",
            "--parents",
            "--reverse",
            &format!("main..{}", ticket.branch),
        ],
    );
    let chain: Vec<Vec<&str>> = history.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(chain.len(), 3, "{history}");
    assert_eq!(chain[0][1], main, "linear history: {history}");
    assert_eq!(chain[1][1], chain[0][0], "linear history: {history}");
    assert_eq!(chain[2][1], chain[1][0], "linear history: {history}");
    let mut roots = [task_git(plan).commit.as_str(), task_git(test).commit.as_str()];
    roots.sort_by_key(|c| chain.iter().position(|l| l[0] == *c));
    assert_eq!(roots, [chain[0][0], chain[1][0]]);
    // The dependent started from the commit holding both.
    assert_eq!(task_git(tidy).base_commit, chain[1][0]);
    assert_eq!(task_git(tidy).commit, chain[2][0]);
    let files = git(&bare, &["ls-tree", "-r", "--name-only", &ticket.branch]);
    for f in ["PLAN.md", "tests/feature.rs", "NOTES.md"] {
        assert!(files.lines().any(|l| l == f), "{f} missing from {files}");
    }

    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
    let _ = std::fs::remove_dir_all(bare.parent().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_ref_the_repository_lacks_fails_the_task_naming_it() {
    let infra = Infra::new().await.unwrap();
    let mesh = ProcessMesh::start(&infra, Options::default()).await.unwrap();
    let (bare, _) = remote();
    let tickets = mesh.tickets();
    let ticket = file_ticket(
        &tickets,
        pb::CreateTicketRequest {
            title: "Start nowhere".into(),
            repository: bare.display().to_string(),
            base_ref: "no-such-branch".into(),
            ..Default::default()
        },
    )
    .await
    .ticket
    .unwrap();
    let done = wait_ticket(&tickets, &ticket.id, FAILED).await;
    let first = done.tasks.iter().min_by_key(|t| t.phase).unwrap();
    // Permanent: no retry can find it.
    assert_eq!(first.attempt, 1);
    assert!(
        first.error_message.contains("no-such-branch"),
        "{}",
        first.error_message
    );
    assert_eq!(git(&bare, &["for-each-ref", "--format=%(refname)"]), "refs/heads/main");

    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
    let _ = std::fs::remove_dir_all(bare.parent().unwrap());
}

/// Every file under `dir` (`.git` directories included) containing `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)) {
                found.push(p);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_forge_repository_is_reached_with_the_token_and_nothing_else_ever_sees_it() {
    const TOKEN: &str = "ghp_omoiTestTokenThatMustNeverLeak0123";
    let infra = Infra::new().await.unwrap();
    let (bare, main) = remote();
    let root = bare.parent().unwrap().to_path_buf();
    let forge = GitServer::start(root.clone(), "x-access-token", TOKEN).await.unwrap();
    let log = root.join("executor.log");
    // The agent writes its whole environment into the workspace, so that it
    // lands on the branch for the test to read.
    let agent = format!(
        "sh -c 'env > agent-env.txt; exec {}'",
        omoi_tests::process::binary("omoi-demo-agent").display()
    );
    let options = Options {
        executors: 1,
        executor_env: vec![
            ("OMOI_DEMO_SLEEP_MS".into(), "20".into()),
            ("OMOI_RUNNER_COMMAND".into(), agent),
            ("OMOI_GIT_TOKEN".into(), TOKEN.into()),
            // A GitHub-shaped URL reaches the stand-in forge.
            ("GIT_CONFIG_COUNT".into(), "1".into()),
            ("GIT_CONFIG_KEY_0".into(), format!("url.{}/.insteadOf", forge.url)),
            ("GIT_CONFIG_VALUE_0".into(), "https://github.example.com/acme/".into()),
            ("RUST_LOG".into(), "info,omoi_executor=debug".into()),
            (LOG_FILE.into(), log.display().to_string()),
        ],
        ..Default::default()
    };
    let mesh = ProcessMesh::start(&infra, options).await.unwrap();
    let tickets = mesh.tickets();
    let ticket = file_ticket(
        &tickets,
        pb::CreateTicketRequest {
            title: "Private work".into(),
            repository: "https://github.example.com/acme/remote.git".into(),
            ..Default::default()
        },
    )
    .await
    .ticket
    .unwrap();
    let done = wait_ticket(&tickets, &ticket.id, COMPLETED).await;
    let branch = &ticket.branch;
    assert_eq!(git(&bare, &["rev-list", "--count", &format!("{main}..{branch}")]), "4");
    // Anonymous requests were refused; the credential helper's were served.
    assert!(forge.refused() > 0 && forge.authorized() > 0);
    // One clone for the four phases: the executor's mirror of the
    // repository, fetched since.
    assert_eq!(forge.clones(), 1);

    // The agent's environment (on the branch) has no git credentials.
    let agent_env = git(&bare, &["show", &format!("{branch}:agent-env.txt")]);
    assert!(agent_env.contains("OMOI_TASK_ID="), "{agent_env}");
    assert!(
        !agent_env.contains(TOKEN) && !agent_env.contains("OMOI_GIT"),
        "{agent_env}"
    );
    // Nor does anything else the mesh wrote: workspaces (their .git too),
    // the executor's log, the ticket and its tasks, events, agent output.
    assert_eq!(
        files_containing(&mesh.workspace_root, TOKEN.as_bytes()),
        Vec::<PathBuf>::new()
    );
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("run"), "the log was written: {log_text}");
    assert!(!log_text.contains(TOKEN));
    assert!(!format!("{done:?}").contains(TOKEN));
    for stream in [infra.topology.stream.clone(), infra.topology.output_stream()] {
        let messages = payloads(&infra.nats_url, &stream).await.unwrap();
        assert!(!messages.is_empty(), "{stream} has messages");
        assert!(
            !messages
                .iter()
                .any(|m| m.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes())),
            "{stream} carries the token"
        );
    }

    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_ticket_opens_its_pull_request_once_across_a_lost_answer_and_a_restart() {
    const TOKEN: &str = "ghs_pullRequestTokenForTheTicketService";
    let infra = Infra::new().await.unwrap();
    let (bare, _) = remote();
    let root = bare.parent().unwrap().to_path_buf();
    git(&root, &["clone", "--quiet", "--bare", "remote.git", "locked.git"]);
    let github = GitHubApi::start(TOKEN, "https://github.example.com").await.unwrap();
    let options = Options {
        env: vec![
            ("OMOI_GITHUB_API_URL".into(), github.url.clone()),
            ("OMOI_GITHUB_TOKEN".into(), TOKEN.into()),
            ("OMOI_PULL_REQUEST_INTERVAL_SECONDS".into(), "0.2".into()),
        ],
        executor_env: vec![
            ("OMOI_DEMO_SLEEP_MS".into(), "20".into()),
            // GitHub-shaped URLs reach the local bare repositories.
            ("GIT_CONFIG_COUNT".into(), "1".into()),
            (
                "GIT_CONFIG_KEY_0".into(),
                format!("url.file://{}/.insteadOf", root.display()),
            ),
            ("GIT_CONFIG_VALUE_0".into(), "https://github.example.com/acme/".into()),
        ],
        ..Default::default()
    };
    let mut mesh = ProcessMesh::start(&infra, options).await.unwrap();
    let tickets = mesh.tickets();
    let create = |title: &str, repo: &str| pb::CreateTicketRequest {
        title: title.into(),
        description: "Say hello.".into(),
        repository: format!("https://github.example.com/acme/{repo}.git"),
        pull_request: true,
        ..Default::default()
    };
    // The first opening reaches GitHub, but its answer is lost.
    github.lose_next_answer();
    let ticket = file_ticket(&tickets, create("Greet people", "remote"))
        .await
        .ticket
        .unwrap();
    wait_ticket(&tickets, &ticket.id, COMPLETED).await;
    eventually(WAIT, "the first opening", || async {
        (!github.pulls().is_empty()).then_some(())
    })
    .await;
    // The ticket service dies before it could record anything, and comes back.
    mesh.restart_ticket().await.unwrap();
    let tickets = mesh.tickets();
    let done = wait_ticket_where(&tickets, &ticket.id, "the pull request recorded", |t| {
        !t.pull_request_url.is_empty()
    })
    .await;
    let pulls = github.pulls();
    assert_eq!(pulls.len(), 1, "{pulls:?}");
    let pr = &pulls[0];
    assert_eq!(
        (pr.repo.as_str(), pr.head.as_str(), pr.base.as_str(), pr.title.as_str()),
        ("acme/remote", ticket.branch.as_str(), "main", "Greet people")
    );
    assert!(pr.body.contains(&ticket.id), "{}", pr.body);
    assert_eq!(done.pull_request_url, "https://github.example.com/acme/remote/pull/1");
    assert_eq!(done.pull_request_error, "");
    // The branch the pull request names holds the ticket's four commits.
    assert_eq!(
        git(&bare, &["rev-list", "--count", &format!("main..{}", ticket.branch)]),
        "4"
    );

    // A repository that refuses: the refusal is on the ticket, once.
    github.lock("acme/locked");
    let refused = file_ticket(&tickets, create("Locked out", "locked"))
        .await
        .ticket
        .unwrap();
    wait_ticket(&tickets, &refused.id, COMPLETED).await;
    let t = wait_ticket_where(&tickets, &refused.id, "the refusal recorded", |t| {
        !t.pull_request_error.is_empty()
    })
    .await;
    assert!(
        t.pull_request_error.contains("Resource not accessible by integration"),
        "{}",
        t.pull_request_error
    );
    assert_eq!(t.pull_request_url, "");
    let posts = |calls: Vec<String>| {
        calls
            .iter()
            .filter(|c| c.starts_with("POST /repos/acme/locked/pulls"))
            .count()
    };
    let before = posts(github.calls());
    assert_eq!(before, 1);

    // One TICKET_PULL_REQUEST_OPENED, for the first ticket only.
    let events = read_all(&infra.nats_url, &infra.topology.stream, 0, Duration::ZERO)
        .await
        .unwrap();
    let opened: Vec<_> = events
        .iter()
        .filter(|e| e.event_type == "TICKET_PULL_REQUEST_OPENED")
        .collect();
    assert_eq!(opened.len(), 1, "{opened:?}");
    assert_eq!(opened[0].entity_id, ticket.id);
    let payload = omoi_proto::convert::struct_to_json(opened[0].payload.as_ref().unwrap());
    assert_eq!(payload["url"], "https://github.example.com/acme/remote/pull/1");
    assert_eq!(posts(github.calls()), before, "a refusal is not asked again");

    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
    let _ = std::fs::remove_dir_all(&root);
}
