//! A ticket's branch, one task at a time. Each attempt gets two clones:
//!
//! - the *mirror*, a bare clone the executor alone owns: the only place
//!   that talks to the ticket's repository, so credentials (a credential
//!   helper fed from the executor's secret, or an SSH key) reach git there
//!   and nowhere else;
//! - the *workspace*, a clone of the mirror without any remote, checked out
//!   on the ticket's branch at its head when that holds the work of the
//!   task's dependencies (with what other tasks or people pushed since),
//!   else at the commit the dependencies ended on.
//!
//! After a successful run, whatever the agent changed (its own commits
//! included) becomes one commit on top of that base, made in the workspace
//! as the agent's user with a clean environment; it travels to the mirror
//! as a bundle (so the executor never runs git inside a repository the
//! agent controlled) and is pushed from there, fast-forward only: a push
//! that loses a race is rebased onto the branch and pushed again.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use omoi_domain::git::{BranchDiff, GitChange, bounded_patch};
use omoi_domain::validate::Repository;

use crate::git_cache::{GitCache, Held};
use crate::sandbox::Fence;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GitError {
    /// Trying again can help: the remote was unreachable, or the branch
    /// moved under the task in a way a rebase could not settle.
    #[error("{0}")]
    Transient(String),
    /// It cannot work as asked: a ref or commit that does not exist,
    /// dependencies whose changes conflict, a workspace the agent broke.
    #[error("{0}")]
    Refused(String),
}

/// How the executor reaches tickets' repositories and signs its commits.
#[derive(Clone, Default)]
pub struct GitSettings {
    pub author_name: String,
    pub author_email: String,
    /// HTTPS token, handed to git by a credential helper.
    pub token: Option<String>,
    pub username: String,
    pub ssh_key: Option<PathBuf>,
    /// The mirrors attempts start from (`OMOI_GIT_CACHE_DIR`); None: each
    /// attempt clones the remote.
    pub cache: Option<Arc<GitCache>>,
    /// Whether workspaces may borrow the cache's objects (an agent in a
    /// pod of its own cannot reach them: its workspace gets copies).
    pub borrow: bool,
}

impl fmt::Debug for GitSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitSettings")
            .field("author_name", &self.author_name)
            .field("author_email", &self.author_email)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("username", &self.username)
            .field("ssh_key", &self.ssh_key)
            .field("cache", &self.cache)
            .finish()
    }
}

/// Who runs git inside a workspace: the agent's user, or the executor's own;
/// in the agent's sandbox when it had one (the repository's configuration
/// is the agent's to write: a filter or a pager it set runs fenced in).
#[derive(Debug, Clone, Default)]
pub struct WorkspaceUser {
    pub identity: Option<(u32, u32)>,
    pub home: Option<PathBuf>,
    pub fence: Option<Arc<Fence>>,
}

/// A dependency whose work the task builds on.
#[derive(Debug, Clone)]
pub struct Parent {
    /// How to name it in an error (its title).
    pub name: String,
    pub commit: String,
}

/// A candidate's kept commit, as its bundle carries it.
#[derive(Debug, Clone, Copy)]
pub struct Kept<'a> {
    pub bundle: &'a [u8],
    pub commit: &'a str,
}

/// What a run's work came to in its workspace.
enum Work {
    /// Nothing changed: the branch stays where it was.
    Unchanged(GitChange),
    /// One commit on the base.
    Committed(String),
}

/// Where one attempt's work starts.
#[derive(Debug, Clone)]
pub struct Start<'a> {
    pub repository: &'a Repository,
    pub branch: &'a str,
    /// Empty: the remote's HEAD.
    pub base_ref: &'a str,
    /// A work tree an earlier attempt of the ticket left on this executor,
    /// to bring to the base (its `.git` replaced, what differs rewritten,
    /// everything else removed; see `refresh`) instead of checking out a
    /// fresh one. Used only where the base is one commit (no merge).
    pub reuse: Option<&'a Path>,
    /// Completed dependencies that left a commit; none: start at `base_ref`.
    pub parents: Vec<Parent>,
}

/// An attempt's two clones and the commit it started from.
#[derive(Debug, Clone)]
pub struct Checkout {
    pub mirror: PathBuf,
    pub workspace: PathBuf,
    pub branch: String,
    pub base_commit: String,
    /// Commits the mirror has that the workspace's history includes (what a
    /// bundle of the attempt's work may leave out).
    known: Vec<String>,
    /// Commits on the branch since the parents' work (`--oneline`, newest
    /// first), when the attempt started from the branch's head.
    pub pushed_since: Vec<String>,
    /// The branch the ticket's work merges into and its current head, as
    /// a branch of the workspace too (so an agent can merge it in); None
    /// when the base is no branch of the repository.
    pub base_branch: Option<(String, String)>,
    /// The cache's mirror the attempt's repositories borrow objects from,
    /// held (never evicted) while the attempt lasts.
    cached: Option<Held>,
    /// Whether the workspace borrows them too.
    borrows: bool,
    /// Whether the workspace is an earlier attempt's work tree, to be
    /// brought to the base by `refresh`.
    pub reused: bool,
}

impl Checkout {
    /// What the agent must be able to read beside its workspace: the
    /// objects its repository borrows.
    pub fn borrowed(&self) -> Option<PathBuf> {
        self.cached.as_ref().filter(|_| self.borrows).map(Held::objects)
    }
}

/// Most commits pushed since an attempt's parents that its prompt lists.
const PUSHED_LISTED: usize = 20;

/// Most attempts at pushing when other tasks keep moving the branch.
const PUSH_ATTEMPTS: usize = 5;

impl GitSettings {
    /// Clones the repository into `mirror` and prepares `workspace` on the
    /// branch at the attempt's base.
    pub async fn prepare(&self, start: &Start<'_>, mirror: &Path, workspace: &Path) -> Result<Checkout, GitError> {
        let source = match start.repository {
            Repository::Local(p) => p.display().to_string(),
            Repository::Url(u) => u.clone(),
        };
        if tokio::fs::try_exists(mirror).await.unwrap_or(false) {
            tokio::fs::remove_dir_all(mirror)
                .await
                .map_err(|e| GitError::Transient(format!("cannot clear {}: {e}", mirror.display())))?;
        }
        let cached = match &self.cache {
            Some(cache) => {
                let held = cache.refreshed(self, &source).await?;
                self.borrowing_mirror(&held, &source, mirror).await?;
                Some(held)
            }
            None => {
                self.remote(
                    None,
                    &["clone", "--bare", "--quiet", "--no-tags", "--", &source, &path(mirror)],
                )
                .await
                .map_err(|e| match e {
                    GitError::Transient(m) | GitError::Refused(m) => {
                        GitError::Transient(format!("git clone of {source} failed: {m}"))
                    }
                })?;
                None
            }
        };
        let mut known = Vec::new();
        for p in &start.parents {
            if known.contains(&p.commit) {
                continue;
            }
            if !self.has_commit(mirror, &p.commit).await {
                // Not on a branch any more; a server may still hand it out.
                let _ = self
                    .remote(Some(mirror), &["fetch", "--quiet", "origin", &p.commit])
                    .await;
                if !self.has_commit(mirror, &p.commit).await {
                    return Err(GitError::Refused(format!(
                        "commit {} of dependency {:?} is not in the repository (was the branch rewritten?)",
                        p.commit, p.name
                    )));
                }
            }
            known.push(p.commit.clone());
        }
        // Where the branch holds the parents' work, its head is where the
        // work goes on: what other tasks or people pushed since is kept.
        let mut pushed_since = Vec::new();
        if !known.is_empty() {
            let tip = format!("refs/heads/{}^{{commit}}", start.branch);
            if let Ok(head) = self.local(mirror, &["rev-parse", "--verify", "--quiet", &tip]).await {
                let mut holds_parents = true;
                for c in &known {
                    if self
                        .local(mirror, &["merge-base", "--is-ancestor", c, &head])
                        .await
                        .is_err()
                    {
                        holds_parents = false;
                        break;
                    }
                }
                if holds_parents && !known.contains(&head) {
                    let mut range = vec!["log".to_owned(), "--oneline".to_owned(), "--no-decorate".to_owned()];
                    range.push(format!("--max-count={PUSHED_LISTED}"));
                    range.push(head.clone());
                    range.extend(known.iter().map(|c| format!("^{c}")));
                    let range: Vec<&str> = range.iter().map(String::as_str).collect();
                    let log = self.local(mirror, &range).await.unwrap_or_default();
                    pushed_since = log.lines().map(str::to_owned).collect();
                    known.push(head);
                }
            }
        }
        if known.is_empty() {
            let rev = if start.base_ref.is_empty() {
                "HEAD"
            } else {
                start.base_ref
            };
            let commit = self
                .local(
                    mirror,
                    &[
                        "rev-parse",
                        "--verify",
                        "--quiet",
                        "--end-of-options",
                        &format!("{rev}^{{commit}}"),
                    ],
                )
                .await
                .map_err(|_| GitError::Refused(format!("base_ref {rev:?} is not a commit of the repository")))?;
            known.push(commit);
        }
        // A dependency whose commit another one's history holds adds nothing.
        let mut tips = Vec::new();
        for c in &known {
            let mut contained = false;
            for d in known.iter().filter(|d| *d != c) {
                if self.local(mirror, &["merge-base", "--is-ancestor", c, d]).await.is_ok() {
                    contained = true;
                    break;
                }
            }
            if !contained {
                tips.push(c.clone());
            }
        }
        let base_branch = self.base_branch(mirror, start).await;
        let mut reused = false;
        if let Some(tree) = start.reuse.filter(|_| tips.len() == 1) {
            match self
                .reuse(mirror, workspace, tree, start.branch, &tips[0], &cached, &base_branch)
                .await
            {
                Ok(()) => reused = true,
                Err(e) => {
                    // Only an optimisation: a fresh checkout instead.
                    tracing::warn!(tree = %tree.display(), error = %e, "the ticket's earlier checkout is not reused");
                    crate::workspace::fresh(workspace)
                        .await
                        .map_err(|e| GitError::Transient(e.to_string()))?;
                }
            }
        }
        if !reused {
            self.repository(mirror, workspace, &cached, &base_branch).await?;
            self.local(workspace, &["checkout", "--quiet", "-B", start.branch, &tips[0]])
                .await?;
            if tips.len() > 1 {
                self.merge(workspace, &tips[1..], &start.parents).await?;
            }
        }
        let base_commit = if reused {
            // Its work tree is still the agent's: nothing runs there yet.
            tips[0].clone()
        } else {
            self.local(workspace, &["rev-parse", "HEAD"]).await?
        };
        Ok(Checkout {
            mirror: mirror.to_path_buf(),
            workspace: workspace.to_path_buf(),
            branch: start.branch.to_owned(),
            base_commit,
            known,
            pushed_since,
            base_branch,
            borrows: cached.is_some() && self.borrow,
            cached,
            reused,
        })
    }

