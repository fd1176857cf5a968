//! Real git repositories for the tests: a bare "remote" with a first
//! commit on `main`, and git run as a test would type it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs git in `dir` (as a fixed author); its trimmed output. Panics with
/// git's own message when it fails.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "seed")
        .env("GIT_AUTHOR_EMAIL", "seed@example.com")
        .env("GIT_COMMITTER_NAME", "seed")
        .env("GIT_COMMITTER_EMAIL", "seed@example.com")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A bare repository (`<temp>/omoi-git-<id>/remote.git`) with one commit
/// on `main`, and that commit.
pub fn remote() -> (PathBuf, String) {
    let root = std::env::temp_dir().join(format!("omoi-git-{}", uuid::Uuid::new_v4().simple()));
    let (bare, seed) = (root.join("remote.git"), root.join("seed"));
    std::fs::create_dir_all(&seed).unwrap();
    git(
        &root,
        &["init", "--quiet", "--bare", "-b", "main", bare.to_str().unwrap()],
    );
    git(&seed, &["init", "--quiet", "-b", "main"]);
    std::fs::write(seed.join("README.md"), "# The product\n").unwrap();
    git(&seed, &["add", "README.md"]);
    git(&seed, &["commit", "--quiet", "-m", "Initial commit"]);
    git(&seed, &["push", "--quiet", bare.to_str().unwrap(), "main"]);
    let head = git(&bare, &["rev-parse", "main"]);
    (bare, head)
}

/// A person's commit on `branch` of `bare` (made from its head): `file`
/// written with `text`; the commit.
pub fn push_commit(bare: &Path, branch: &str, file: &str, text: &str, message: &str) -> String {
    let work = bare.with_file_name(format!("person-{}", uuid::Uuid::new_v4().simple()));
    let (bare, work_path) = (bare.to_str().unwrap(), work.to_str().unwrap());
    git(
        Path::new("/"),
        &["clone", "--quiet", "--branch", branch, bare, work_path],
    );
    std::fs::write(work.join(file), text).unwrap();
    git(&work, &["add", file]);
    git(&work, &["commit", "--quiet", "-m", message]);
    git(&work, &["push", "--quiet", "origin", branch]);
    let commit = git(&work, &["rev-parse", "HEAD"]);
    std::fs::remove_dir_all(&work).unwrap();
    commit
}
