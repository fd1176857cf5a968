//! Workspaces: one directory per task attempt under the workspace root,
//! (a checkout of the ticket's branch when it names a repository, see
//! `git`), and what a run changed in it.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use std::time::SystemTime;

use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("{0}")]
    Repository(String),
    #[error("workspace {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// `<root>/<task_id>/<attempt>`; both parts are typed, so nothing in them can
/// climb out of the root, and the result is checked once more.
pub fn path(root: &Path, task_id: Uuid, attempt: i32) -> Result<PathBuf, WorkspaceError> {
    let p = root.join(task_id.to_string()).join(attempt.max(0).to_string());
    contained(root, &p)?;
    Ok(p)
}

/// Refuses a path that leaves `root` lexically (`..`, absolute joins).
pub fn contained(root: &Path, p: &Path) -> Result<(), WorkspaceError> {
    let rel = p.strip_prefix(root).map_err(|_| WorkspaceError::Io {
        path: p.display().to_string(),
        source: std::io::Error::other("outside the workspace root"),
    })?;
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(WorkspaceError::Io {
            path: p.display().to_string(),
            source: std::io::Error::other("outside the workspace root"),
        });
    }
    Ok(())
}

pub use omoi_domain::validate::{Repository, repository as parse_repository_field};

/// The ticket's repository, or why it is refused.
pub fn parse_repository(value: &str) -> Result<Option<Repository>, WorkspaceError> {
    parse_repository_field("repository", value).map_err(|e| WorkspaceError::Repository(e.to_string()))
}

/// A fresh, empty workspace directory (a crash's leftover is removed).
pub async fn fresh(dir: &Path) -> Result<(), WorkspaceError> {
    let io = |source| WorkspaceError::Io {
        path: dir.display().to_string(),
        source,
    };
    if let Some(parent) = dir.parent() {
        tokio::fs::create_dir_all(parent).await.map_err(io)?;
    }
    // A retried attempt number never repeats, but a leftover from a crash may.
    if tokio::fs::try_exists(dir).await.map_err(io)? {
        tokio::fs::remove_dir_all(dir).await.map_err(io)?;
    }
    tokio::fs::create_dir_all(dir).await.map_err(io)
}

/// The executor's own clone of the ticket's repository for an attempt,
/// next to (never inside) the agent's workspace.
pub fn mirror_path(workspace: &Path) -> PathBuf {
    workspace.with_extension("git")
}

/// The home of an attempt's agent (when it runs as an agent user), beside
/// its workspace: `<root>/<task>/<attempt>.home`.
pub fn home_path(workspace: &Path) -> PathBuf {
    workspace.with_extension("home")
}

/// Files of a workspace with their size and modification time (`.git` left
/// out), to tell what a run changed.
pub type Snapshot = BTreeMap<PathBuf, (u64, Option<SystemTime>)>;

const MAX_FILES: usize = 20_000;

pub fn snapshot(dir: &Path) -> Snapshot {
    let mut out = Snapshot::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            if out.len() >= MAX_FILES {
                return out;
            }
            let p = e.path();
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                if e.file_name() != ".git" {
                    stack.push(p);
                }
            } else if let Ok(rel) = p.strip_prefix(dir) {
                out.insert(rel.to_path_buf(), (meta.len(), meta.modified().ok()));
            }
        }
    }
    out
}

/// Paths added or modified, and paths removed, between two snapshots, each
/// sorted.
pub fn differences(before: &Snapshot, after: &Snapshot) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let written = after
        .iter()
        .filter(|(p, v)| before.get(*p) != Some(v))
        .map(|(p, _)| p.clone())
        .collect();
    let removed = before.keys().filter(|p| !after.contains_key(*p)).cloned().collect();
    (written, removed)
}

/// Paths added, modified or removed between two snapshots, sorted.
pub fn changed(before: &Snapshot, after: &Snapshot) -> Vec<String> {
    let (written, removed) = differences(before, after);
    let mut out: Vec<String> = written
        .iter()
        .chain(&removed)
        .map(|p| p.display().to_string())
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_paths_stay_under_the_root() {
        let root = Path::new("/w");
        let id = Uuid::from_u128(1);
        assert_eq!(path(root, id, 2).unwrap(), PathBuf::from(format!("/w/{id}/2")));
        assert!(contained(root, Path::new("/w/a/../../etc")).is_err());
        assert!(contained(root, Path::new("/etc/passwd")).is_err());
        assert!(contained(root, Path::new("/w/a/b")).is_ok());
    }

    #[test]
    fn repositories_are_paths_or_urls() {
        assert_eq!(
            parse_repository("https://example.com/r.git").unwrap(),
            Some(Repository::Url("https://example.com/r.git".into()))
        );
        assert_eq!(
            parse_repository("/srv/repo").unwrap(),
            Some(Repository::Local("/srv/repo".into()))
        );
        assert_eq!(parse_repository("  ").unwrap(), None);
        for bad in ["../secret", "relative/path", "/srv/../etc", "--upload-pack=x", "/a\nb"] {
            assert!(parse_repository(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn changes_are_detected() {
        let dir = std::env::temp_dir().join(format!("omoi-ws-{}", Uuid::new_v4()));
        std::fs::create_dir_all(dir.join("src")).unwrap();
        std::fs::write(dir.join("keep.txt"), "a").unwrap();
        std::fs::write(dir.join("gone.txt"), "a").unwrap();
        let before = snapshot(&dir);
        std::fs::write(dir.join("src/new.rs"), "fn main() {}").unwrap();
        std::fs::remove_file(dir.join("gone.txt")).unwrap();
        std::fs::write(dir.join("keep.txt"), "abc").unwrap();
        let after = snapshot(&dir);
        assert_eq!(changed(&before, &after), ["gone.txt", "keep.txt", "src/new.rs"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
