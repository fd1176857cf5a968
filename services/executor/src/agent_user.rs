//! The unprivileged user agents run as (`OMOI_AGENT_USER`), so that an
//! agent cannot read the executor's secrets: not its environment
//! (`/proc/<pid>/environ` belongs to another user, and the executor is not
//! dumpable), not its secret files. Each workspace is handed to that user
//! before the agent starts, and the agent gets a home of its own.

use std::io;
use std::os::unix::fs::{DirBuilderExt, lchown};
use std::path::{Path, PathBuf};

use nix::unistd::{Uid, User};

/// Who an agent process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// HOME of the agent: a directory of the agent user's own, made for
    /// each attempt (`for_attempt`); None for the user as configured.
    pub home: Option<PathBuf>,
}

impl AgentUser {
    /// The user named (or numbered) by `spec`, with its home prepared under
    /// `state`.
    pub fn resolve(spec: &str, state: &Path) -> anyhow::Result<Self> {
        let spec = spec.trim();
        let user = match spec.parse::<u32>() {
            Ok(uid) => User::from_uid(Uid::from_raw(uid))?,
            Err(_) => User::from_name(spec)?,
        }
        .ok_or_else(|| anyhow::anyhow!("OMOI_AGENT_USER: no user {spec:?} on this machine"))?;
        anyhow::ensure!(
            !user.uid.is_root(),
            "OMOI_AGENT_USER: {spec:?} is root; agents must run unprivileged"
        );
        let me = nix::unistd::geteuid();
        anyhow::ensure!(
            me.is_root() || me == user.uid,
            "OMOI_AGENT_USER: running agents as {spec:?} needs the executor to run as root (it runs as uid {me})"
        );
        Self::with_state(user, state)
    }

    /// The executor's own user, whose attempts get homes of their own: what
    /// a sandboxed agent runs as when no other user is set, so that its
    /// home is not the executor's.
    pub fn own(state: &Path) -> anyhow::Result<Self> {
        let me = nix::unistd::geteuid();
        let user = User::from_uid(me)?.ok_or_else(|| anyhow::anyhow!("uid {me} has no name on this machine"))?;
        Self::with_state(user, state)
    }

    fn with_state(user: User, state: &Path) -> anyhow::Result<Self> {
        // The state directory: the agent user may pass through, not list.
        std::fs::DirBuilder::new().recursive(true).mode(0o711).create(state)?;
        std::fs::set_permissions(state, std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
        Ok(AgentUser {
            name: user.name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            home: None,
        })
    }

    /// The same user with `home` as the home of one attempt: made afresh
    /// (a crashed run's leftover goes), filled by `prepare` (as the
    /// executor), then handed to the user. An attempt's home is bound into
    /// its sandbox alone, so no agent sees another attempt's session files;
    /// it goes with its attempt.
    pub fn for_attempt(&self, home: &Path, prepare: impl FnOnce(&Path) -> io::Result<()>) -> io::Result<Self> {
        match std::fs::remove_dir_all(home) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::DirBuilder::new().mode(0o700).create(home)?;
        prepare(home)?;
        let attempt = AgentUser {
            home: Some(home.to_path_buf()),
            ..self.clone()
        };
        attempt.give(home)?;
        Ok(attempt)
    }

    /// Makes `dir` (not what it holds) the agent user's.
    pub fn give_top(&self, dir: &Path) -> io::Result<()> {
        lchown(dir, Some(self.uid), Some(self.gid))
    }

    /// Makes everything under `dir` (itself included) the agent user's.
    pub fn give(&self, dir: &Path) -> io::Result<()> {
        lchown(dir, Some(self.uid), Some(self.gid))?;
        if dir.is_symlink() || !dir.is_dir() {
            return Ok(());
        }
        for entry in std::fs::read_dir(dir)? {
            self.give(&entry?.path())?;
        }
        Ok(())
    }
}

/// Keeps other processes of the executor's user (and agents) from reading
/// its memory and `/proc/<pid>/environ`: they become root's.
pub fn protect_executor() {
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %e, "cannot make the executor non-dumpable");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_unknown_users_are_refused() {
        let state = std::env::temp_dir().join(format!("omoi-agent-user-{}", uuid::Uuid::new_v4()));
        assert!(
            AgentUser::resolve("root", &state)
                .unwrap_err()
                .to_string()
                .contains("root")
        );
        assert!(
            AgentUser::resolve("no-such-user-here", &state)
                .unwrap_err()
                .to_string()
                .contains("no user")
        );
        let _ = std::fs::remove_dir_all(state);
    }

    #[test]
    fn an_attempts_home_is_made_afresh_and_prepared() {
        let state = std::env::temp_dir().join(format!("omoi-agent-user-{}", uuid::Uuid::new_v4()));
        let user = AgentUser::own(&state).unwrap();
        let home = state.join("1.home");
        std::fs::create_dir_all(home.join("left-over")).unwrap();
        let attempt = user
            .for_attempt(&home, |h| std::fs::write(h.join("settings"), "x"))
            .unwrap();
        assert_eq!(attempt.home.as_deref(), Some(home.as_path()));
        assert_eq!(attempt.uid, user.uid);
        assert!(!home.join("left-over").exists());
        assert!(home.join("settings").exists());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&home).unwrap().permissions().mode() & 0o777, 0o700);
        let _ = std::fs::remove_dir_all(state);
    }
}
