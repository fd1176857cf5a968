//! The agents' sandbox, tried for real: a hostile agent under the
//! executor's sandbox, told every address of the mesh, reaches its
//! workspace and the allow-listed host and nothing else; the real Claude
//! Code in the same sandbox completes a ticket through the model proxy
//! while only the stand-in model API ever sees the real key; and on NATS,
//! the executor's user can publish its output and keep its checkpoints but
//! not forge an event or delete a stream.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use omoi_proto::ticket as pb;
use omoi_tests::http::{Reply, Server};
use omoi_tests::mesh::{Options, ProcessMesh};
use omoi_tests::model_api::{Cli, ModelApi};
use omoi_tests::process::PrivateNats;
use omoi_tests::{Infra, file_ticket, task_output, wait_ticket};

const COMPLETED: i32 = 3;
const SECRET: &str = "sk-ant-sandboxed-do-not-leak";
/// What a sandboxed agent holds in place of its key.
const PLACEHOLDER: &str = "omoi-brokered-placeholder-key";

pub(super) fn tempdir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("omoi-{what}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

pub(super) fn port_of(url: &str) -> u16 {
    let authority = url.split("://").nth(1).unwrap_or(url);
    let authority = authority.rsplit('@').next().unwrap().split('/').next().unwrap();
    authority.rsplit(':').next().unwrap().parse().unwrap()
}

/// A host outside the mesh answering 200 to everything.
pub(super) async fn host() -> Server {
    async fn ok(_: Arc<()>, _: http::Request<hyper::body::Incoming>) -> Reply {
        Ok(http::Response::new(http_body_util::Full::new(
            bytes::Bytes::from_static(b"reached\n"),
        )))
    }
    Server::start(Arc::new(()), ok).await.unwrap()
}

/// The mesh's services as processes, with no executor yet.
pub(super) async fn bare_mesh(infra: &Infra) -> ProcessMesh {
    let options = Options {
        executors: 0,
        ..Default::default()
    };
    ProcessMesh::start(infra, options).await.unwrap()
}

pub(super) fn one_task(title: &str) -> pb::CreateTicketRequest {
    pb::CreateTicketRequest {
        title: title.to_owned(),
        plan: vec![pb::TaskSpec {
            title: title.to_owned(),
            phase: 1,
            max_retries: Some(0),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A one-task ticket on a new bare repository, run to COMPLETED: the
/// ticket, the repository and its branch.
pub(super) async fn one_task_on_a_repository(
    mesh: &ProcessMesh,
    title: &str,
) -> (pb::GetTicketResponse, PathBuf, String) {
    let tickets = mesh.tickets();
    let (bare, _) = omoi_tests::repo::remote();
    let mut request = one_task(title);
    request.repository = bare.display().to_string();
    let created = file_ticket(&tickets, request).await;
    let branch = created.ticket.as_ref().unwrap().branch.clone();
    let done = wait_ticket(&tickets, &created.ticket.unwrap().id, COMPLETED).await;
    (done, bare, branch)
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_holding(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => found.extend(files_holding(&path, needle)),
            Ok(t) if t.is_file() => {
                let bytes = std::fs::read(&path).unwrap_or_default();
                if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    found.push(path);
                }
            }
            _ => {}
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_agent_reaches_its_workspace_and_the_allowed_host_and_nothing_else() {
    let infra = Infra::new().await.unwrap();
    let mut mesh = bare_mesh(&infra).await;
    let (allowed, outside) = (host().await, host().await);
    // What an agent must not read though its user could: a world-readable
    // secret of the machine's, and another task's workspace.
    let secrets = tempdir("secrets");
    let token = secrets.join("token");
    std::fs::write(&token, "machine secret\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let root = mesh.workspace_root.clone();
    let other = root.join("other-task/1");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("other.txt"), "another task's work\n").unwrap();
    for dir in [root.join("other-task"), other.clone()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // Another attempt's home, its agent's session in it: the agent's own
    // user's, as every attempt's home is.
    let other_home = root.join("other-task/1.home");
    std::fs::create_dir_all(&other_home).unwrap();
    std::fs::write(other_home.join("session.jsonl"), "another agent's conversation\n").unwrap();
    let id = |flag: &str| -> u32 {
        let out = std::process::Command::new("id")
            .args([flag, "nobody"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().parse().unwrap()
    };
    for p in [other_home.clone(), other_home.join("session.jsonl")] {
        std::os::unix::fs::chown(&p, Some(id("-u")), Some(id("-g"))).unwrap();
    }
    std::fs::set_permissions(&other_home, std::fs::Permissions::from_mode(0o700)).unwrap();

    // The agent: every address it was told, directly and through the
    // proxy, and the files, one word each.
    let scripts = tempdir("hostile");
    let script = scripts.join("agent.sh");
    let ports = scripts.join("ports.env");
    std::fs::write(
        &script,
        format!(
            r#". {ports}
tcp() {{ timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null && echo open || echo closed; }}
via() {{ curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 --noproxy '' -x http://127.0.0.1:13128 "$@"; }}
tunnel() {{ curl -s -o /dev/null -w '%{{http_connect}}' --max-time 5 --noproxy '' -p -x http://127.0.0.1:13128 "$@"; }}
seen() {{ cat "$1" >/dev/null 2>&1 && echo READ || echo hidden; }}
r="nats=$(tcp $NATS) pg=$(tcp $PG) queue=$(tcp $QUEUE) ticket=$(tcp $TICKET) executor=$(tcp $EXECUTOR)"
r="$r direct=$(curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 --noproxy '*' http://127.0.0.1:$ALLOWED/)"
r="$r allowed=$(via http://127.0.0.1:$ALLOWED/) outside=$(via http://localhost:$OUTSIDE/)"
r="$r nats_via_proxy=$(tunnel http://127.0.0.1:$NATS/) pg_via_proxy=$(tunnel http://127.0.0.1:$PG/)"
r="$r queue_via_proxy=$(via http://127.0.0.1:$QUEUE/) executor_via_proxy=$(tunnel http://localhost:$EXECUTOR/)"
r="$r fences=$(ls $ROOT/.omoi/fences >/dev/null 2>&1 && echo READ || echo hidden)"
r="$r other=$(seen $ROOT/other-task/1/other.txt) other_home=$(seen $ROOT/other-task/1.home/session.jsonl)"
r="$r token=$(seen $TOKEN) home=$([ "$HOME" = "$PWD.home" ] && touch "$HOME/mine" && echo own || echo "$HOME")"
echo proof > proof.txt && r="$r wrote=yes"
# The executor's git cache: its repository's objects, borrowed, read-only.
borrowed=$(cat .git/objects/info/alternates)
r="$r git=$(git rev-parse HEAD >/dev/null 2>&1 && echo ok || echo broken)"
r="$r objects=$(ls "$borrowed" >/dev/null 2>&1 && echo READ || echo hidden)"
r="$r cache_write=$(touch "$borrowed/x" 2>/dev/null && echo WROTE || echo refused)"
r="$r cache_config=$(seen "$(dirname "$borrowed")/config") other_repo=$(seen $ROOT/.git-cache/other.git/objects/secret)"
# A clean filter of its own, for the executor's `git add` after the run.
git config filter.omoi.clean "touch $MARKER; cat" && echo '* filter=omoi' > .gitattributes
echo "$r"
"#,
            ports = ports.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let pg = port_of(&infra.db.url);
    let env: Vec<(String, String)> = [
        ("OMOI_RUNNER_COMMAND", format!("bash {}", script.display())),
        ("OMOI_RUNNER_ENV_ALLOW", "PATH".into()),
        ("OMOI_AGENT_USER", "nobody".into()),
        ("OMOI_AGENT_SANDBOX", "on".into()),
        ("OMOI_AGENT_SANDBOX_READ_ONLY", scripts.display().to_string()),
        // Every port of this machine: only the mesh's own stay shut.
        ("OMOI_AGENT_ALLOWED_HOSTS", "127.0.0.1".into()),
        ("OMOI_AGENT_DENIED_ADDRS", format!("127.0.0.1:{pg}")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    mesh.add_executor(&infra, &env).await.unwrap();
    let marker = std::env::temp_dir().join(format!("omoi-escaped-{}", uuid::Uuid::new_v4().simple()));
    let told = format!(
        "NATS={} PG={pg} QUEUE={} TICKET={} EXECUTOR={} ALLOWED={} OUTSIDE={} ROOT={} TOKEN={} MARKER={}\n",
        port_of(&infra.nats_url),
        mesh.task_queue.port,
        mesh.ticket.port,
        mesh.executors[0].port,
        port_of(&allowed.url),
        port_of(&outside.url),
        root.display(),
        token.display(),
        marker.display()
    );
    std::fs::write(&ports, told).unwrap();
    // Another repository's objects in the executor's git cache, readable
    // by anyone on this machine: not in this agent's sandbox.
    let other_repo = root.join(".git-cache/other.git/objects");
    std::fs::create_dir_all(&other_repo).unwrap();
    std::fs::write(other_repo.join("secret"), "another ticket's code").unwrap();
    std::fs::set_permissions(&ports, std::fs::Permissions::from_mode(0o644)).unwrap();

    let (done, bare, branch) = one_task_on_a_repository(&mesh, "try everything").await;
    let result = omoi_proto::convert::struct_to_json(done.tasks[0].result.as_ref().unwrap());
    assert_eq!(
        result["summary"].as_str().unwrap(),
        "nats=closed pg=closed queue=closed ticket=closed executor=closed direct=000 \
         allowed=200 outside=403 nats_via_proxy=403 pg_via_proxy=403 queue_via_proxy=403 executor_via_proxy=403 \
         fences=hidden other=hidden other_home=hidden token=hidden home=own wrote=yes \
         git=ok objects=READ cache_write=refused cache_config=hidden other_repo=hidden"
    );
    let ws = Path::new(result["workspace"].as_str().unwrap());
    assert_eq!(std::fs::read_to_string(ws.join("proof.txt")).unwrap(), "proof\n");
    // The attempt's home went with it.
    assert!(!ws.with_extension("home").exists());
    // Each refusal is on the attempt's own output, for its timeline.
    let output = task_output(&mesh.task_queue.url, &done.tasks[0].id).await;
    let said = |line: String| assert!(output.contains(&line), "{line:?} not in {output:#?}");
    said(format!(
        "omoi egress proxy: localhost:{} is not on the executor's OMOI_AGENT_ALLOWED_HOSTS",
        port_of(&outside.url)
    ));
    said(format!(
        "omoi egress proxy: 127.0.0.1:{} is one of omoi's own addresses",
        port_of(&infra.nats_url)
    ));
    // Its work landed, through the executor's git in its workspace, which
    // ran the agent's filter in the sandbox: nothing reached this machine.
    let show = format!("{branch}:proof.txt");
    assert_eq!(omoi_tests::repo::git(&bare, &["show", &show]), "proof");
    assert!(!marker.exists(), "the agent's git filter ran outside its sandbox");

    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
    for dir in [secrets, scripts, bare.parent().unwrap().to_path_buf()] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_in_the_sandbox_works_through_the_model_proxy_without_its_key() {
    let infra = Infra::new().await.unwrap();
    let api = ModelApi::start().await.unwrap();
    let home = tempdir("agent-home");
    let mut mesh = bare_mesh(&infra).await;
    let mut env = api.executor_env(Cli::Claude, &home, SECRET);
    env.extend([
        ("OMOI_AGENT_SANDBOX".to_owned(), "on".to_owned()),
        ("OMOI_AGENT_USER".to_owned(), "nobody".to_owned()),
    ]);
    mesh.add_executor(&infra, &env).await.unwrap();
    let tickets = mesh.tickets();
    let created = file_ticket(&tickets, one_task("write hello.txt outcome=reveal")).await;
    let done = wait_ticket(&tickets, &created.ticket.unwrap().id, COMPLETED).await;
    let result = omoi_proto::convert::struct_to_json(done.tasks[0].result.as_ref().unwrap());
    assert_eq!(result["summary"], "Done: wrote hello.txt");
    let ws = Path::new(result["workspace"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(ws.join("hello.txt")).unwrap(),
        "hello from claude\n"
    );

    // The model API got the real key on every call, through the proxy.
    let keys = api.keys();
    assert!(keys.len() >= 3, "{keys:?}");
    assert!(keys.iter().all(|k| k == SECRET), "{keys:?}");
    // The agent held the placeholder, and the proxy's address.
    let conversation = api.conversations().last().unwrap().to_string();
    assert!(
        conversation.contains(&format!("ANTHROPIC_API_KEY={PLACEHOLDER}")),
        "{conversation}"
    );
    assert!(conversation.contains("ANTHROPIC_BASE_URL=http://127.0.0.1:13129"));
    assert!(!conversation.contains(SECRET));
    // The proxy counted what the answers said was used: a second source,
    // in the run's output, the same as the agent's own account.
    let t = api.tally();
    let counted = format!(
        "model proxy counted {} answers: {} input, {} output, {} cache read, {} cache write tokens",
        t.answers, t.input_tokens, t.output_tokens, t.cache_read_tokens, t.cache_write_tokens
    );
    let output = task_output(&mesh.task_queue.url, &done.tasks[0].id).await;
    assert!(output.contains(&counted), "{counted:?} not in {output:#?}");
    let usage = done.tasks[0].usage.as_ref().unwrap();
    assert_eq!(
        (usage.input_tokens, usage.output_tokens),
        (t.input_tokens, t.output_tokens)
    );
    // Nothing the agent had or wrote holds the key: its workspace, its home,
    // the executor's state; nor does anything the mesh reports.
    assert_eq!(files_holding(&mesh.workspace_root, SECRET), Vec::<PathBuf>::new());
    assert!(!format!("{done:?}").contains(SECRET));

    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
    let _ = std::fs::remove_dir_all(home);
}

/// How the test's private NATS knows its users.
enum NatsAuth {
    /// Users and passwords (`server_authorization`), in the URLs.
    Passwords,
    /// Operator mode: user JWTs in credentials files (`NATS_CREDS_FILE`).
    Jwt,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_executors_nats_user_publishes_output_and_checkpoints_and_nothing_else() {
    executor_user_is_fenced(NatsAuth::Passwords).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_executors_nats_credentials_file_holds_it_to_the_same() {
    executor_user_is_fenced(NatsAuth::Jwt).await;
}

async fn executor_user_is_fenced(auth: NatsAuth) {
    use omoi_bus::auth::{User, executor_permissions, server_authorization};
    let mut infra = Infra::new().await.unwrap();
    let machines_nats = infra.nats_url.clone();
    let creds_dir = tempdir("creds");
    let permissions = executor_permissions(&infra.topology, &infra.sessions_bucket());
    // The server's configuration, and how the services and the executor
    // present themselves: (its NATS_URL, its NATS_CREDS_FILE).
    let (config, services, executor) = match auth {
        NatsAuth::Passwords => {
            let (services, executor) = (
                uuid::Uuid::new_v4().simple().to_string(),
                uuid::Uuid::new_v4().simple().to_string(),
            );
            let config = server_authorization(
                &infra.topology,
                &infra.sessions_bucket(),
                &User {
                    name: "omoi",
                    password: &services,
                },
                &User {
                    name: "omoi-executor",
                    password: &executor,
                },
            );
            (
                config,
                (format!("omoi:{services}@"), None),
                (format!("omoi-executor:{executor}@"), None),
            )
        }
        NatsAuth::Jwt => {
            let operator = omoi_tests::nats_jwt::Operator::new();
            let services = operator.user(&creds_dir, "omoi", None);
            let executor = operator.user(&creds_dir, "omoi-executor", Some(&permissions));
            (
                operator.server_config.clone(),
                (String::new(), Some(services)),
                (String::new(), Some(executor)),
            )
        }
    };
    let nats = PrivateNats::start_with_config(&config).await.unwrap();
    infra.nats_url = format!("nats://{}127.0.0.1:{}", services.0, nats.port);
    infra.nats_creds = services.1.clone();
    let executor_url = format!("nats://{}127.0.0.1:{}", executor.0, nats.port);
    let mut mesh = bare_mesh(&infra).await;
    // The executor on its own user: its agent's output and its session's
    // checkpoints go through.
    let mut env: Vec<(String, String)> = [
        ("NATS_URL", executor_url.as_str()),
        ("OMOI_DEMO_TURNS", "3"),
        ("OMOI_DEMO_SLEEP_MS", "300"),
        ("OMOI_CHECKPOINT_SECONDS", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    if let Some(creds) = &executor.1 {
        env.push(("NATS_CREDS_FILE".into(), creds.display().to_string()));
    }
    mesh.add_executor(&infra, &env).await.unwrap();
    let tickets = mesh.tickets();
    let created = file_ticket(&tickets, one_task("talk for a while")).await;
    let done = wait_ticket(&tickets, &created.ticket.unwrap().id, COMPLETED).await;
    let task = &done.tasks[0];
    let session = task.session.as_ref().expect("a session");
    assert!(session.checkpoints >= 1 && session.checkpoint_bytes > 0, "{session:?}");
    let output = task_output(&mesh.task_queue.url, &task.id).await;
    assert!(output.iter().any(|l| l.starts_with("checkpoint ")), "{output:#?}");

    // With the executor's credentials: no forged event, no deleted stream.
    let forged = omoi_bus::connect_with(&executor_url, executor.1.as_deref(), "forger")
        .await
        .unwrap();
    let js = async_nats::jetstream::new(forged);
    let subject = infra.topology.event_subject("task", "TASK_COMPLETED", None);
    let published = async { js.publish(subject.clone(), "forged".into()).await?.await };
    assert!(
        published.await.is_err(),
        "an event published with the executor's credentials"
    );
    assert!(js.delete_stream(&infra.topology.stream).await.is_err());
    assert!(js.delete_stream(infra.topology.output_stream()).await.is_err());
    // As the services see it: both streams there, no forged event in.
    let owner = omoi_bus::connect_with(&infra.nats_url, services.1.as_deref(), "owner")
        .await
        .unwrap();
    let owner = async_nats::jetstream::new(owner);
    let events = owner.get_stream(&infra.topology.stream).await.unwrap();
    assert!(events.get_last_raw_message_by_subject(&subject).await.is_err());
    owner.get_stream(infra.topology.output_stream()).await.unwrap();

    mesh.stop().await.unwrap();
    infra.nats_url = machines_nats;
    infra.nats_creds = None;
    infra.cleanup().await.unwrap();
    drop(nats);
    let _ = std::fs::remove_dir_all(creds_dir);
}

/// An executor started with `env` (and the machine's NATS), until it
/// exits by itself: its exit status and what it said.
pub(super) async fn executor_refusing(env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let out = tokio::process::Command::new(omoi_tests::process::binary("omoi-executor"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("NATS_URL", omoi_tests::infra::nats_url())
        .env(
            "OMOI_LISTEN_ADDR",
            format!("127.0.0.1:{}", omoi_tests::process::free_port()),
        )
        .env("OMOI_RUNNER_COMMAND", "true")
        .env(
            "OMOI_WORKSPACE_ROOT",
            std::env::temp_dir().join(format!("omoi-ws-{}", uuid::Uuid::new_v4().simple())),
        )
        .envs(env.iter().copied())
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), out)
        .await
        .expect("the executor stops by itself")
        .unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_that_cannot_fence_its_agents_as_told_does_not_start() {
    // No sandbox to be had, and one required: it says why and stops.
    let (status, said) = executor_refusing(&[
        ("OMOI_AGENT_SANDBOX", "on"),
        ("OMOI_AGENT_SANDBOX_BWRAP", "/nonexistent/bwrap"),
    ])
    .await;
    assert!(!status.success());
    assert!(
        said.contains("OMOI_AGENT_SANDBOX=on, but agents cannot be sandboxed on this machine")
            && said.contains("/nonexistent/bwrap"),
        "{said}"
    );
    // An allow-list entry that is not a host: named.
    let (status, said) = executor_refusing(&[("OMOI_AGENT_ALLOWED_HOSTS", "registry.npmjs.org,*")]).await;
    assert!(!status.success());
    assert!(
        said.contains(r#"OMOI_AGENT_ALLOWED_HOSTS: "*" is not a host"#),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_sandbox_to_be_had_auto_runs_agents_and_says_so_loudly() {
    let infra = Infra::new().await.unwrap();
    let mut mesh = bare_mesh(&infra).await;
    let logs = tempdir("executor-log");
    let log = logs.join("executor.log");
    let env: Vec<(String, String)> = [
        ("OMOI_AGENT_SANDBOX_BWRAP", "/nonexistent/bwrap".to_owned()),
        (omoi_tests::process::LOG_FILE, log.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    mesh.add_executor(&infra, &env).await.unwrap();
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("AGENTS RUN WITHOUT A SANDBOX"), "{said}");
    assert!(said.contains("/nonexistent/bwrap"), "{said}");
    let tickets = mesh.tickets();
    let created = file_ticket(&tickets, one_task("unfenced")).await;
    let done = wait_ticket(&tickets, &created.ticket.unwrap().id, COMPLETED).await;
    let output = task_output(&mesh.task_queue.url, &done.tasks[0].id).await;
    let started = output.iter().find(|l| l.starts_with("started ")).unwrap();
    assert!(!started.contains("in its sandbox"), "{started}");
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
    let _ = std::fs::remove_dir_all(logs);
}
