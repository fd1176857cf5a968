//! `omoi up`: the whole mesh as local processes, on this machine's
//! PostgreSQL and NATS or on private ones (`local`), with a sample ticket
//! followed to its end: its four phases land as four commits on a branch of
//! a local sample repository.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use omoi_proto::ticket as pb;
use tokio::process::{Child, Command};

use omoi_runtime::grpc::Connector;

use crate::local::{self, Backing};
use crate::{print_ticket_summary, status_name, tickets, watch};

#[derive(Debug, clap::Args)]
pub struct Up {
    /// Stop everything once the sample ticket ended, instead of serving
    /// until Ctrl-C.
    #[arg(long)]
    exit_when_done: bool,
    /// Start the mesh without filing the sample ticket.
    #[arg(long)]
    no_ticket: bool,
    /// Executors to start.
    #[arg(long, default_value_t = 2)]
    executors: u16,
    /// Ports: ticket on this one, then task-queue, health and the executors.
    #[arg(long, default_value_t = 50051)]
    base_port: u16,
    /// Port of omoi-console, the HTTP/JSON API.
    #[arg(long, default_value_t = 8080)]
    console_port: u16,
    /// Where the executors make their workspaces.
    #[arg(long, env = "OMOI_WORKSPACE_ROOT")]
    workspace_root: Option<PathBuf>,
    /// Who does the work: the bundled demo agent (`command`) or a coding
    /// agent, with its key from this environment (ANTHROPIC_API_KEY,
    /// OPENAI_API_KEY or GEMINI_API_KEY, or their *_FILE forms).
    #[arg(long, default_value = "command", value_parser = ["command", "claude-code", "codex", "gemini"])]
    runner: String,
    /// The repository the sample ticket works on (a git URL or an absolute
    /// path); default: a local sample repository made on first use.
    #[arg(long, visible_alias = "repo")]
    repository: Option<String>,
}

/// The sample ticket's repository when none is given: a bare repository
/// under `base` holding one commit on `main`, made once and reused (each
/// ticket works on a branch of its own).
fn sample_repository(base: &Path) -> anyhow::Result<PathBuf> {
    let repo = base.join("sample-repo.git");
    if repo.join("HEAD").exists() {
        return Ok(repo);
    }
    let seed = base.join("sample-repo-seed");
    let _ = std::fs::remove_dir_all(&seed);
    std::fs::create_dir_all(&seed)?;
    git(
        base,
        &["init", "--quiet", "--bare", "-b", "main", &repo.display().to_string()],
    )?;
    git(&seed, &["init", "--quiet", "-b", "main"])?;
    std::fs::write(
        seed.join("README.md"),
        "# Greeter\n\nA small app that greets people. omoi's sample tickets work on it.\n",
    )?;
    git(&seed, &["add", "README.md"])?;
    git(&seed, &["commit", "--quiet", "-m", "Start the greeter"])?;
    git(&seed, &["push", "--quiet", &repo.display().to_string(), "main"])?;
    std::fs::remove_dir_all(&seed)?;
    Ok(repo)
}

/// Runs git (as the omoi author, for the sample's first commit); its output.
fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "omoi")
        .env("GIT_AUTHOR_EMAIL", "omoi@localhost")
        .env("GIT_COMMITTER_NAME", "omoi")
        .env("GIT_COMMITTER_EMAIL", "omoi@localhost")
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run git (is it installed?): {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "git {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The ticket's branch in a local repository: its commits and what they
/// changed, and how to look closer.
fn print_branch(repository: &str, ticket: &pb::Ticket) -> anyhow::Result<()> {
    let repo = Path::new(repository);
    if ticket.branch.is_empty() || !repo.is_absolute() {
        return Ok(());
    }
    let base = if ticket.base_ref.is_empty() {
        "HEAD"
    } else {
        &ticket.base_ref
    };
    let range = format!("{base}..{}", ticket.branch);
    println!();
    println!("Branch {} in {}:", ticket.branch, repo.display());
    print!("{}", git(repo, &["log", "--reverse", "--format=  %h %s", &range])?);
    print!(
        "{}",
        git(repo, &["diff", "--stat", &format!("{base}...{}", ticket.branch)])?
    );
    println!("Look closer: git -C {} log -p {range}", repo.display());
    Ok(())
}

/// The key a coding-agent runner needs, by the variable that holds it.
fn key_of(runner: &str) -> Option<&'static str> {
    match runner {
        "claude-code" => Some("ANTHROPIC_API_KEY"),
        "codex" => Some("OPENAI_API_KEY"),
        "gemini" => Some("GEMINI_API_KEY"),
        _ => None,
    }
}

