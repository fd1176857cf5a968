//! `omoi up`: the whole mesh as local processes on this machine's
//! PostgreSQL and NATS, with a sample ticket followed to its end.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use omoi_proto::ticket as pb;
use tokio::process::{Child, Command};

use omoi_runtime::grpc::Connector;

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
    /// Where the executors make their workspaces.
    #[arg(long, env = "OMOI_WORKSPACE_ROOT")]
    workspace_root: Option<PathBuf>,
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

impl Up {
    pub async fn run(self) -> anyhow::Result<()> {
        let bin_dir = std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| anyhow::anyhow!("cannot tell where the omoi binaries are"))?;
        for bin in [
            "omoi-task-queue",
            "omoi-health",
            "omoi-ticket",
            "omoi-executor",
            "omoi-demo-agent",
        ] {
            anyhow::ensure!(
                bin_dir.join(bin).exists(),
                "{} is missing next to omoi; build them all with `cargo build --release --bins`",
                bin_dir.join(bin).display()
            );
        }
        let ports: Vec<u16> = (0..3 + self.executors).map(|i| self.base_port + i).collect();
        for p in &ports {
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
        let url = |port: u16| format!("http://127.0.0.1:{port}");
        let (ticket_url, queue_url, health_url) = (url(ports[0]), url(ports[1]), url(ports[2]));
        let shared: Vec<(String, String)> = vec![
            ("OMOI_TASK_QUEUE_URL".into(), queue_url.clone()),
            ("OMOI_HEALTH_URL".into(), health_url.clone()),
            ("OMOI_TICKET_URL".into(), ticket_url.clone()),
        ];
        let start = |name: &str, bin: &str, port: u16, extra: Vec<(String, String)>| -> anyhow::Result<Proc> {
            let log = logs.join(format!("{name}.log"));
            let file = std::fs::File::create(&log)?;
            let child = Command::new(bin_dir.join(bin))
                .env("OMOI_LISTEN_ADDR", format!("127.0.0.1:{port}"))
                .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
                .envs(shared.iter().cloned())
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
        };
        println!("omoi: starting the mesh (logs in {})", logs.display());
        let mut procs = vec![start("task-queue", "omoi-task-queue", ports[1], vec![])?];
        let result: anyhow::Result<Option<i32>> = async {
            ready(&mut procs[0]).await?;
            procs.push(start("health", "omoi-health", ports[2], vec![])?);
            procs.push(start("ticket", "omoi-ticket", ports[0], vec![])?);
            ready(&mut procs[1]).await?;
            ready(&mut procs[2]).await?;
            for i in 0..self.executors {
                let env = vec![
                    ("OMOI_RUNNER".to_string(), "command".to_string()),
                    (
                        "OMOI_RUNNER_COMMAND".to_string(),
                        bin_dir.join("omoi-demo-agent").display().to_string(),
                    ),
                    ("OMOI_WORKSPACE_ROOT".to_string(), workspaces.display().to_string()),
                    ("OMOI_RUNNER_ENV_ALLOW".to_string(), "PATH,HOME,LANG,OMOI_DEMO_SLEEP_MS".to_string()),
                ];
                let name = format!("executor-{}", i + 1);
                procs.push(start(&name, "omoi-executor", ports[3 + i as usize], env)?);
                let last = procs.len() - 1;
                ready(&mut procs[last]).await?;
            }
            println!();
            for p in &procs {
                println!("  {:<12} {}", p.name, p.url);
            }
            println!();
            let outcome = if self.no_ticket { None } else { Some(self.sample(&ticket_url, &workspaces).await?) };
            println!();
            println!("The mesh is up. Try, from another terminal:");
            println!("  grpcurl -plaintext 127.0.0.1:{} list", ports[0]);
            println!(
                "  grpcurl -plaintext -d '{{\"title\":\"Write a changelog\"}}' 127.0.0.1:{} omoi.ticket.v1.TicketService/CreateTicket",
                ports[0]
            );
            println!("  grpcurl -plaintext 127.0.0.1:{} omoi.taskqueue.v1.TaskQueueService/GetQueueStats", ports[1]);
            println!("  grpcurl -plaintext 127.0.0.1:{} omoi.health.v1.AgentHealthService/ListAgents", ports[2]);
            println!("  grpcurl -plaintext 127.0.0.1:{} omoi.executor.v1.ExecutorService/ListExecutions", ports[3]);
            if self.exit_when_done {
                return Ok(outcome);
            }
            println!("Ctrl-C stops everything.");
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            Ok(outcome)
        }
        .await;
        println!("omoi: stopping the mesh");
        // Executors first (they hand back their work), the task-queue last.
        for p in procs.iter().rev() {
            p.terminate();
            // Wait per process so that each drains before the next stops.
        }
        for p in procs.iter_mut().rev() {
            let _ = tokio::time::timeout(Duration::from_secs(30), p.child.wait()).await;
        }
        match result? {
            Some(status) if status != i32::from(omoi_proto::common::TicketStatus::Completed) => {
                anyhow::bail!("the sample ticket ended {}", status_name(status))
            }
            _ => Ok(()),
        }
    }

    /// Files the sample ticket and follows it; returns its final status.
    async fn sample(&self, ticket_url: &str, workspaces: &Path) -> anyhow::Result<i32> {
        let connector = Connector::new(
            std::env::var("OMOI_AUTH_TOKEN").ok().as_deref(),
            &omoi_runtime::tls::TlsArgs::default(),
        )?;
        let mut client = tickets(ticket_url, &connector)?;
        let created = client
            .create_ticket(pb::CreateTicketRequest {
                title: "Add a greeting feature".into(),
                description: "Greet users by name on the home page, with tests.".into(),
                priority: 3,
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
        watch(&mut client, &ticket.id).await?;
        let done = client
            .get_ticket(pb::GetTicketRequest {
                ticket_id: ticket.id.clone(),
            })
            .await?
            .into_inner();
        println!();
        print_ticket_summary(&done, workspaces);
        Ok(done.ticket.map(|t| t.status).unwrap_or_default())
    }
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
