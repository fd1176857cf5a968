//! A checkpoint as stored: one gzip'd tar holding `checkpoint.json` (the
//! manifest), the workspace's work so far against the attempt's start
//! (`workspace/<path>`: files added or changed, symlinks as links; the
//! manifest lists what was removed) and the agent's session files
//! (`session/<i>`, or `session/<i>/<path>` for a directory: the i-th path
//! the runner names, relative to the agent's home). Every secret the
//! executor holds is replaced before anything is written. Restoring
//! places the work in a new workspace and the session files where the
//! runner looks for them for that workspace, refusing any path that would
//! leave either.

use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use chrono::{DateTime, Utc};
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};

/// What a checkpoint says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub runner: String,
    pub session_id: String,
    pub task_id: String,
    pub attempt: i32,
    /// The workspace it was taken in (rewritten to the new one in session
    /// files on restore).
    pub workspace: String,
    pub taken_at: DateTime<Utc>,
    /// Workspace files the attempt removed.
    pub removed: Vec<String>,
    /// Files left out for their size.
    pub skipped: Vec<String>,
    /// The session's files and directories as the agent kept them,
    /// relative to its home; the i-th is stored as `session/<i>`.
    pub session_files: Vec<String>,
}

#[cfg(test)]
impl Manifest {
    /// A manifest of `runner`'s attempt 1 of task `t` in `/old`, which
    /// removed `gone.txt`.
    pub fn sample(runner: &str) -> Self {
        Manifest {
            runner: runner.into(),
            session_id: String::new(),
            task_id: "t".into(),
            attempt: 1,
            workspace: "/old".into(),
            taken_at: Utc::now(),
            removed: vec!["gone.txt".into()],
            skipped: vec![],
            session_files: vec![],
        }
    }
}

/// A file bigger than this is left out of a checkpoint (and named in it).
pub const MAX_FILE_BYTES: u64 = 32 * 1024 * 1024;

/// Replaces the executor's secrets in what it stores.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    secrets: Vec<Vec<u8>>,
}

const REDACTED: &[u8] = b"[REDACTED]";

impl Redactor {
    /// Short values are left alone: replacing every "a" would ruin a file
    /// and hide nothing.
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Self {
        let mut secrets: Vec<Vec<u8>> = secrets
            .into_iter()
            .map(|s| s.trim().as_bytes().to_vec())
            .filter(|s| s.len() >= 8)
            .collect();
        // Longest first, so that a secret containing another goes whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Self { secrets }
    }

    pub fn redact(&self, data: Vec<u8>) -> Vec<u8> {
        self.secrets
            .iter()
            .fold(data, |data, secret| replace(&data, secret, REDACTED))
    }
}

