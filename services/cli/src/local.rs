//! What `omoi up` keeps its state in: the PostgreSQL and NATS that
//! DATABASE_URL and NATS_URL name; else the ones at the usual local
//! addresses, when they let omoi in without a password; else a private
//! PostgreSQL cluster (trust auth on a unix socket in a directory only its
//! owner may enter) and a private `nats-server -js` on a loopback port, both
//! under the state directory, kept for the next run and stopped with the
//! mesh. Missing server programs are installed from Debian's packages only
//! when this runs as root on a machine with apt-get.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::unistd::{Uid, User};
use sqlx::ConnectOptions;
use sqlx::postgres::PgConnectOptions;
use tokio::process::{Child, Command};

/// Where a machine's own PostgreSQL and NATS usually listen.
const SHARED_DATABASE: &str = "postgres://postgres@127.0.0.1:5432/omoi";
const SHARED_NATS: &str = "127.0.0.1:4222";

/// The state directory: OMOI_STATE_DIR, else `$XDG_DATA_HOME/omoi` or
/// `~/.local/share/omoi`; for root `/var/lib/omoi`, which the `postgres`
/// user that runs the private cluster can reach.
pub fn state_dir() -> PathBuf {
    let set = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set("OMOI_STATE_DIR") {
        return dir;
    }
    if Uid::effective().is_root() {
        return PathBuf::from("/var/lib/omoi");
    }
    if let Some(data) = set("XDG_DATA_HOME") {
        return data.join("omoi");
    }
    set("HOME").unwrap_or_else(std::env::temp_dir).join(".local/share/omoi")
}

/// The database and broker the mesh runs on, and what was started for it.
pub struct Backing {
    /// To hand to the services; None when their environment already says.
    pub database_url: Option<String>,
    pub nats_url: Option<String>,
    /// The executors' own, when the private NATS gives them a user of
    /// their own.
    pub executor_nats_url: Option<String>,
    postgres: Option<PrivatePostgres>,
    nats: Option<Child>,
    /// One line each, for the user.
    pub notes: Vec<String>,
}

/// Where `omoi up` keeps the mesh's bearer token.
pub fn token_file(state: &Path) -> PathBuf {
    state.join("auth-token")
}

/// The bearer token of the mesh `omoi up` runs: None when
/// OMOI_AUTH_TOKEN(_FILE) gives one (the services read it themselves), else
/// the file holding the mesh's own, made once (32 random bytes, hex; mode
/// 0600) and kept in the state directory, where the CLI finds it too.
pub fn mesh_token(state: &Path) -> anyhow::Result<Option<PathBuf>> {
    if given("OMOI_AUTH_TOKEN") {
        return Ok(None);
    }
    let file = token_file(state);
    if !file.exists() {
        std::fs::create_dir_all(state)?;
        write_private(&file, &password()?)?;
    }
    Ok(Some(file))
}

/// The token of the mesh `omoi up` runs on this machine, for the CLI when
/// it was given none and talks to services on this machine.
pub fn local_token() -> Option<String> {
    std::fs::read_to_string(token_file(&state_dir()))
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

fn given(name: &str) -> bool {
    [name.to_owned(), format!("{name}_FILE")]
        .iter()
        .any(|n| std::env::var_os(n).is_some_and(|v| !v.is_empty()))
}

impl Backing {
    pub async fn prepare(state: &Path) -> anyhow::Result<Self> {
        // Others (the `postgres` user) may pass through, not list.
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().recursive(true).mode(0o711).create(state)?;
        }
        let mut backing = Backing {
            database_url: None,
            nats_url: None,
            executor_nats_url: None,
            postgres: None,
            nats: None,
            notes: Vec::new(),
        };
        if given("DATABASE_URL") {
            backing.notes.push("PostgreSQL: DATABASE_URL".into());
        } else if login_works(SHARED_DATABASE).await {
            backing.database_url = Some(SHARED_DATABASE.into());
            backing.notes.push("PostgreSQL: 127.0.0.1:5432".into());
        } else {
            let (pg, note) = PrivatePostgres::start(&state.join("postgres")).await?;
            backing.database_url = Some(pg.url());
            backing.notes.push(note);
            backing.postgres = Some(pg);
        }
        if given("NATS_URL") {
            backing.notes.push("NATS: NATS_URL".into());
        } else if reachable(SHARED_NATS).await {
            backing.nats_url = Some(format!("nats://{SHARED_NATS}"));
            backing.notes.push(format!("NATS: {SHARED_NATS}"));
        } else {
            let nats = match private_nats(&state.join("nats")).await {
                Ok(started) => started,
                Err(e) => {
                    backing.stop().await;
                    return Err(e);
                }
            };
            backing.notes.push(format!(
                "NATS: a private nats-server at {} (JetStream in {}; a user for the services, another for executors)",
                nats.address,
                state.join("nats").display()
            ));
            backing.nats_url = Some(nats.services_url);
            backing.executor_nats_url = Some(nats.executor_url);
            backing.nats = Some(nats.child);
        }
        Ok(backing)
    }

    /// Stops what `prepare` started (after the mesh).
    pub async fn stop(&mut self) {
        if let Some(mut nats) = self.nats.take() {
            if let Some(pid) = nats.id() {
                omoi_runtime::shutdown::send_signal(pid as i32, omoi_runtime::shutdown::SIGTERM);
            }
            let _ = tokio::time::timeout(Duration::from_secs(10), nats.wait()).await;
        }
        if let Some(pg) = self.postgres.take()
            && let Err(e) = pg.stop().await
        {
            eprintln!("omoi: {e:#}");
        }
    }
}

