//! The whole mesh as replicated processes that can be killed and started
//! again on their ports: two task-queues, two health services, two ticket
//! services and executors running the demo agent, as a cluster runs them.
//! The chaos test and the soak drive it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use omoi_tests::process::{LOG_FILE, Service, free_port};

/// How the fleet is made up and tuned.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub database_url: String,
    pub nats_url: String,
    /// Replicas of each of task-queue, health and ticket.
    pub replicas: usize,
    pub executors: usize,
    /// Runs each executor holds at once.
    pub executor_capacity: u32,
    /// Where logs and workspaces go.
    pub dir: PathBuf,
    /// Extra environment of every process.
    pub env: Vec<(String, String)>,
    /// Extra environment of the executors (demo agent knobs).
    pub executor_env: Vec<(String, String)>,
}

/// One restartable process of the fleet.
pub struct Proc {
    pub name: String,
    bin: &'static str,
    pub port: u16,
    env: Vec<(String, String)>,
    service: Option<Service>,
}

impl Proc {
    fn new(name: String, bin: &'static str, env: Vec<(String, String)>, port: u16, dir: &Path) -> Self {
        let mut env = env;
        env.push(("OMOI_LISTEN_ADDR".into(), format!("127.0.0.1:{port}")));
        env.push((LOG_FILE.into(), dir.join(format!("{name}.log")).display().to_string()));
        Self {
            name,
            bin,
            port,
            env,
            service: None,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.service.as_ref().and_then(|s| s.child.id())
    }

    pub fn is_running(&self) -> bool {
        self.service.is_some()
    }

    /// Starts it (again) on its port and waits until it serves.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let service = Service::spawn(self.bin, self.port, &self.env)?;
        self.service = Some(service);
        omoi_runtime::grpc::Connector::default()
            .wait_serving(&self.url(), Duration::from_secs(120))
            .await
            .map_err(|e| anyhow::anyhow!("{} did not serve: {e}", self.name))
    }

    /// SIGKILL: it dies at once, mid-whatever.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(s) = self.service.take() {
            s.kill9().await?;
        }
        Ok(())
    }

    /// SIGTERM and its exit code (None: killed by a signal, or not running).
    pub async fn terminate(&mut self, within: Duration) -> anyhow::Result<Option<i32>> {
        match self.service.take() {
            Some(s) => Ok(s.terminate(within).await?.code()),
            None => Ok(None),
        }
    }
}

/// The processes of the fleet, in start order: task-queues, health,
/// tickets, executors.
pub struct Fleet {
    pub procs: Vec<Proc>,
    pub dir: PathBuf,
}

impl Fleet {
    /// Starts every process and waits until each serves. Replica `i` of the
    /// ticket service uses task-queue `i`; executor `j` uses replica `j mod
    /// replicas` of each service and keeps the identity `executor-j` across
    /// restarts.
    pub async fn start(o: &FleetOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&o.dir)?;
        let base = |extra: &[(&str, String)]| {
            let mut env: Vec<(String, String)> = vec![
                ("DATABASE_URL".into(), o.database_url.clone()),
                ("NATS_URL".into(), o.nats_url.clone()),
                ("OMOI_SHUTDOWN_GRACE_SECONDS".into(), "10".into()),
            ];
            env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
            env.extend(o.env.iter().cloned());
            env
        };
        let ports = |n: usize| (0..n).map(|_| free_port()).collect::<Vec<_>>();
        let (tq, health, ticket) = (ports(o.replicas), ports(o.replicas), ports(o.replicas));
        let url = |p: u16| format!("http://127.0.0.1:{p}");
        let mut procs = Vec::new();
        for (i, p) in tq.iter().enumerate() {
            let env = base(&[("OMOI_DB_MAX_CONNECTIONS", "8".into())]);
            procs.push(Proc::new(format!("task-queue-{i}"), "omoi-task-queue", env, *p, &o.dir));
        }
        for (i, p) in health.iter().enumerate() {
            let env = base(&[("OMOI_DB_MAX_CONNECTIONS", "4".into())]);
            procs.push(Proc::new(format!("health-{i}"), "omoi-health", env, *p, &o.dir));
        }
        for (i, p) in ticket.iter().enumerate() {
            let env = base(&[
                ("OMOI_DB_MAX_CONNECTIONS", "4".into()),
                ("OMOI_TASK_QUEUE_URL", url(tq[i])),
            ]);
            procs.push(Proc::new(format!("ticket-{i}"), "omoi-ticket", env, *p, &o.dir));
        }
        let workspaces = o.dir.join("workspaces");
        for j in 0..o.executors {
            let r = j % o.replicas;
            // A home of its own: what an agent keeps there (its session)
            // reaches another executor only through a checkpoint.
            let home = o.dir.join(format!("home-{j}"));
            std::fs::create_dir_all(&home)?;
            let mut env = base(&[
                ("HOME", home.display().to_string()),
                ("OMOI_TASK_QUEUE_URL", url(tq[r])),
                ("OMOI_HEALTH_URL", url(health[r])),
                ("OMOI_TICKET_URL", url(ticket[r])),
                ("OMOI_AGENT_ID", format!("executor-{j}")),
                ("OMOI_EXECUTOR_CAPACITY", o.executor_capacity.to_string()),
                ("OMOI_WORKSPACE_POLICY", "remove".into()),
            ]);
            env.extend(omoi_tests::mesh::demo_executor_env(&workspaces));
            env.extend(o.executor_env.iter().cloned());
            procs.push(Proc::new(
                format!("executor-{j}"),
                "omoi-executor",
                env,
                free_port(),
                &o.dir,
            ));
        }
        let mut fleet = Self {
            procs,
            dir: o.dir.clone(),
        };
        for p in &mut fleet.procs {
            p.start().await?;
        }
        Ok(fleet)
    }

    pub fn urls(&self, bin: &str) -> Vec<String> {
        self.procs.iter().filter(|p| p.bin == bin).map(Proc::url).collect()
    }

    /// SIGTERM to every process, executors first; the names of those that
    /// did not exit 0.
    pub async fn stop(mut self) -> anyhow::Result<Vec<String>> {
        let mut unclean = Vec::new();
        for p in self.procs.iter_mut().rev() {
            let running = p.is_running();
            let code = p.terminate(Duration::from_secs(60)).await?;
            if running && code != Some(0) {
                unclean.push(format!("{} exited {code:?}", p.name));
            }
        }
        Ok(unclean)
    }
}
