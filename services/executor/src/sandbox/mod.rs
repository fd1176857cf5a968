//! The sandbox around every agent run (`OMOI_AGENT_SANDBOX`): bubblewrap gives
//! the agent's process tree network, PID, IPC, UTS and user namespaces of
//! its own and a filesystem of the read-only system, its program, its
//! workspace and its home — not the executor's state, other attempts'
//! workspaces, the git cache or the machine's secrets. Its network is
//! loopback alone, where the init ([`init`]) bridges two ports to the
//! executor's proxies for this attempt (a [`Fence`]): the egress proxy
//! ([`egress`], the allow-listed hosts, never the mesh) and the model
//! proxy ([`model`], the agent's model API with the real key, which the
//! agent never holds). The sandbox dies with the executor
//! (`--die-with-parent`, and the PID namespace with its first process).

mod egress;
mod hosts;
pub mod init;
mod model;
pub mod pod;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::agent_user::AgentUser;
use crate::config::{Config, SandboxMode};
pub use model::{KeyHeader, Metered, ModelRoute, PLACEHOLDER_KEY};

/// The loopback port inside the sandbox that reaches the egress proxy.
pub const EGRESS_PORT: u16 = 13128;
/// The loopback port inside the sandbox that reaches the model proxy.
pub const MODEL_PORT: u16 = 13129;

/// Where the init and the proxies' sockets appear inside.
const INSIDE: &str = "/omoi";

/// What of /etc an agent sees: names, users, certificates, the loader's
/// cache; not the machine's configuration or keys.
const ETC: [&str; 17] = [
    "/etc/passwd",
    "/etc/group",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/ssl/certs",
    "/etc/ssl/openssl.cnf",
    "/etc/ca-certificates",
    "/etc/ca-certificates.conf",
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/gitconfig",
    "/etc/mime.types",
    "/etc/os-release",
];

/// The top-level system directories, bound read-only (or recreated as the
/// links they are on a merged-/usr system).
const SYSTEM: [&str; 7] = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"];

/// One attempt, as the proxies name it in what they log, and where they
/// tell its run's output what they refused.
#[derive(Clone)]
pub struct Attempt {
    pub task_id: Uuid,
    pub attempt: i32,
    pub say: Arc<dyn Fn(String) + Send + Sync>,
}

impl std::fmt::Debug for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attempt")
            .field("task_id", &self.task_id)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

/// The executor's sandbox: how agents are fenced in.
#[derive(Debug)]
pub struct Sandbox {
    how: How,
    init: PathBuf,
    rules: Arc<egress::Rules>,
    model: Option<Arc<ModelRoute>>,
    read_only: Vec<PathBuf>,
    /// Where each attempt's proxy sockets live.
    dir: PathBuf,
    /// Who the proxies' sockets belong to (the agent's user).
    owner: Option<(u32, u32)>,
    /// Numbers the fences (short names: a socket's path is limited).
    fences: std::sync::atomic::AtomicU64,
    /// Between a stop's SIGTERM and SIGKILL (a pod's grace period).
    kill_grace: Duration,
}

/// What each attempt's agent runs in.
#[derive(Debug)]
enum How {
    /// bubblewrap, on this machine.
    Bwrap(PathBuf),
    /// A Kubernetes pod of its own, whose bridges reach the attempt's
    /// proxies through this executor's pod proxy listener.
    Pod {
        pods: Box<pod::Pods>,
        tokens: Arc<pod::Tokens>,
    },
}

/// The longest path of a unix socket (`sun_path`, with its NUL).
const SOCKET_PATH_MAX: usize = 107;

/// Where fences' sockets go: under the state directory, unless its path
/// leaves no room for a socket's name, then a directory of this
/// executor's own under the temporary one.
fn fences_dir(state: &Path) -> std::io::Result<PathBuf> {
    let under_state = state.join("fences");
    let dir = if under_state.as_os_str().len() + 24 <= SOCKET_PATH_MAX {
        std::fs::create_dir_all(&under_state)?;
        under_state
    } else {
        let dir = std::env::temp_dir().join(format!("omoi-fences-{}", Uuid::new_v4().simple()));
        std::fs::create_dir(&dir)?;
        dir
    };
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
    Ok(dir)
}

