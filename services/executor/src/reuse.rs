//! A ticket's checkout reused: the work tree an attempt leaves is kept for
//! the ticket's next attempt on this executor, which brings it to its own
//! base by rewriting only what differs (`GitSettings::reuse`, `refresh`)
//! instead of checking out every file again.
//!
//! An attempt's tree is left for reuse when its work is on the branch (it
//! succeeded) or when the workspace policy would remove it anyway; one
//! kept for inspection (a failure under `keep` or `remove-on-success`)
//! stays as it is. A tree the policy would have removed moves under
//! `<root>/.reuse` and is removed once it is not wanted; one the policy
//! keeps stays where it is until an attempt takes it. At most `slots`
//! trees wait, the oldest going first; none survive a restart.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A work tree waiting for its ticket's next attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Tree {
    pub ticket: String,
    pub path: PathBuf,
    /// Under `.reuse`, removed when not wanted (else the policy keeps it).
    owned: bool,
}

/// The trees waiting, oldest first.
#[derive(Debug)]
pub struct Parked {
    root: PathBuf,
    slots: usize,
    trees: Mutex<VecDeque<Tree>>,
}

impl Parked {
    /// Waiting trees under `<workspace_root>/.reuse` (what a previous run
    /// of the executor left there is removed).
    pub fn new(workspace_root: &Path, slots: usize) -> Self {
        let root = workspace_root.join(".reuse");
        if let Err(e) = std::fs::remove_dir_all(&root)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %root.display(), error = %e, "earlier checkouts kept for reuse not removed");
        }
        Parked {
            root,
            slots,
            trees: Mutex::new(VecDeque::new()),
        }
    }

    /// The tree an earlier attempt of `ticket` left, if one waits.
    pub fn take(&self, ticket: &str) -> Option<Tree> {
        if self.slots == 0 || ticket.is_empty() {
            return None;
        }
        let mut trees = self.trees.lock().unwrap_or_else(|e| e.into_inner());
        let at = trees.iter().rposition(|t| t.ticket == ticket)?;
        trees.remove(at)
    }

    /// Leaves `dir` (an attempt's workspace) for `ticket`'s next attempt;
    /// `remove`: the workspace policy would remove it.
    pub async fn park(&self, ticket: &str, dir: &Path, remove: bool) {
        if self.slots == 0 || ticket.is_empty() {
            return;
        }
        let path = if remove {
            let path = self.root.join(format!("{ticket}-{}", uuid::Uuid::new_v4().simple()));
            let moved = async {
                tokio::fs::create_dir_all(&self.root).await?;
                tokio::fs::rename(dir, &path).await
            };
            if let Err(e) = moved.await {
                tracing::warn!(workspace = %dir.display(), error = %e, "workspace not kept for reuse");
                remove_tree(dir).await;
                return;
            }
            path
        } else {
            dir.to_path_buf()
        };
        let tree = Tree {
            ticket: ticket.to_owned(),
            path,
            owned: remove,
        };
        let evicted: Vec<Tree> = {
            let mut trees = self.trees.lock().unwrap_or_else(|e| e.into_inner());
            // One tree per ticket: the latest.
            let mut out: Vec<Tree> = Vec::new();
            trees.retain(|t| {
                let same = t.ticket == tree.ticket;
                if same {
                    out.push(t.clone());
                }
                !same
            });
            trees.push_back(tree);
            while trees.len() > self.slots {
                out.extend(trees.pop_front());
            }
            out
        };
        for t in evicted {
            discard(t).await;
        }
    }
}

/// A tree no attempt will take: removed when it was kept only for reuse.
pub async fn discard(tree: Tree) {
    if tree.owned {
        remove_tree(&tree.path).await;
    }
}

async fn remove_tree(path: &Path) {
    if let Err(e) = tokio::fs::remove_dir_all(path).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "workspace not removed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_ticket_gets_its_latest_tree_and_the_oldest_trees_go_first() {
        let root = std::env::temp_dir().join(format!("omoi-reuse-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(root.join(".reuse/stale")).unwrap();
        let parked = Parked::new(&root, 2);
        assert!(
            !root.join(".reuse/stale").exists(),
            "a previous run's trees are removed"
        );
        let ws = |name: &str| {
            let d = root.join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("f"), name).unwrap();
            d
        };
        // Kept by the policy: it stays where it is.
        let a1 = ws("a1");
        parked.park("a", &a1, false).await;
        // Removed by the policy: moved aside, then removed when replaced.
        let a2 = ws("a2");
        parked.park("a", &a2, true).await;
        assert!(a1.exists() && !a2.exists());
        let b = ws("b");
        parked.park("b", &b, true).await;
        let c = ws("c");
        parked.park("c", &c, true).await;
        // Two slots: a's tree went first (removed: it was the policy's to remove).
        assert_eq!(parked.take("a"), None);
        assert_eq!(std::fs::read_dir(root.join(".reuse")).unwrap().count(), 2);
        let got = parked.take("b").unwrap();
        assert_eq!(std::fs::read_to_string(got.path.join("f")).unwrap(), "b");
        assert_eq!(parked.take("b"), None, "taken once");
        discard(got.clone()).await;
        assert!(!got.path.exists());
        assert!(a1.exists(), "a tree the policy keeps is never removed");
        assert_eq!(parked.take(""), None);
        let _ = std::fs::remove_dir_all(&root);
    }
}