    /// The workspace's repository, made from the attempt's mirror with
    /// nothing checked out: its objects borrowed from the cache (the
    /// mirror's alternates are the clone's), or copied where the agent
    /// cannot reach the cache; no remote; the base branch as a branch of
    /// its own (so an agent can merge it in).
    async fn repository(
        &self,
        mirror: &Path,
        workspace: &Path,
        cached: &Option<Held>,
        base_branch: &Option<(String, String)>,
    ) -> Result<(), GitError> {
        let mut clone = vec!["clone", "--quiet", "--no-checkout", "--no-hardlinks"];
        if cached.is_some() && !self.borrow {
            clone.push("--dissociate");
        }
        let (from, ws) = (path(mirror), path(workspace));
        clone.extend(["--", &from, &ws]);
        self.local(mirror, &clone).await?;
        // The agent may commit, or merge the base in: as omoi's author.
        self.local(workspace, &["config", "user.name", &self.author_name])
            .await?;
        self.local(workspace, &["config", "user.email", &self.author_email])
            .await?;
        if let Some((name, head)) = base_branch {
            self.local(workspace, &["update-ref", &format!("refs/heads/{name}"), head])
                .await?;
        }
        self.local(workspace, &["remote", "remove", "origin"]).await?;
        Ok(())
    }