/// `data` with every `from` replaced by `to`.
pub fn replace(data: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    if from.is_empty() || data.len() < from.len() {
        return data.to_vec();
    }
    let mut out = Vec::with_capacity(data.len());
    let mut rest = data;
    while let Some(at) = rest.windows(from.len()).position(|w| w == from) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(to);
        rest = &rest[at + from.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// The content of the regular file at `root/rel`, opened without following
/// a link anywhere on the way and without leaving `root` (the agent owns
/// what is below it and may swap a directory for a link at any moment:
/// the executor must not read elsewhere through it); None when it is not
/// a regular file there any more, or is bigger than `max` bytes.
pub fn read_beneath(root: &Path, rel: &Path, max: u64) -> io::Result<Option<Vec<u8>>> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
    let dir = std::fs::File::open(root)?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = match openat2(&dir, rel, how) {
        Ok(fd) => fd,
        // Gone, a link on the way, or out of bounds: nothing to keep.
        Err(
            nix::errno::Errno::ENOENT
            | nix::errno::Errno::ELOOP
            | nix::errno::Errno::EXDEV
            | nix::errno::Errno::ENOTDIR,
        ) => {
            return Ok(None);
        }
        Err(e) => return Err(io::Error::from(e)),
    };
    let mut file = std::fs::File::from(fd);
    let meta = file.metadata()?;
    if !meta.is_file() || meta.len() > max {
        return Ok(None);
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    (&mut file).take(max + 1).read_to_end(&mut data)?;
    Ok((data.len() as u64 <= max).then_some(data))
}

/// What goes into a checkpoint.
pub struct Contents<'a> {
    pub manifest: Manifest,
    pub workspace: &'a Path,
    /// Workspace paths (relative) added or changed.
    pub changed: Vec<PathBuf>,
    /// The agent's home and its session's files relative to it.
    pub home: Option<&'a Path>,
    pub session_files: Vec<PathBuf>,
    pub redactor: &'a Redactor,
}

/// The checkpoint's bytes (gzip'd tar).
pub fn build(mut c: Contents<'_>) -> io::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    tar.follow_symlinks(false);
    // (name in the archive, root, path below the root, what it is)
    let mut files: Vec<(PathBuf, &Path, PathBuf, Entry)> = Vec::new();
    for rel in &c.changed {
        if rel.as_os_str().is_empty() || !plain(rel) {
            continue;
        }
        match entry(&c.workspace.join(rel))? {
            Some(Entry::File(size)) if size > MAX_FILE_BYTES => c.manifest.skipped.push(rel.display().to_string()),
            Some(e) => files.push((Path::new("workspace").join(rel), c.workspace, rel.clone(), e)),
            None => {}
        }
    }
    if let Some(home) = c.home {
        let kept: Vec<&PathBuf> = c
            .session_files
            .iter()
            .filter(|p| !p.as_os_str().is_empty() && plain(p))
            .collect();
        c.manifest.session_files = kept.iter().map(|p| p.display().to_string()).collect();
        for (i, rel) in kept.into_iter().enumerate() {
            let name = Path::new("session").join(i.to_string());
            match entry(&home.join(rel))? {
                Some(Entry::Dir) => {
                    for (inner, e) in walk(&home.join(rel))? {
                        files.push((name.join(&inner), home, rel.join(&inner), e));
                    }
                }
                Some(e) => files.push((name, home, rel.clone(), e)),
                None => {}
            }
        }
    }
    let manifest = serde_json::to_vec(&c.manifest).map_err(io::Error::other)?;
    append_bytes(&mut tar, Path::new("checkpoint.json"), &manifest, 0o644)?;
    for (name, root, rel, e) in files {
        match e {
            Entry::File(size) if size <= MAX_FILE_BYTES => {
                // Gone or changed since it was listed: the agent is still
                // at work.
                let Some(data) = read_beneath(root, &rel, MAX_FILE_BYTES)? else {
                    continue;
                };
                let data = c.redactor.redact(data);
                append_bytes(&mut tar, &name, &data, mode_of(&root.join(&rel)))?;
            }
            Entry::File(_) => {}
            Entry::Link(target) => {
                let mut header = tar::Header::new_gnu();
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                header.set_mode(0o777);
                tar.append_link(&mut header, &name, &target)?;
            }
            Entry::Dir => {}
        }
    }
    tar.into_inner()?.finish()
}

fn append_bytes<W: Write>(tar: &mut tar::Builder<W>, name: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(data.len() as u64);
    header.set_mode(mode);
    header.set_mtime(Utc::now().timestamp().max(0) as u64);
    tar.append_data(&mut header, name, data)
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path).map_or(0o644, |m| m.permissions().mode() & 0o777)
}

enum Entry {
    File(u64),
    Link(PathBuf),
    Dir,
}

/// What is at `path`, not following a link; None when nothing (or
/// something that is neither file, link nor directory).
fn entry(path: &Path) -> io::Result<Option<Entry>> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let t = meta.file_type();
    Ok(if t.is_symlink() {
        Some(Entry::Link(std::fs::read_link(path)?))
    } else if t.is_file() {
        Some(Entry::File(meta.len()))
    } else if t.is_dir() {
        Some(Entry::Dir)
    } else {
        None
    })
}

/// The files and links under `dir`, relative to it.
fn walk(dir: &Path) -> io::Result<Vec<(PathBuf, Entry)>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(dir.join(&rel))? {
            let rel = rel.join(e?.file_name());
            match entry(&dir.join(&rel))? {
                Some(Entry::Dir) => stack.push(rel),
                Some(e) => out.push((rel, e)),
                None => {}
            }
        }
    }
    Ok(out)
}

