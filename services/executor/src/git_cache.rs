//! One mirror of each repository per executor (`OMOI_GIT_CACHE_DIR`): a
//! bare repository cloned once from the remote and brought up to date with
//! an incremental fetch before each attempt, so that an attempt costs a
//! fetch and a checkout, not two clones. Attempts' own repositories (their
//! per-attempt mirror and workspace) borrow its objects (git's alternates)
//! instead of copying them.
//!
//! Only the mirror talks to the remote, with the executor's credentials,
//! which never reach the disk. Its objects are readable by the agent's
//! user (its workspace borrows them) and writable by the executor alone;
//! what names the remote (`config`, `FETCH_HEAD`) is the executor's alone.
//! The cache's root is not listable by others (0711): an agent reaches the
//! objects of its own repository, whose path its workspace names.
//!
//! Fetches of one repository are one at a time (a lock per mirror in the
//! process, and a file lock across executors sharing the directory); an
//! attempt that asks while a fetch runs, or before the next starts, uses
//! that fetch: attempts asking together share one. A fetch that
//! fails leaves the mirror as it was. `OMOI_GIT_CACHE_MAX_BYTES` bounds the
//! cache: the least recently used mirrors no attempt holds are removed
//! until it fits. Git's housekeeping (`git maintenance run --auto`: a
//! repack once fetches piled up packs or loose objects) runs in the
//! background after a fetch, one at a time per mirror, never in a fetch an
//! attempt waits for.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::git::{GitError, GitSettings};

/// The executor's mirrors.
#[derive(Debug)]
pub struct GitCache {
    root: PathBuf,
    /// 0: unbounded.
    max_bytes: u64,
    mirrors: Mutex<HashMap<PathBuf, Arc<Mirror>>>,
    /// Clones and fetches from remotes, counted.
    talks: std::sync::atomic::AtomicUsize,
}

/// One repository's mirror.
#[derive(Debug)]
pub struct Mirror {
    pub path: PathBuf,
    /// Held while a fetch (or the clone) runs.
    fetching: tokio::sync::Mutex<()>,
    fetches: Mutex<Fetches>,
    /// Whether its housekeeping runs.
    maintaining: std::sync::atomic::AtomicBool,
}

/// A mirror's fetches, numbered as they start.
#[derive(Debug, Default)]
struct Fetches {
    started: u64,
    running: bool,
    /// The last one that succeeded.
    done: u64,
}

/// A mirror an attempt uses: not removed while held, by this executor or
/// another sharing the directory (a shared lock on its `.use` file, which
/// eviction must take exclusively).
#[derive(Debug, Clone)]
pub struct Held {
    mirror: Arc<Mirror>,
    _using: Arc<std::fs::File>,
}

impl Held {
    /// The objects an attempt's repositories borrow.
    pub fn objects(&self) -> PathBuf {
        self.mirror.path.join("objects")
    }
}

/// A lock file of the cache, made when missing.
fn lock_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

/// Opens lock file `path` and locks it, shared or not, waiting.
async fn locked(path: PathBuf, shared: bool) -> Result<std::fs::File, GitError> {
    tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
        let f = lock_file(&path)?;
        if shared {
            f.lock_shared()?
        } else {
            f.lock()?
        }
        Ok(f)
    })
    .await
    .map_err(|e| GitError::Transient(format!("the git cache's lock: {e}")))?
    .map_err(|e| GitError::Transient(format!("the git cache's lock: {e}")))
}

/// Files of a mirror that name its remote: never readable by an agent.
const PRIVATE: [&str; 2] = ["config", "FETCH_HEAD"];