    /// Makes `tree` (an earlier attempt's work tree) the workspace: a fresh
    /// repository (`repository`) on `branch` at `tip`, whose index lists
    /// `tip`'s files, takes the place of whatever `.git` it had (the
    /// agent's: nothing of it is read), and the tree moves to `workspace`.
    /// Its files are brought to `tip` by `refresh`, as the agent's user.
    #[allow(clippy::too_many_arguments)]
    async fn reuse(
        &self,
        mirror: &Path,
        workspace: &Path,
        tree: &Path,
        branch: &str,
        tip: &str,
        cached: &Option<Held>,
        base_branch: &Option<(String, String)>,
    ) -> Result<(), GitError> {
        let io = |what: &str, e: std::io::Error| GitError::Transient(format!("{what}: {e}"));
        let made = workspace.with_extension("fresh");
        let _ = tokio::fs::remove_dir_all(&made).await;
        self.repository(mirror, &made, cached, base_branch).await?;
        let head = format!("refs/heads/{branch}");
        self.local(&made, &["update-ref", &head, tip]).await?;
        self.local(&made, &["symbolic-ref", "HEAD", &head]).await?;
        self.local(&made, &["read-tree", tip]).await?;
        let old = tree.join(".git");
        match tokio::fs::symlink_metadata(&old).await {
            Ok(m) if m.is_dir() => tokio::fs::remove_dir_all(&old).await,
            Ok(_) => tokio::fs::remove_file(&old).await,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
        .map_err(|e| io("cannot remove the earlier .git", e))?;
        tokio::fs::rename(made.join(".git"), &old)
            .await
            .map_err(|e| io("cannot move the repository in", e))?;
        let _ = tokio::fs::remove_dir_all(&made).await;
        tokio::fs::remove_dir_all(workspace)
            .await
            .map_err(|e| io("cannot clear the workspace", e))?;
        tokio::fs::rename(tree, workspace)
            .await
            .map_err(|e| io("cannot move the earlier checkout in", e))
    }

    /// Brings a reused workspace's files to its base, as the agent's user
    /// (they were the agent's): what matches is left as it is (compared by
    /// content), what differs rewritten, everything else (untracked and
    /// ignored files, a failed attempt's leftovers) removed.
    pub async fn refresh(&self, checkout: &Checkout, user: &WorkspaceUser) -> Result<(), GitError> {
        if !checkout.reused {
            return Ok(());
        }
        let ws = &checkout.workspace;
        // Exits 1 when files differ: the reset that follows rewrites them.
        let _ = self
            .as_agent(ws, user, &["update-index", "-q", "--refresh"], None)
            .await;
        self.as_agent(ws, user, &["reset", "--quiet", "--hard", "HEAD"], None)
            .await?;
        self.as_agent(ws, user, &["clean", "-ffdxq"], None).await?;
        Ok(())
    }

    /// The attempt's own mirror, borrowing the cache's objects: the
    /// remote's address (it pushes from there), the cached mirror's
    /// branches and HEAD, nothing copied.
    async fn borrowing_mirror(&self, held: &Held, source: &str, mirror: &Path) -> Result<(), GitError> {
        let root = Path::new("/");
        self.local(root, &["init", "--quiet", "--bare", &path(mirror)]).await?;
        let alternates = mirror.join("objects/info/alternates");
        tokio::fs::write(&alternates, format!("{}\n", held.objects().display()))
            .await
            .map_err(|e| GitError::Transient(format!("cannot write {}: {e}", alternates.display())))?;
        self.local(mirror, &["remote", "add", "origin", "--", source]).await?;
        let cached = path(&held.objects().with_file_name(""));
        // Every commit is there already: only the refs are written.
        self.local(
            mirror,
            &["fetch", "--quiet", "--no-tags", &cached, "+refs/heads/*:refs/heads/*"],
        )
        .await?;
        if let Ok(head) = self
            .local(Path::new(&cached), &["symbolic-ref", "--quiet", "HEAD"])
            .await
        {
            self.local(mirror, &["symbolic-ref", "HEAD", &head]).await?;
        }
        Ok(())
    }

    /// The branch `start` merges into (its `base_ref`, or the remote's
    /// default branch) and its head in `mirror`, unless it is no branch or
    /// the ticket's own.
    async fn base_branch(&self, mirror: &Path, start: &Start<'_>) -> Option<(String, String)> {
        let name = if start.base_ref.is_empty() {
            self.local(mirror, &["symbolic-ref", "--quiet", "--short", "HEAD"])
                .await
                .ok()?
        } else {
            start.base_ref.to_owned()
        };
        if name == start.branch {
            return None;
        }
        let tip = format!("refs/heads/{name}^{{commit}}");
        let head = self
            .local(mirror, &["rev-parse", "--verify", "--quiet", &tip])
            .await
            .ok()?;
        Some((name, head))
    }

    /// Merges dependencies' commits into the workspace's first one; refused,
    /// naming the files, when they conflict.
    async fn merge(&self, workspace: &Path, others: &[String], parents: &[Parent]) -> Result<(), GitError> {
        let mut args = vec![
            "merge",
            "--quiet",
            "--no-edit",
            "-m",
            "Merge the work of this task's dependencies",
        ];
        args.extend(others.iter().map(String::as_str));
        if self.local(workspace, &args).await.is_ok() {
            return Ok(());
        }
        let files = self
            .local(workspace, &["diff", "--name-only", "--diff-filter=U"])
            .await
            .unwrap_or_default();
        let _ = self.local(workspace, &["merge", "--abort"]).await;
        let names: Vec<&str> = parents.iter().map(|p| p.name.as_str()).collect();
        Err(GitError::Refused(format!(
            "the changes of this task's dependencies ({}) conflict in: {}",
            names.join(", "),
            files.lines().collect::<Vec<_>>().join(", ")
        )))
    }

    /// Commits what the run changed (one commit on the base; none when
    /// nothing changed) and pushes it to the ticket's branch.
    pub async fn commit_and_push(
        &self,
        checkout: &Checkout,
        message: &str,
        user: &WorkspaceUser,
    ) -> Result<GitChange, GitError> {
        let commit = match self.commit_work(checkout, message, user).await? {
            Work::Unchanged(g) => return Ok(g),
            Work::Committed(commit) => commit,
        };
        let (commit, _) = self.receive(checkout, &commit, user).await?;
        let commit = self.push(checkout, commit).await?;
        self.describe(checkout, commit).await
    }

    /// Commits what a candidate's run changed, as `commit_and_push` does,
    /// without pushing it: what it changed, and the commit as a bundle (to
    /// be kept; `land` pushes it if it is chosen). No bundle when nothing
    /// changed.
    pub async fn commit_and_keep(
        &self,
        checkout: &Checkout,
        message: &str,
        user: &WorkspaceUser,
    ) -> Result<(GitChange, Option<Vec<u8>>), GitError> {
        let commit = match self.commit_work(checkout, message, user).await? {
            Work::Unchanged(g) => return Ok((g, None)),
            Work::Committed(commit) => commit,
        };
        let (commit, bundle) = self.receive(checkout, &commit, user).await?;
        Ok((self.describe(checkout, commit).await?, Some(bundle)))
    }

    /// Pushes a kept candidate's commit (its bundle, made by
    /// `commit_and_keep` on any executor of the same repository) to the
    /// ticket's branch, on top of whatever landed there since.
    pub async fn land(&self, checkout: &Checkout, bundle: &[u8], commit: &str) -> Result<GitChange, GitError> {
        let commit = self.fetch_bundle(checkout, bundle, commit).await?;
        let commit = self.push(checkout, commit).await?;
        self.describe(checkout, commit).await
    }

    /// Lands a kept candidate's commit in place of another's on the branch
    /// (`take_back`, the candidate whose change is there now; none when no
    /// candidate of the step landed). Both come as their bundles (made by
    /// `commit_and_keep` on any executor): one commit on the branch's head
    /// undoing the one's change and doing the other's, made in a scratch
    /// worktree of the mirror and pushed; none when they change the same.
    /// Refused when either does not apply cleanly (later work on the branch
    /// built on what is taken back).
    pub async fn land_instead(
        &self,
        checkout: &Checkout,
        land: Kept<'_>,
        take_back: Option<Kept<'_>>,
        message: &str,
    ) -> Result<GitChange, GitError> {
        let back = match take_back {
            Some(k) => Some(self.fetch_bundle(checkout, k.bundle, k.commit).await?),
            None => None,
        };
        let commit = self.fetch_bundle(checkout, land.bundle, land.commit).await?;
        // On the branch as the mirror has it (the workspace starts where
        // the task's dependencies' work is, and a choice has none).
        let tip = format!("refs/heads/{}^{{commit}}", checkout.branch);
        let head = match self
            .local(&checkout.mirror, &["rev-parse", "--verify", "--quiet", &tip])
            .await
        {
            Ok(head) => head,
            Err(_) => checkout.base_commit.clone(),
        };
        let tree = self.scratch_tree(checkout, "choice", &head).await?;
        let made = self.swap(&tree, &commit, back.as_deref(), message).await;
        self.drop_scratch_tree(checkout, &tree).await;
        match made? {
            Some(made) => {
                let made = self.push(checkout, made).await?;
                let g = self.describe(checkout, made).await?;
                Ok(GitChange { base_commit: head, ..g })
            }
            None => Ok(GitChange {
                branch: checkout.branch.clone(),
                base_commit: head.clone(),
                commit: head,
                ..Default::default()
            }),
        }
    }

    /// In the scratch worktree `tree`: `take_back`'s change undone,
    /// `commit`'s applied, committed as one; the commit, or none when
    /// nothing changed.
    async fn swap(
        &self,
        tree: &Path,
        commit: &str,
        take_back: Option<&str>,
        message: &str,
    ) -> Result<Option<String>, GitError> {
        if let Some(back) = take_back {
            self.apply(tree, "revert", back).await.map_err(|e| {
                refused(
                    e,
                    &format!("{back} cannot be taken back: later work on the branch builds on it"),
                )
            })?;
        }
        self.apply(tree, "cherry-pick", commit)
            .await
            .map_err(|e| refused(e, &format!("{commit} does not apply on the branch")))?;
        if self.local(tree, &["diff", "--cached", "--quiet", "HEAD"]).await.is_ok() {
            return Ok(None);
        }
        self.local(
            tree,
            &[
                "-c",
                "core.hooksPath=/dev/null",
                "commit",
                "--quiet",
                "--no-verify",
                "-m",
                message,
            ],
        )
        .await?;
        self.local(tree, &["rev-parse", "HEAD"]).await.map(Some)
    }

    /// `git revert` or `git cherry-pick` of `commit` (against its first
    /// parent when it is a merge) into the index and tree, not committed.
    async fn apply(&self, tree: &Path, verb: &str, commit: &str) -> Result<String, GitError> {
        let mut args = vec!["-c", "core.hooksPath=/dev/null", verb, "--no-commit"];
        if self.is_merge(tree, commit).await {
            args.extend(["-m", "1"]);
        }
        args.push(commit);
        self.local(tree, &args).await
    }

    async fn is_merge(&self, repo: &Path, commit: &str) -> bool {
        self.local(repo, &["rev-parse", "--verify", "--quiet", &format!("{commit}^2")])
            .await
            .is_ok()
    }

    /// A detached scratch worktree of the mirror at `at`, named `name`.
    async fn scratch_tree(&self, checkout: &Checkout, name: &str, at: &str) -> Result<PathBuf, GitError> {
        let tree = checkout.mirror.with_extension(name);
        let _ = tokio::fs::remove_dir_all(&tree).await;
        self.local(
            &checkout.mirror,
            &["worktree", "add", "--quiet", "--detach", &path(&tree), at],
        )
        .await?;
        Ok(tree)
    }

    async fn drop_scratch_tree(&self, checkout: &Checkout, tree: &Path) {
        let _ = self
            .local(&checkout.mirror, &["worktree", "remove", "--force", &path(tree)])
            .await;
    }

    /// The workspace's work as one commit on the base, made as the agent's
    /// user (or what there was: nothing changed).
    async fn commit_work(&self, checkout: &Checkout, message: &str, user: &WorkspaceUser) -> Result<Work, GitError> {
        let ws = &checkout.workspace;
        let base = &checkout.base_commit;
        let head = self
            .as_agent(ws, user, &["rev-parse", "--verify", "HEAD^{commit}"], None)
            .await
            .map_err(|e| GitError::Refused(format!("the workspace's git repository is unusable: {e}")))?;
        let merged = self.merged_base(checkout, user).await?;
        if merged.is_some() {
            // The index and files are what counts; the merge state (or the
            // agent's merge commit) is made again below.
            let _ = self.as_agent(ws, user, &["merge", "--quit"], None).await;
        }
        if head.trim() != base {
            self.as_agent(ws, user, &["merge-base", "--is-ancestor", base, "HEAD"], None)
                .await
                .map_err(|_| GitError::Refused(format!("the agent moved the branch off its base {base}")))?;
            // Its own commits become part of the task's one commit.
            self.as_agent(ws, user, &["reset", "--quiet", "--soft", base], None)
                .await?;
        }
        self.as_agent(ws, user, &["add", "--all"], None).await?;
        let unchanged = self
            .as_agent(ws, user, &["diff", "--cached", "--quiet", "--no-ext-diff"], None)
            .await
            .is_ok();
        if unchanged && merged.is_none() {
            return Ok(Work::Unchanged(GitChange {
                branch: checkout.branch.clone(),
                base_commit: base.clone(),
                commit: base.clone(),
                ..Default::default()
            }));
        }
        let commit = match &merged {
            None => {
                self.as_agent(
                    ws,
                    user,
                    &["commit", "--quiet", "--no-verify", "-F", "-"],
                    Some(message),
                )
                .await?;
                self.as_agent(ws, user, &["rev-parse", "HEAD"], None).await?
            }
            Some((name, other)) => {
                self.unmarked(checkout, user, name).await?;
                // A merge commit: the pull request merges cleanly only when
                // the base's head is one of its parents.
                let tree = self.as_agent(ws, user, &["write-tree"], None).await?;
                let message = format!("{message}\n\nMerge branch '{name}' into {}", checkout.branch);
                let commit = self
                    .as_agent(
                        ws,
                        user,
                        &["commit-tree", &tree, "-p", base, "-p", other, "-F", "-"],
                        Some(&message),
                    )
                    .await?;
                self.as_agent(ws, user, &["reset", "--quiet", "--soft", &commit], None)
                    .await?;
                commit
            }
        };
        Ok(Work::Committed(commit))
    }

    /// The base branch (name, commit) the agent merged into the workspace:
    /// committed, or under way (its conflicts resolved or not).
    async fn merged_base(
        &self,
        checkout: &Checkout,
        user: &WorkspaceUser,
    ) -> Result<Option<(String, String)>, GitError> {
        let Some((name, other)) = &checkout.base_branch else {
            return Ok(None);
        };
        let ws = &checkout.workspace;
        if self
            .as_agent(
                ws,
                user,
                &["merge-base", "--is-ancestor", other, &checkout.base_commit],
                None,
            )
            .await
            .is_ok()
        {
            // Already in the branch: nothing to merge.
            return Ok(None);
        }
        let committed = self
            .as_agent(ws, user, &["merge-base", "--is-ancestor", other, "HEAD"], None)
            .await
            .is_ok();
        let under_way = self
            .as_agent(ws, user, &["rev-parse", "--verify", "--quiet", "MERGE_HEAD"], None)
            .await
            .is_ok_and(|m| m.trim() == other);
        Ok((committed || under_way).then(|| (name.clone(), other.clone())))
    }

    /// Refuses a merge whose conflicts were left unresolved (conflict
    /// markers added to a file), naming the files.
    async fn unmarked(&self, checkout: &Checkout, user: &WorkspaceUser, name: &str) -> Result<(), GitError> {
        let diff = self
            .as_agent(
                &checkout.workspace,
                user,
                &[
                    "diff",
                    "--cached",
                    "--no-ext-diff",
                    "--no-textconv",
                    "-U0",
                    &checkout.base_commit,
                ],
                None,
            )
            .await?;
        let (mut file, mut marked) = ("", Vec::new());
        for line in diff.lines() {
            if let Some(f) = line.strip_prefix("+++ b/") {
                file = f;
            } else if (line.starts_with("+<<<<<<< ") || line.starts_with("+>>>>>>> ")) && !marked.contains(&file) {
                marked.push(file);
            }
        }
        if marked.is_empty() {
            return Ok(());
        }
        Err(GitError::Refused(format!(
            "the merge of {name} was left with conflict markers in: {}",
            marked.join(", ")
        )))
    }

    /// Brings the workspace's commit into the mirror as a bundle the agent's
    /// user writes to a pipe; the commit and the bundle.
    async fn receive(
        &self,
        checkout: &Checkout,
        commit: &str,
        user: &WorkspaceUser,
    ) -> Result<(String, Vec<u8>), GitError> {
        let mut args = vec!["bundle", "create", "--quiet", "-", "HEAD", "--not"];
        args.extend(checkout.known.iter().map(String::as_str));
        // The mirror has the base branch a merge brought in.
        args.extend(checkout.base_branch.iter().map(|(_, head)| head.as_str()));
        let bundle = self.as_agent_bytes(&checkout.workspace, user, &args).await?;
        let got = self.fetch_bundle(checkout, &bundle, commit).await?;
        Ok((got, bundle))
    }

    /// Fetches a bundle's HEAD into the mirror (objects checked), which
    /// must be `commit`.
    async fn fetch_bundle(&self, checkout: &Checkout, bundle: &[u8], commit: &str) -> Result<String, GitError> {
        let file = checkout.mirror.join("attempt.bundle");
        tokio::fs::write(&file, bundle)
            .await
            .map_err(|e| GitError::Transient(format!("cannot write {}: {e}", file.display())))?;
        let fetched = self
            .local(
                &checkout.mirror,
                &[
                    "-c",
                    "transfer.fsckObjects=true",
                    "fetch",
                    "--quiet",
                    "--no-tags",
                    &path(&file),
                    "+HEAD:refs/omoi/attempt",
                ],
            )
            .await;
        let _ = tokio::fs::remove_file(&file).await;
        fetched?;
        let got = self
            .local(&checkout.mirror, &["rev-parse", "refs/omoi/attempt"])
            .await?;
        if got != commit {
            return Err(GitError::Refused(format!(
                "the workspace's commit {commit} did not arrive"
            )));
        }
        Ok(got)
    }

    /// Pushes `commit` to the branch, fast-forward only, rebasing it onto the
    /// branch when another push got there first; the commit that landed.
    async fn push(&self, checkout: &Checkout, mut commit: String) -> Result<String, GitError> {
        let mirror = &checkout.mirror;
        let target = format!("refs/heads/{}", checkout.branch);
        for _ in 0..PUSH_ATTEMPTS {
            let refused = match self
                .remote(
                    Some(mirror),
                    &["push", "--quiet", "origin", &format!("{commit}:{target}")],
                )
                .await
            {
                Ok(_) => return Ok(commit),
                Err(e) => e,
            };
            // Someone else's commit is on the branch now: fetch it and go
            // on top of it (never over it).
            self.remote(
                Some(mirror),
                &[
                    "fetch",
                    "--quiet",
                    "--no-tags",
                    "origin",
                    &format!("+{target}:refs/omoi/upstream"),
                ],
            )
            .await
            .map_err(|_| GitError::Transient(format!("push to {} refused: {refused}", checkout.branch)))?;
            if self
                .local(mirror, &["merge-base", "--is-ancestor", &commit, "refs/omoi/upstream"])
                .await
                .is_ok()
            {
                return Ok(commit);
            }
            if self.is_merge(mirror, &commit).await {
                // A merge is not replayed (a rebase would flatten it into
                // the base's commits): its task goes round again instead.
                return Err(GitError::Transient(format!(
                    "the branch {} moved while its merge was made",
                    checkout.branch
                )));
            }
            commit = self.rebase(checkout, &commit).await?;
        }
        Err(GitError::Transient(format!(
            "the branch {} kept moving; gave up after {PUSH_ATTEMPTS} pushes",
            checkout.branch
        )))
    }

    /// Replays the attempt's commit onto `refs/omoi/upstream` in a scratch
    /// worktree of the mirror.
    async fn rebase(&self, checkout: &Checkout, commit: &str) -> Result<String, GitError> {
        let tree = self.scratch_tree(checkout, "rebase", commit).await?;
        let parent = format!("{commit}^");
        let rebased = self
            .local(
                &tree,
                &[
                    "-c",
                    "core.hooksPath=/dev/null",
                    "rebase",
                    "--quiet",
                    "--onto",
                    "refs/omoi/upstream",
                    &parent,
                ],
            )
            .await;
        let out = match rebased {
            Ok(_) => self.local(&tree, &["rev-parse", "HEAD"]).await,
            Err(e) => {
                let _ = self.local(&tree, &["rebase", "--abort"]).await;
                Err(GitError::Transient(format!(
                    "the branch {} moved under the task and its change does not apply on top: {e}",
                    checkout.branch
                )))
            }
        };
        self.drop_scratch_tree(checkout, &tree).await;
        out
    }

    /// What `commit` changed, from the mirror.
    async fn describe(&self, checkout: &Checkout, commit: String) -> Result<GitChange, GitError> {
        // Against its first parent: what the branch got (a merge's too).
        let parent = format!("{commit}^1");
        let (files, insertions, deletions) = self.numstat(&checkout.mirror, &parent, &commit).await?;
        let patch = self
            .local(
                &checkout.mirror,
                &["diff", "--no-color", "--no-ext-diff", "--no-textconv", &parent, &commit],
            )
            .await?;
        let (patch, patch_truncated) = bounded_patch(&patch);
        let branch_diff = match &checkout.base_branch {
            Some((_, base_head)) => self.branch_diff(&checkout.mirror, base_head, &commit).await?,
            None => None,
        };
        Ok(GitChange {
            branch: checkout.branch.clone(),
            base_commit: checkout.base_commit.clone(),
            commit,
            files_changed: files,
            insertions,
            deletions,
            patch,
            patch_truncated,
            branch_diff,
        })
    }

    /// The ticket's whole change at `commit`: against where the branch left
    /// `base_head`'s history (None when they share none).
    async fn branch_diff(&self, mirror: &Path, base_head: &str, commit: &str) -> Result<Option<BranchDiff>, GitError> {
        let Ok(merge_base) = self.local(mirror, &["merge-base", base_head, commit]).await else {
            return Ok(None);
        };
        let merge_base = merge_base.trim().to_owned();
        let (files_changed, insertions, deletions) = self.numstat(mirror, &merge_base, commit).await?;
        let patch = self
            .local(
                mirror,
                &[
                    "diff",
                    "--no-color",
                    "--no-ext-diff",
                    "--no-textconv",
                    &merge_base,
                    commit,
                ],
            )
            .await?;
        let (patch, patch_truncated) = bounded_patch(&patch);
        Ok(Some(BranchDiff {
            merge_base,
            files_changed,
            insertions,
            deletions,
            patch,
            patch_truncated,
        }))
    }

    /// Files changed, lines added and removed from `from` to `to`.
    async fn numstat(&self, repo: &Path, from: &str, to: &str) -> Result<(i32, i64, i64), GitError> {
        let numstat = self
            .local(repo, &["diff", "--numstat", "--no-ext-diff", "--no-textconv", from, to])
            .await?;
        let (mut files, mut insertions, mut deletions) = (0, 0, 0);
        for line in numstat.lines() {
            let mut parts = line.split('\t');
            let n = |p: Option<&str>| p.and_then(|s| s.parse::<i64>().ok()).unwrap_or(0);
            insertions += n(parts.next());
            deletions += n(parts.next());
            files += 1;
        }
        Ok((files, insertions, deletions))
    }

    async fn has_commit(&self, repo: &Path, commit: &str) -> bool {
        self.local(repo, &["cat-file", "-e", &format!("{commit}^{{commit}}")])
            .await
            .is_ok()
    }

    /// git talking to the ticket's repository: the executor's environment
    /// (its git configuration included) plus the credentials.
    pub(crate) async fn remote(&self, dir: Option<&Path>, args: &[&str]) -> Result<String, GitError> {
        let mut cmd = tokio::process::Command::new("git");
        if let Some(dir) = dir {
            cmd.arg("-C").arg(dir);
        }
        cmd.args(args).env("GIT_TERMINAL_PROMPT", "0");
        if let Some(token) = &self.token {
            // Appended to whatever configuration the environment already
            // carries; the token itself travels in a variable of git's own
            // environment, read by the helper, never written anywhere.
            let n: usize = std::env::var("GIT_CONFIG_COUNT")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let helper = r#"!f() { test "$1" = get && printf 'username=%s\npassword=%s\n' "$OMOI_GIT_USERNAME" "$OMOI_GIT_PASSWORD"; }; f"#;
            cmd.env("GIT_CONFIG_COUNT", (n + 2).to_string())
                .env(format!("GIT_CONFIG_KEY_{n}"), "credential.helper")
                .env(format!("GIT_CONFIG_VALUE_{n}"), "")
                .env(format!("GIT_CONFIG_KEY_{}", n + 1), "credential.helper")
                .env(format!("GIT_CONFIG_VALUE_{}", n + 1), helper)
                .env("OMOI_GIT_USERNAME", &self.username)
                .env("OMOI_GIT_PASSWORD", token);
        }
        if let Some(key) = &self.ssh_key {
            let command = format!(
                "ssh -i '{}' -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=accept-new",
                key.display().to_string().replace('\'', "")
            );
            cmd.env("GIT_SSH_COMMAND", command);
        }
        self.output(cmd, None).await.map(|o| o.trim().to_owned())
    }

    /// git on the executor's own repositories (mirror, scratch worktree),
    /// without credentials.
    async fn local(&self, dir: &Path, args: &[&str]) -> Result<String, GitError> {
        let mut cmd = tokio::process::Command::new("git");
        cmd.arg("-C").arg(dir).args(args).env("GIT_TERMINAL_PROMPT", "0");
        self.author(&mut cmd);
        self.output(cmd, None).await.map(|o| o.trim().to_owned())
    }

    /// git inside a workspace the agent had: as the agent's user, with a
    /// clean environment (no secret to find), hooks off.
    fn agent_command(&self, dir: &Path, user: &WorkspaceUser, args: &[&str]) -> tokio::process::Command {
        let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into());
        let mut git: Vec<String> = vec!["git".into(), "-C".into(), dir.display().to_string()];
        git.extend(
            ["-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false"]
                .iter()
                .chain(args)
                .map(|a| (*a).to_owned()),
        );
        let argv = match &user.fence {
            // No git to find: started as it is, it fails like one unsandboxed.
            Some(fence) => fence.argv(&git, Some(&path), dir, &[dir.to_path_buf()]).unwrap_or(git),
            None => git,
        };
        let mut cmd = tokio::process::Command::new(&argv[0]);
        if let Some((uid, gid)) = user.identity {
            cmd.uid(uid).gid(gid);
        }
        let home = user.home.clone().unwrap_or_else(|| dir.to_path_buf());
        cmd.args(&argv[1..])
            .env_clear()
            .env("PATH", path)
            .env("HOME", home)
            .env("LANG", "C.UTF-8")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null");
        self.author(&mut cmd);
        cmd
    }

