//! Agent sessions that outlive their attempt, with the real Claude Code
//! against a stand-in model API: a follow-up resumes the conversation of
//! the task it follows and lands one more commit on the ticket's branch;
//! an executor killed in the middle of a run leaves a checkpoint from which
//! another executor resumes the same conversation, the agent's work in its
//! new workspace, and the crash costs at most the call it interrupted.

use std::time::Duration;

use omoi_proto::taskqueue as tq;
use omoi_proto::ticket as pb;
use omoi_tests::mesh::{Options, ProcessMesh};
use omoi_tests::model_api::{Cli, ModelApi};
use omoi_tests::repo::{git, remote};
use omoi_tests::{Infra, client, eventually, file_ticket, wait_ticket};
use serde_json::Value;
use tonic::Code;

const COMPLETED: i32 = 3;
const IN_PROGRESS: i32 = 2;
const FAILED: i32 = 4;
const SECRET: &str = "sk-ant-test-sessions-do-not-leak";

/// An executor running `cli` against `api` as agent `id`, checkpointing
/// every second.
fn agent(cli: Cli, api: &ModelApi, home: &std::path::Path, id: &str) -> Vec<(String, String)> {
    let mut env = api.executor_env(cli, home, SECRET);
    env.push(("OMOI_AGENT_ID".into(), id.into()));
    env.push(("OMOI_CHECKPOINT_SECONDS".into(), "1".into()));
    env
}

fn claude(api: &ModelApi, home: &std::path::Path, id: &str) -> Vec<(String, String)> {
    agent(Cli::Claude, api, home, id)
}

fn codex(api: &ModelApi, home: &std::path::Path, id: &str) -> Vec<(String, String)> {
    agent(Cli::Codex, api, home, id)
}

fn gemini(api: &ModelApi, home: &std::path::Path, id: &str) -> Vec<(String, String)> {
    agent(Cli::Gemini, api, home, id)
}