impl GitCache {
    /// The cache under `root` (made, 0711, when missing).
    pub fn new(root: &Path, max_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))?;
        Ok(Self {
            root: root.to_path_buf(),
            max_bytes,
            mirrors: Mutex::new(HashMap::new()),
            talks: Default::default(),
        })
    }

    /// The mirror of `source`, up to date with it (cloned the first time,
    /// fetched since), held for the caller.
    pub async fn refreshed(&self, git: &GitSettings, source: &str) -> Result<Held, GitError> {
        let mirror = self.mirror(source);
        // In use from now: eviction (here or in another executor) waits
        // for none and passes it by.
        let using = Arc::new(locked(mirror.path.with_extension("use"), true).await?);
        let held = Held {
            mirror: Arc::clone(&mirror),
            _using: using,
        };
        // A fetch under way when this attempt asks serves it, as does the
        // next to start: attempts asking together share one.
        let wanted = {
            let f = mirror.fetches.lock().unwrap_or_else(|p| p.into_inner());
            if f.running { f.started } else { f.started + 1 }
        };
        let fetching = mirror.fetching.lock().await;
        if mirror.fetches.lock().unwrap_or_else(|p| p.into_inner()).done >= wanted {
            drop(fetching);
            touch(&mirror.path);
            return Ok(held);
        }
        let number = {
            let mut f = mirror.fetches.lock().unwrap_or_else(|p| p.into_inner());
            f.started += 1;
            f.running = true;
            f.started
        };
        let done = self.fetch_locked(git, source, &mirror.path).await;
        {
            let mut f = mirror.fetches.lock().unwrap_or_else(|p| p.into_inner());
            f.running = false;
            if done.is_ok() {
                f.done = number;
            }
        }
        drop(fetching);
        done?;
        touch(&mirror.path);
        self.evict();
        maintain(git, &held);
        Ok(held)
    }

    /// [`GitCache::fetch`] under the mirror's file lock (executors sharing
    /// the directory fetch one at a time).
    async fn fetch_locked(&self, git: &GitSettings, source: &str, path: &Path) -> Result<(), GitError> {
        let file_lock = locked(path.with_extension("fetch"), false).await?;
        let done = self.fetch(git, source, path).await;
        drop(file_lock);
        done
    }

    fn mirror(&self, source: &str) -> Arc<Mirror> {
        let name: String = Sha256::digest(source.as_bytes())[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let path = self.root.join(format!("{name}.git"));
        let mut mirrors = self.mirrors.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(mirrors.entry(path.clone()).or_insert_with(|| {
            Arc::new(Mirror {
                path,
                fetching: tokio::sync::Mutex::new(()),
                fetches: Mutex::default(),
                maintaining: Default::default(),
            })
        }))
    }

    /// How many clones and fetches it made.
    #[cfg(test)]
    pub fn talks(&self) -> usize {
        self.talks.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Clones `source` into `path` (by way of a scratch name, so that a
    /// clone that fails leaves nothing), or fetches its branches.
    async fn fetch(&self, git: &GitSettings, source: &str, path: &Path) -> Result<(), GitError> {
        self.talks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cloned = tokio::fs::try_exists(path.join("HEAD")).await.unwrap_or(false);
        if cloned {
            git.remote(
                Some(path),
                &[
                    // Housekeeping runs after, in the background.
                    "-c",
                    "maintenance.auto=false",
                    "fetch",
                    "--quiet",
                    "--prune",
                    "--no-tags",
                    "origin",
                    "+refs/heads/*:refs/heads/*",
                ],
            )
            .await
            .map_err(|e| GitError::Transient(format!("git fetch of {source} failed: {e}")))?;
        } else {
            let scratch = path.with_extension(format!("cloning-{}", std::process::id()));
            let _ = tokio::fs::remove_dir_all(&scratch).await;
            let cloned = git
                .remote(
                    None,
                    &[
                        "clone",
                        "--bare",
                        "--quiet",
                        "--no-tags",
                        // Readable by the agents' user whatever the umask:
                        // their workspaces borrow these objects.
                        "--config",
                        "core.sharedRepository=0644",
                        "--",
                        source,
                        &scratch.display().to_string(),
                    ],
                )
                .await;
            if let Err(e) = cloned {
                let _ = tokio::fs::remove_dir_all(&scratch).await;
                return Err(GitError::Transient(format!("git clone of {source} failed: {e}")));
            }
            tokio::fs::rename(&scratch, path)
                .await
                .map_err(|e| GitError::Transient(format!("cannot keep the mirror of {source}: {e}")))?;
        }
        for private in PRIVATE {
            let p = path.join(private);
            if p.exists() {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| GitError::Transient(format!("cannot protect {}: {e}", p.display())))?;
            }
        }
        Ok(())
    }

    /// Removes the least recently used mirrors no attempt holds while the
    /// cache is over its bound.
    fn evict(&self) {
        if self.max_bytes == 0 {
            return;
        }
        let mut mirrors = self.mirrors.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        let mut found: Vec<(SystemTime, u64, PathBuf)> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "git"))
            .map(|p| (last_used(&p), size(&p), p))
            .collect();
        let mut total: u64 = found.iter().map(|(_, s, _)| s).sum();
        found.sort();
        for (_, bytes, path) in found {
            if total <= self.max_bytes {
                break;
            }
            // In use here (the map's and an attempt's), or anywhere (its
            // `.use` file locked shared): kept.
            if mirrors.get(&path).is_some_and(|m| Arc::strong_count(m) > 1) {
                continue;
            }
            let Ok(using) = lock_file(&path.with_extension("use")) else {
                continue;
            };
            if using.try_lock().is_err() {
                continue;
            }
            mirrors.remove(&path);
            let out = path.with_extension(format!("evicted-{}", uuid::Uuid::new_v4().simple()));
            if std::fs::rename(&path, &out).is_ok() {
                // Gone from the cache at once; its files go in the
                // background (gigabytes, maybe).
                tokio::task::spawn_blocking(move || std::fs::remove_dir_all(out));
                tracing::info!(mirror = %path.display(), bytes, "git cache: evicted the least recently used mirror");
                total = total.saturating_sub(bytes);
            }
            drop(using);
        }
    }
}

/// Starts the mirror's housekeeping in the background unless it runs:
/// `git maintenance run --auto` (nothing unless fetches piled up packs or
/// loose objects), the mirror held (not evicted) meanwhile.
fn maintain(git: &GitSettings, held: &Held) {
    use std::sync::atomic::Ordering;
    if held.mirror.maintaining.swap(true, Ordering::AcqRel) {
        return;
    }
    let (git, held) = (git.clone(), held.clone());
    tokio::spawn(async move {
        let path = held.mirror.path.clone();
        let done = git
            .remote(
                Some(&path),
                &["-c", "gc.autoDetach=false", "maintenance", "run", "--auto", "--quiet"],
            )
            .await;
        if let Err(e) = done {
            tracing::warn!(mirror = %path.display(), error = %e, "git cache: housekeeping failed");
        }
        held.mirror.maintaining.store(false, Ordering::Release);
    });
}

/// When a mirror was last used (its `omoi-used` stamp).
fn last_used(mirror: &Path) -> SystemTime {
    std::fs::metadata(mirror.join("omoi-used"))
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn touch(mirror: &Path) {
    let _ = std::fs::write(mirror.join("omoi-used"), b"");
}

/// Bytes under `dir`.
fn size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => size(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}