/// A checkpoint read back.
#[derive(Debug, Default)]
pub struct Checkpoint {
    pub manifest: Option<Manifest>,
    /// Workspace files (relative path, content, mode).
    pub files: Vec<(PathBuf, Vec<u8>, u32)>,
    pub links: Vec<(PathBuf, PathBuf)>,
    /// Session files: which session path, the path inside it (empty for
    /// the path itself), content.
    pub session: Vec<(usize, PathBuf, Vec<u8>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum CorruptCheckpoint {
    #[error("checkpoint unreadable: {0}")]
    Io(#[from] io::Error),
    #[error("checkpoint entry {0:?} is not one a checkpoint holds")]
    Entry(String),
    #[error("checkpoint has no manifest")]
    NoManifest,
}

/// Reads a checkpoint; every path is checked to stay where it belongs.
pub fn read(bytes: &[u8]) -> Result<Checkpoint, CorruptCheckpoint> {
    let mut archive = tar::Archive::new(GzDecoder::new(bytes));
    let mut out = Checkpoint::default();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let name = path.display().to_string();
        let bad = || CorruptCheckpoint::Entry(name.clone());
        let mut parts = path.components();
        let head = match parts.next() {
            Some(Component::Normal(h)) => h.to_string_lossy().into_owned(),
            _ => return Err(bad()),
        };
        let rest: PathBuf = parts.as_path().to_path_buf();
        if !plain(&rest) {
            return Err(bad());
        }
        let kind = entry.header().entry_type();
        match (head.as_str(), kind) {
            ("checkpoint.json", tar::EntryType::Regular) if rest.as_os_str().is_empty() => {
                let mut data = Vec::new();
                entry.read_to_end(&mut data)?;
                out.manifest = Some(serde_json::from_slice(&data).map_err(io::Error::other)?);
            }
            ("workspace", tar::EntryType::Regular) if !rest.as_os_str().is_empty() && !in_git(&rest) => {
                let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
                let mut data = Vec::new();
                entry.read_to_end(&mut data)?;
                out.files.push((rest, data, mode));
            }
            ("workspace", tar::EntryType::Symlink) if !rest.as_os_str().is_empty() && !in_git(&rest) => {
                let target = entry.link_name()?.ok_or_else(bad)?.into_owned();
                out.links.push((rest, target));
            }
            ("session", tar::EntryType::Regular) => {
                let mut inner = rest.components();
                let index: usize = match inner.next() {
                    Some(Component::Normal(i)) => i.to_str().and_then(|i| i.parse().ok()).ok_or_else(bad)?,
                    _ => return Err(bad()),
                };
                let mut data = Vec::new();
                entry.read_to_end(&mut data)?;
                out.session.push((index, inner.as_path().to_path_buf(), data));
            }
            _ => return Err(bad()),
        }
    }
    if out.manifest.is_none() {
        return Err(CorruptCheckpoint::NoManifest);
    }
    Ok(out)
}

/// Only plain names: nothing that climbs out or starts from the root.
fn plain(p: &Path) -> bool {
    p.components().all(|c| matches!(c, Component::Normal(_)))
}

fn in_git(p: &Path) -> bool {
    p.components().next().is_some_and(|c| c.as_os_str() == ".git")
}

/// Writes `data` at `root/rel`, refusing to pass through a symlink on the
/// way (a link the agent made must not carry the write elsewhere).
pub fn write_under(root: &Path, rel: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    if !plain(rel) {
        return Err(io::Error::other(format!("{} leaves {}", rel.display(), root.display())));
    }
    let target = root.join(rel);
    let mut dir = root.to_path_buf();
    for part in rel.parent().into_iter().flat_map(Path::components) {
        dir.push(part);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(io::Error::other(format!("{} passes through a link", rel.display())));
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => std::fs::remove_file(&dir).and_then(|_| std::fs::create_dir(&dir))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::create_dir(&dir)?,
            Err(e) => return Err(e),
        }
    }
    if std::fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_symlink() || m.is_dir()) {
        remove_any(&target)?;
    }
    let mut f = std::fs::File::create(&target)?;
    f.write_all(data)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
}