    async fn as_agent(
        &self,
        dir: &Path,
        user: &WorkspaceUser,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, GitError> {
        let cmd = self.agent_command(dir, user, args);
        self.output(cmd, stdin).await.map(|o| o.trim().to_owned())
    }

    async fn as_agent_bytes(&self, dir: &Path, user: &WorkspaceUser, args: &[&str]) -> Result<Vec<u8>, GitError> {
        let mut cmd = self.agent_command(dir, user, args);
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| GitError::Transient(format!("cannot run git: {e}")))?;
        if !out.status.success() {
            return Err(GitError::Refused(self.scrub(&String::from_utf8_lossy(&out.stderr))));
        }
        Ok(out.stdout)
    }

    fn author(&self, cmd: &mut tokio::process::Command) {
        cmd.env("GIT_AUTHOR_NAME", &self.author_name)
            .env("GIT_AUTHOR_EMAIL", &self.author_email)
            .env("GIT_COMMITTER_NAME", &self.author_name)
            .env("GIT_COMMITTER_EMAIL", &self.author_email);
    }

    async fn output(&self, mut cmd: tokio::process::Command, stdin: Option<&str>) -> Result<String, GitError> {
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| GitError::Transient(format!("cannot run git: {e}")))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            use tokio::io::AsyncWriteExt;
            pipe.write_all(text.as_bytes())
                .await
                .map_err(|e| GitError::Transient(format!("cannot talk to git: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| GitError::Transient(format!("git did not finish: {e}")))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let err = if err.trim().is_empty() {
                format!("git exited with {}", out.status)
            } else {
                err.trim().to_owned()
            };
            return Err(GitError::Transient(self.scrub(&err)));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// An error message with the token taken out, should git ever echo it.
    fn scrub(&self, text: &str) -> String {
        match &self.token {
            Some(t) if !t.is_empty() => text.replace(t.as_str(), "<redacted>"),
            _ => text.to_owned(),
        }
    }
}

/// A git step that failed as `what`: a change that does not apply stays so
/// on a retry.
fn refused(e: GitError, what: &str) -> GitError {
    match e {
        GitError::Transient(m) | GitError::Refused(m) => GitError::Refused(format!("{what}: {m}")),
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// The message of a task's commit: `<phase>: <title>` and trailers that
/// lead back to the task and attempt.
pub fn commit_message(phase: &str, title: &str, task_id: &str, attempt: i32) -> String {
    let subject: String = format!("{phase}: {title}")
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    format!("{subject}\n\nOmoi-Task: {task_id}\nOmoi-Attempt: {attempt}\n")
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A scratch directory with a bare "remote" holding `main` with one
    /// commit, and a helper to commit on branches of it.
    struct Scratch {
        root: PathBuf,
        remote: PathBuf,
    }

    fn run(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    impl Scratch {
        fn new() -> Self {
            let root = std::env::temp_dir().join(format!("omoi-git-unit-{}", uuid::Uuid::new_v4().simple()));
            let remote = root.join("remote.git");
            std::fs::create_dir_all(&root).unwrap();
            run(&root, &["init", "--quiet", "--bare", "-b", "main", "remote.git"]);
            let s = Scratch { root, remote };
            s.commit("main", "main", &[("README.md", "hello\n")]);
            s
        }

        /// Commits `files` on `branch` (made from `from`) of the remote; the commit.
        fn commit(&self, from: &str, branch: &str, files: &[(&str, &str)]) -> String {
            let seed = self.root.join(format!("seed-{}", uuid::Uuid::new_v4().simple()));
            let remote = self.remote.display().to_string();
            if run(&self.remote, &["for-each-ref", "refs/heads/main"]).is_empty() {
                std::fs::create_dir_all(&seed).unwrap();
                run(&seed, &["init", "--quiet", "-b", from]);
            } else {
                run(
                    &self.root,
                    &["clone", "--quiet", "--branch", from, &remote, seed.to_str().unwrap()],
                );
            }
            for (f, text) in files {
                std::fs::write(seed.join(f), text).unwrap();
            }
            run(&seed, &["add", "--all"]);
            run(&seed, &["commit", "--quiet", "-m", branch]);
            run(
                &seed,
                &["push", "--quiet", &remote, &format!("HEAD:refs/heads/{branch}")],
            );
            run(&seed, &["rev-parse", "HEAD"])
        }

        fn settings() -> GitSettings {
            GitSettings {
                author_name: "omoi".into(),
                author_email: "omoi@localhost".into(),
                ..Default::default()
            }
        }

        async fn prepare(&self, parents: Vec<Parent>) -> Result<Checkout, GitError> {
            self.prepare_on(BRANCH, parents).await
        }

        async fn prepare_on(&self, branch: &str, parents: Vec<Parent>) -> Result<Checkout, GitError> {
            self.prepare_in(&Self::settings(), branch, parents).await
        }

        async fn prepare_with(&self, git: &GitSettings, parents: Vec<Parent>) -> Result<Checkout, GitError> {
            self.prepare_in(git, BRANCH, parents).await
        }

        async fn prepare_in(
            &self,
            git: &GitSettings,
            branch: &str,
            parents: Vec<Parent>,
        ) -> Result<Checkout, GitError> {
            let repository = Repository::Local(self.remote.clone());
            let ws = self.root.join(format!("ws-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&ws).unwrap();
            let start = Start {
                repository: &repository,
                branch,
                base_ref: "",
                parents,
                reuse: None,
            };
            git.prepare(&start, &ws.with_extension("git"), &ws).await
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    const BRANCH: &str = "omoi/0000abcd-unit";

    fn parent(name: &str, commit: &str) -> Parent {
        Parent {
            name: name.into(),
            commit: commit.into(),
        }
    }

    #[tokio::test]
    async fn divergent_dependencies_are_merged_and_conflicting_ones_refused_by_name() {
        let s = Scratch::new();
        let a = s.commit("main", "a", &[("a.txt", "a\n")]);
        let b = s.commit("main", "b", &[("b.txt", "b\n")]);
        let c = s.commit("main", "c", &[("a.txt", "not a\n")]);
        let merged = s.prepare(vec![parent("A", &a), parent("B", &b)]).await.unwrap();
        assert!(merged.workspace.join("a.txt").exists() && merged.workspace.join("b.txt").exists());
        let parents = run(&merged.workspace, &["rev-list", "--parents", "-n", "1", "HEAD"]);
        assert!(parents.contains(&a) && parents.contains(&b), "{parents}");
        assert_eq!(run(&merged.workspace, &["remote"]), "", "the workspace has no remote");

        let refused = s.prepare(vec![parent("A", &a), parent("C", &c)]).await.unwrap_err();
        let GitError::Refused(message) = refused else {
            panic!("{refused:?}")
        };
        assert!(message.contains("A, C") && message.contains("a.txt"), "{message}");
    }

    #[tokio::test]
    async fn an_ancestor_dependency_adds_nothing_and_a_missing_commit_is_refused() {
        let s = Scratch::new();
        let a = s.commit("main", "a", &[("a.txt", "a\n")]);
        let b = s.commit("a", "b", &[("b.txt", "b\n")]);
        let c = s.prepare(vec![parent("A", &a), parent("B", &b)]).await.unwrap();
        assert_eq!(c.base_commit, b);
        let gone = "0".repeat(40);
        let e = s.prepare(vec![parent("Gone", &gone)]).await.unwrap_err();
        assert!(
            matches!(&e, GitError::Refused(m) if m.contains(&gone) && m.contains("Gone")),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn work_goes_on_from_what_people_pushed_on_it_but_not_from_a_rewritten_branch() {
        let s = Scratch::new();
        let agent = s.commit("main", "t", &[("a.txt", "a\n")]);
        let person = s.commit("t", "t", &[("NOTES.md", "by a person\n")]);
        let c = s.prepare_on("t", vec![parent("Earlier", &agent)]).await.unwrap();
        assert_eq!(c.base_commit, person);
        assert!(c.workspace.join("NOTES.md").exists());
        assert_eq!(c.pushed_since.len(), 1);
        assert!(c.pushed_since[0].ends_with(" t"), "{:?}", c.pushed_since);
        // A branch that no longer holds the work: the work, not the branch.
        let rewritten = s.commit("main", "u", &[("b.txt", "b\n")]);
        let c = s.prepare_on("u", vec![parent("Earlier", &agent)]).await.unwrap();
        assert_ne!(c.base_commit, rewritten);
        assert_eq!((c.base_commit.as_str(), c.pushed_since.len()), (agent.as_str(), 0));
    }

    #[tokio::test]
    async fn a_merge_of_the_moved_base_lands_as_a_merge_commit_and_never_with_its_conflicts_left() {
        let s = Scratch::new();
        let work = s.commit("main", "t", &[("README.md", "hello from the branch\n")]);
        let moved = s.commit("main", "main", &[("README.md", "hello from main\n")]);
        let user = WorkspaceUser::default();
        let merge = |c: &Checkout| {
            let out = std::process::Command::new("git")
                .arg("-C")
                .arg(&c.workspace)
                .args(["merge", "main"])
                .output()
                .unwrap();
            assert!(!out.status.success(), "the merge conflicts");
        };

        // Conflicts left as they are: refused, naming the file.
        let c = s.prepare_on("t", vec![parent("Work", &work)]).await.unwrap();
        assert_eq!(c.base_branch, Some(("main".to_owned(), moved.clone())));
        assert_eq!(
            run(&c.workspace, &["rev-parse", "main"]),
            moved,
            "the base is a branch of the workspace"
        );
        merge(&c);
        let e = Scratch::settings()
            .commit_and_push(&c, "fix: merge", &user)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, GitError::Refused(m) if m.contains("conflict markers in: README.md")),
            "{e:?}"
        );

        // Resolved and committed by the agent: one merge commit on the
        // branch, its parents the work and the base's head.
        let c = s.prepare_on("t", vec![parent("Work", &work)]).await.unwrap();
        merge(&c);
        std::fs::write(c.workspace.join("README.md"), "hello from main and the branch\n").unwrap();
        run(&c.workspace, &["commit", "--quiet", "-am", "resolved"]);
        let landed = Scratch::settings()
            .commit_and_push(&c, "fix: merge", &user)
            .await
            .unwrap();
        assert_eq!(run(&s.remote, &["rev-parse", "t"]), landed.commit);
        let parents = run(&s.remote, &["rev-list", "--parents", "-n", "1", "t"]);
        assert_eq!(parents, format!("{} {work} {moved}", landed.commit));
        assert_eq!(
            run(&s.remote, &["show", "t:README.md"]),
            "hello from main and the branch"
        );
        assert!(
            landed.patch.contains("+hello from main and the branch"),
            "{}",
            landed.patch
        );
    }

    fn cached(cache: &Arc<GitCache>) -> GitSettings {
        GitSettings {
            cache: Some(Arc::clone(cache)),
            borrow: true,
            ..Scratch::settings()
        }
    }

    #[tokio::test]
    async fn the_cache_clones_once_then_fetches_and_workspaces_borrow_its_objects() {
        let s = Scratch::new();
        let cache = Arc::new(GitCache::new(&s.root.join("cache"), 0).unwrap());
        let git = cached(&cache);
        let c = s.prepare_with(&git, vec![]).await.unwrap();
        assert_eq!(cache.talks(), 1);
        let borrowed = c.borrowed().unwrap();
        assert!(borrowed.starts_with(s.root.join("cache")), "{borrowed:?}");
        let alternates = std::fs::read_to_string(c.workspace.join(".git/objects/info/alternates")).unwrap();
        assert_eq!(alternates.trim(), borrowed.display().to_string());
        assert!(
            std::fs::read_dir(c.workspace.join(".git/objects/pack"))
                .unwrap()
                .next()
                .is_none(),
            "nothing copied"
        );
        // Work lands from the borrowing repositories as from clones.
        std::fs::write(c.workspace.join("a.txt"), "a\n").unwrap();
        let user = WorkspaceUser::default();
        let landed = git.commit_and_push(&c, "one", &user).await.unwrap();
        assert_eq!(run(&s.remote, &["rev-parse", BRANCH]), landed.commit);

        // The next attempt fetches (the branch the first one pushed too).
        let next = s.prepare_with(&git, vec![parent("One", &landed.commit)]).await.unwrap();
        assert_eq!((cache.talks(), next.base_commit.as_str()), (2, landed.commit.as_str()));

        // Eight at once: one fetch between them.
        let mut asks = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (cache, git, source) = (Arc::clone(&cache), git.clone(), s.remote.display().to_string());
            asks.spawn(async move { cache.refreshed(&git, &source).await.map(|_| ()) });
        }
        while let Some(held) = asks.join_next().await {
            held.unwrap().unwrap();
        }
        assert_eq!(cache.talks(), 3);
    }

    #[tokio::test]
    async fn packs_fetches_pile_up_are_repacked_in_the_background() {
        let s = Scratch::new();
        let cache = Arc::new(GitCache::new(&s.root.join("cache"), 0).unwrap());
        let git = cached(&cache);
        let source = s.remote.display().to_string();
        drop(cache.refreshed(&git, &source).await.unwrap());
        let mirror = std::fs::read_dir(s.root.join("cache"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "git"))
            .unwrap();
        // Every fetch keeps its pack; more than one is worth a repack.
        run(&mirror, &["config", "transfer.unpackLimit", "1"]);
        run(&mirror, &["config", "gc.autoPackLimit", "1"]);
        let packs = || {
            std::fs::read_dir(mirror.join("objects/pack"))
                .unwrap()
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
                .count()
        };
        for i in 0..3 {
            s.commit("main", "main", &[(&format!("f{i}.txt"), "x\n")]);
            drop(cache.refreshed(&git, &source).await.unwrap());
        }
        // A fetch whose housekeeping was under way starts none: the next
        // one does.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while packs() != 1 {
            assert!(std::time::Instant::now() < deadline, "{} packs", packs());
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            drop(cache.refreshed(&git, &source).await.unwrap());
        }
        assert_eq!(
            run(&mirror, &["rev-parse", "main"]),
            run(&s.remote, &["rev-parse", "main"]),
            "the mirror is whole"
        );
    }

    #[tokio::test]
    async fn a_failed_fetch_leaves_the_mirror_as_it_was() {
        let s = Scratch::new();
        let cache = Arc::new(GitCache::new(&s.root.join("cache"), 0).unwrap());
        let git = cached(&cache);
        let first = s.prepare_with(&git, vec![]).await.unwrap();
        let mirror = first.borrowed().unwrap().with_file_name("");
        let heads = run(&mirror, &["for-each-ref"]);
        let away = s.root.join("away.git");
        std::fs::rename(&s.remote, &away).unwrap();
        let e = s.prepare_with(&git, vec![]).await.unwrap_err();
        assert!(matches!(&e, GitError::Transient(m) if m.contains("git fetch")), "{e:?}");
        assert_eq!(run(&mirror, &["for-each-ref"]), heads);
        std::fs::rename(&away, &s.remote).unwrap();
        s.prepare_with(&git, vec![]).await.unwrap();
    }

    #[tokio::test]
    async fn over_its_bound_the_cache_drops_the_least_recently_used_mirror_no_attempt_holds() {
        let (a, b) = (Scratch::new(), Scratch::new());
        let cache = Arc::new(GitCache::new(&a.root.join("cache"), 1).unwrap());
        let git = cached(&cache);
        let held = a.prepare_with(&git, vec![]).await.unwrap();
        let mirror_a = held.borrowed().unwrap().with_file_name("");
        b.prepare_with(&git, vec![]).await.unwrap();
        assert!(mirror_a.exists(), "held by an attempt: kept");
        drop(held);
        // Another executor sharing the directory uses it now.
        let other = GitCache::new(&a.root.join("cache"), 0).unwrap();
        let theirs = other.refreshed(&git, a.remote.to_str().unwrap()).await.unwrap();
        b.prepare_with(&git, vec![]).await.unwrap();
        assert!(mirror_a.exists(), "held by another executor: kept");
        drop(theirs);
        let again = b.prepare_with(&git, vec![]).await.unwrap();
        assert!(!mirror_a.exists(), "no longer held, least recently used: dropped");
        assert!(again.borrowed().unwrap().exists(), "the one in use stays");
    }

    #[tokio::test]
    async fn another_user_reads_the_shared_objects_but_neither_writes_them_nor_reads_the_remote() {
        let s = Scratch::new();
        let cache = Arc::new(GitCache::new(&s.root.join("cache"), 0).unwrap());
        let c = s.prepare_with(&cached(&cache), vec![]).await.unwrap();
        let objects = c.borrowed().unwrap();
        let mirror = objects.with_file_name("");
        std::fs::set_permissions(&s.root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let as_nobody = |script: &str| {
            std::process::Command::new("runuser")
                .args(["-u", "nobody", "--", "sh", "-c", script])
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap()
                .success()
        };
        let some_object = run(&mirror, &["rev-parse", "HEAD"]);
        let loose = objects.join(&some_object[..2]).join(&some_object[2..]);
        let packs = objects.join("pack");
        let readable = format!(
            "cat {} >/dev/null || cat {}/*.pack >/dev/null",
            loose.display(),
            packs.display()
        );
        assert!(as_nobody(&readable), "the objects are readable");
        assert!(!as_nobody(&format!("touch {}/x", objects.display())));
        assert!(!as_nobody(&format!("touch {}/x", packs.display())));
        assert!(!as_nobody(&format!("cat {}/config", mirror.display())));
        assert!(
            !as_nobody(&format!("ls {}", s.root.join("cache").display())),
            "the cache is not listable"
        );
    }

    #[tokio::test]
    async fn a_reused_checkout_is_brought_to_the_base_rewriting_only_what_differs_and_keeping_nothing_else() {
        use std::os::unix::fs::MetadataExt;
        let s = Scratch::new();
        let user = WorkspaceUser::default();
        let settings = Scratch::settings();
        let first = s.prepare(vec![]).await.unwrap();
        assert!(!first.reused);
        std::fs::write(first.workspace.join("one.txt"), "1\n").unwrap();
        std::fs::write(first.workspace.join(".gitignore"), "build/\n").unwrap();
        let landed = settings.commit_and_push(&first, "first", &user).await.unwrap();
        // What a failed attempt might leave: strays, an ignored build, an
        // edit, and its own repository configuration.
        let old = first.workspace.clone();
        std::fs::write(old.join("stray.txt"), "x").unwrap();
        std::fs::create_dir_all(old.join("build")).unwrap();
        std::fs::write(old.join("build/out.o"), "x").unwrap();
        std::fs::write(old.join("README.md"), "edited\n").unwrap();
        run(&old, &["config", "alias.hostile", "!touch pwned"]);
        // The agent's user (when the tests run as root): its files are its.
        let agent = nix::unistd::Uid::effective().is_root().then_some((65534, 65534));
        let chown = |p: &Path| {
            if let Some((uid, gid)) = agent {
                let done = std::process::Command::new("chown")
                    .args(["-R", &format!("{uid}:{gid}")])
                    .arg(p)
                    .status()
                    .unwrap();
                assert!(done.success());
            }
        };
        chown(&old);
        // An old time that a rewrite would not keep.
        let touched = std::process::Command::new("touch")
            .args(["-d", "2001-02-03 04:05:06"])
            .arg(old.join("one.txt"))
            .status()
            .unwrap();
        assert!(touched.success());
        let mtime = std::fs::metadata(old.join("one.txt")).unwrap().mtime();

        let repository = Repository::Local(s.remote.clone());
        let ws = s.root.join("ws-reused");
        std::fs::create_dir_all(&ws).unwrap();
        let start = Start {
            repository: &repository,
            branch: BRANCH,
            base_ref: "",
            parents: vec![parent("first", &landed.commit)],
            reuse: Some(&old),
        };
        let next = settings.prepare(&start, &ws.with_extension("git"), &ws).await.unwrap();
        assert!(next.reused && !old.exists(), "the tree moved in");
        assert_eq!(next.base_commit, landed.commit);
        // As the worker hands it over: the new repository becomes the agent's.
        chown(&ws.join(".git"));
        let agent_user = WorkspaceUser {
            identity: agent,
            ..Default::default()
        };
        settings.refresh(&next, &agent_user).await.unwrap();
        let any = ["-c", "safe.directory=*"];
        let look = |args: &[&str]| run(&ws, &[&any[..], args].concat());
        assert_eq!(look(&["status", "--porcelain", "--ignored"]), "");
        assert_eq!(look(&["rev-parse", "--abbrev-ref", "HEAD"]), BRANCH);
        assert_eq!(std::fs::read_to_string(ws.join("README.md")).unwrap(), "hello\n");
        assert!(!ws.join("stray.txt").exists() && !ws.join("build").exists());
        assert_eq!(
            std::fs::metadata(ws.join("one.txt")).unwrap().mtime(),
            mtime,
            "an unchanged file is not written again"
        );
        assert!(
            !std::fs::read_to_string(ws.join(".git/config"))
                .unwrap()
                .contains("hostile")
        );
        assert_eq!(look(&["remote"]), "");

        // Its next commit holds its own change alone.
        std::fs::write(ws.join("two.txt"), "2\n").unwrap();
        chown(&ws.join("two.txt"));
        let second = settings.commit_and_push(&next, "second", &agent_user).await.unwrap();
        assert_eq!(
            run(&s.remote, &["rev-parse", &format!("{}^", second.commit)]),
            landed.commit
        );
        let files = run(&s.remote, &["diff", "--name-only", &landed.commit, &second.commit]);
        assert_eq!(files, "two.txt");
    }

    #[tokio::test]
    async fn a_chosen_candidate_lands_in_place_of_the_one_on_the_branch_unless_later_work_built_on_it() {
        let s = Scratch::new();
        let user = WorkspaceUser::default();
        let settings = Scratch::settings();
        let read = |file: &str| {
            let out = std::process::Command::new("git")
                .arg("-C")
                .arg(&s.remote)
                .args(["show", &format!("{BRANCH}:{file}")])
                .output()
                .unwrap();
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        };
        // Two candidates from the same base, kept, not pushed.
        let mut kept = Vec::new();
        for (text, extra) in [("a\n", None), ("b\n", Some("extra.txt"))] {
            let c = s.prepare(vec![]).await.unwrap();
            std::fs::write(c.workspace.join("hello.txt"), text).unwrap();
            if let Some(extra) = extra {
                std::fs::write(c.workspace.join(extra), "x\n").unwrap();
            }
            let (g, bundle) = settings.commit_and_keep(&c, "candidate", &user).await.unwrap();
            kept.push((g.commit, bundle.unwrap()));
        }
        let k = |i: usize| Kept {
            bundle: &kept[i].1,
            commit: &kept[i].0,
        };
        let first = s.prepare(vec![]).await.unwrap();
        settings.land(&first, k(0).bundle, k(0).commit).await.unwrap();
        // Later work on the branch, elsewhere.
        let later = s.prepare(vec![]).await.unwrap();
        std::fs::write(later.workspace.join("other.txt"), "o\n").unwrap();
        settings.commit_and_push(&later, "later", &user).await.unwrap();

        // B in A's place: one commit on the branch's head.
        let at = s.prepare(vec![]).await.unwrap();
        let swapped = settings.land_instead(&at, k(1), Some(k(0)), "choose b").await.unwrap();
        assert_eq!(
            run(&s.remote, &["rev-parse", &format!("{}^", swapped.commit)]),
            swapped.base_commit
        );
        assert_eq!(run(&s.remote, &["rev-parse", BRANCH]), swapped.commit);
        assert_eq!(read("hello.txt").as_deref(), Some("b\n"));
        assert_eq!(read("extra.txt").as_deref(), Some("x\n"));
        assert_eq!(read("other.txt").as_deref(), Some("o\n"), "later work stays");
        assert_eq!(
            (swapped.files_changed, swapped.insertions, swapped.deletions),
            (2, 2, 1)
        );

        // And back: B's change (not the landing's) is what is taken back.
        let at = s.prepare(vec![]).await.unwrap();
        settings.land_instead(&at, k(0), Some(k(1)), "choose a").await.unwrap();
        assert_eq!(read("hello.txt").as_deref(), Some("a\n"));
        assert_eq!(read("extra.txt"), None);
        assert_eq!(read("other.txt").as_deref(), Some("o\n"));

        // The same change in its own place: nothing to commit.
        let at = s.prepare(vec![]).await.unwrap();
        let same = settings.land_instead(&at, k(0), Some(k(0)), "again").await.unwrap();
        let head = run(&s.remote, &["rev-parse", BRANCH]);
        assert_eq!((same.commit.as_str(), same.committed()), (head.as_str(), false));

        // Later work that edits what A wrote: A cannot be taken back.
        let head = run(&s.remote, &["rev-parse", BRANCH]);
        let edit = s.prepare(vec![parent("the branch", &head)]).await.unwrap();
        std::fs::write(edit.workspace.join("hello.txt"), "a, edited\n").unwrap();
        settings.commit_and_push(&edit, "edit", &user).await.unwrap();
        let head = run(&s.remote, &["rev-parse", BRANCH]);
        let at = s.prepare(vec![]).await.unwrap();
        match settings.land_instead(&at, k(1), Some(k(0)), "choose b").await {
            Err(GitError::Refused(m)) => assert!(m.contains("cannot be taken back"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(run(&s.remote, &["rev-parse", BRANCH]), head, "nothing pushed");
    }

    #[tokio::test]
    async fn the_agents_own_commits_and_leftovers_land_as_one_commit_and_no_change_as_none() {
        let s = Scratch::new();
        let main = run(&s.remote, &["rev-parse", "main"]);
        let user = WorkspaceUser::default();
        let settings = Scratch::settings();

        let idle = s.prepare(vec![]).await.unwrap();
        let none = settings
            .commit_and_push(&idle, "initial: nothing", &user)
            .await
            .unwrap();
        assert_eq!((none.commit.as_str(), none.committed()), (main.as_str(), false));
        assert!(
            run(&s.remote, &["for-each-ref", "refs/heads/omoi"]).is_empty(),
            "nothing pushed"
        );

        let busy = s.prepare(vec![]).await.unwrap();
        std::fs::write(busy.workspace.join("one.txt"), "1\n").unwrap();
        run(&busy.workspace, &["add", "one.txt"]);
        run(&busy.workspace, &["commit", "--quiet", "-m", "the agent's own"]);
        std::fs::write(busy.workspace.join("two.txt"), "2\n2\n").unwrap();
        let message = commit_message("implementation", "Do it", "t-1", 3);
        let landed = settings.commit_and_push(&busy, &message, &user).await.unwrap();
        assert_eq!(landed.base_commit, main);
        assert_eq!((landed.files_changed, landed.insertions, landed.deletions), (2, 3, 0));
        assert_eq!(run(&s.remote, &["rev-parse", "omoi/0000abcd-unit"]), landed.commit);
        assert_eq!(run(&s.remote, &["rev-parse", &format!("{}^", landed.commit)]), main);
        let body = run(&s.remote, &["log", "-1", "--format=%B%n%an", &landed.commit]);
        assert_eq!(body, "implementation: Do it\n\nOmoi-Task: t-1\nOmoi-Attempt: 3\n\nomoi");
        assert!(landed.patch.contains("+2") && !landed.patch_truncated);
    }
}