impl Sandbox {
    /// The sandbox `OMOI_AGENT_SANDBOX` asks for, checked on this machine by
    /// starting one as `user` (None: the executor's own user); None when
    /// off, or when `auto` and the machine cannot (said loudly). `model`:
    /// where the agent's model calls go.
    pub fn from_config(
        config: &Config,
        user: Option<&AgentUser>,
        model: Option<ModelRoute>,
    ) -> anyhow::Result<Option<Self>> {
        let allow = hosts::AllowList::parse(&config.agent_allowed_hosts).map_err(anyhow::Error::msg)?;
        if config.runner == crate::config::RunnerKind::Openhands {
            // Its agent runs in the OpenHands server, not here.
            tracing::info!("the openhands runner starts no agent process here: no sandbox to make");
            return Ok(None);
        }
        if config.sandbox == SandboxMode::Off {
            omoi_runtime::metrics::AGENT_SANDBOX.set(0);
            tracing::warn!(
                "OMOI_AGENT_SANDBOX=off: agents run without a sandbox, with this machine's network and files"
            );
            return Ok(None);
        }
        let identity = user.map(|u| (u.uid, u.gid));
        let (how, took) = if config.sandbox == SandboxMode::Pod {
            anyhow::ensure!(
                user.is_none(),
                "OMOI_AGENT_SANDBOX=pod runs agents as their pod's user: unset OMOI_AGENT_USER"
            );
            let pods = pod::Pods::from_args(&config.pod, &config.workspace_root)?;
            let addr = config.pod.agent_pod_proxy_addr;
            let listener = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .and_then(tokio::net::TcpListener::from_std)
                .map_err(|e| anyhow::anyhow!("OMOI_AGENT_POD_PROXY_ADDR {addr}: {e}"))?;
            let tokens = Arc::new(pod::Tokens::default());
            tokio::spawn(Arc::clone(&tokens).serve(listener));
            (
                How::Pod {
                    pods: Box::new(pods),
                    tokens,
                },
                Duration::ZERO,
            )
        } else {
            let found = which(&config.sandbox_bwrap, std::env::var("PATH").ok().as_deref());
            let checked = found
                .ok_or_else(|| format!("{} (OMOI_AGENT_SANDBOX_BWRAP) is not installed", config.sandbox_bwrap))
                .and_then(|bwrap| probe(&bwrap, identity).map(|took| (bwrap, took)));
            match (checked, config.sandbox) {
                (Ok((bwrap, took)), _) => (How::Bwrap(bwrap), took),
                (Err(why), SandboxMode::On) => {
                    anyhow::bail!("OMOI_AGENT_SANDBOX=on, but agents cannot be sandboxed on this machine: {why}")
                }
                (Err(why), _) => {
                    omoi_runtime::metrics::AGENT_SANDBOX.set(0);
                    tracing::error!(
                        reason = %why,
                        "AGENTS RUN WITHOUT A SANDBOX: this machine cannot sandbox them (OMOI_AGENT_SANDBOX=auto); \
                         they can reach the network, the mesh and this machine's files as their user can"
                    );
                    return Ok(None);
                }
            }
        };
        let mut endpoints: Vec<(&str, &str)> = vec![
            ("OMOI_TASK_QUEUE_URL", config.task_queue_url.as_str()),
            ("OMOI_HEALTH_URL", config.health_url.as_str()),
            ("OMOI_TICKET_URL", config.ticket_url.as_str()),
        ];
        endpoints.extend(config.bus.nats_url().split(',').map(|u| ("NATS_URL", u)));
        endpoints.extend(
            config
                .agent_denied_addrs
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|a| ("OMOI_AGENT_DENIED_ADDRS", a)),
        );
        let listen = config.listen_addr.to_string();
        endpoints.push(("OMOI_LISTEN_ADDR", &listen));
        let pod_proxy = config.pod.agent_pod_proxy_addr.to_string();
        if config.sandbox == SandboxMode::Pod {
            endpoints.push(("OMOI_AGENT_POD_PROXY_ADDR", &pod_proxy));
        }
        // The cluster's API, when there is one.
        let kubernetes = match (
            std::env::var("KUBERNETES_SERVICE_HOST"),
            std::env::var("KUBERNETES_SERVICE_PORT"),
        ) {
            (Ok(host), Ok(port)) => Some(format!("https://{host}:{port}")),
            _ => None,
        };
        if let Some(api) = &kubernetes {
            endpoints.push(("KUBERNETES_SERVICE_HOST", api));
        }
        if let (How::Pod { .. }, Some(api)) = (&how, &config.pod.agent_pod_api) {
            endpoints.push(("OMOI_AGENT_POD_API", api));
        }
        let metrics = config.host.metrics_addr.map(|a| a.to_string());
        if let Some(m) = &metrics {
            endpoints.push(("OMOI_METRICS_ADDR", m));
        }
        let denied = hosts::Denied::resolve(endpoints).map_err(anyhow::Error::msg)?;
        let dir = fences_dir(&config.state_dir())?;
        omoi_runtime::metrics::AGENT_SANDBOX.set(1);
        tracing::info!(
            sandbox = %match &how {
                How::Bwrap(bwrap) => bwrap.display().to_string(),
                How::Pod { .. } => "a pod per attempt".to_owned(),
            },
            startup_ms = took.as_secs_f64() * 1e3,
            allowed_hosts = %config.agent_allowed_hosts,
            model_proxy = model.as_ref().map(|m| m.upstream.to_string()).unwrap_or_default(),
            "agents run sandboxed"
        );
        Ok(Some(Sandbox {
            how,
            kill_grace: Duration::from_secs_f64(config.kill_grace_seconds.max(0.0)),
            init: match &config.sandbox_init {
                Some(init) => init.clone(),
                None => std::env::current_exe()?,
            },
            rules: Arc::new(egress::Rules { allow, denied }),
            model: model.map(Arc::new),
            read_only: config
                .sandbox_read_only
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                .collect(),
            dir,
            owner: identity,
            fences: Default::default(),
        }))
    }

    /// The base URL an agent calls its model at: the model proxy, inside.
    pub fn model_base_url(&self) -> Option<String> {
        self.model
            .as_ref()
            .map(|m| format!("http://127.0.0.1:{MODEL_PORT}{}", m.base_path()))
    }

    /// The fence of one attempt: its proxies listening, until it is
    /// dropped; what they refuse is also said to `say` (the run's output).
    /// Whether each attempt runs in a Kubernetes pod of its own.
    pub fn per_attempt_pod(&self) -> bool {
        matches!(self.how, How::Pod { .. })
    }

    /// The fence of one attempt, whose agent may read `read_only` too.
    pub fn fence(
        self: &Arc<Self>,
        task_id: Uuid,
        attempt: i32,
        say: Arc<dyn Fn(String) + Send + Sync>,
        read_only: Vec<PathBuf>,
    ) -> std::io::Result<Fence> {
        let n = self.fences.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = self.dir.join(format!("{}.{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
        let who = Attempt { task_id, attempt, say };
        let stop = CancellationToken::new();
        let mut fence = Fence {
            sandbox: Arc::clone(self),
            dir: dir.clone(),
            stop: stop.clone(),
            metered: Default::default(),
            task_id,
            attempt,
            tokens: Vec::new(),
            launches: Default::default(),
            read_only,
        };
        let egress = self.socket(&dir.join("e.sock"))?;
        let (rules, to) = (Arc::clone(&self.rules), who.clone());
        tokio::spawn(serve_http(egress, stop.clone(), move |req| {
            let (rules, to) = (Arc::clone(&rules), to.clone());
            async move { egress::handle(req, &rules, &to).await }
        }));
        if let Some(route) = &self.model {
            let model = self.socket(&dir.join("m.sock"))?;
            let (route, tally) = (Arc::clone(route), Arc::clone(&fence.metered));
            tokio::spawn(serve_http(model, stop, move |req| {
                let (route, to, tally) = (Arc::clone(&route), who.clone(), Arc::clone(&tally));
                async move { model::handle(req, &route, &to, tally).await }
            }));
        }
        if let How::Pod { tokens, .. } = &self.how {
            fence.tokens = fence
                .proxies()
                .into_iter()
                .map(|(_, _, sock)| tokens.issue(dir.join(sock)))
                .collect();
        }
        Ok(fence)
    }

    /// Deletes the attempts' pods an earlier run of this executor left
    /// (none when agents run on this machine). Also proves, at start, that
    /// the executor may manage pods.
    pub async fn sweep(&self) -> anyhow::Result<()> {
        if let How::Pod { pods, .. } = &self.how {
            let swept = pods.sweep().await.map_err(|e| {
                anyhow::anyhow!("OMOI_AGENT_SANDBOX=pod: cannot list this executor's attempt pods: {e}")
            })?;
            if swept > 0 {
                tracing::warn!(swept, "deleted attempt pods an earlier run of this executor left");
            }
        }
        Ok(())
    }

    /// A listening socket the agent's user may connect to, and no one else.
    fn socket(&self, path: &Path) -> std::io::Result<UnixListener> {
        let listener = UnixListener::bind(path)?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
        }
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        Ok(listener)
    }
}

