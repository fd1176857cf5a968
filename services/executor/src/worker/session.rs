//! An attempt's agent session: restored from the checkpoint the task
//! names before the agent starts (an earlier attempt's, or for a follow-up
//! the session of the task it follows), checkpointed while the agent runs
//! and once more when it ends, each checkpoint recorded on the task
//! (RecordSession) so that whichever executor runs the next attempt finds
//! it. Nothing here stops an attempt: a store out of reach skips a
//! checkpoint with a warning (the next one tries again), a checkpoint that
//! cannot be restored starts the agent afresh and says why.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use chrono::Utc;
use omoi_domain::AgentSession;
use omoi_domain::session::{checkpoint_name, parse_checkpoint_name};
use omoi_proto::common::{AgentEventKind, OutputStream};
use omoi_proto::taskqueue as tq;
use omoi_runtime::metrics::{CHECKPOINT_BYTES, CHECKPOINT_SECONDS, CHECKPOINTS, SESSIONS_RESUMED};
use uuid::Uuid;

use super::Worker;
use crate::events::{EventSink, event};
use crate::executions::Execution;
use crate::runners::{RunContext, session_id_ok};
use crate::sessions::SessionError;
use crate::sessions::archive::{self, Contents, Manifest};
use crate::workspace::{self, Snapshot};

/// What an attempt takes up.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Continues {
    /// Nothing: a new session.
    Fresh,
    /// The checkpoint of an earlier attempt of the same task.
    Retry(AgentSession),
    /// The session of the task a follow-up follows.
    FollowUp { session: AgentSession, from_task: Uuid },
}

impl Continues {
    /// What the task's recorded session offers its next attempt.
    pub(super) fn of(task: &tq::Task, task_id: Uuid) -> Self {
        let Some(recorded) = task.session.clone() else {
            return Continues::Fresh;
        };
        let Ok(session) = omoi_proto::domain::agent_session("session", recorded) else {
            return Continues::Fresh;
        };
        match parse_checkpoint_name(&session.checkpoint) {
            None => Continues::Fresh,
            Some((from, _)) if from == task_id => Continues::Retry(session),
            Some((from_task, _)) => Continues::FollowUp { session, from_task },
        }
    }

    pub(super) fn session(&self) -> Option<&AgentSession> {
        match self {
            Continues::Fresh => None,
            Continues::Retry(s) | Continues::FollowUp { session: s, .. } => Some(s),
        }
    }
}

/// An earlier attempt's work, told to a new session: the files it had
/// changed, and its diff against this attempt's checkout (bounded).
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct Earlier {
    pub changed: Vec<String>,
    pub diff: String,
}

/// The most of an earlier attempt's diff a prompt quotes.
const MAX_DIFF_BYTES: usize = 16 * 1024;

/// What a restore did.
#[derive(Debug, Default)]
pub(super) struct Restored {
    /// The session id to resume (the runner can, and its files are back).
    pub resume: Option<String>,
    /// The record of this attempt's session so far (resumed from where).
    pub session: Option<AgentSession>,
    /// What an earlier attempt left, for a runner that starts afresh (its
    /// work is not put back: a new session would not know it).
    pub earlier: Option<Earlier>,
}

impl Worker {
    /// Takes up what `continues` names. The runner that holds the session
    /// resumes it: its files go back where the runner looks for them in
    /// this workspace and, for a retry, the earlier attempt's work over the
    /// fresh checkout (a follow-up's work is on the branch already). Any
    /// other runner starts a new session, told what the earlier attempt had
    /// changed. Whatever happens, a follow-up's records keep naming the
    /// task whose conversation it continues.
    pub(super) async fn restore(&self, run: &Execution, continues: &Continues, ctx: &RunContext) -> Restored {
        let link = match continues {
            Continues::FollowUp { from_task, .. } => Some(*from_task),
            Continues::Retry(s) => s.resumed_from_task_id,
            Continues::Fresh => None,
        };
        let mut restored = self.take_up(run, continues, ctx).await;
        if restored.session.is_none() && link.is_some() {
            restored.session = Some(AgentSession {
                runner: self.config.runner.as_str().to_owned(),
                resumed_from_task_id: link,
                ..Default::default()
            });
        }
        restored
    }