/// True when the server at `url` lets its user in (trust or peer auth).
async fn login_works(url: &str) -> bool {
    let Ok(options) = url.parse::<PgConnectOptions>() else {
        return false;
    };
    let options = options.database("postgres");
    match tokio::time::timeout(Duration::from_secs(5), options.connect()).await {
        Ok(Ok(conn)) => {
            let _ = sqlx::Connection::close(conn).await;
            true
        }
        _ => false,
    }
}

async fn reachable(addr: &str) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// Installs a Debian package when this runs as root on a machine with
/// apt-get; false when it may not or could not.
async fn install(package: &str) -> bool {
    if !Uid::effective().is_root() || which("apt-get").is_none() {
        return false;
    }
    println!("omoi: installing {package} (apt-get)");
    let quiet = |c: &mut Command| {
        c.env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
    };
    let mut update = Command::new("apt-get");
    update.args(["update", "-qq"]);
    quiet(&mut update);
    let mut get = Command::new("apt-get");
    get.args(["install", "-y", "-qq", package]);
    quiet(&mut get);
    update.status().await.is_ok_and(|s| s.success()) && get.status().await.is_ok_and(|s| s.success())
}

/// A program on PATH.
fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Where `initdb` and `pg_ctl` are: Debian's newest server, else PATH.
fn postgres_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .or_else(|| which("initdb").and_then(|p| p.parent().map(Path::to_path_buf)))
}

/// A PostgreSQL cluster of omoi's own: `data` made once by initdb, its
/// socket in `run`. Run as the `postgres` user when omoi runs as root
/// (PostgreSQL refuses root), else as the user running omoi.
struct PrivatePostgres {
    dir: PathBuf,
    bin: PathBuf,
    owner: Option<User>,
    /// False when another run had it going already: that one stops it.
    started: bool,
}

impl PrivatePostgres {
    async fn start(dir: &Path) -> anyhow::Result<(Self, String)> {
        let bin = match postgres_bin_dir() {
            Some(bin) => bin,
            None if install("postgresql").await => {
                postgres_bin_dir().ok_or_else(|| anyhow::anyhow!("initdb is missing after installing postgresql"))?
            }
            None => anyhow::bail!(
                "no PostgreSQL to use: nothing lets omoi in at 127.0.0.1:5432 and the server programs \
                 (initdb, pg_ctl) are not installed; install PostgreSQL (Debian: apt-get install postgresql) \
                 or set DATABASE_URL"
            ),
        };
        let owner = if Uid::effective().is_root() {
            Some(User::from_name("postgres")?.ok_or_else(|| {
                anyhow::anyhow!("PostgreSQL refuses to run as root and this machine has no `postgres` user")
            })?)
        } else {
            None
        };
        let mut pg = PrivatePostgres {
            dir: dir.to_path_buf(),
            bin,
            owner,
            started: false,
        };
        anyhow::ensure!(
            !dir.to_string_lossy().contains(['\'', '"', ' ']),
            "the state directory {} must not hold quotes or spaces (set OMOI_STATE_DIR)",
            dir.display()
        );
        pg.own_dir(dir)?;
        pg.own_dir(&pg.run())?;
        let mut note = format!("PostgreSQL: a private cluster in {}", dir.display());
        if !pg.data().join("PG_VERSION").exists() {
            println!("omoi: creating a private PostgreSQL cluster in {}", dir.display());
            pg.run_tool("initdb", |c| {
                c.args(["-A", "trust", "-U", "omoi", "-E", "UTF8", "-D"]).arg(pg.data());
            })
            .await?;
        }
        if pg
            .run_tool("pg_ctl", |c| {
                c.args(["status", "-D"]).arg(pg.data());
            })
            .await
            .is_ok()
        {
            note.push_str(" (already running)");
        } else {
            let options = format!("-c listen_addresses='' -k '{}' -p 5432", pg.run().display());
            pg.run_tool("pg_ctl", |c| {
                c.args(["-w", "-t", "60", "-D"])
                    .arg(pg.data())
                    .arg("-l")
                    .arg(dir.join("log"))
                    .args(["-o", &options, "start"]);
            })
            .await?;
            pg.started = true;
        }
        Ok((pg, note))
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn run(&self) -> PathBuf {
        self.dir.join("run")
    }

    fn url(&self) -> String {
        format!("postgres://omoi@localhost/omoi?host={}", self.run().display())
    }

    /// A directory only the cluster's owner may enter.
    fn own_dir(&self, dir: &Path) -> anyhow::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        if let Some(owner) = &self.owner {
            std::os::unix::fs::chown(dir, Some(owner.uid.as_raw()), Some(owner.gid.as_raw()))?;
        }
        Ok(())
    }