/// Serves HTTP/1 on `listener` until `stop`, each request answered by
/// `answer` (a CONNECT's tunnel included).
async fn serve_http<F, Fut>(listener: UnixListener, stop: CancellationToken, answer: F)
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<egress::Body>> + Send + 'static,
{
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
        };
        let (answer, stop) = (answer.clone(), stop.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let answer = answer.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .with_upgrades();
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// One attempt's sandbox: its proxies, and how its agent is started.
pub struct Fence {
    sandbox: Arc<Sandbox>,
    dir: PathBuf,
    stop: CancellationToken,
    /// What the model proxy counted in this attempt's answers.
    metered: Arc<std::sync::Mutex<Metered>>,
    task_id: Uuid,
    attempt: i32,
    /// The tokens its pod reaches its proxies with (one per proxy).
    tokens: Vec<String>,
    /// Numbers the pods it starts.
    launches: std::sync::atomic::AtomicU64,
    /// What this attempt's agent may read besides the sandbox's own list
    /// (the git objects its workspace borrows).
    read_only: Vec<PathBuf>,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        if let How::Pod { tokens, .. } = &self.sandbox.how {
            for t in &self.tokens {
                tokens.forget(t);
            }
        }
        self.stop.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Fence {
    /// What the model proxy counted in the attempt's answers so far; None
    /// when no answer carried a usage.
    pub fn metered(&self) -> Option<Metered> {
        let m = self.metered.lock().unwrap_or_else(|p| p.into_inner()).clone();
        (m.responses > 0).then_some(m)
    }

    /// The proxies an agent reaches: (name, port inside, socket's name).
    fn proxies(&self) -> Vec<(&'static str, u16, &'static str)> {
        let mut proxies = vec![("egress-proxy", EGRESS_PORT, "e.sock")];
        if self.sandbox.model.is_some() {
            proxies.push(("model-proxy", MODEL_PORT, "m.sock"));
        }
        proxies
    }

    /// The program that starts the sandbox, and the setting naming it.
    pub fn program(&self) -> (&Path, &'static str) {
        match &self.sandbox.how {
            How::Bwrap(bwrap) => (bwrap, "OMOI_AGENT_SANDBOX_BWRAP"),
            How::Pod { .. } => (&self.sandbox.init, "OMOI_AGENT_SANDBOX_INIT"),
        }
    }

    /// The variables the agent gets inside: the egress proxy for whatever
    /// honours a proxy (loopback left alone: the model proxy is there).
    pub fn env(&self) -> Vec<(String, String)> {
        let proxy = format!("http://127.0.0.1:{EGRESS_PORT}");
        let mut env: Vec<(String, String)> = ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"]
            .into_iter()
            .map(|k| (k.to_owned(), proxy.clone()))
            .collect();
        for k in ["NO_PROXY", "no_proxy"] {
            env.push((k.to_owned(), "127.0.0.1,localhost,::1".to_owned()));
        }
        env.push(("TMPDIR".to_owned(), "/tmp".to_owned()));
        env
    }

    /// bubblewrap's command line that runs `argv` (found on `path`) in
    /// `cwd` inside the sandbox, `writable` bound read-write.
    /// None when the program is not there to start.
    pub fn argv(&self, argv: &[String], path: Option<&str>, cwd: &Path, writable: &[PathBuf]) -> Option<Vec<String>> {
        let bwrap = match &self.sandbox.how {
            How::Bwrap(bwrap) => bwrap,
            How::Pod { pods, .. } => return self.pod_argv(pods, argv, path, cwd, writable),
        };
        let sandbox = &self.sandbox;
        let mut a: Vec<String> = [
            "--unshare-all",
            "--die-with-parent",
            "--hostname",
            "omoi-agent",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--tmpfs",
            "/tmp",
        ]
        .map(str::to_owned)
        .to_vec();
        for dir in SYSTEM.map(Path::new) {
            match std::fs::read_link(dir) {
                // Recreated, not bound: a bind would follow it.
                Ok(target) => a.extend([
                    "--symlink".into(),
                    target.display().to_string(),
                    dir.display().to_string(),
                ]),
                Err(_) if dir.is_dir() => bind_ro(&mut a, dir),
                Err(_) => {}
            }
        }
        let who = sandbox.owner;
        for etc in ETC.map(Path::new).into_iter().filter(|p| reachable(p, who)) {
            bind_ro(&mut a, etc);
        }
        // The program first, then the PATH and the extras; each once, and
        // nothing already inside another (a bind inside a read-only bind
        // cannot make its mount point there).
        // The program as found here: inside, it is started by that path.
        let program = which(argv.first()?, path)?;
        let mut read_only: Vec<PathBuf> = program_files(&program);
        read_only.extend(
            path.unwrap_or_default()
                .split(':')
                .map(PathBuf::from)
                .filter(|d| d.is_absolute() && d.is_dir() && !d.starts_with(&sandbox.dir)),
        );
        read_only.extend(sandbox.read_only.iter().cloned());
        read_only.extend(self.read_only.iter().cloned());
        let mut bound: Vec<PathBuf> = SYSTEM.iter().chain(ETC.iter()).map(PathBuf::from).collect();
        for p in read_only {
            if reachable(&p, who) && !bound.iter().any(|b| p.starts_with(b)) {
                bind_ro(&mut a, &p);
                bound.push(p);
            }
        }
        for p in writable.iter().filter(|p| reachable(p, who)) {
            a.extend(["--bind".into(), p.display().to_string(), p.display().to_string()]);
        }
        let inside = Path::new(INSIDE);
        a.extend([
            "--ro-bind".into(),
            sandbox.init.display().to_string(),
            inside.join("init").display().to_string(),
        ]);
        let mut bridges = Vec::new();
        for (name, port, sock) in self.proxies() {
            a.extend([
                "--bind".into(),
                self.dir.join(sock).display().to_string(),
                inside.join(sock).display().to_string(),
            ]);
            bridges.push(init::Bridge {
                name: name.into(),
                port,
                to: init::Target::Socket(inside.join(sock)),
            });
        }
        a.extend(["--chdir".into(), cwd.display().to_string(), "--".into()]);
        a.push(inside.join("init").display().to_string());
        a.push(init::FLAG.into());
        for b in &bridges {
            a.extend(["--bridge".into(), b.arg()]);
        }
        a.push("--".into());
        a.push(program.display().to_string());
        a.extend(argv.iter().skip(1).cloned());
        let mut out = vec![bwrap.display().to_string()];
        out.extend(a);
        Some(out)
    }

    /// The launcher's command line that runs `argv` in a pod of its own
    /// (see [`pod`]): the pod's description written beside the attempt's
    /// proxies' sockets.
    fn pod_argv(
        &self,
        pods: &pod::Pods,
        argv: &[String],
        path: Option<&str>,
        cwd: &Path,
        writable: &[PathBuf],
    ) -> Option<Vec<String>> {
        // The pod runs this executor's image: the program is where it is here.
        let program = which(argv.first()?, path)?;
        let mut argv = argv.to_vec();
        argv[0] = program.display().to_string();
        let bridges: Vec<init::Bridge> = self
            .proxies()
            .into_iter()
            .zip(&self.tokens)
            .map(|((name, port, _), token)| init::Bridge {
                name: name.into(),
                port,
                to: init::Target::Tcp {
                    addr: pods.proxy().to_owned(),
                    token: token.clone(),
                },
            })
            .collect();
        let manifest = pods.manifest(&pod::AttemptPod {
            task_id: self.task_id,
            attempt: self.attempt,
            argv: &argv,
            cwd,
            writable,
            bridges: &bridges,
            grace: self.sandbox.kill_grace,
        });
        // One per start (the agent and the git steps after it).
        let n = self.launches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = self.dir.join(format!("pod.{n}.json"));
        if let Err(e) = pods.write_launch(&file, manifest, self.sandbox.kill_grace) {
            tracing::error!(file = %file.display(), error = %e, "cannot describe an attempt's pod");
            return None;
        }
        Some(vec![
            self.sandbox.init.display().to_string(),
            pod::FLAG.to_owned(),
            file.display().to_string(),
        ])
    }
}

fn bind_ro(a: &mut Vec<String>, p: &Path) {
    a.extend(["--ro-bind".into(), p.display().to_string(), p.display().to_string()]);
}

/// Whether `who` (uid, gid; None: the executor's own user) can reach `p`:
/// search every directory above it, read it. bubblewrap, run as the agent's
/// user, cannot bind what that user cannot reach (and the agent could not
/// use it anyway): such a directory on the PATH is left out.
fn reachable(p: &Path, who: Option<(u32, u32)>) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some((uid, gid)) = who.filter(|(uid, _)| *uid != 0) else {
        return p.exists();
    };
    let allows = |m: &std::fs::Metadata, bits: u32| {
        let shift = if m.uid() == uid {
            6
        } else if m.gid() == gid {
            3
        } else {
            0
        };
        (m.mode() >> shift) & bits == bits
    };
    let Ok(target) = std::fs::metadata(p) else {
        return false;
    };
    let read = if target.is_dir() { 0o5 } else { 0o4 };
    allows(&target, read)
        && p.ancestors()
            .skip(1)
            .all(|dir| std::fs::metadata(dir).is_ok_and(|m| allows(&m, 0o1)))
}

/// What of a program the sandbox must show: for a program of an npm
/// package, the whole `node_modules` it lives in (its dependencies beside
/// it, its `.bin` link among them); else the path it is started by and the
/// file that resolves to.
fn program_files(program: &Path) -> Vec<PathBuf> {
    let modules = |p: &Path| {
        p.ancestors()
            .filter(|a| a.file_name().is_some_and(|n| n == "node_modules"))
            .last()
            .map(Path::to_path_buf)
    };
    let real = program.canonicalize().ok();
    match (modules(program), real.as_deref().and_then(modules)) {
        (Some(linked), Some(resolved)) if linked == resolved => vec![linked],
        (linked, Some(resolved)) => linked.into_iter().chain([resolved]).collect(),
        (_, None) => std::iter::once(program.to_path_buf()).chain(real).collect(),
    }
}

/// `program` as found: itself when it names a path, else the first on
/// `path` (a colon list).
fn which(program: &str, path: Option<&str>) -> Option<PathBuf> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return p.exists().then_some(p);
    }
    path.unwrap_or_default()
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// Starts an empty sandbox as `identity`: how long it took, or why it
/// cannot start on this machine.
fn probe(bwrap: &Path, identity: Option<(u32, u32)>) -> Result<Duration, String> {
    let mut command = std::process::Command::new(bwrap);
    command
        .args([
            "--unshare-all",
            "--die-with-parent",
            "--ro-bind",
            "/",
            "/",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--",
            "true",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some((uid, gid)) = identity {
        std::os::unix::process::CommandExt::uid(&mut command, uid);
        std::os::unix::process::CommandExt::gid(&mut command, gid);
    }
    let started = Instant::now();
    let out = command
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bwrap.display()))?;
    if out.status.success() {
        Ok(started.elapsed())
    } else {
        Err(format!(
            "{} failed ({}): {}",
            bwrap.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_npm_program_brings_its_node_modules() {
        let root = std::env::temp_dir().join(format!("omoi-program-{}", Uuid::new_v4()));
        let pkg = root.join("node_modules/@scope/cli");
        std::fs::create_dir_all(&pkg).unwrap();
        std::fs::create_dir_all(root.join("node_modules/.bin")).unwrap();
        std::fs::write(pkg.join("cli.js"), "").unwrap();
        let bin = root.join("node_modules/.bin/cli");
        std::os::unix::fs::symlink("../@scope/cli/cli.js", &bin).unwrap();
        assert_eq!(program_files(&bin), [root.join("node_modules")]);
        let plain = root.join("agent");
        std::fs::write(&plain, "").unwrap();
        assert_eq!(program_files(&plain), [plain.clone(), plain.canonicalize().unwrap()]);
        assert_eq!(
            which(
                "cli",
                Some(&format!("/nonexistent:{}", root.join("node_modules/.bin").display()))
            ),
            Some(bin)
        );
        assert_eq!(which("no-such-program", Some("/usr/bin")), None);
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn what_the_agent_cannot_reach_is_not_bound() {
        let root = std::env::temp_dir().join(format!("omoi-reach-{}", Uuid::new_v4()));
        let closed = root.join("closed/bin");
        let open = root.join("open/bin");
        std::fs::create_dir_all(&closed).unwrap();
        std::fs::create_dir_all(&open).unwrap();
        let mode = |p: &Path, m| std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(m)).unwrap();
        mode(&root, 0o755);
        mode(&root.join("closed"), 0o700);
        mode(&root.join("open"), 0o711);
        mode(&open, 0o755);
        let agent = Some((65534, 65534));
        assert!(!reachable(&closed, agent));
        assert!(reachable(&open, agent));
        assert!(reachable(&closed, None), "the executor's own user reaches its own");
        assert!(!reachable(&root.join("missing"), None));
        let _ = std::fs::remove_dir_all(root);
    }
}