    async fn take_up(&self, run: &Execution, continues: &Continues, ctx: &RunContext) -> Restored {
        let Some(session) = continues.session() else {
            return Restored::default();
        };
        let runner = self.config.runner.as_str();
        let layout = self
            .runner
            .sessions()
            .filter(|_| session.runner == runner && session_id_ok(&session.session_id));
        let home = self.runner.home(ctx);
        let (layout, home) = match (layout, home, continues) {
            (Some(layout), Some(home), _) => (layout, home),
            (_, _, Continues::FollowUp { .. }) => return Restored::default(),
            _ => return self.earlier(run, session, &ctx.workspace).await,
        };
        let bytes = match self.sessions.get(&session.checkpoint).await {
            Ok(b) => b,
            Err(e) => return self.fresh(run, &e.to_string()),
        };
        let checkpoint = match archive::read(&bytes) {
            Ok(c) => c,
            Err(e) => return self.fresh(run, &format!("checkpoint {}: {e}", session.checkpoint)),
        };
        let manifest = checkpoint
            .manifest
            .clone()
            .unwrap_or_else(|| unreachable!("read checks it"));
        // Where each kept session file goes for this workspace.
        let old = PathBuf::from(&manifest.workspace);
        let places: Vec<Option<PathBuf>> = manifest
            .session_files
            .iter()
            .map(|kept| layout.place(Path::new(kept), &session.session_id, &old, &ctx.workspace))
            .collect();
        let (workspace, agent_home) = (ctx.workspace.clone(), home.clone());
        let restore_work = matches!(continues, Continues::Retry(_));
        let placed = tokio::task::spawn_blocking(move || -> Result<(usize, bool), String> {
            let files = if restore_work {
                put_back_work(&workspace, &checkpoint, &manifest).map_err(|e| format!("workspace: {e}"))?
            } else {
                0
            };
            let session_back = put_back_session(&agent_home, &places, &checkpoint, &manifest, &workspace)
                .map_err(|e| format!("session: {e}"))?;
            Ok((files, session_back))
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        let files = match placed {
            Ok((files, true)) => files,
            Ok((_, false)) => {
                return self.fresh(
                    run,
                    &format!("checkpoint {} holds no session files", session.checkpoint),
                );
            }
            Err(e) => {
                return self.fresh(
                    run,
                    &format!("checkpoint {} cannot be restored: {e}", session.checkpoint),
                );
            }
        };
        if let Some(user) = &self.agent_user {
            // Restored as the executor: the agent's again.
            for dir in [ctx.workspace.as_path(), home.as_path()] {
                if let Err(e) = user.give(dir) {
                    return self.fresh(run, &format!("cannot hand the restored files to {}: {e}", user.name));
                }
            }
        }
        let (from_task, what) = match continues {
            Continues::FollowUp { from_task, .. } => (Some(*from_task), format!("task {from_task}")),
            _ => (session.resumed_from_task_id, format!("attempt {}", session.attempt)),
        };
        SESSIONS_RESUMED.with_label_values(&["resumed"]).inc();
        run.line(
            OutputStream::System,
            format!(
                "resuming session {} of {what} ({files} files of its work restored)",
                session.session_id
            ),
        );
        Restored {
            session: Some(AgentSession {
                runner: runner.to_owned(),
                session_id: session.session_id.clone(),
                resumed_from_attempt: session.attempt,
                resumed_from_task_id: from_task,
                ..Default::default()
            }),
            resume: Some(session.session_id.clone()),
            earlier: None,
        }
    }

    /// What an earlier attempt had changed, from its checkpoint, for a
    /// runner that starts afresh.
    async fn earlier(&self, run: &Execution, session: &AgentSession, workspace: &Path) -> Restored {
        let read = match self.sessions.get(&session.checkpoint).await {
            Ok(bytes) => archive::read(&bytes).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let earlier = match read {
            Ok(c) => {
                let workspace = workspace.to_path_buf();
                tokio::task::spawn_blocking(move || earlier_work(&c, &workspace))
                    .await
                    .unwrap_or_default()
            }
            Err(e) => {
                run.line(
                    OutputStream::System,
                    format!("the earlier attempt's checkpoint is unreadable: {e}"),
                );
                Earlier::default()
            }
        };
        let changed = &earlier.changed;
        run.line(
            OutputStream::System,
            format!(
                "a new session: the {} runner does not take up attempt {}'s ({} files changed)",
                self.config.runner.as_str(),
                session.attempt,
                changed.len()
            ),
        );
        Restored {
            earlier: Some(earlier),
            ..Default::default()
        }
    }

    /// A checkpoint that could not be used: said in the run's events, and
    /// the agent starts afresh.
    fn fresh(&self, run: &Execution, why: &str) -> Restored {
        SESSIONS_RESUMED.with_label_values(&["fresh"]).inc();
        let text = format!("starting a new session: {why}");
        tracing::warn!(task_id = %run.task_id, attempt = run.attempt, "{text}");
        run.emit(event(AgentEventKind::Error, text.clone()));
        Restored::default()
    }

    /// Stores a checkpoint of the attempt, its workspace as `after`, and
    /// records it on the task; the session as recorded, or None when it
    /// was skipped (said in the run's output).
    pub(super) async fn checkpoint(&self, c: &Checkpointing<'_>, after: &Snapshot) -> Option<AgentSession> {
        let began = std::time::Instant::now();
        let session_id = c
            .ctx
            .session
            .borrow()
            .clone()
            .or_else(|| c.ctx.resume.clone())
            .unwrap_or_default();
        let runner = self.config.runner.as_str();
        let taken_at = Utc::now();
        let name = checkpoint_name(c.ticket_id, c.ctx.task_id, c.ctx.attempt);
        let (changed, removed) = workspace::differences(c.before, after);
        let removed = removed.iter().map(|p| p.display().to_string()).collect();
        let home = self.runner.home(c.ctx);
        let session_files = match (self.runner.sessions(), &home) {
            (Some(layout), Some(home)) if session_id_ok(&session_id) => {
                layout.files(home, &c.ctx.workspace, &session_id)
            }
            _ => Vec::new(),
        };
        let manifest = Manifest {
            runner: runner.to_owned(),
            session_id: session_id.clone(),
            task_id: c.ctx.task_id.to_string(),
            attempt: c.ctx.attempt,
            workspace: c.ctx.workspace.display().to_string(),
            taken_at,
            removed,
            skipped: Vec::new(),
            session_files: Vec::new(),
        };
        let (workspace, redactor) = (c.ctx.workspace.clone(), self.sessions.redactor.clone());
        let built = tokio::task::spawn_blocking(move || {
            archive::build(Contents {
                manifest,
                workspace: &workspace,
                changed,
                home: home.as_deref(),
                session_files,
                redactor: &redactor,
            })
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        let stored = match built {
            Ok(bytes) => self.sessions.put(&name, bytes).await,
            Err(e) => Err(SessionError::Corrupt(e.into())),
        };
        let bytes = match stored {
            Ok(b) => b,
            Err(e) => {
                CHECKPOINTS.with_label_values(&["skipped"]).inc();
                c.run.line(
                    OutputStream::System,
                    format!("checkpoint skipped (the attempt goes on; the next one tries again): {e}"),
                );
                return None;
            }
        };
        let mut session = c.resumed.clone().unwrap_or_default();
        session.runner = runner.to_owned();
        session.session_id = session_id;
        session.checkpoint = name;
        session.checkpoint_at = Some(taken_at);
        session.attempt = c.ctx.attempt;
        session.checkpoints = c.count.fetch_add(1, Ordering::Relaxed) + 1;
        session.checkpoint_bytes = bytes as i64;
        self.record_session(c.ctx.task_id, c.ctx.attempt, &session).await;
        let took = began.elapsed();
        CHECKPOINT_SECONDS.observe(took.as_secs_f64());
        CHECKPOINTS.with_label_values(&["stored"]).inc();
        CHECKPOINT_BYTES.inc_by(bytes);
        c.run.line(
            OutputStream::System,
            format!(
                "checkpoint {} stored: {} bytes in {} ms",
                session.checkpoints,
                bytes,
                took.as_millis()
            ),
        );
        Some(session)
    }

    /// RecordSession, delivered as a report is (a refusal means the
    /// attempt is no longer ours: nothing more to do).
    pub(super) async fn record_session(&self, task_id: Uuid, attempt: i32, session: &AgentSession) -> bool {
        let wire = omoi_proto::common::AgentSession::from(session);
        super::report("RecordSession", || {
            let mut q = self.queue.clone();
            let session = wire.clone();
            async move {
                q.record_session(tq::RecordSessionRequest {
                    task_id: task_id.to_string(),
                    attempt,
                    session: Some(session),
                })
                .await
            }
        })
        .await
    }

    /// Checkpoints every `OMOI_CHECKPOINT_SECONDS` while the agent runs
    /// (never returns; dropped when the run ends). A checkpoint is taken
    /// only once there is something to keep: a session, or work.
    pub(super) async fn checkpoint_every(&self, c: &Checkpointing<'_>) -> std::convert::Infallible {
        if self.config.checkpoint_seconds == 0 {
            return std::future::pending().await;
        }
        let period = Duration::from_secs(self.config.checkpoint_seconds);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let has_session = c.ctx.session.borrow().is_some() || c.ctx.resume.is_some();
            let after = workspace::snapshot(&c.ctx.workspace);
            if has_session || c.before != &after {
                self.checkpoint(c, &after).await;
            }
        }
    }
}

/// An attempt's checkpointing: what it is about and how many it stored.
pub(super) struct Checkpointing<'a> {
    pub run: &'a Execution,
    pub ctx: &'a RunContext,
    pub ticket_id: Option<Uuid>,
    /// The workspace as the attempt started (its work is what differs).
    pub before: &'a Snapshot,
    /// Where its session came from, when it resumed one.
    pub resumed: Option<AgentSession>,
    pub count: AtomicI32,
}

/// What a checkpoint's work was against `workspace` (this attempt's fresh
/// checkout): the files, and a unified diff of the text ones, cut at
/// [`MAX_DIFF_BYTES`].
fn earlier_work(c: &archive::Checkpoint, workspace: &Path) -> Earlier {
    let mut changed: Vec<String> = c.files.iter().map(|(p, _, _)| p.display().to_string()).collect();
    changed.extend(c.links.iter().map(|(p, _)| p.display().to_string()));
    let removed = c.manifest.as_ref().map(|m| m.removed.clone()).unwrap_or_default();
    changed.extend(removed.iter().map(|p| format!("{p} (removed)")));
    changed.sort();
    let mut diff = String::new();
    let mut files: Vec<&(PathBuf, Vec<u8>, u32)> = c.files.iter().collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    for (rel, data, _) in files {
        let before = archive::read_beneath(workspace, rel, archive::MAX_FILE_BYTES)
            .ok()
            .flatten()
            .unwrap_or_default();
        let name = rel.display().to_string();
        match (std::str::from_utf8(&before), std::str::from_utf8(data)) {
            (Ok(old), Ok(new)) => {
                let text = similar::TextDiff::from_lines(old, new);
                let header = (format!("a/{name}"), format!("b/{name}"));
                diff.push_str(&text.unified_diff().header(&header.0, &header.1).to_string());
            }
            _ => diff.push_str(&format!("Binary file {name} differs\n")),
        }
        if diff.len() > MAX_DIFF_BYTES {
            break;
        }
    }
    for rel in &removed {
        diff.push_str(&format!("File {rel} removed\n"));
    }
    if diff.len() > MAX_DIFF_BYTES {
        diff.truncate(diff.floor_char_boundary(MAX_DIFF_BYTES));
        diff.push_str("\n… (cut)\n");
    }
    Earlier { changed, diff }
}

/// The earlier attempt's work, over this attempt's checkout; how many
/// files (and links) it put back.
fn put_back_work(workspace: &Path, c: &archive::Checkpoint, manifest: &Manifest) -> std::io::Result<usize> {
    for (rel, data, mode) in &c.files {
        archive::write_under(workspace, rel, data, *mode)?;
    }
    for rel in &manifest.removed {
        let rel = Path::new(rel);
        if rel.components().all(|p| matches!(p, std::path::Component::Normal(_))) {
            archive::remove_any(&workspace.join(rel))?;
        }
    }
    // Links last: none of them can carry a file's write elsewhere.
    for (rel, target) in &c.links {
        let at = workspace.join(rel);
        if let Some(parent) = at.parent() {
            std::fs::create_dir_all(parent)?;
        }
        archive::remove_any(&at)?;
        std::os::unix::fs::symlink(target, &at)?;
    }
    Ok(c.files.len() + c.links.len())
}

/// The session's files where the runner looks for them in `workspace`
/// (`places`: where each kept one goes; the old workspace's path in them
/// made the new one's); whether any were placed.
fn put_back_session(
    home: &Path,
    places: &[Option<PathBuf>],
    c: &archive::Checkpoint,
    manifest: &Manifest,
    workspace: &Path,
) -> std::io::Result<bool> {
    let (old, new) = (manifest.workspace.as_bytes(), workspace.display().to_string());
    let mut placed = false;
    for (index, inner, data) in &c.session {
        let Some(Some(path)) = places.get(*index) else { continue };
        let rel = if inner.as_os_str().is_empty() {
            path.clone()
        } else {
            path.join(inner)
        };
        let data = archive::replace(data, old, new.as_bytes());
        archive::write_under(home, &rel, &data, 0o600)?;
        placed = true;
    }
    Ok(placed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_earlier_attempts_work_reads_as_a_bounded_diff_against_the_checkout() {
        let ws = std::env::temp_dir().join(format!("omoi-earlier-{}", Uuid::new_v4()));
        std::fs::create_dir_all(ws.join("src")).unwrap();
        std::fs::write(ws.join("src/lib.rs"), "fn a() {}\nfn b() {}\n").unwrap();
        let checkpoint = archive::Checkpoint {
            manifest: Some(Manifest::sample("command")),
            files: vec![
                ("src/lib.rs".into(), b"fn a() {}\nfn c() {}\n".to_vec(), 0o644),
                ("new.txt".into(), b"hello\n".to_vec(), 0o644),
                ("blob.bin".into(), vec![0xff, 0xfe, 0x00], 0o644),
            ],
            ..Default::default()
        };
        let e = earlier_work(&checkpoint, &ws);
        assert_eq!(e.changed, ["blob.bin", "gone.txt (removed)", "new.txt", "src/lib.rs"]);
        for said in [
            "--- a/src/lib.rs",
            "-fn b() {}",
            "+fn c() {}",
            "+hello",
            "Binary file blob.bin differs",
            "File gone.txt removed",
        ] {
            assert!(e.diff.contains(said), "{said} in {}", e.diff);
        }
        // A large one is cut, on a character boundary.
        let big = archive::Checkpoint {
            files: vec![("big.txt".into(), "é\n".repeat(20_000).into_bytes(), 0o644)],
            ..checkpoint
        };
        let e = earlier_work(&big, &ws);
        assert!(
            e.diff.len() < MAX_DIFF_BYTES + 100 && e.diff.ends_with("… (cut)\n"),
            "{}",
            e.diff.len()
        );
        std::fs::remove_dir_all(ws).unwrap();
    }
}
