//! Real coding-agent CLIs driven by the executor, against a stand-in model
//! API, on the whole mesh with every service a process: the agent's work in
//! the workspace, its events streamed live, its usage and cost on the task
//! and the ticket, its failures classified from what it reports.

use std::time::Duration;

use futures::StreamExt;
use omoi_proto::common::{AgentEvent, AgentEventKind};
use omoi_proto::taskqueue as tq;
use omoi_proto::ticket::{self as pb};
use omoi_tests::mesh::{Options, ProcessMesh};
use omoi_tests::model_api::{Cli, ModelApi, Tally};
use omoi_tests::process::agent_cli;
use omoi_tests::{Infra, TicketClient, client, file_ticket, wait_ticket};

const WAIT: Duration = Duration::from_secs(90);
const COMPLETED: i32 = 3;
const FAILED: i32 = 4;
const PAUSED: i32 = 6;
const PENDING: i32 = 1;
const RETRYABLE: i32 = 1;
const PERMANENT: i32 = 2;
const SECRET: &str = "sk-ant-test-do-not-leak";

/// An executor running Claude Code against `api`, for `phases`, as `bin`.
fn claude(api: &ModelApi, home: &std::path::Path, phases: &str, bin: &str) -> Vec<(String, String)> {
    let mut env = api.executor_env(Cli::Claude, home, SECRET);
    env.push(("OMOI_AGENT_PHASES".into(), phases.into()));
    env.push(("OMOI_AGENT_BIN".into(), bin.into()));
    env
}

fn spec(title: &str, phase: i32, depends_on: Vec<i32>, max_retries: i32) -> pb::TaskSpec {
    pb::TaskSpec {
        title: title.to_owned(),
        phase,
        depends_on,
        max_retries: Some(max_retries),
        ..Default::default()
    }
}

/// A ticket of one task the stand-in answers by looping (the same failing
/// command every turn), under `guardian`.
fn looping(guardian: pb::GuardianSettings, max_retries: i32) -> pb::CreateTicketRequest {
    pb::CreateTicketRequest {
        title: "outcome=loop".into(),
        plan: vec![spec("outcome=loop", 2, vec![], max_retries)],
        guardian: Some(guardian),
        ..Default::default()
    }
}