struct Proc {
    name: String,
    url: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn terminate(&self) {
        if let Some(pid) = self.child.id() {
            omoi_runtime::shutdown::send_signal(pid as i32, omoi_runtime::shutdown::SIGTERM);
        }
    }
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() && std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
}

/// The omoi binaries this one was built with.
const BINARIES: [&str; 6] = [
    "omoi-task-queue",
    "omoi-health",
    "omoi-ticket",
    "omoi-console",
    "omoi-executor",
    "omoi-demo-agent",
];

/// Starts mesh processes from the binaries next to this one, each logging
/// to a file of its own and knowing where its peers are.
struct Launcher {
    bin_dir: PathBuf,
    logs: PathBuf,
    peers: Vec<(String, String)>,
    /// The executors' NATS user, when they have one of their own.
    executor_nats: Option<String>,
}

fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

impl Launcher {
    fn new(logs: PathBuf, ports: &[u16], backing: &Backing, token: Option<&Path>) -> anyhow::Result<Self> {
        let bin_dir = std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| anyhow::anyhow!("cannot tell where the omoi binaries are"))?;
        for bin in BINARIES {
            anyhow::ensure!(
                bin_dir.join(bin).exists(),
                "{} is missing next to omoi; build them all with `cargo build --release --bins`",
                bin_dir.join(bin).display()
            );
        }
        let mut peers = vec![
            ("OMOI_TICKET_URL".into(), url(ports[0])),
            ("OMOI_TASK_QUEUE_URL".into(), url(ports[1])),
            ("OMOI_HEALTH_URL".into(), url(ports[2])),
        ];
        if let Some(db) = &backing.database_url {
            peers.push(("DATABASE_URL".into(), db.clone()));
        }
        if let Some(nats) = &backing.nats_url {
            peers.push(("NATS_URL".into(), nats.clone()));
        }
        // Every service requires the mesh's token of the others and of
        // clients (an agent on this machine cannot just call them).
        if let Some(file) = token {
            peers.push(("OMOI_AUTH_TOKEN_FILE".into(), file.display().to_string()));
        }
        Ok(Self {
            bin_dir,
            logs,
            peers,
            executor_nats: backing.executor_nats_url.clone(),
        })
    }

    fn start(&self, name: &str, bin: &str, port: u16, extra: Vec<(String, String)>) -> anyhow::Result<Proc> {
        let log = self.logs.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(self.bin_dir.join(bin))
            .env("OMOI_LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .envs(self.peers.iter().cloned())
            .envs(extra)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {bin}: {e}"))?;
        Ok(Proc {
            name: name.to_owned(),
            url: url(port),
            child,
            log,
        })
    }

    /// An executor running `runner` (the demo agent for `command`) in
    /// `workspaces`; a coding agent's key comes from this environment. Its
    /// sandboxed agents may not reach the database or the console, which
    /// it does not otherwise know of.
    fn executor(&self, n: u16, port: u16, workspaces: &Path, runner: &str, console: u16) -> anyhow::Result<Proc> {
        let agent = self.bin_dir.join("omoi-demo-agent").display().to_string();
        let database = self
            .peers
            .iter()
            .find(|(k, _)| k == "DATABASE_URL")
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var("DATABASE_URL").ok());
        let denied: Vec<String> = std::iter::once(format!("127.0.0.1:{console}"))
            .chain(database)
            .collect();
        let mut env = vec![
            ("OMOI_AGENT_DENIED_ADDRS".to_string(), denied.join(",")),
            ("OMOI_RUNNER".to_string(), runner.to_string()),
            ("OMOI_RUNNER_COMMAND".to_string(), agent),
            ("OMOI_WORKSPACE_ROOT".to_string(), workspaces.display().to_string()),
            (
                "OMOI_RUNNER_ENV_ALLOW".to_string(),
                "PATH,HOME,LANG,OMOI_DEMO_SLEEP_MS".to_string(),
            ),
        ];
        if let Some(nats) = &self.executor_nats {
            env.push(("NATS_URL".to_string(), nats.clone()));
        }
        self.start(&format!("executor-{n}"), "omoi-executor", port, env)
    }
}