/// Removes a file, link or directory at `path`, if there.
pub fn remove_any(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(what: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("omoi-archive-{what}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn manifest() -> Manifest {
        Manifest {
            session_id: "s".into(),
            ..Manifest::sample("claude-code")
        }
    }

    #[test]
    fn work_and_session_files_round_trip_with_secrets_replaced() {
        let (ws, home) = (temp("ws"), temp("home"));
        std::fs::create_dir_all(ws.join("src")).unwrap();
        std::fs::write(ws.join("src/a.rs"), "key sk-secret-value-1234 here").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", ws.join("link")).unwrap();
        std::fs::create_dir_all(home.join(".agent/s")).unwrap();
        std::fs::write(home.join(".agent/s.jsonl"), "{\"cwd\":\"/old\"}").unwrap();
        std::fs::write(home.join(".agent/s/part"), "more").unwrap();
        let redactor = Redactor::new(["sk-secret-value-1234".to_owned(), "short".to_owned()]);
        let bytes = build(Contents {
            manifest: manifest(),
            workspace: &ws,
            changed: vec!["src/a.rs".into(), "link".into(), "vanished.txt".into()],
            home: Some(&home),
            session_files: vec![".agent/s.jsonl".into(), ".agent/s".into()],
            redactor: &redactor,
        })
        .unwrap();
        let c = read(&bytes).unwrap();
        assert_eq!(c.manifest.unwrap().session_files, [".agent/s.jsonl", ".agent/s"]);
        assert_eq!(c.files.len(), 1);
        assert_eq!(c.files[0].0, PathBuf::from("src/a.rs"));
        assert_eq!(String::from_utf8_lossy(&c.files[0].1), "key [REDACTED] here");
        assert_eq!(c.links, vec![(PathBuf::from("link"), PathBuf::from("/etc/passwd"))]);
        let mut session: Vec<_> = c.session.iter().map(|(i, p, _)| (*i, p.clone())).collect();
        session.sort();
        assert_eq!(session, vec![(0, PathBuf::new()), (1, PathBuf::from("part"))]);
        for d in [ws, home] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn reads_stay_below_their_root_and_follow_no_link() {
        let (root, outside) = (temp("beneath"), temp("secret"));
        std::fs::write(outside.join("shadow"), "secret").unwrap();
        std::fs::create_dir_all(root.join("src")).unwrap();
        std::fs::write(root.join("src/a.rs"), "fn a() {}").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("swapped")).unwrap();
        std::os::unix::fs::symlink(outside.join("shadow"), root.join("link")).unwrap();
        nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let read = |rel: &str| read_beneath(&root, Path::new(rel), 1024).unwrap();
        assert_eq!(read("src/a.rs").as_deref(), Some(&b"fn a() {}"[..]));
        for elsewhere in ["swapped/shadow", "link", "../secret/shadow", "fifo", "missing"] {
            assert_eq!(read(elsewhere), None, "{elsewhere}");
        }
        assert_eq!(
            read_beneath(&root, Path::new("src/a.rs"), 3).unwrap(),
            None,
            "over the limit"
        );
        for d in [root, outside] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn entries_that_climb_out_are_refused_and_writes_do_not_follow_links() {
        let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
        let manifest = serde_json::to_vec(&manifest()).unwrap();
        append_bytes(&mut tar, Path::new("checkpoint.json"), &manifest, 0o644).unwrap();
        // The tar crate refuses to write `..` itself: the name is set raw.
        let mut header = tar::Header::new_gnu();
        header.as_gnu_mut().unwrap().name[..22].copy_from_slice(b"workspace/../../escape");
        header.set_size(1);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        tar.append(&header, &b"x"[..]).unwrap();
        let bytes = tar.into_inner().unwrap().finish().unwrap();
        assert!(matches!(read(&bytes), Err(CorruptCheckpoint::Entry(_))));
        assert!(read(b"not a checkpoint").is_err());

        let (root, outside) = (temp("root"), temp("outside"));
        std::os::unix::fs::symlink(&outside, root.join("out")).unwrap();
        assert!(write_under(&root, Path::new("out/x"), b"x", 0o644).is_err());
        assert!(!outside.join("x").exists());
        write_under(&root, Path::new("a/b/c.txt"), b"c", 0o600).unwrap();
        assert_eq!(std::fs::read(root.join("a/b/c.txt")).unwrap(), b"c");
        for d in [root, outside] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }
}