/// Runs the `omoi` command line against `mesh`; its output, having
/// succeeded.
fn omoi_cli(mesh: &ProcessMesh, args: &[&str]) -> String {
    let out = std::process::Command::new(omoi_tests::process::binary("omoi"))
        .args(["--ticket-url", &mesh.ticket.url])
        .args(["--task-queue-url", &mesh.task_queue.url])
        .args(args)
        .env_remove("OMOI_AUTH_TOKEN")
        .output()
        .expect("omoi runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn file(c: &TicketClient, title: &str, plan: Vec<pb::TaskSpec>) -> pb::CreateTicketResponse {
    file_ticket(
        c,
        pb::CreateTicketRequest {
            title: title.to_owned(),
            plan,
            ..Default::default()
        },
    )
    .await
}

/// What one run of the stand-in's `write` script reports: turns 1 to 3.
fn one_run() -> Tally {
    let mut t = Tally::default();
    for turn in 1..=3 {
        t.answers += 1;
        t.input_tokens += 100 + 10 * turn;
        t.output_tokens += 30 + turn;
        t.cache_read_tokens += 20;
        t.cache_write_tokens += 10;
    }
    t
}

fn assert_usage(usage: &omoi_proto::common::Usage, tally: &Tally, turns: i32) {
    assert_eq!(
        (
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_read_tokens,
            usage.cache_write_tokens
        ),
        (
            tally.input_tokens,
            tally.output_tokens,
            tally.cache_read_tokens,
            tally.cache_write_tokens
        )
    );
    // Claude Code's own total_cost_usd, carried through.
    assert!(
        (usage.cost_usd - tally.sonnet_4_5_cost()).abs() < 1e-9,
        "{} vs {}",
        usage.cost_usd,
        tally.sonnet_4_5_cost()
    );
    assert!(!usage.cost_estimated);
    assert_eq!(usage.model, "claude-sonnet-4-5");
    assert_eq!(usage.turns, turns);
}

/// A usage whose tokens are the stand-in's and whose cost came from the
/// price table for `model`.
fn assert_estimated(usage: &omoi_proto::common::Usage, tally: &Tally, cost: f64, model: &str) {
    assert_eq!(
        (usage.input_tokens, usage.cache_read_tokens, usage.output_tokens),
        (tally.input_tokens, tally.cache_read_tokens, tally.output_tokens)
    );
    assert!((usage.cost_usd - cost).abs() < 1e-9, "{usage:?}");
    assert!(usage.cost_estimated);
    assert_eq!(usage.model, model);
}

fn kinds(events: &[AgentEvent]) -> Vec<AgentEventKind> {
    events
        .iter()
        .map(AgentEvent::kind)
        .filter(|k| *k != AgentEventKind::Output)
        .collect()
}

/// A mesh of processes with no executor yet, a stand-in model API and a
/// home directory for the agents.
struct Rig {
    infra: Infra,
    api: ModelApi,
    home: std::path::PathBuf,
    mesh: ProcessMesh,
    tickets: TicketClient,
}

impl Rig {
    async fn start() -> Rig {
        let infra = Infra::new().await.unwrap();
        let api = ModelApi::start().await.unwrap();
        let home = tempdir("agent-home");
        let mesh = ProcessMesh::start(
            &infra,
            Options {
                executors: 0,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let tickets = mesh.tickets();
        Rig {
            infra,
            api,
            home,
            mesh,
            tickets,
        }
    }

    /// A mesh with one Claude Code executor.
    async fn with_claude() -> Rig {
        let mut rig = Rig::start().await;
        rig.executor(&rig.api.executor_env(Cli::Claude, &rig.home, SECRET))
            .await;
        rig
    }

    async fn executor(&mut self, env: &[(String, String)]) {
        self.mesh.add_executor(&self.infra, env).await.unwrap();
    }

    /// A one-task ticket of the `write` script, completed: the ticket, the
    /// task's result, and its agent events once it ended. The agent's answer
    /// is the summary and its file, saying `hello`, is in the workspace.
    async fn write_hello(&self, hello: &str) -> (pb::GetTicketResponse, serde_json::Value, Vec<AgentEvent>) {
        let created = file(&self.tickets, "hello", vec![spec("write hello.txt", 1, vec![], 0)]).await;
        let done = wait_ticket(&self.tickets, &created.ticket.unwrap().id, COMPLETED).await;
        let task = &done.tasks[0];
        let result = omoi_proto::convert::struct_to_json(task.result.as_ref().unwrap());
        assert_eq!(result["summary"], "Done: wrote hello.txt");
        let ws = std::path::Path::new(result["workspace"].as_str().unwrap());
        assert_eq!(std::fs::read_to_string(ws.join("hello.txt")).unwrap(), hello);
        let events = client(&self.mesh.task_queue.url)
            .stream_task_output(tq::StreamTaskOutputRequest {
                task_id: task.id.clone(),
                follow: false,
            })
            .await
            .unwrap()
            .into_inner()
            .map(|m| m.unwrap().event.unwrap())
            .collect()
            .await;
        (done, result, events)
    }

    /// A refused key fails for good, at once, saying which agent refused.
    async fn refused(&self, agent: &str) {
        let task = self.failed("outcome=unauthorized", 1, 2).await;
        assert_eq!(
            (task.attempt, task.error_class),
            (1, PERMANENT),
            "{}",
            task.error_message
        );
        assert!(
            task.error_message.starts_with(&format!("{agent}: ")),
            "{}",
            task.error_message
        );
    }

    /// The task of a one-task ticket of `phase` that failed for good.
    async fn failed(&self, title: &str, phase: i32, max_retries: i32) -> tq::Task {
        let t = file(&self.tickets, title, vec![spec(title, phase, vec![], max_retries)]).await;
        let failed = wait_ticket(&self.tickets, &t.ticket.unwrap().id, FAILED).await;
        let task = failed.tasks[0].clone();
        assert!(!format!("{task:?}").contains(SECRET));
        task
    }

    async fn stop(self) {
        self.mesh.stop().await.unwrap();
        self.infra.cleanup().await.unwrap();
        let _ = std::fs::remove_dir_all(self.home);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_works_a_ticket_streaming_its_events_and_cost() {
    let mut rig = Rig::start().await;
    let bin = agent_cli("claude").display().to_string();
    rig.executor(&claude(&rig.api, &rig.home, "", &bin)).await;
    let (api, tickets) = (&rig.api, &rig.tickets);
    let queue = client(&rig.mesh.task_queue.url);

    // The first run's second turn waits, so that we join it in the middle.
    api.hold(2);
    let created = file(
        tickets,
        "hello, claude",
        vec![spec("write hello.txt", 1, vec![], 0), spec("check it", 2, vec![0], 0)],
    )
    .await;
    let first = created.tasks[0].id.clone();
    tokio::time::timeout(WAIT, api.held()).await.expect("turn 2 asked for");
    let mut follow = queue
        .clone()
        .stream_task_output(tq::StreamTaskOutputRequest {
            task_id: first.clone(),
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    api.release();
    let mut events = Vec::new();
    let collected = tokio::time::timeout(WAIT, async {
        while let Some(m) = follow.next().await {
            events.push(m.unwrap().event.unwrap());
        }
    })
    .await;
    assert!(collected.is_ok(), "the stream ends once the task is done: {events:?}");
    let done = wait_ticket(tickets, &created.ticket.unwrap().id, COMPLETED).await;

    // History, then the live events, then the end: every event, in order.
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (0..events.len() as i64).collect::<Vec<_>>());
    use AgentEventKind::*;
    // What it spent so far, told (and priced from the table) as each model
    // message began, then Claude Code's own account.
    let told: Vec<(i32, bool)> = events
        .iter()
        .filter_map(|e| e.usage.as_ref())
        .map(|u| (u.turns, u.cost_usd > 0.0))
        .collect();
    assert_eq!(told, [(1, true), (2, true), (3, true), (3, true)]);
    let account = events.iter().rposition(|e| e.kind() == Usage).unwrap();
    let events: Vec<AgentEvent> = events
        .into_iter()
        .enumerate()
        .filter(|(i, e)| e.kind() != Usage || *i == account)
        .map(|(_, e)| e)
        .collect();
    assert_eq!(
        kinds(&events),
        [
            Message, ToolCall, ToolResult, FileChange, ToolCall, ToolResult, Command, Message, Usage, Result
        ]
    );
    let agent: Vec<&AgentEvent> = events.iter().filter(|e| e.kind() != Output).collect();
    assert_eq!((agent[1].tool.as_str(), agent[1].path.as_str()), ("Write", "hello.txt"));
    assert_eq!(
        (agent[3].path.as_str(), agent[3].text.as_str()),
        ("hello.txt", "created")
    );
    assert_eq!(agent[6].text, "cat hello.txt");
    assert_eq!(agent[5].text.trim(), "hello from claude");
    assert_eq!(agent[9].text, "Done: wrote hello.txt");
    assert!(events.iter().all(|e| e.task_id == first && e.attempt == 1));

    // The agent's file is in its workspace; its answer is the summary.
    let task = done.tasks.iter().find(|t| t.id == first).unwrap();
    let result = omoi_proto::convert::struct_to_json(task.result.as_ref().unwrap());
    assert_eq!(result["summary"], "Done: wrote hello.txt");
    assert_eq!(result["changed_files"], serde_json::json!(["hello.txt"]));
    let ws = std::path::Path::new(result["workspace"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(ws.join("hello.txt")).unwrap(),
        "hello from claude\n"
    );
    assert_eq!(api.directories().len(), 2, "one run per task");

    // Each task's usage is its run's; the ticket's is the sum.
    let run = one_run();
    for t in &done.tasks {
        assert_usage(t.usage.as_ref().expect("usage on the task"), &run, 3);
    }
    let ticket = done.ticket.as_ref().unwrap();
    assert_eq!(api.tally().answers, 6);
    assert_usage(ticket.usage.as_ref().expect("usage on the ticket"), &api.tally(), 6);

    // The key reached the agent, and nothing else.
    let everything = format!("{events:?}{done:?}");
    assert!(!everything.contains(SECRET));
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_failures_are_classified_from_what_it_reports() {
    let mut rig = Rig::start().await;
    let bin = agent_cli("claude").display().to_string();
    rig.executor(&claude(&rig.api, &rig.home, "INITIAL", &bin)).await;
    rig.executor(&claude(&rig.api, &rig.home, "REFACTORING", "/nonexistent/bin/claude"))
        .await;

    // Refused credentials: permanent, at once.
    rig.refused("claude").await;

    // A rate limit: retryable, so retried until the retries run out.
    let task = rig.failed("outcome=rate_limited", 1, 1).await;
    assert_eq!(
        (task.attempt, task.retry_count, task.error_class),
        (2, 1, RETRYABLE),
        "{}",
        task.error_message
    );
    assert!(task.error_message.contains("429"), "{}", task.error_message);

    // A CLI that is not there: permanent, naming the binary and the setting.
    let task = rig.failed("anything", 4, 3).await;
    assert_eq!(
        (task.attempt, task.error_class),
        (1, PERMANENT),
        "{}",
        task.error_message
    );
    assert!(
        task.error_message.contains("/nonexistent/bin/claude") && task.error_message.contains("OMOI_AGENT_BIN"),
        "{}",
        task.error_message
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_works_a_ticket_with_an_estimated_cost_and_classified_failures() {
    let mut rig = Rig::start().await;
    rig.executor(&rig.api.executor_env(Cli::Codex, &rig.home, SECRET)).await;
    let (done, _, events) = rig.write_hello("hello from codex\n").await;
    use AgentEventKind::*;
    let seen: Vec<AgentEventKind> = kinds(&events).into_iter().filter(|k| *k != Error).collect();
    assert_eq!(
        seen,
        [
            ToolCall, ToolResult, Command, ToolCall, ToolResult, Command, Message, Usage
        ]
    );
    let commands: Vec<&AgentEvent> = events.iter().filter(|e| e.kind() == Command).collect();
    assert!(commands[1].text.contains("cat hello.txt"), "{}", commands[1].text);
    assert_eq!(commands[1].exit_code, Some(0));
    // Tokens as the stand-in reported them; the cost from the price table.
    let usage = done.tasks[0].usage.as_ref().expect("usage on the task");
    let tally = rig.api.tally();
    assert_eq!(tally.answers, 3);
    assert_estimated(usage, &tally, tally.gpt_5_codex_cost(), "gpt-5-codex");
    assert_eq!(done.ticket.as_ref().unwrap().usage.as_ref(), Some(usage));
    assert!(!format!("{done:?}{events:?}").contains(SECRET));

    // Refused credentials fail for good; a rate limit is retried.
    rig.refused("codex").await;
    let task = rig.failed("outcome=rate_limited", 1, 1).await;
    assert_eq!(
        (task.attempt, task.error_class),
        (2, RETRYABLE),
        "{}",
        task.error_message
    );
    rig.stop().await;
}

/// Best-of-N: three candidates on two runners (Claude Code, Codex, Claude
/// Code) from the same base, judged by the ticket's check, which only
/// Codex's work passes: it lands on the branch, the others' commits never
/// reach the remote, every candidate's evidence is listed on the choosing
/// task and in the events, and all of them count on the ticket's cost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_candidates_on_two_runners_and_the_one_passing_the_check_lands() {
    let mut rig = Rig::with_claude().await;
    rig.executor(&rig.api.executor_env(Cli::Codex, &rig.home, SECRET)).await;
    let (bare, main) = omoi_tests::repo::remote();
    let runner = |r: &str| pb::LabelSet {
        labels: [("runner".to_string(), r.to_string())].into(),
    };
    let step = pb::TaskSpec {
        candidates: Some(pb::Candidates {
            count: 3,
            requires: vec![runner("claude-code"), runner("codex"), runner("claude-code")],
            ..Default::default()
        }),
        ..spec("write hello.txt", 2, vec![], 0)
    };
    let created = file_ticket(
        &rig.tickets,
        pb::CreateTicketRequest {
            title: "best of three".into(),
            repository: bare.display().to_string(),
            check_command: "grep -q codex hello.txt".into(),
            plan: vec![step],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        created.tasks.len(),
        4,
        "three candidates and the step choosing among them"
    );
    let ticket = created.ticket.unwrap();
    let done = wait_ticket(&rig.tickets, &ticket.id, COMPLETED).await;
    let chooser = done.tasks.iter().find(|t| t.candidate_of.is_empty()).unwrap();
    assert_eq!(chooser.title, "write hello.txt");
    let mut candidates: Vec<&tq::Task> = done.tasks.iter().filter(|t| t.candidate_of == chooser.id).collect();
    candidates.sort_by_key(|t| t.candidate);
    assert_eq!(candidates.len(), 3);

    // The choice: only Codex's work passed the check.
    let seen = &chooser.candidates;
    assert_eq!(seen.len(), 3, "{chooser:?}");
    let runners: Vec<&str> = seen.iter().map(|c| c.runner.as_str()).collect();
    assert_eq!(runners, ["claude-code", "codex", "claude-code"]);
    let chosen: Vec<i32> = seen.iter().filter(|c| c.chosen).map(|c| c.index).collect();
    assert_eq!(chosen, [2]);
    for c in seen {
        assert_eq!(c.check_passed, c.index == 2, "{c:?}");
        assert!(!c.commit.is_empty() && c.insertions == 1, "{c:?}");
        assert!(c.usage.as_ref().is_some_and(|u| u.input_tokens > 0), "{c:?}");
        if c.index != 2 {
            assert_eq!(c.reason, "its check failed");
        }
    }
    assert!(
        seen[1].reason.starts_with("chosen: the smallest change"),
        "{}",
        seen[1].reason
    );

    // Codex's commit is the branch's one commit; the others never left
    // their executors.
    let branch = &ticket.branch;
    let commits = omoi_tests::repo::git(&bare, &["rev-list", &format!("{main}..{branch}")]);
    assert_eq!(commits.lines().count(), 1, "{commits}");
    let landed = chooser.git.as_ref().expect("the chosen work landed");
    assert_eq!(commits.trim(), landed.commit);
    assert_eq!(landed.base_commit, main);
    assert_eq!(
        omoi_tests::repo::git(&bare, &["show", &format!("{branch}:hello.txt")]),
        "hello from codex"
    );
    assert_eq!(done.ticket.as_ref().unwrap().head_commit, landed.commit);
    for c in [&seen[0], &seen[2]] {
        let probe = std::process::Command::new("git")
            .args(["-C", &bare.display().to_string(), "cat-file", "-e", &c.commit])
            .status()
            .unwrap();
        assert!(!probe.success(), "candidate {}'s commit reached the remote", c.index);
    }
    // The step's task takes up the chosen conversation: a follow-up of it
    // resumes Codex's session.
    let winner = candidates[1].session.as_ref().expect("the candidate's session");
    let taken = chooser.session.as_ref().expect("the chosen session, taken up");
    assert_eq!(
        (taken.runner.as_str(), &taken.session_id),
        ("codex", &winner.session_id)
    );
    assert_eq!(taken.checkpoint, winner.checkpoint);
    for t in &candidates {
        assert!(t.git.is_none(), "a candidate pushes nothing");
        assert_eq!(t.status, omoi_proto::common::TaskStatus::Completed as i32);
    }

    // The events say how each ended and what was chosen, and why.
    let history = omoi_tests::ticket_history(&rig.tickets, &ticket.id).await;
    let of = |ty: &str| -> Vec<serde_json::Value> {
        history
            .iter()
            .filter(|e| e.event_type == ty)
            .map(|e| omoi_proto::convert::struct_to_json(e.payload.as_ref().unwrap()))
            .collect()
    };
    let finished = of("TASK_CANDIDATE_FINISHED");
    assert_eq!(finished.len(), 3, "{finished:?}");
    assert!(
        finished
            .iter()
            .all(|f| f["outcome"] == "completed" && f["candidate_of"] == chooser.id.as_str())
    );
    assert_eq!(finished.iter().filter(|f| f["check_passed"] == true).count(), 1);
    let picked = of("TASK_CANDIDATE_CHOSEN");
    assert_eq!(picked.len(), 1, "{picked:?}");
    assert_eq!(picked[0]["chosen"], 2);
    assert_eq!(picked[0]["commit"], landed.commit.as_str());
    assert!(
        picked[0]["reason"].as_str().unwrap().starts_with("chosen:"),
        "{}",
        picked[0]
    );
    assert_eq!(picked[0]["candidates"].as_array().unwrap().len(), 3);

    // Every candidate's spending is the ticket's.
    let spent: f64 = candidates.iter().map(|t| t.usage.as_ref().unwrap().cost_usd).sum();
    let ticket_cost = done.ticket.as_ref().unwrap().usage.as_ref().unwrap().cost_usd;
    assert!((ticket_cost - spent).abs() < 1e-9, "{ticket_cost} vs {spent}");
    assert!(!format!("{done:?}{history:?}").contains(SECRET));

    // A person prefers candidate 1 (its check failed, but it is theirs to
    // say): it lands in place of Codex's, with their reason.
    let choose = |candidate: i32, task_id: &str| {
        let mut c = rig.tickets.clone();
        let task_id = task_id.to_owned();
        async move {
            c.choose_candidate(pb::ChooseCandidateRequest {
                task_id,
                candidate,
                comment: "prefer claude's greeting".into(),
            })
            .await
        }
    };
    for (candidate, task_id, code, says) in [
        (0, chooser.id.as_str(), tonic::Code::InvalidArgument, "candidate"),
        (9, chooser.id.as_str(), tonic::Code::InvalidArgument, "candidate"),
        (
            4,
            chooser.id.as_str(),
            tonic::Code::FailedPrecondition,
            "candidates 1 to 3",
        ),
        (
            2,
            chooser.id.as_str(),
            tonic::Code::FailedPrecondition,
            "is the one on the branch",
        ),
        (
            1,
            candidates[0].id.as_str(),
            tonic::Code::FailedPrecondition,
            "chooses among no candidates",
        ),
        (1, "not-a-task", tonic::Code::InvalidArgument, "task_id"),
    ] {
        let refused = choose(candidate, task_id).await.unwrap_err();
        assert_eq!(refused.code(), code, "{candidate} {task_id}: {}", refused.message());
        assert!(refused.message().contains(says), "{}", refused.message());
    }
    let aside = rig
        .tickets
        .clone()
        .follow_up(pb::FollowUpRequest {
            ticket_id: ticket.id.clone(),
            message: "more".into(),
            task_id: candidates[0].id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(aside.code(), tonic::Code::FailedPrecondition, "{}", aside.message());
    assert!(aside.message().contains("ChooseCandidate"), "{}", aside.message());

    let chose = choose(1, &chooser.id).await.unwrap().into_inner();
    let choice_id = chose.task.as_ref().unwrap().id.clone();
    assert!(chose.task.as_ref().unwrap().lands_candidate);
    assert_eq!(
        chose.task.as_ref().unwrap().title,
        "Choose candidate 1: write hello.txt"
    );
    let done = wait_ticket(&rig.tickets, &ticket.id, COMPLETED).await;
    let choice = done.tasks.iter().find(|t| t.id == choice_id).unwrap();
    assert_eq!(
        omoi_tests::repo::git(&bare, &["show", &format!("{branch}:hello.txt")]),
        "hello from claude"
    );
    let commits = omoi_tests::repo::git(&bare, &["rev-list", &format!("{main}..{branch}")]);
    assert_eq!(commits.lines().count(), 2, "one more commit: {commits}");
    let swapped = choice.git.as_ref().expect("the choice landed");
    assert_eq!(commits.lines().next(), Some(swapped.commit.as_str()));
    assert_eq!(swapped.base_commit, landed.commit);
    let reasons: Vec<(bool, &str)> = choice
        .candidates
        .iter()
        .map(|c| (c.chosen, c.reason.as_str()))
        .collect();
    assert_eq!(reasons[1], (false, "replaced by candidate 1"), "{reasons:?}");
    assert_eq!(reasons[2], (false, "its check failed"), "{reasons:?}");
    assert!(reasons[0].0 && reasons[0].1.starts_with("chosen by "), "{reasons:?}");
    assert!(
        reasons[0]
            .1
            .ends_with(" in place of candidate 2: prefer claude's greeting"),
        "{reasons:?}"
    );
    // Later follow-ups resume the chosen candidate's conversation.
    let taken = choice.session.as_ref().expect("the chosen session, taken up");
    let first = candidates[0].session.as_ref().unwrap();
    assert_eq!(
        (taken.runner.as_str(), &taken.session_id),
        ("claude-code", &first.session_id)
    );
    let history = omoi_tests::ticket_history(&rig.tickets, &ticket.id).await;
    let picked: Vec<serde_json::Value> = history
        .iter()
        .filter(|e| e.event_type == "TASK_CANDIDATE_CHOSEN")
        .map(|e| omoi_proto::convert::struct_to_json(e.payload.as_ref().unwrap()))
        .collect();
    assert_eq!(picked.len(), 2, "{picked:?}");
    assert_eq!(
        (picked[1]["chosen"].as_i64(), picked[1]["commit"].as_str()),
        (Some(1), Some(swapped.commit.as_str()))
    );
    assert_eq!(picked[1]["reason"], reasons[0].1);
    assert!(history.iter().any(|e| e.event_type == "TICKET_REOPENED"));

    // Candidate 3 wrote what candidate 1 did: chosen, with nothing to
    // commit.
    choose(3, &chooser.id).await.unwrap();
    let done = wait_ticket(&rig.tickets, &ticket.id, COMPLETED).await;
    let third = done.tasks.iter().rfind(|t| t.lands_candidate).unwrap();
    assert!(third.candidates[2].chosen, "{:?}", third.candidates);
    assert_eq!(third.git.as_ref().unwrap().commit, swapped.commit, "the branch stays");
    assert_eq!(omoi_tests::repo::git(&bare, &["rev-parse", branch]), swapped.commit);

    // A budget that cannot cover three more candidates at what a run cost
    // here is refused up front, with the estimate; one that can is taken.
    let per_run = ticket_cost / 3.0;
    let again = |budget: f64| pb::CreateTicketRequest {
        title: "best of three again".into(),
        repository: bare.display().to_string(),
        max_cost_usd: Some(budget),
        plan: vec![pb::TaskSpec {
            candidates: Some(pb::Candidates {
                count: 3,
                ..Default::default()
            }),
            ..spec("write hello.txt", 2, vec![], 0)
        }],
        ..Default::default()
    };
    let refused = rig.tickets.clone().create_ticket(again(per_run)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let says = refused.message();
    assert!(
        says.contains("max_cost_usd") && says.contains("its 3 agent runs (3 candidates)"),
        "{says}"
    );
    assert!(says.contains(&format!("at ${per_run:.4} a run")), "{says}");
    let taken = rig
        .tickets
        .clone()
        .create_ticket(again(per_run * 3.5))
        .await
        .unwrap()
        .into_inner();
    rig.tickets
        .clone()
        .cancel_ticket(pb::CancelTicketRequest {
            ticket_id: taken.ticket.unwrap().id,
            reason: "only its budget was in question".into(),
        })
        .await
        .unwrap();
    rig.stop().await;
    let _ = std::fs::remove_dir_all(bare.parent().unwrap());
}

/// Best-of-N with a judge: three candidates all pass the check; the judge
/// (Claude Code, shown each one's diff, check output and cost) picks one —
/// not the one the smallest-change rule would have (Codex's, the cheapest) —
/// and its pick lands with its reasons; what the judge spent counts too. A
/// judge no registered agent can be is refused up front.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_judges_pick_among_passing_candidates_lands_with_its_reasons() {
    let mut rig = Rig::with_claude().await;
    rig.executor(&rig.api.executor_env(Cli::Codex, &rig.home, SECRET)).await;
    let (bare, _) = omoi_tests::repo::remote();
    let labels =
        |r: &str| -> std::collections::HashMap<String, String> { [("runner".to_string(), r.to_string())].into() };
    let ticket = |judge: &str| pb::CreateTicketRequest {
        title: "best of three, judged".into(),
        repository: bare.display().to_string(),
        check_command: "test -f hello.txt".into(),
        plan: vec![pb::TaskSpec {
            candidates: Some(pb::Candidates {
                count: 3,
                requires: ["claude-code", "codex", "claude-code"]
                    .iter()
                    .map(|r| pb::LabelSet { labels: labels(r) })
                    .collect(),
                judge: labels(judge),
            }),
            ..spec("write hello.txt", 2, vec![], 0)
        }],
        ..Default::default()
    };
    let refused = rig.tickets.clone().create_ticket(ticket("gemini")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("plan[0].candidates.judge"),
        "{}",
        refused.message()
    );

    let created = file_ticket(&rig.tickets, ticket("claude-code")).await;
    let id = created.ticket.as_ref().unwrap().id.clone();
    let done = wait_ticket(&rig.tickets, &id, COMPLETED).await;
    let chooser = done.tasks.iter().find(|t| t.candidate_of.is_empty()).unwrap();
    assert_eq!(
        chooser.requires,
        labels("claude-code"),
        "the choosing task runs the judge"
    );
    let seen = &chooser.candidates;
    assert!(seen.iter().all(|c| c.check_passed), "{seen:?}");
    let chosen: Vec<i32> = seen.iter().filter(|c| c.chosen).map(|c| c.index).collect();
    assert_eq!(chosen, [3], "{seen:?}");
    assert_eq!(seen[2].reason, "chosen by the judge: candidate 3 is the most thorough");
    assert_eq!(seen[1].reason, "not chosen by the judge (it chose candidate 3)");
    let landed = chooser.git.as_ref().unwrap();
    assert_eq!(
        landed.commit, seen[2].commit,
        "its commit landed as it was (the branch had not moved)"
    );
    assert_eq!(
        omoi_tests::repo::git(&bare, &["show", &format!("{}:hello.txt", landed.branch)]),
        "hello from claude"
    );
    let history = omoi_tests::ticket_history(&rig.tickets, &id).await;
    let picked: Vec<serde_json::Value> = history
        .iter()
        .filter(|e| e.event_type == "TASK_CANDIDATE_CHOSEN")
        .map(|e| omoi_proto::convert::struct_to_json(e.payload.as_ref().unwrap()))
        .collect();
    assert_eq!(picked.len(), 1);
    assert_eq!(picked[0]["chosen"], 3);
    assert_eq!(
        picked[0]["reason"],
        "chosen by the judge: candidate 3 is the most thorough"
    );
    // The judge's spending is the choosing task's, and the ticket's.
    let judged = chooser.usage.as_ref().expect("the judge's usage").cost_usd;
    assert!(judged > 0.0);
    let spent: f64 = done
        .tasks
        .iter()
        .map(|t| t.usage.as_ref().map_or(0.0, |u| u.cost_usd))
        .sum();
    let ticket_cost = done.ticket.as_ref().unwrap().usage.as_ref().unwrap().cost_usd;
    assert!((ticket_cost - spent).abs() < 1e-9, "{ticket_cost} vs {spent}");
    rig.stop().await;
    let _ = std::fs::remove_dir_all(bare.parent().unwrap());
}

/// The guardian on a looping agent: Claude Code against a stand-in that
/// runs the same failing command every turn. After three repeats the
/// guardian nudges (the agent's session resumed with guidance, which the
/// stand-in is sent), then stops the attempt as a retryable failure with
/// the evidence, which the retry's prompt carries; every intervention is a
/// TASK_GUARDIAN_INTERVENED naming its events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guardian_nudges_a_looping_agent_then_stops_it_with_the_evidence() {
    let mut rig = Rig::start().await;
    let mut env = rig.api.executor_env(Cli::Claude, &rig.home, SECRET);
    env.push(("OMOI_GUARDIAN_REPEAT_THRESHOLD".to_owned(), "3".to_owned()));
    rig.executor(&env).await;
    // The ticket's own threshold over the deployment's two nudges; out of
    // range ones are refused by name.
    let ticket = |guardian: pb::GuardianSettings| looping(guardian, 1);
    for (bad, field) in [
        (
            pb::GuardianSettings {
                repeat: Some(1),
                ..Default::default()
            },
            "guardian.repeat",
        ),
        (
            pb::GuardianSettings {
                nudges: Some(-1),
                ..Default::default()
            },
            "guardian.nudges",
        ),
        (
            pb::GuardianSettings {
                budget_share: Some(2.0),
                ..Default::default()
            },
            "guardian.budget_share",
        ),
    ] {
        let refused = rig.tickets.clone().create_ticket(ticket(bad)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().contains(field), "{}", refused.message());
    }
    let created = file_ticket(
        &rig.tickets,
        ticket(pb::GuardianSettings {
            nudges: Some(1),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(
        created.ticket.as_ref().unwrap().guardian.as_ref().unwrap().nudges,
        Some(1)
    );
    let failed = wait_ticket(&rig.tickets, &created.ticket.unwrap().id, FAILED).await;
    let task = failed.tasks[0].clone();
    assert_eq!(task.attempt, 2, "{}", task.error_message);
    assert!(task.error_message.contains("guardian: stop"), "{}", task.error_message);

    let stepped = omoi_tests::interventions(&rig.tickets, &task.ticket_id).await;
    let actions: Vec<(i64, &str)> = stepped
        .iter()
        .map(|e| (e["attempt"].as_i64().unwrap(), e["action"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions,
        [(1, "nudge"), (1, "stop"), (2, "nudge"), (2, "stop")],
        "{stepped:?}"
    );
    for e in &stepped {
        let evidence = e["evidence"].as_array().unwrap();
        assert_eq!(evidence.len(), 3, "{e}");
        assert!(e["reason"].as_str().unwrap().contains("3 times"), "{e}");
    }
    // The output names each intervention with the events that show it.
    let output = omoi_tests::task_output(&rig.mesh.task_queue.url, &task.id).await;
    assert_eq!(output.iter().filter(|l| l.starts_with("guardian: nudge")).count(), 2);
    // The nudge reached the agent's resumed session; the stop's evidence
    // reached the retry's prompt.
    let asked = rig
        .api
        .conversations()
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>();
    assert!(
        asked.iter().any(|c| c.contains("guardian interrupted you")),
        "no nudge reached the model"
    );
    assert!(
        asked.iter().any(|c| c.contains("guardian: stop")),
        "the retry was not told why"
    );
    rig.stop().await;
}

/// A stall: the agent keeps working (the same command, turn after turn:
/// no file written, no new command) past the ticket's `stall_seconds`; with
/// no nudges allowed the attempt is stopped, the stall as its evidence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_agent_is_stopped_at_the_tickets_stall_limit() {
    let rig = Rig::with_claude().await;
    let created = file_ticket(
        &rig.tickets,
        looping(
            pb::GuardianSettings {
                repeat: Some(1000),
                stall_seconds: Some(2),
                nudges: Some(0),
                ..Default::default()
            },
            0,
        ),
    )
    .await;
    let failed = wait_ticket(&rig.tickets, &created.ticket.unwrap().id, FAILED).await;
    let task = &failed.tasks[0];
    assert!(task.error_message.contains("guardian: stop"), "{}", task.error_message);
    assert!(
        task.error_message.contains("without writing a file"),
        "{}",
        task.error_message
    );
    let signals: Vec<String> = omoi_tests::interventions(&rig.tickets, &task.ticket_id)
        .await
        .iter()
        .map(|e| e["signal"].to_string())
        .collect();
    assert_eq!(signals, ["\"stall\""]);
    rig.stop().await;
}

/// A spend limit: Claude Code's usage is told as it runs (each message as
/// it begins, priced from the table), so the guardian sees a looping
/// attempt eat into the ticket's budget and, at a fifth of it, pauses the
/// ticket for a person — PAUSED with the reason, its retry held — long
/// before the budget is gone. A person sends it on with other thresholds;
/// the retry starts afresh and is stopped as a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spend_limit_pauses_the_ticket_for_a_person_before_the_budget_is_gone() {
    let rig = Rig::with_claude().await;
    let budget = 0.01;
    let created = file_ticket(
        &rig.tickets,
        pb::CreateTicketRequest {
            max_cost_usd: Some(budget),
            ..looping(
                pb::GuardianSettings {
                    repeat: Some(1000),
                    budget_share: Some(0.2),
                    ..Default::default()
                },
                1,
            )
        },
    )
    .await;
    let ticket_id = created.ticket.unwrap().id;
    let paused = wait_ticket(&rig.tickets, &ticket_id, PAUSED).await;
    let t = paused.ticket.as_ref().unwrap();
    assert!(
        t.paused_reason.starts_with("the guardian paused it: $") && t.paused_reason.contains("of the ticket's"),
        "{}",
        t.paused_reason
    );
    // Its retry waits for the person; the attempt's spending, priced as it
    // ran, is on the ticket: past the fifth, far from the budget.
    let (held, spent) = omoi_tests::eventually(WAIT, "the retry held, the attempt's usage on the ticket", || {
        let tickets = rig.tickets.clone();
        let id = ticket_id.clone();
        async move {
            let read = omoi_tests::read_ticket(&tickets, &id).await.ok()?;
            let task = read.tasks.first().filter(|t| t.status == PENDING)?.clone();
            Some((task, read.ticket?.usage.filter(|u| u.cost_usd > 0.0)?))
        }
    })
    .await;
    assert_eq!(held.attempt, 1);
    assert!(held.error_message.contains("guardian: pause"), "{}", held.error_message);
    assert!(
        spent.cost_usd >= 0.2 * budget && spent.cost_usd < 0.5 * budget,
        "{spent:?}"
    );
    assert!(
        spent.cost_estimated,
        "priced from the table: the run was stopped before its account"
    );
    eprintln!("paused at ${:.5} of the ticket's ${budget}: {spent:?}", spent.cost_usd);
    // The person's inbox says why; they send it on with thresholds of
    // their own.
    let omoi = |args: &[&str]| omoi_cli(&rig.mesh, args);
    let inbox = omoi(&["inbox"]);
    assert!(
        inbox.contains(&ticket_id) && inbox.contains("paused: the guardian paused it"),
        "{inbox}"
    );
    let mut update = vec!["update", ticket_id.as_str()];
    for t in ["repeat=3", "nudges=0", "budget_share=0"] {
        update.extend(["--guardian", t]);
    }
    omoi(&update);
    let failed = wait_ticket(&rig.tickets, &ticket_id, FAILED).await;
    let task = &failed.tasks[0];
    assert_eq!(task.attempt, 2, "{}", task.error_message);
    let history = omoi_tests::ticket_history(&rig.tickets, &ticket_id).await;
    let stepped: Vec<(i64, String, String)> = omoi_tests::interventions(&rig.tickets, &ticket_id)
        .await
        .into_iter()
        .map(|e| {
            (
                e["attempt"].as_i64().unwrap(),
                e["signal"].as_str().unwrap().to_owned(),
                e["action"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        stepped[0],
        (1, "budget_share".to_owned(), "pause".to_owned()),
        "{stepped:?}"
    );
    assert_eq!(stepped.len(), 2, "{stepped:?}");
    assert_eq!((stepped[1].0, stepped[1].2.as_str()), (2, "stop"), "{stepped:?}");
    let paused_events = history.iter().filter(|e| e.event_type == "TICKET_PAUSED").count();
    assert_eq!(paused_events, 1);
    rig.stop().await;
}

/// The defaults, measured: each real CLI's steady run (Claude Code, Codex,
/// Gemini CLI writing a file) and an unguarded Claude Code loop are
/// replayed with `omoi guardian-replay` (by task from the queue, and from
/// a file `omoi logs --output json` exported); at the defaults no steady
/// run trips, and the loop would have been stopped, most of its tokens
/// saved. The sweep of the repeat threshold is printed for the docs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guardians_defaults_replayed_over_steady_runs_and_a_loop() {
    let mut rig = Rig::start().await;
    for cli in [Cli::Claude, Cli::Codex, Cli::Gemini] {
        rig.executor(&rig.api.executor_env(cli, &rig.home, SECRET)).await;
    }
    let on = |runner: &str, title: &str, timeout: i32| pb::TaskSpec {
        title: title.to_owned(),
        phase: 2,
        max_retries: Some(0),
        timeout_seconds: timeout,
        requires: [("runner".to_owned(), runner.to_owned())].into(),
        ..Default::default()
    };
    let mut steady = Vec::new();
    for runner in ["claude-code", "codex", "gemini"] {
        let created = file(&rig.tickets, "steady", vec![on(runner, "write hello.txt", 0)]).await;
        wait_ticket(&rig.tickets, &created.ticket.unwrap().id, COMPLETED).await;
        steady.push(created.tasks[0].id.clone());
    }
    // The loop, its guardian off, until its task's 8-second timeout.
    let unguarded = file_ticket(
        &rig.tickets,
        pb::CreateTicketRequest {
            title: "outcome=loop".into(),
            plan: vec![on("claude-code", "outcome=loop", 8)],
            guardian: Some(pb::GuardianSettings {
                repeat: Some(1000),
                stall_seconds: Some(0),
                spend_per_minute_usd: Some(0.0),
                budget_share: Some(0.0),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    wait_ticket(&rig.tickets, &unguarded.ticket.unwrap().id, FAILED).await;
    let looped = unguarded.tasks[0].id.clone();

    let omoi = |args: &[&str]| omoi_cli(&rig.mesh, args);
    let export = std::env::temp_dir().join(format!("omoi-loop-{}.jsonl", uuid::Uuid::new_v4().simple()));
    std::fs::write(&export, omoi(&["--output", "json", "logs", &looped])).unwrap();
    let export = export.display().to_string();

    // The defaults: the steady runs never trip; the loop is stopped.
    let mut args = vec!["guardian-replay"];
    args.extend(steady.iter().map(String::as_str));
    let replayed = omoi(&args);
    assert!(
        replayed.ends_with("0 attempts nudged, 0 stopped, 0 paused; 0 tokens saved by stopping\n"),
        "{replayed}"
    );
    assert!(!replayed.contains("  #"), "no trip: {replayed}");
    let tokens = |text: &str| -> (i64, i64) {
        let total = text
            .lines()
            .find_map(|l| l.split(" events, ").nth(1)?.split(" tokens").next()?.parse().ok())
            .unwrap();
        let saved = text
            .lines()
            .last()
            .and_then(|l| l.split("; ").nth(1)?.split(' ').next()?.parse().ok())
            .unwrap();
        (total, saved)
    };
    let defaults = omoi(&["guardian-replay", "--file", &export]);
    assert!(defaults.contains("1 stopped"), "{defaults}");
    let (total, saved) = tokens(&defaults);
    assert!(saved * 10 > total * 9, "stopping saves most of it: {defaults}");
    // The same from the queue as from the export.
    assert_eq!(tokens(&omoi(&["guardian-replay", &looped])), (total, saved));
    for repeat in ["2", "3", "5", "8"] {
        let on_loop = omoi(&["guardian-replay", "--file", &export, "--repeat", repeat]);
        let mut args = vec!["guardian-replay", "--repeat", repeat];
        args.extend(steady.iter().map(String::as_str));
        let trips = omoi(&args).matches("\n  #").count();
        let (total, saved) = tokens(&on_loop);
        eprintln!(
            "repeat {repeat}: steady runs trip {trips} times; the loop ({total} tokens) stopped with {saved} tokens ({:.1}%) unspent",
            100.0 * saved as f64 / total as f64
        );
    }
    let _ = std::fs::remove_file(&export);
    rig.stop().await;
}

/// The optional reviewer: every two seconds the executor's agent, in a
/// session of its own, is shown the task and the attempt's recent events
/// and asked whether it progresses; the stand-in finds the looping agent
/// going in circles, so the guardian nudges it with the reviewer's words,
/// then (one nudge allowed) stops the attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reviewer_finds_a_looping_agent_not_progressing_and_the_guardian_acts_on_it() {
    let rig = Rig::with_claude().await;
    let created = file_ticket(
        &rig.tickets,
        looping(
            pb::GuardianSettings {
                repeat: Some(1000),
                stall_seconds: Some(0),
                review_seconds: Some(2),
                nudges: Some(1),
                ..Default::default()
            },
            0,
        ),
    )
    .await;
    let failed = wait_ticket(&rig.tickets, &created.ticket.unwrap().id, FAILED).await;
    let task = &failed.tasks[0];
    assert!(task.error_message.contains("guardian: stop"), "{}", task.error_message);
    assert!(task.error_message.contains("write it first"), "{}", task.error_message);
    let stepped = omoi_tests::interventions(&rig.tickets, &task.ticket_id).await;
    let said: Vec<(&str, &str)> = stepped
        .iter()
        .map(|e| (e["signal"].as_str().unwrap(), e["action"].as_str().unwrap()))
        .collect();
    assert_eq!(said, [("review", "nudge"), ("review", "stop")], "{stepped:?}");
    // Its evidence: the events it was shown, the agent's repeated call.
    assert!(
        stepped[0]["evidence"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["text"].as_str().unwrap().contains("missing.txt")),
        "{}",
        stepped[0]
    );
    // The reviewer was shown the task and the digest; the agent was told
    // what the reviewer said, in its own session.
    let asked = rig.api.conversations();
    let reviews: Vec<String> = asked
        .iter()
        .map(|c| c.to_string())
        .filter(|c| c.contains("omoi's guardian asks you to review"))
        .collect();
    assert!(reviews.len() >= 2, "{} looks", reviews.len());
    assert!(reviews[0].contains("cat missing.txt"), "{}", reviews[0]);
    assert!(
        asked.iter().any(|c| {
            let c = c.to_string();
            c.contains("guardian interrupted you") && c.contains("write it first") && !c.contains("asks you to review")
        }),
        "the reviewer's words did not reach the agent"
    );
    rig.stop().await;
}

/// A steady worker is never held by its reviewer, and what the reviewer
/// spends is the attempt's: the agent's second turn waits until the
/// reviewer has looked (and found it progressing), then the attempt
/// completes reporting every turn the stand-in answered, the reviewer's
/// with the agent's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_worker_passes_its_review_and_pays_for_it() {
    let rig = Rig::with_claude().await;
    rig.api.hold(2);
    let created = file_ticket(
        &rig.tickets,
        pb::CreateTicketRequest {
            title: "a steady worker".into(),
            plan: vec![spec("write hello.txt", 2, vec![], 0)],
            guardian: Some(pb::GuardianSettings {
                review_seconds: Some(5),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    let id = created.tasks[0].id.clone();
    tokio::time::timeout(Duration::from_secs(90), rig.api.held())
        .await
        .expect("turn 2 asked for");
    omoi_tests::eventually(Duration::from_secs(60), "the reviewer's look", || {
        let (url, id) = (rig.mesh.task_queue.url.clone(), id.clone());
        async move {
            omoi_tests::task_output(&url, &id)
                .await
                .iter()
                .any(|l| l == "guardian: the reviewer finds it progressing")
                .then_some(())
        }
    })
    .await;
    rig.api.release();
    let done = wait_ticket(&rig.tickets, &created.ticket.unwrap().id, COMPLETED).await;
    let reviews = rig
        .api
        .conversations()
        .iter()
        .filter(|c| c.to_string().contains("omoi's guardian asks you to review"))
        .count();
    assert_eq!(reviews, 1);
    let history = omoi_tests::ticket_history(&rig.tickets, &done.ticket.as_ref().unwrap().id).await;
    assert!(!history.iter().any(|e| e.event_type == "TASK_GUARDIAN_INTERVENED"));
    // The agent's three turns and the reviewer's one.
    assert_eq!(rig.api.tally().answers, 4);
    assert_usage(done.tasks[0].usage.as_ref().unwrap(), &rig.api.tally(), 4);
    rig.stop().await;
}

/// Routing by capability: a task requiring `runner=codex` never reaches the
/// Claude Code executor, idle as it is and working other tickets meanwhile;
/// it waits, reported as unsatisfiable, until a Codex executor registers,
/// which takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_requiring_codex_waits_for_a_codex_executor_whatever_else_is_idle() {
    let mut rig = Rig::with_claude().await;
    let mut queue = client(&rig.mesh.task_queue.url);
    let health = omoi_tests::health_client(&rig.mesh.health.url);
    let codex: std::collections::HashMap<String, String> = [("runner".to_string(), "codex".to_string())].into();
    let pinned = pb::TaskSpec {
        requires: codex.clone(),
        ..spec("write hello.txt", 2, vec![], 0)
    };
    let waiting = file(&rig.tickets, "for codex", vec![pinned]).await;
    let waiting_id = waiting.tasks[0].id.clone();
    assert_eq!(waiting.tasks[0].requires, codex);
    let stats = omoi_tests::eventually(WAIT, "the codex task reported as unsatisfiable", || {
        let mut queue = queue.clone();
        async move {
            let s = queue
                .get_queue_stats(tq::GetQueueStatsRequest::default())
                .await
                .unwrap()
                .into_inner();
            (!s.unsatisfied.is_empty()).then_some(s)
        }
    })
    .await;
    assert_eq!(stats.unsatisfied.len(), 1, "{stats:?}");
    let u = &stats.unsatisfied[0];
    assert_eq!((&u.requires, u.phase, u.tasks), (&codex, 2, 1));

    // The Claude Code executor is free and works a ticket anybody may take,
    // of the same phase, filed after; the codex task is never handed to it.
    let other = file(&rig.tickets, "for anyone", vec![spec("write hello.txt", 2, vec![], 0)]).await;
    let done = wait_ticket(&rig.tickets, &other.ticket.unwrap().id, COMPLETED).await;
    let claude_agent = done.tasks[0].assigned_agent_id.clone();
    let labels = |agent_id: String| {
        let mut health = health.clone();
        async move {
            let a = health
                .get_agent(omoi_proto::health::GetAgentRequest { agent_id })
                .await
                .unwrap()
                .into_inner()
                .agent
                .unwrap();
            a.labels
        }
    };
    let claude_labels = labels(claude_agent.clone()).await;
    assert_eq!(claude_labels.get("runner").map(String::as_str), Some("claude-code"));
    assert_eq!(
        claude_labels.get("model").map(String::as_str),
        Some("claude-sonnet-4-5")
    );
    let still = queue
        .get_task(tq::GetTaskRequest {
            task_id: waiting_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(
        (still.status, still.attempt, still.assigned_agent_id.as_str()),
        (1, 0, "")
    );
    // A Codex executor registers: it takes the task and completes it.
    rig.executor(&rig.api.executor_env(Cli::Codex, &rig.home, SECRET)).await;
    let done = wait_ticket(&rig.tickets, &waiting.ticket.unwrap().id, COMPLETED).await;
    let codex_agent = done.tasks[0].assigned_agent_id.clone();
    assert_ne!(codex_agent, claude_agent);
    assert_eq!(
        labels(codex_agent).await.get("runner").map(String::as_str),
        Some("codex")
    );
    let s = queue
        .get_queue_stats(tq::GetQueueStatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(s.unsatisfied.is_empty(), "{s:?}");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_works_a_ticket_with_an_estimated_cost_and_a_refused_key_fails_for_good() {
    let mut rig = Rig::start().await;
    rig.executor(&rig.api.executor_env(Cli::Gemini, &rig.home, SECRET))
        .await;
    let (done, _, events) = rig.write_hello("hello from gemini\n").await;
    use AgentEventKind::*;
    assert_eq!(
        kinds(&events),
        [
            Message, ToolCall, ToolResult, FileChange, ToolCall, ToolResult, Command, Message, Usage, Result
        ]
    );
    let usage = done.tasks[0].usage.as_ref().expect("usage on the task");
    let tally = rig.api.tally();
    assert_eq!((tally.answers, usage.turns), (3, 3));
    assert_estimated(usage, &tally, tally.gemini_2_5_flash_cost(), "gemini-2.5-flash");
    assert!(!format!("{done:?}{events:?}").contains(SECRET));

    rig.refused("gemini").await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_read_the_executors_secrets() {
    use std::os::unix::fs::PermissionsExt;
    let mut rig = Rig::start().await;
    let secrets = tempdir("secrets");
    let token_file = secrets.join("auth-token");
    let token = format!("omoi-token-{}", uuid::Uuid::new_v4().simple());
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    // The agent tries every process's environment it can see (the
    // executor's holds the key) and the executor's secret file, and writes
    // in its workspace; its last line says how each went.
    let script = format!(
        "e=denied; f=denied; w=no; \
         cat /proc/*/environ 2>/dev/null | grep -q {SECRET} && e=READ; \
         cat {file} >/dev/null 2>&1 && f=READ; \
         echo proof > proof.txt && w=yes; \
         echo \"user=$(id -un) home=$HOME environ=$e file=$f wrote=$w\"",
        file = token_file.display()
    );
    let command = format!("sh -c '{script}'");
    let env: Vec<(String, String)> = [
        ("OMOI_RUNNER_COMMAND", command.as_str()),
        ("OMOI_AGENT_USER", "nobody"),
        ("OMOI_AUTH_TOKEN_FILE", &token_file.display().to_string()),
        ("ANTHROPIC_API_KEY", SECRET),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    rig.executor(&env).await;
    // On a repository: its git steps after the run happen as the agent's
    // user too, and the work lands on the branch.
    let (bare, _) = omoi_tests::repo::remote();
    let created = file_ticket(
        &rig.tickets,
        pb::CreateTicketRequest {
            title: "try the secrets".into(),
            repository: bare.display().to_string(),
            plan: vec![spec("try", 1, vec![], 0)],
            ..Default::default()
        },
    )
    .await;
    let ticket = created.ticket.unwrap();
    let done = wait_ticket(&rig.tickets, &ticket.id, COMPLETED).await;
    let result = omoi_proto::convert::struct_to_json(done.tasks[0].result.as_ref().unwrap());
    let summary = result["summary"].as_str().unwrap();
    assert!(summary.starts_with("user=nobody home="), "{summary}");
    assert!(summary.ends_with("environ=denied file=denied wrote=yes"), "{summary}");
    let ws = std::path::Path::new(result["workspace"].as_str().unwrap());
    assert_eq!(std::fs::read_to_string(ws.join("proof.txt")).unwrap(), "proof\n");
    let landed = done.tasks[0].git.as_ref().expect("the work landed");
    let show = format!("{}:proof.txt", ticket.branch);
    assert_eq!(omoi_tests::repo::git(&bare, &["show", &show]), "proof");
    assert_eq!(
        omoi_tests::repo::git(&bare, &["rev-parse", &ticket.branch]),
        landed.commit
    );
    let everything = format!("{done:?}");
    assert!(!everything.contains(SECRET) && !everything.contains(&token));
    rig.stop().await;
    let _ = std::fs::remove_dir_all(secrets);
    let _ = std::fs::remove_dir_all(bare.parent().unwrap());
}

fn tempdir(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("omoi-{what}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