impl Up {
    pub async fn run(self) -> anyhow::Result<()> {
        if let Some(key) = key_of(&self.runner) {
            let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
            anyhow::ensure!(
                set(key) || set(&format!("{key}_FILE")),
                "--runner {} needs {key} (or {key}_FILE) in the environment",
                self.runner
            );
        }
        let ports: Vec<u16> = (0..3 + self.executors).map(|i| self.base_port + i).collect();
        for p in ports.iter().chain([&self.console_port]) {
            anyhow::ensure!(
                port_free(*p),
                "port {p} is taken; stop what uses it or pick other ports with --base-port"
            );
        }
        let base = std::env::temp_dir().join("omoi");
        let logs = base.join("logs");
        let workspaces = self.workspace_root.clone().unwrap_or_else(|| base.join("workspaces"));
        std::fs::create_dir_all(&logs)?;
        std::fs::create_dir_all(&workspaces)?;
        let state = local::state_dir();
        let token_file = local::mesh_token(&state)?;
        let mut backing = Backing::prepare(&state).await?;
        for note in &backing.notes {
            println!("omoi: {note}");
        }
        let launcher = match Launcher::new(logs.clone(), &ports, &backing, token_file.as_deref()) {
            Ok(launcher) => launcher,
            Err(e) => {
                backing.stop().await;
                return Err(e);
            }
        };
        println!("omoi: starting the mesh (logs in {})", logs.display());
        let mut procs = Vec::new();
        let result = async {
            self.start_mesh(&launcher, &ports, &workspaces, &mut procs).await?;
            println!(
                "omoi: the console is at http://127.0.0.1:{}/ (the board, each ticket's tasks and its agents' work, live)",
                self.console_port
            );
            let outcome = if self.no_ticket {
                None
            } else {
                let repository = match &self.repository {
                    Some(r) => r.clone(),
                    None => sample_repository(&base)?.display().to_string(),
                };
                Some(
                    self.sample(&url(ports[0]), &workspaces, &repository, token_file.as_deref())
                        .await?,
                )
            };
            print_hints(&ports, self.console_port, token_file.as_deref());
            if !self.exit_when_done {
                println!("Ctrl-C stops everything.");
                wait_for_stop().await?;
            }
            Ok::<_, anyhow::Error>(outcome)
        }
        .await;
        println!("omoi: stopping the mesh");
        stop_all(&mut procs).await;
        backing.stop().await;
        match result? {
            Some(status) if status != i32::from(omoi_proto::common::TicketStatus::Completed) => {
                anyhow::bail!("the sample ticket ended {}", status_name(status))
            }
            _ => Ok(()),
        }
    }

    /// Task-queue first (the others need it), then health and ticket, then
    /// the executors; each ready before the next that needs it.
    async fn start_mesh(
        &self,
        launcher: &Launcher,
        ports: &[u16],
        workspaces: &Path,
        procs: &mut Vec<Proc>,
    ) -> anyhow::Result<()> {
        procs.push(launcher.start("task-queue", "omoi-task-queue", ports[1], vec![])?);
        ready(&mut procs[0]).await?;
        procs.push(launcher.start("health", "omoi-health", ports[2], vec![])?);
        procs.push(launcher.start("ticket", "omoi-ticket", ports[0], vec![])?);
        ready(&mut procs[1]).await?;
        ready(&mut procs[2]).await?;
        for i in 0..self.executors {
            procs.push(launcher.executor(
                i + 1,
                ports[3 + i as usize],
                workspaces,
                &self.runner,
                self.console_port,
            )?);
            let last = procs.len() - 1;
            ready(&mut procs[last]).await?;
        }
        let mut console = launcher.start("console", "omoi-console", self.console_port, vec![])?;
        listening(&mut console).await?;
        procs.push(console);
        println!();
        for p in procs.iter() {
            println!("  {:<12} {}", p.name, p.url);
        }
        println!();
        Ok(())
    }

