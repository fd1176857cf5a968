//! Services and brokers as real processes, for tests that signal or kill them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// Path of a workspace binary. `tests/run.sh` builds them all before the
/// tests (`cargo build --workspace --bins`); a build from inside a test
/// would see a different environment and rebuild half the tree.
pub fn binary(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, as tests/run.sh does)",
        path.display()
    );
    path
}

/// A coding-agent CLI (`claude`, `codex`, `gemini`) at the version the
/// project pins (deploy/agents/package.json), as tests/run.sh installs it.
pub fn agent_cli(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root");
    let path = root.join(".ci/agents/node_modules/.bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: install the pinned agent CLIs first (tests/run.sh does)",
        path.display()
    );
    path
}

/// target/<profile>, from where this executable lives: a test's in
/// target/<profile>/deps/…, a harness binary's (omoi-chaos) beside the
/// services' in target/<profile>.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("executable under target/<profile>");
    match dir.file_name() {
        Some(name) if name == "deps" => dir.parent().expect("target/<profile>/deps").to_path_buf(),
        _ => dir.to_path_buf(),
    }
}

/// A free loopback port (bound then released), never handed out twice in
/// this process: a test that restarts a service on its port must not find
/// another test's service there.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// The test-side setting that sends a service's output to a file.
pub const LOG_FILE: &str = "LOG_FILE";

/// A running service process.
pub struct Service {
    pub child: Child,
    pub url: String,
    pub port: u16,
}

impl Service {
    /// Starts `bin` with `env` (and RUST_LOG=warn unless set), listening on
    /// `port`. `LOG_FILE` in `env` is not passed on: the process's output
    /// goes to that file instead of the test's.
    pub fn spawn(bin: &str, port: u16, env: &[(String, String)]) -> anyhow::Result<Self> {
        let mut cmd = Command::new(binary(bin));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env(
                "RUST_LOG",
                std::env::var("OMOI_TEST_SERVICE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().filter(|(k, _)| k != LOG_FILE).map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some((_, path)) = env.iter().find(|(k, _)| k == LOG_FILE) {
            let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
            cmd.stdout(file.try_clone()?).stderr(file);
        }
        let child = cmd.spawn()?;
        Ok(Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            port,
        })
    }

    pub fn signal(&self, signal: i32) {
        if let Some(pid) = self.child.id() {
            omoi_runtime::shutdown::send_signal(pid as i32, signal);
        }
    }

    /// SIGTERM, then wait for the exit status.
    pub async fn terminate(mut self, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        self.signal(SIGTERM);
        Ok(tokio::time::timeout(within, self.child.wait()).await??)
    }

    /// SIGKILL: the process dies at once, mid-whatever.
    pub async fn kill9(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

pub use omoi_runtime::shutdown::SIGTERM;

/// A NATS server of the test's own (JetStream on, storage in a temp dir),
/// which the test may stop and restart.
pub struct PrivateNats {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
    /// A configuration file it runs with, when it has one.
    config: Option<PathBuf>,
}

impl PrivateNats {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(None).await
    }

    /// One that runs with `config` (nats-server's configuration syntax:
    /// authorization, say) besides the usual flags.
    pub async fn start_with_config(config: &str) -> anyhow::Result<Self> {
        Self::start_with(Some(config)).await
    }

    async fn start_with(config: Option<&str>) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("omoi-nats-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let config = match config {
            Some(text) => {
                let file = dir.join("nats.conf");
                std::fs::write(&file, text)?;
                Some(file)
            }
            None => None,
        };
        let mut nats = Self {
            port: free_port(),
            dir: dir.clone(),
            child: None,
            config,
        };
        nats.restart().await?;
        Ok(nats)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts it (again), on the same port and storage.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let mut command = Command::new(nats_server_binary());
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let child = command
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(self.dir.join("store"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        self.child = Some(child);
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("private nats-server did not start on port {}", self.port)
    }

    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The nats-server private brokers run: `OMOI_NATS_SERVER` when set (the
/// pinned current one the test command installs), else the machine's.
fn nats_server_binary() -> PathBuf {
    if let Some(given) = std::env::var_os("OMOI_NATS_SERVER").filter(|v| !v.is_empty()) {
        return PathBuf::from(given);
    }
    for candidate in [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ] {
        if Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    PathBuf::from("nats-server")
}

/// A PostgreSQL server of the test's own (initdb in a temp dir, trust auth,
/// run as the `postgres` user when the test runs as root), which the test
/// may stop, crash and start again.
pub struct PrivatePostgres {
    pub port: u16,
    pub dir: PathBuf,
    bin: PathBuf,
}

fn postgres_bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .expect("PostgreSQL server binaries under /usr/lib/postgresql")
}

fn as_postgres(program: &Path) -> std::process::Command {
    // initdb and postgres refuse to run as root.
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if root {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        std::process::Command::new(program)
    }
}

impl PrivatePostgres {
    pub fn start() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("omoi-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let _ = std::process::Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status();
        let bin = postgres_bin_dir();
        let out = as_postgres(&bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(dir.join("data"))
            .output()?;
        anyhow::ensure!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let pg = Self {
            port: free_port(),
            dir,
            bin,
        };
        pg.up()?;
        Ok(pg)
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn up(&self) -> anyhow::Result<()> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on",
            self.port,
            self.dir.display()
        );
        let out = as_postgres(&self.bin.join("pg_ctl"))
            .args(["-w", "-t", "60", "-D"])
            .arg(self.dir.join("data"))
            .args(["-l"])
            .arg(self.dir.join("log"))
            .args(["-o", &opts, "start"])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Stops the server the hard way (`immediate`: no checkpoint, like a
    /// crash); committed transactions survive through the WAL.
    pub fn crash(&self) -> anyhow::Result<()> {
        let out = as_postgres(&self.bin.join("pg_ctl"))
            .args(["-w", "-D"])
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.crash();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