fn one_task(repository: &str, max_retries: i32) -> pb::CreateTicketRequest {
    pb::CreateTicketRequest {
        title: "hello, sessions".into(),
        repository: repository.to_owned(),
        plan: vec![pb::TaskSpec {
            title: "write hello.txt".into(),
            phase: 1,
            max_retries: Some(max_retries),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A mesh without executors that takes an attempt back within seconds of
/// its executor's death (a 2 s lease, stale after 3 s of silence).
fn quick_leases() -> Options {
    Options {
        executors: 0,
        heartbeat_interval_seconds: 1,
        stale_after_seconds: 3.0,
        env: vec![("OMOI_LEASE_SECONDS".into(), "2".into())],
        ..Default::default()
    }
}

fn tempdir(what: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("omoi-{what}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The task's session once it is as `what` says.
async fn session_where(
    queue: &omoi_tests::TaskQueueClient,
    id: &str,
    what: &str,
    holds: impl Fn(&omoi_proto::common::AgentSession) -> bool,
) -> omoi_proto::common::AgentSession {
    eventually(Duration::from_secs(30), what, || {
        let (mut q, task_id) = (queue.clone(), id.to_owned());
        let holds = &holds;
        async move {
            let t = q
                .get_task(tq::GetTaskRequest { task_id })
                .await
                .ok()?
                .into_inner()
                .task?;
            t.session.filter(|s| holds(s))
        }
    })
    .await
}

/// Whether the conversation of a model request holds `text` anywhere.
fn holds(conversation: &Value, text: &str) -> bool {
    conversation.to_string().contains(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_up_resumes_the_agents_session_and_lands_one_more_commit() {
    let infra = Infra::new().await.unwrap();
    let api = ModelApi::start().await.unwrap();
    let home = tempdir("agent-home");
    let options = Options {
        executors: 0,
        ..Default::default()
    };
    let mut mesh = ProcessMesh::start(&infra, options).await.unwrap();
    mesh.add_executor(&infra, &claude(&api, &home, "claude-a"))
        .await
        .unwrap();
    let tickets = mesh.tickets();
    let (bare, _) = remote();
    let created = file_ticket(&tickets, one_task(&bare.display().to_string(), 0)).await;
    let ticket = created.ticket.unwrap();
    let first = created.tasks[0].id.clone();
    let done = wait_ticket(&tickets, &ticket.id, COMPLETED).await;
    let session = done.tasks[0].session.clone().expect("the task's session");
    assert_eq!(session.runner, "claude-code");
    assert!(!session.session_id.is_empty());
    assert!(session.checkpoints >= 1 && session.checkpoint_bytes > 0, "{session:?}");
    let branch = &ticket.branch;
    assert_eq!(git(&bare, &["rev-list", "--count", &format!("main..{branch}")]), "1");

    // Bad input changes nothing.
    let mut t = tickets.clone();
    let ask = |ticket_id: &str, message: &str, task_id: &str| pb::FollowUpRequest {
        ticket_id: ticket_id.into(),
        message: message.into(),
        task_id: task_id.into(),
    };
    for (req, code, field) in [
        (ask(&ticket.id, " ", ""), Code::InvalidArgument, "message"),
        (
            ask(&ticket.id, &"x".repeat(64 * 1024 + 1), ""),
            Code::InvalidArgument,
            "message",
        ),
        (ask("nope", "hi", ""), Code::InvalidArgument, "ticket_id"),
        (ask(&uuid::Uuid::new_v4().to_string(), "hi", ""), Code::NotFound, ""),
        (
            ask(&ticket.id, "hi", &uuid::Uuid::new_v4().to_string()),
            Code::NotFound,
            "task_id",
        ),
    ] {
        let s = t.follow_up(req).await.unwrap_err();
        assert_eq!(s.code(), code, "{}", s.message());
        assert!(s.message().contains(field), "{}", s.message());
    }
    assert_eq!(wait_ticket(&tickets, &ticket.id, COMPLETED).await.tasks.len(), 1);

    // The follow-up: the ticket opens again and completes again.
    let asked = t
        .follow_up(ask(&ticket.id, "Also cover the empty case: file=extra.txt", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(asked.ticket.unwrap().status, IN_PROGRESS);
    let follow_up = asked.task.unwrap();
    assert_eq!(follow_up.depends_on, std::slice::from_ref(&first));
    let done = wait_ticket(&tickets, &ticket.id, COMPLETED).await;
    assert_eq!(done.tasks.len(), 2);
    let task = done.tasks.iter().find(|t| t.id == follow_up.id).unwrap();
    let resumed = task.session.clone().expect("the follow-up's session");
    assert_eq!(resumed.session_id, session.session_id, "the same conversation");
    assert_eq!(resumed.resumed_from_task_id, first);
    assert_eq!(resumed.resumed_from_attempt, 1);

    // The model saw the first conversation's turns with the message.
    let conversations = api.conversations();
    let asked_more = conversations
        .iter()
        .find(|c| holds(c, "file=extra.txt"))
        .expect("the follow-up reached the model");
    assert!(holds(asked_more, "toolu_write_hello_txt"), "{asked_more}");
    assert!(holds(asked_more, "Done: wrote hello.txt"), "{asked_more}");

    // One more commit on the branch, with the follow-up's file; the
    // ticket's cost counts both tasks.
    let commits = git(&bare, &["rev-list", "--count", &format!("main..{branch}")]);
    assert_eq!(commits, "2");
    assert_eq!(
        git(&bare, &["show", &format!("{branch}:extra.txt")]),
        "hello from claude"
    );
    let ticket_usage = done.ticket.as_ref().unwrap().usage.clone().unwrap();
    let task_costs: f64 = done.tasks.iter().map(|t| t.usage.as_ref().unwrap().cost_usd).sum();
    assert!((ticket_usage.cost_usd - task_costs).abs() < 1e-9);

    // Reopened and completed again, each said by an event.
    let events = omoi_tests::ticket_history(&tickets, &ticket.id).await;
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let reopened = types
        .iter()
        .position(|t| *t == "TICKET_REOPENED")
        .unwrap_or_else(|| panic!("{types:?}"));
    assert!(types[reopened..].contains(&"TICKET_COMPLETED"), "{types:?}");
    assert!(!format!("{events:?}{done:?}").contains(SECRET));

    // A cancelled ticket takes no follow-up.
    let other = file_ticket(&tickets, one_task("", 0)).await.ticket.unwrap();
    t.cancel_ticket(pb::CancelTicketRequest {
        ticket_id: other.id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    let s = t.follow_up(ask(&other.id, "more", "")).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{}", s.message());

    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
    let _ = std::fs::remove_dir_all(home);
}

/// An agent CLI as the crash test drives it: the executor's environment,
/// and what the resumed call and the work look like.
struct Agent {
    env: fn(&ModelApi, &std::path::Path, &str) -> Vec<(String, String)>,
    /// In the resumed model call: the earlier tool call and its result.
    earlier_call: &'static str,
    earlier_result: &'static str,
    hello: &'static str,
    /// Whether the resumed session keeps its id (Gemini CLI gives an
    /// imported conversation a new one).
    same_id: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_executors_claude_code_attempt_resumes_its_session_on_another() {
    crash_and_resume(Agent {
        env: claude,
        earlier_call: "toolu_write_hello_txt",
        earlier_result: "File created successfully",
        hello: "hello from claude\n",
        same_id: true,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_executors_codex_attempt_resumes_its_thread_on_another() {
    crash_and_resume(Agent {
        env: codex,
        earlier_call: "call_1",
        earlier_result: "function_call_output",
        hello: "hello from codex\n",
        same_id: true,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_executors_gemini_attempt_resumes_its_conversation_on_another() {
    crash_and_resume(Agent {
        env: gemini,
        earlier_call: "write_file",
        earlier_result: "functionResponse",
        hello: "hello from gemini\n",
        same_id: false,
    })
    .await;
}

/// The agent writes its file, a checkpoint is taken, its executor is
/// killed while the agent waits on its next model call, and another
/// executor (a home and a workspace root of its own: nothing of the first
/// reaches it but the checkpoint) resumes the same conversation over the
/// same work.
async fn crash_and_resume(agent: Agent) {
    let infra = Infra::new().await.unwrap();
    let api = ModelApi::start().await.unwrap();
    let (home, home_b, root_b) = (tempdir("agent-home"), tempdir("agent-home-b"), tempdir("ws-b"));
    let mut mesh = ProcessMesh::start(&infra, quick_leases()).await.unwrap();
    mesh.add_executor(&infra, &(agent.env)(&api, &home, "agent-a"))
        .await
        .unwrap();
    let tickets = mesh.tickets();
    let queue = client(&mesh.task_queue.url);

    // The agent writes its file, then waits on its second model call.
    api.hold(2);
    let created = file_ticket(&tickets, one_task("", 2)).await;
    let id = created.tasks[0].id.clone();
    tokio::time::timeout(Duration::from_secs(90), api.held())
        .await
        .expect("turn 2 asked for");
    let held_at = chrono::Utc::now();
    // A checkpoint taken wholly after that: the write and its result in it.
    let checkpointed = session_where(&queue, &id, "a checkpoint after the write", |s| {
        s.checkpoint_at
            .as_ref()
            .and_then(omoi_proto::convert::from_timestamp)
            .is_some_and(|at| at > held_at + chrono::Duration::milliseconds(1100))
    })
    .await;
    assert_eq!(checkpointed.attempt, 1);

    // Killed mid-call; another executor takes the attempt up.
    mesh.executors.pop().unwrap().kill9().await.unwrap();
    let killed_at = chrono::Utc::now();
    api.release();
    let mut b = (agent.env)(&api, &home_b, "agent-b");
    b.push(("OMOI_WORKSPACE_ROOT".into(), root_b.display().to_string()));
    mesh.add_executor(&infra, &b).await.unwrap();
    let done = wait_ticket(&tickets, &created.ticket.unwrap().id, COMPLETED).await;
    let task = &done.tasks[0];
    assert_eq!(task.attempt, 2);
    let session = task.session.clone().unwrap();
    if agent.same_id {
        assert_eq!(session.session_id, checkpointed.session_id, "the same conversation");
    }
    assert_eq!((session.attempt, session.resumed_from_attempt), (2, 1));

    // The resumed call carried the earlier turn, the tool call and its
    // result; the work was in the new workspace; the crash cost no more
    // than the call it cut short.
    let asked = api.asked();
    // Three calls without the crash: the crash cost the one it cut short.
    // After it, only the resumed run's, in the second executor's
    // workspace: the killed executor's agent made none (it died with its
    // executor).
    assert!(asked.len() <= 4, "{} model calls", asked.len());
    let after: Vec<&str> = asked
        .iter()
        .filter(|(at, _, _)| *at > killed_at)
        .map(|(_, dir, _)| dir.as_str())
        .collect();
    assert!(
        !after.is_empty() && after.iter().all(|d| d.starts_with(&*root_b.to_string_lossy())),
        "{after:?}"
    );
    let (resumed_at, _, resumed) = asked
        .iter()
        .find(|(at, _, _)| *at > killed_at)
        .expect("a model call after the crash");
    assert!(holds(resumed, agent.earlier_call), "{resumed}");
    assert!(holds(resumed, agent.earlier_result), "{resumed}");
    let result = omoi_proto::convert::struct_to_json(task.result.as_ref().unwrap());
    assert_eq!(result["summary"], "Done: wrote hello.txt");
    let ws = std::path::Path::new(result["workspace"].as_str().unwrap());
    assert!(ws.ends_with("2") && ws.starts_with(&root_b), "{}", ws.display());
    assert_eq!(std::fs::read_to_string(ws.join("hello.txt")).unwrap(), agent.hello);
    let events = omoi_tests::ticket_history(&tickets, &task.ticket_id).await;
    let resumed_event = events
        .iter()
        .find(|e| e.event_type == "TASK_RESUMED")
        .expect("TASK_RESUMED");
    let payload = omoi_proto::convert::struct_to_json(resumed_event.payload.as_ref().unwrap());
    assert_eq!(payload["resumed_from_attempt"], 1);
    assert_eq!(
        payload["session_id"],
        checkpointed.session_id.as_str(),
        "the session taken up"
    );
    assert!(!format!("{events:?}{done:?}").contains(SECRET));

    // What it cost, for the record (`--nocapture` shows it): from the
    // attempt taken back to the resumed agent's first model call; the
    // checkpoints' size and time.
    let taken_back = events
        .iter()
        .find(|e| e.event_type == "TASK_RETRIED")
        .and_then(|e| omoi_proto::convert::from_timestamp(e.occurred_at.as_ref()?))
        .expect("TASK_RETRIED");
    let output = omoi_tests::task_output(&mesh.task_queue.url, &id).await;
    let took: Vec<u64> = output
        .iter()
        .filter_map(|l| {
            l.strip_prefix("checkpoint ")?
                .split(" in ")
                .nth(1)?
                .strip_suffix(" ms")?
                .parse()
                .ok()
        })
        .collect();
    eprintln!(
        "{}: resumed {} ms after the attempt was taken back; {} checkpoints, {:.1} ms each on average, the last {} bytes",
        session.runner,
        (*resumed_at - taken_back).num_milliseconds(),
        took.len(),
        took.iter().sum::<u64>() as f64 / took.len().max(1) as f64,
        session.checkpoint_bytes
    );

    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
    for dir in [home, home_b, root_b] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The guardian's counts outlive an executor: a looping agent's executor
/// is killed after two of its same failing calls; the retry on another
/// executor resumes the session, and the guardian, counting on from the
/// first attempt's durable events, stops it at the fourth call of the two
/// attempts — not the fourth of its own — naming both attempts' events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guardians_counts_outlive_a_killed_executor() {
    let infra = Infra::new().await.unwrap();
    let api = ModelApi::start().await.unwrap();
    let (home, home_b, root_b) = (tempdir("agent-home"), tempdir("agent-home-b"), tempdir("ws-b"));
    let mut mesh = ProcessMesh::start(&infra, quick_leases()).await.unwrap();
    mesh.add_executor(&infra, &claude(&api, &home, "agent-a"))
        .await
        .unwrap();
    let tickets = mesh.tickets();
    let queue = client(&mesh.task_queue.url);

    // Two of the same failing call, then the third model call waits.
    api.hold(3);
    let created = file_ticket(
        &tickets,
        pb::CreateTicketRequest {
            title: "outcome=loop".into(),
            plan: vec![pb::TaskSpec {
                title: "outcome=loop".into(),
                phase: 1,
                max_retries: Some(1),
                ..Default::default()
            }],
            guardian: Some(pb::GuardianSettings {
                repeat: Some(4),
                nudges: Some(0),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    let id = created.tasks[0].id.clone();
    tokio::time::timeout(Duration::from_secs(90), api.held())
        .await
        .expect("turn 3 asked for");
    let held_at = chrono::Utc::now();
    session_where(&queue, &id, "a checkpoint after the second call", |s| {
        s.checkpoint_at
            .as_ref()
            .and_then(omoi_proto::convert::from_timestamp)
            .is_some_and(|at| at > held_at + chrono::Duration::milliseconds(1100))
    })
    .await;
    // Both calls are on the queue's record before the executor dies.
    let calls = |events: &[omoi_proto::common::AgentEvent], attempt: i32| {
        events
            .iter()
            .filter(|e| {
                e.attempt == attempt
                    && e.kind() == omoi_proto::common::AgentEventKind::ToolCall
                    && e.text.contains("missing.txt")
            })
            .count()
    };
    eventually(
        Duration::from_secs(30),
        "the first attempt's two calls recorded",
        || {
            let (url, id) = (mesh.task_queue.url.clone(), id.clone());
            async move { (calls(&omoi_tests::task_events(&url, &id).await, 1) == 2).then_some(()) }
        },
    )
    .await;

    mesh.executors.pop().unwrap().kill9().await.unwrap();
    let killed_at = chrono::Utc::now();
    api.release();
    let mut b = claude(&api, &home_b, "agent-b");
    b.push(("OMOI_WORKSPACE_ROOT".into(), root_b.display().to_string()));
    mesh.add_executor(&infra, &b).await.unwrap();
    let failed = wait_ticket(&tickets, &created.ticket.unwrap().id, FAILED).await;
    let task = &failed.tasks[0];
    assert_eq!(task.attempt, 2, "{}", task.error_message);
    assert!(task.error_message.contains("guardian: stop"), "{}", task.error_message);
    assert_eq!(
        task.session.as_ref().unwrap().resumed_from_attempt,
        1,
        "the session resumed"
    );

    let stepped = omoi_tests::interventions(&tickets, &task.ticket_id).await;
    assert_eq!(stepped.len(), 1, "{stepped:?}");
    let stop = &stepped[0];
    assert_eq!(
        (stop["attempt"].as_i64(), stop["action"].as_str()),
        (Some(2), Some("stop")),
        "{stop}"
    );
    assert!(stop["reason"].as_str().unwrap().contains("4 times"), "{stop}");
    let attempts: Vec<i64> = stop["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["attempt"].as_i64().unwrap())
        .collect();
    assert_eq!(attempts, [1, 1, 2, 2], "{stop}");
    let events = omoi_tests::task_events(&mesh.task_queue.url, &id).await;
    assert_eq!(calls(&events, 2), 2, "two calls of its own, then stopped");
    assert!(
        events
            .iter()
            .any(|e| e.attempt == 2 && e.text.starts_with("guardian: counting on from attempt 1")),
        "the output says whose counts it took up"
    );
    // After the kill the resumed agent asked the model for its two calls
    // (and at most the one the stop cut short), not four.
    let after = api.asked().iter().filter(|(at, _, _)| *at > killed_at).count();
    assert!((2..=3).contains(&after), "{after} model calls after the kill");

    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
    for dir in [home, home_b, root_b] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_that_cannot_be_kept_or_used_never_stops_an_attempt() {
    let infra = Infra::new().await.unwrap();
    let api = ModelApi::start().await.unwrap();
    let (home, home_b) = (tempdir("agent-home"), tempdir("agent-home-b"));
    let mut mesh = ProcessMesh::start(&infra, quick_leases()).await.unwrap();
    // The first executor's checkpoint store is out of reach (no bucket can
    // have that name): its checkpoints are skipped, its agent works on.
    let mut a = claude(&api, &home, "agent-a");
    a.push(("OMOI_SESSIONS_BUCKET".into(), "not a bucket!".into()));
    mesh.add_executor(&infra, &a).await.unwrap();
    let tickets = mesh.tickets();
    let queue = client(&mesh.task_queue.url);
    api.hold(2);
    let created = file_ticket(&tickets, one_task("", 2)).await;
    let (ticket_id, id) = (created.ticket.unwrap().id, created.tasks[0].id.clone());
    tokio::time::timeout(Duration::from_secs(90), api.held())
        .await
        .expect("turn 2 asked for");
    let url = mesh.task_queue.url.clone();
    let output = |task_id: String| {
        let url = url.clone();
        async move { omoi_tests::task_events(&url, &task_id).await }
    };
    eventually(Duration::from_secs(30), "a skipped checkpoint said", || {
        let out = output(id.clone());
        async move {
            out.await
                .iter()
                .any(|e| e.text.starts_with("checkpoint skipped"))
                .then_some(())
        }
    })
    .await;

    // The task's record names a checkpoint that is not one.
    let js = async_nats::jetstream::new(async_nats::connect(&infra.nats_url).await.unwrap());
    let bucket = js
        .create_object_store(async_nats::jetstream::object_store::Config {
            bucket: infra.sessions_bucket(),
            ..Default::default()
        })
        .await
        .unwrap();
    let name = format!("{ticket_id}/{id}/1");
    bucket.put(name.as_str(), &mut &b"not a checkpoint"[..]).await.unwrap();
    queue
        .clone()
        .record_session(tq::RecordSessionRequest {
            task_id: id.clone(),
            attempt: 1,
            session: Some(omoi_proto::common::AgentSession {
                runner: "claude-code".into(),
                session_id: "0b5e3f3c-2f0e-4a7e-9b7e-3c1d2e4f5a6b".into(),
                checkpoint: name.clone(),
                attempt: 1,
                checkpoints: 1,
                ..Default::default()
            }),
        })
        .await
        .unwrap();

    // Killed; the next attempt cannot use it: a new session, saying why.
    mesh.executors.pop().unwrap().kill9().await.unwrap();
    let killed_at = chrono::Utc::now();
    api.release();
    mesh.add_executor(&infra, &claude(&api, &home_b, "agent-b"))
        .await
        .unwrap();
    let done = wait_ticket(&tickets, &ticket_id, COMPLETED).await;
    let task = &done.tasks[0];
    assert_eq!(task.attempt, 2);
    assert_eq!(task.session.as_ref().unwrap().resumed_from_attempt, 0);
    let said: Vec<String> = output(id.clone())
        .await
        .into_iter()
        .filter(|e| e.attempt == 2 && e.kind() == omoi_proto::common::AgentEventKind::Error)
        .map(|e| e.text)
        .collect();
    assert!(
        said.iter()
            .any(|t| t.starts_with("starting a new session") && t.contains(&name)),
        "{said:?}"
    );
    // It started from an empty conversation, and did the whole task.
    let first_after = api
        .asked()
        .into_iter()
        .find(|(at, _, _)| *at > killed_at)
        .expect("a model call after the crash");
    assert_eq!(first_after.2.as_array().map(Vec::len), Some(1), "{}", first_after.2);
    let result = omoi_proto::convert::struct_to_json(task.result.as_ref().unwrap());
    assert_eq!(result["summary"], "Done: wrote hello.txt");

    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
    for dir in [home, home_b] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_programs_own_session_is_checkpointed_and_resumed_by_the_command_runner() {
    let infra = Infra::new().await.unwrap();
    let (home, home_b, root_b) = (tempdir("agent-home"), tempdir("agent-home-b"), tempdir("ws-b"));
    let mut mesh = ProcessMesh::start(&infra, quick_leases()).await.unwrap();
    // The demo agent works eight turns of 400 ms, its session in its home.
    let demo = |home: &std::path::Path, id: &str| -> Vec<(String, String)> {
        [
            ("OMOI_AGENT_ID", id),
            ("HOME", &home.display().to_string()),
            ("OMOI_DEMO_TURNS", "8"),
            ("OMOI_DEMO_SLEEP_MS", "400"),
            ("OMOI_CHECKPOINT_SECONDS", "1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    };
    mesh.add_executor(&infra, &demo(&home, "demo-a")).await.unwrap();
    let tickets = mesh.tickets();
    let queue = client(&mesh.task_queue.url);
    let created = file_ticket(&tickets, one_task("", 2)).await;
    let id = created.tasks[0].id.clone();
    // Killed once two checkpoints of its session are kept.
    let checkpointed = session_where(&queue, &id, "two checkpoints", |s| s.checkpoints >= 2).await;
    assert_eq!(checkpointed.runner, "command");
    assert_eq!(checkpointed.session_id, format!("demo-{id}-1"));
    mesh.executors.pop().unwrap().kill9().await.unwrap();
    let mut b = demo(&home_b, "demo-b");
    b.push(("OMOI_WORKSPACE_ROOT".into(), root_b.display().to_string()));
    mesh.add_executor(&infra, &b).await.unwrap();
    let done = wait_ticket(&tickets, &created.ticket.unwrap().id, COMPLETED).await;
    let task = &done.tasks[0];
    assert_eq!(task.attempt, 2);
    let session = task.session.clone().unwrap();
    assert_eq!(
        (session.session_id.as_str(), session.resumed_from_attempt),
        (checkpointed.session_id.as_str(), 1)
    );
    // Every turn once, in order: the first attempt's up to its last
    // checkpoint (two at least), the second's after.
    let result = omoi_proto::convert::struct_to_json(task.result.as_ref().unwrap());
    let summary = result["summary"].as_str().unwrap();
    let turns: Vec<(usize, i32)> = summary
        .split("turns ")
        .nth(1)
        .unwrap()
        .split(' ')
        .map(|t| {
            let (turn, attempt) = t.split_once(':').unwrap();
            (turn.parse().unwrap(), attempt.parse().unwrap())
        })
        .collect();
    assert_eq!(
        turns.iter().map(|t| t.0).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>(),
        "{summary}"
    );
    let first = turns.iter().filter(|t| t.1 == 1).count();
    assert!(first >= 2 && turns[first..].iter().all(|t| t.1 == 2), "{summary}");

    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
    for dir in [home, home_b, root_b] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Best-of-N across a crash: a Claude Code candidate's executor is killed
/// mid-conversation; the candidate resumes on another executor, the two
/// Codex candidates run meanwhile, and the choice sees all three ended and
/// completed (none picked from a partial set).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidates_killed_executor_is_survived_and_the_choice_sees_every_candidate() {
    let infra = Infra::new().await.unwrap();
    let api = ModelApi::start().await.unwrap();
    let (home, home_b, root_b) = (tempdir("agent-home"), tempdir("agent-home-b"), tempdir("ws-b"));
    let mut mesh = ProcessMesh::start(&infra, quick_leases()).await.unwrap();
    mesh.add_executor(&infra, &claude(&api, &home, "agent-a"))
        .await
        .unwrap();
    let tickets = mesh.tickets();
    let (bare, main) = remote();
    let runner = |r: &str| pb::LabelSet {
        labels: [("runner".to_string(), r.to_string())].into(),
    };
    api.hold(2);
    let created = file_ticket(
        &tickets,
        pb::CreateTicketRequest {
            title: "best of three, through a crash".into(),
            repository: bare.display().to_string(),
            check_command: "grep -q hello hello.txt".into(),
            plan: vec![pb::TaskSpec {
                title: "write hello.txt".into(),
                phase: 2,
                candidates: Some(pb::Candidates {
                    count: 3,
                    requires: vec![runner("claude-code"), runner("codex"), runner("codex")],
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await;
    // The Claude Code candidate wrote its file and waits on its next call.
    tokio::time::timeout(Duration::from_secs(90), api.held())
        .await
        .expect("turn 2 asked for");
    mesh.executors.pop().unwrap().kill9().await.unwrap();
    api.release();
    let mut b = claude(&api, &home_b, "agent-b");
    b.push(("OMOI_WORKSPACE_ROOT".into(), root_b.display().to_string()));
    mesh.add_executor(&infra, &b).await.unwrap();
    mesh.add_executor(&infra, &codex(&api, &home, "agent-c")).await.unwrap();
    let done = wait_ticket(&tickets, &created.ticket.unwrap().id, COMPLETED).await;
    let chooser = done.tasks.iter().find(|t| t.candidate_of.is_empty()).unwrap();
    let seen = &chooser.candidates;
    assert_eq!(seen.len(), 3, "{chooser:?}");
    assert!(seen.iter().all(|c| c.status == 4 && c.check_passed), "{seen:?}");
    let crashed = done.tasks.iter().find(|t| t.candidate == 1).unwrap();
    assert_eq!(crashed.attempt, 2, "the killed candidate's attempt went round again");
    assert_eq!(seen.iter().filter(|c| c.chosen).count(), 1);
    let landed = chooser.git.as_ref().expect("the chosen work landed");
    assert_eq!(landed.base_commit, main);
    let chosen = seen.iter().find(|c| c.chosen).unwrap();
    let hello = git(&bare, &["show", &format!("{}:hello.txt", landed.branch)]);
    assert_eq!(
        hello,
        format!(
            "hello from {}",
            if chosen.runner == "codex" { "codex" } else { "claude" }
        )
    );
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
    for d in [home, home_b, root_b] {
        let _ = std::fs::remove_dir_all(d);
    }
    let _ = std::fs::remove_dir_all(bare.parent().unwrap());
}
