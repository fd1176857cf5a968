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
/// out), to tell what a run changed: the first `MAX_FILES` in path order
/// (a walk in name order), and where the walk stopped when it did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    files: BTreeMap<PathBuf, (u64, Option<SystemTime>)>,
    /// The last path taken when there were more: nothing after it (in
    /// path order) is known.
    last: Option<PathBuf>,
}

impl Snapshot {
    /// Whether `path` is one the snapshot knows about (present or not).
    fn covers(&self, path: &Path) -> bool {
        self.last.as_deref().is_none_or(|last| path <= last)
    }
}

/// Enough for the largest repositories agents work in; beyond it a
/// snapshot says nothing of the rest rather than something wrong.
const MAX_FILES: usize = 200_000;

pub fn snapshot(dir: &Path) -> Snapshot {
    snapshot_at_most(dir, MAX_FILES)
}

fn snapshot_at_most(dir: &Path, max: usize) -> Snapshot {
    fn walk(root: &Path, d: &Path, max: usize, out: &mut Snapshot) -> bool {
        let Ok(entries) = std::fs::read_dir(d) else { return true };
        let mut entries: Vec<_> = entries.flatten().collect();
        // Path order: a directory's files come right after its name.
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let Ok(meta) = e.metadata() else { continue };
            let p = e.path();
            if meta.is_dir() {
                if e.file_name() != ".git" && !walk(root, &p, max, out) {
                    return false;
                }
            } else if let Ok(rel) = p.strip_prefix(root) {
                if out.files.len() >= max {
                    out.last = out.files.keys().next_back().cloned();
                    return false;
                }
                out.files.insert(rel.to_path_buf(), (meta.len(), meta.modified().ok()));
            }
        }
        true
    }
    let mut out = Snapshot::default();
    walk(dir, dir, max, &mut out);
    out
}

/// Paths added or modified, and paths removed, between two snapshots, each
/// sorted; only among the paths both know about.
pub fn differences(before: &Snapshot, after: &Snapshot) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let known = |p: &Path| before.covers(p) && after.covers(p);
    let written = after
        .files
        .iter()
        .filter(|(p, v)| known(p) && before.files.get(*p) != Some(v))
        .map(|(p, _)| p.clone())
        .collect();
    let removed = before
        .files
        .keys()
        .filter(|p| known(p) && !after.files.contains_key(*p))
        .cloned()
        .collect();
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

    #[test]
    fn a_walk_cut_short_tells_only_what_it_knows() {
        let dir = std::env::temp_dir().join(format!("omoi-ws-{}", Uuid::new_v4()));
        for d in ["a", "b", "c"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
            for f in ["1", "2"] {
                std::fs::write(dir.join(d).join(f), "x").unwrap();
            }
        }
        // Four of six files: a/1 a/2 b/1 b/2, in path order.
        let before = snapshot_at_most(&dir, 4);
        assert_eq!(before.last.as_deref(), Some(Path::new("b/2")));
        // A new file early in path order pushes b/2 out of the next walk:
        // it is not reported removed; c's changes are not known.
        std::fs::write(dir.join("a/0"), "x").unwrap();
        std::fs::write(dir.join("a/2"), "xyz").unwrap();
        std::fs::write(dir.join("c/1"), "xyz").unwrap();
        let after = snapshot_at_most(&dir, 4);
        assert_eq!(changed(&before, &after), ["a/0", "a/2"]);
        // Whole walks see everything.
        assert_eq!(changed(&snapshot(&dir), &snapshot(&dir)), Vec::<String>::new());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