    /// Files the sample ticket and follows it; returns its final status.
    async fn sample(
        &self,
        ticket_url: &str,
        workspaces: &Path,
        repository: &str,
        token_file: Option<&Path>,
    ) -> anyhow::Result<i32> {
        let token = std::env::var("OMOI_AUTH_TOKEN")
            .ok()
            .or_else(|| omoi_runtime::config::secret_file(&std::env::var("OMOI_AUTH_TOKEN_FILE").ok()?).ok())
            .or_else(|| std::fs::read_to_string(token_file?).ok())
            .map(|t| t.trim().to_owned());
        let connector = Connector::new(token.as_deref(), &omoi_runtime::tls::TlsArgs::default())?;
        let mut client = tickets(ticket_url, &connector)?;
        let created = client
            .create_ticket(pb::CreateTicketRequest {
                title: "Add a greeting feature".into(),
                description: "Greet users by name on the home page, with tests.".into(),
                priority: 3,
                repository: repository.to_owned(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let ticket = created.ticket.unwrap_or_default();
        println!("Filed ticket {} with {} phase tasks:", ticket.id, created.tasks.len());
        for t in &created.tasks {
            println!("  {}  {}", crate::short(&t.id), t.title);
        }
        println!();
        watch(&mut client, &ticket.id, crate::ops::Output::Text).await?;
        let done = client
            .get_ticket(pb::GetTicketRequest {
                ticket_id: ticket.id.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        println!();
        print_ticket_summary(&done, workspaces);
        let ticket = done.ticket.unwrap_or_default();
        print_branch(repository, &ticket)?;
        Ok(ticket.status)
    }
}

fn print_hints(ports: &[u16], console: u16, token_file: Option<&Path>) {
    println!();
    println!("The mesh is up. The console: http://127.0.0.1:{console}/");
    // The token itself is never printed: it is read where it is kept.
    let (curl, grpc) = match token_file {
        Some(file) => {
            println!(
                "Every service asks for the mesh's bearer token, kept in {} (the omoi CLI reads it there; the console asks for it once).",
                file.display()
            );
            (
                format!(" -H \"Authorization: Bearer $(cat {})\"", file.display()),
                format!(" -H \"authorization: Bearer $(cat {})\"", file.display()),
            )
        }
        None => (String::new(), String::new()),
    };
    println!("Try, from another terminal:");
    println!("  curl{curl} http://127.0.0.1:{console}/v1/tickets");
    println!("  curl{curl} -d '{{\"title\":\"Write a changelog\"}}' http://127.0.0.1:{console}/v1/tickets");
    println!("  grpcurl -plaintext{grpc} 127.0.0.1:{} list", ports[0]);
    println!(
        "  grpcurl -plaintext{grpc} -d '{{\"title\":\"Write a changelog\"}}' 127.0.0.1:{} omoi.ticket.v1.TicketService/CreateTicket",
        ports[0]
    );
    println!(
        "  grpcurl -plaintext{grpc} 127.0.0.1:{} omoi.taskqueue.v1.TaskQueueService/GetQueueStats",
        ports[1]
    );
    println!(
        "  grpcurl -plaintext{grpc} 127.0.0.1:{} omoi.health.v1.AgentHealthService/ListAgents",
        ports[2]
    );
    if let Some(executor) = ports.get(3) {
        println!("  grpcurl -plaintext{grpc} 127.0.0.1:{executor} omoi.executor.v1.ExecutorService/ListExecutions");
    }
}

async fn wait_for_stop() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

/// Executors first (they hand back their work), the task-queue last.
async fn stop_all(procs: &mut [Proc]) {
    for p in procs.iter().rev() {
        p.terminate();
    }
    for p in procs.iter_mut().rev() {
        let _ = tokio::time::timeout(Duration::from_secs(30), p.child.wait()).await;
    }
}

/// Waits until an HTTP process accepts connections.
async fn listening(p: &mut Proc) -> anyhow::Result<()> {
    let addr = p.url.trim_start_matches("http://").to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(&addr).await.is_err() {
        if let Some(status) = p.child.try_wait()? {
            anyhow::bail!("{} exited ({status}) at start; see {}", p.name, p.log.display());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{} not listening at {addr}; see {}",
            p.name,
            p.log.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn ready(p: &mut Proc) -> anyhow::Result<()> {
    let probe = Connector::default();
    tokio::select! {
        r = probe.wait_serving(&p.url, Duration::from_secs(60)) => r.map_err(|e| {
            anyhow::anyhow!("{} not ready ({e}); see {}", p.name, p.log.display())
        }),
        status = p.child.wait() => anyhow::bail!(
            "{} exited ({}) at start; see {}",
            p.name,
            status.map(|s| s.to_string()).unwrap_or_default(),
            p.log.display()
        ),
    }
}