    async fn run_tool(&self, tool: &str, args: impl FnOnce(&mut Command)) -> anyhow::Result<()> {
        let mut c = Command::new(self.bin.join(tool));
        args(&mut c);
        c.current_dir(&self.dir).stdin(Stdio::null());
        if let Some(owner) = &self.owner {
            c.uid(owner.uid.as_raw()).gid(owner.gid.as_raw());
        }
        let out = c
            .output()
            .await
            .map_err(|e| anyhow::anyhow!("cannot run {tool}: {e}"))?;
        anyhow::ensure!(
            out.status.success(),
            "{tool} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    async fn stop(self) -> anyhow::Result<()> {
        if !self.started {
            return Ok(());
        }
        self.run_tool("pg_ctl", |c| {
            c.args(["-w", "-m", "fast", "-D"]).arg(self.data()).arg("stop");
        })
        .await
    }
}

/// A private nats-server, and how each part of the mesh connects to it.
struct PrivateNats {
    child: Child,
    /// Where it listens (no credentials: for messages).
    address: String,
    services_url: String,
    executor_url: String,
}

/// Writes `text` to the new file `path`, which only this user may read
/// (mode 0600 from its creation, never wider).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(text.as_bytes())
}

/// A random secret (32 bytes, hex): a password, a token.
fn password() -> anyhow::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A `nats-server -js` of omoi's own on a free loopback port, its
/// JetStream store under `dir`; runs until stopped (or this process ends).
/// Its users (new passwords each start, in a configuration only this user
/// may read): the services may do anything, executors only publish their
/// agents' output and keep their checkpoints (`omoi_bus::auth`).
async fn private_nats(dir: &Path) -> anyhow::Result<PrivateNats> {
    // OMOI_NATS_SERVER: a current nats-server where the machine's is older
    // (deploy/local/run.sh gives the pinned one).
    let find = || {
        let given = std::env::var_os("OMOI_NATS_SERVER")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        given.or_else(|| which("nats-server")).or_else(|| {
            ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
                .into_iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())
        })
    };
    let bin = match find() {
        Some(bin) => bin,
        None if install("nats-server").await => {
            find().ok_or_else(|| anyhow::anyhow!("nats-server is missing after installing it"))?
        }
        None => anyhow::bail!(
            "no NATS to use: nothing listens at {SHARED_NATS} and nats-server is not installed; \
             install it (Debian: apt-get install nats-server) or set NATS_URL"
        ),
    };
    std::fs::create_dir_all(dir)?;
    let (services, executor) = (password()?, password()?);
    let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
    let topology = omoi_bus::Topology {
        prefix: env("OMOI_SUBJECT_PREFIX", "omoi"),
        stream: env("OMOI_EVENTS_STREAM", "OMOI_EVENTS"),
        ..Default::default()
    };
    let config = omoi_bus::auth::server_authorization(
        &topology,
        &env("OMOI_SESSIONS_BUCKET", "OMOI_SESSIONS"),
        &omoi_bus::auth::User {
            name: "omoi",
            password: &services,
        },
        &omoi_bus::auth::User {
            name: "omoi-executor",
            password: &executor,
        },
    );
    let config_file = dir.join("nats.conf");
    let _ = std::fs::remove_file(&config_file);
    write_private(&config_file, &config)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut child = Command::new(&bin)
        .arg("-c")
        .arg(&config_file)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.join("store"))
        .arg("-l")
        .arg(dir.join("log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", bin.display()))?;
    let addr = format!("127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !reachable(&addr).await {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("nats-server exited ({status}); see {}", dir.join("log").display());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "nats-server did not come up at {addr}; see {}",
            dir.join("log").display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(PrivateNats {
        child,
        services_url: format!("nats://omoi:{services}@{addr}"),
        executor_url: format!("nats://omoi-executor:{executor}@{addr}"),
        address: format!("nats://{addr}"),
    })
}
