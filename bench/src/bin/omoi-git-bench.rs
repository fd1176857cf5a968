//! omoi-git-bench: what a task's git costs the executor on a repository of
//! a given size. It generates the repository (files, history) as a bare
//! remote reached through git's transport (`file://`, never a local
//! copy), then times, for one task's work (a line appended to a file),
//! the executor's preparation of its workspace (`prepare`) and the landing
//! of its commit on the ticket's branch (`land`):
//!
//! - `clone per attempt`: no git cache (what every attempt cost before it);
//! - `cold cache`: an empty `OMOI_GIT_CACHE_DIR` (the executor's first task);
//! - `warm cache`: the mirror there, the remote one commit further on;
//! - `reused checkout`: the warm cache, and the work tree the task before
//!   left on the executor (the next task of a ticket), brought to the
//!   remote's next commit;
//! - `reference`: the same warm mirror fetched, `git worktree add`, commit,
//!   push: what the fastest by-hand set-up costs.
//!
//! Each is run `--rounds` times; the median is reported. `bash
//! bench/git.sh` builds and runs it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use omoi_domain::validate::Repository;
use omoi_executor::git::{GitSettings, Start, WorkspaceUser};
use omoi_executor::git_cache::GitCache;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Parser)]
#[command(name = "omoi-git-bench", about = "What a task's git costs the executor")]
struct Args {
    /// Files in the repository.
    #[arg(long, default_value_t = 30_000)]
    files: usize,
    /// Bytes of each file (text, as compressible as source code).
    #[arg(long, default_value_t = 14_500)]
    file_bytes: usize,
    /// Commits of history (the first adds every file, each next changes
    /// a hundred).
    #[arg(long, default_value_t = 20)]
    commits: usize,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Where to work (a temporary directory, removed, unless given).
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "bench")
        .env("GIT_AUTHOR_EMAIL", "bench@example.com")
        .env("GIT_COMMITTER_NAME", "bench")
        .env("GIT_COMMITTER_EMAIL", "bench@example.com")
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Text of `bytes` bytes, words from a small vocabulary, like source code
/// as git packs it.
fn text(rng: &mut SmallRng, bytes: usize) -> String {
    const WORDS: [&str; 16] = [
        "let", "fn", "match", "self", "value", "return", "impl", "struct", "pub", "use", "async", "await", "Ok", "Err",
        "String", "into",
    ];
    let mut s = String::with_capacity(bytes + 16);
    while s.len() < bytes {
        s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        s.push(if rng.random_range(0..8) == 0 { '\n' } else { ' ' });
    }
    s
}

/// The bare remote, generated; its size on disk and its work tree's.
fn generate(root: &Path, args: &Args) -> anyhow::Result<(PathBuf, u64, u64)> {
    let (bare, seed) = (root.join("remote.git"), root.join("seed"));
    std::fs::create_dir_all(&seed)?;
    git(
        root,
        &["init", "--quiet", "--bare", "-b", "main", &bare.display().to_string()],
    )?;
    git(&seed, &["init", "--quiet", "-b", "main"])?;
    let mut rng = SmallRng::seed_from_u64(7);
    let path_of = |i: usize| format!("src/m{:03}/f{i:05}.rs", i % 300);
    let mut tree_bytes = 0u64;
    for i in 0..args.files {
        let p = seed.join(path_of(i));
        std::fs::create_dir_all(p.parent().expect("a directory"))?;
        let t = text(&mut rng, args.file_bytes);
        tree_bytes += t.len() as u64;
        std::fs::write(p, t)?;
    }
    git(&seed, &["add", "--all"])?;
    git(&seed, &["commit", "--quiet", "-m", "Initial"])?;
    for c in 1..args.commits {
        for _ in 0..100.min(args.files) {
            let i = rng.random_range(0..args.files);
            let t = text(&mut rng, args.file_bytes);
            std::fs::write(seed.join(path_of(i)), t)?;
        }
        git(&seed, &["commit", "--quiet", "-am", &format!("Change {c}")])?;
    }
    git(&seed, &["push", "--quiet", &bare.display().to_string(), "main"])?;
    git(&bare, &["gc", "--quiet"])?;
    std::fs::remove_dir_all(&seed)?;
    Ok((bare.clone(), dir_bytes(&bare), tree_bytes))
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

/// One more commit on the remote's main, as other people's work moves it.
fn move_main(root: &Path, bare: &Path, n: usize) -> anyhow::Result<()> {
    let work = root.join(format!("mover-{n}"));
    let url = format!("file://{}", bare.display());
    git(
        root,
        &["clone", "--quiet", "--depth", "1", &url, &work.display().to_string()],
    )?;
    std::fs::write(work.join(format!("moved-{n}.txt")), "moved\n")?;
    git(&work, &["add", "--all"])?;
    git(&work, &["commit", "--quiet", "-m", "Moved"])?;
    git(&work, &["push", "--quiet", "origin", "main"])?;
    std::fs::remove_dir_all(&work)?;
    Ok(())
}

/// Flushes what earlier steps wrote, so that one step's writeback is
/// never timed in the next (a checkout writes the whole work tree).
fn settle() {
    let _ = std::process::Command::new("sync").status();
}

/// (prepare, land) of one task's work through the executor's git, from
/// the work tree `reuse` when given; its workspace kept (and returned)
/// with `keep`.
async fn task(
    git_settings: &GitSettings,
    url: &str,
    root: &Path,
    branch: &str,
    reuse: Option<&Path>,
    keep: bool,
) -> anyhow::Result<(Duration, Duration, Option<PathBuf>)> {
    let repository = Repository::Url(url.to_owned());
    let ws = root.join(format!("ws-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&ws)?;
    settle();
    let start = Start {
        repository: &repository,
        branch,
        base_ref: "main",
        parents: Vec::new(),
        reuse,
    };
    let user = WorkspaceUser::default();
    let began = Instant::now();
    let checkout = git_settings
        .prepare(&start, &ws.with_extension("git"), &ws)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    anyhow::ensure!(checkout.reused == reuse.is_some(), "the work tree was not reused");
    git_settings
        .refresh(&checkout, &user)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let prepared = began.elapsed();
    append(&ws)?;
    let began = Instant::now();
    git_settings
        .commit_and_push(&checkout, "bench: one line", &user)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let landed = began.elapsed();
    drop(checkout);
    std::fs::remove_dir_all(ws.with_extension("git"))?;
    if keep {
        return Ok((prepared, landed, Some(ws)));
    }
    std::fs::remove_dir_all(&ws)?;
    Ok((prepared, landed, None))
}

fn append(ws: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(ws.join("src/m000/f00000.rs"))?;
    writeln!(f, "// one more line")?;
    Ok(())
}

/// (prepare, land) by hand on a warm mirror: fetch, `worktree add`,
/// commit, push.
fn reference(mirror: &Path, root: &Path, branch: &str) -> anyhow::Result<(Duration, Duration)> {
    let wt = root.join(format!("wt-{}", uuid::Uuid::new_v4().simple()));
    settle();
    let began = Instant::now();
    git(
        mirror,
        &["fetch", "--quiet", "--no-tags", "origin", "+refs/heads/*:refs/heads/*"],
    )?;
    git(
        mirror,
        &[
            "worktree",
            "add",
            "--quiet",
            "-b",
            branch,
            &wt.display().to_string(),
            "main",
        ],
    )?;
    let prepared = began.elapsed();
    append(&wt)?;
    let began = Instant::now();
    git(&wt, &["commit", "--quiet", "-am", "bench: one line"])?;
    git(
        &wt,
        &["push", "--quiet", "origin", &format!("{branch}:refs/heads/{branch}")],
    )?;
    let landed = began.elapsed();
    git(mirror, &["worktree", "remove", "--force", &wt.display().to_string()])?;
    Ok((prepared, landed))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.rounds >= 1 && args.files >= 1,
        "--rounds and --files must be at least 1"
    );
    let (root, temporary) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("omoi-git-bench-{}", uuid::Uuid::new_v4().simple())),
            true,
        ),
    };
    std::fs::create_dir_all(&root)?;
    eprintln!(
        "generating {} files of {} bytes, {} commits…",
        args.files, args.file_bytes, args.commits
    );
    let (bare, packed, tree) = generate(&root, &args)?;
    let url = format!("file://{}", bare.display());
    let settings = GitSettings {
        author_name: "omoi".into(),
        author_email: "omoi@localhost".into(),
        ..Default::default()
    };
    let with_cache = |cache: &Arc<GitCache>| GitSettings {
        cache: Some(Arc::clone(cache)),
        borrow: true,
        ..settings.clone()
    };
    let mut rows: Vec<(&str, Vec<(Duration, Duration)>)> = vec![
        ("clone per attempt", vec![]),
        ("cold cache", vec![]),
        ("warm cache", vec![]),
        ("reused checkout", vec![]),
        ("reference (worktree)", vec![]),
    ];
    for round in 0..args.rounds {
        eprintln!("round {}…", round + 1);
        let (p, l, _) = task(&settings, &url, &root, &format!("omoi/clone-{round}"), None, false).await?;
        rows[0].1.push((p, l));
        let cache = Arc::new(GitCache::new(&root.join(format!("cache-{round}")), 0)?);
        let cached = with_cache(&cache);
        let (p, l, _) = task(&cached, &url, &root, &format!("omoi/cold-{round}"), None, false).await?;
        rows[1].1.push((p, l));
        move_main(&root, &bare, round)?;
        let (p, l, left) = task(&cached, &url, &root, &format!("omoi/warm-{round}"), None, true).await?;
        rows[2].1.push((p, l));
        // The ticket's next task on the executor, the remote moved on.
        move_main(&root, &bare, 2000 + round)?;
        let branch = format!("omoi/reused-{round}");
        let (p, l, _) = task(&cached, &url, &root, &branch, left.as_deref(), false).await?;
        rows[3].1.push((p, l));
        // The reference starts from a mirror as warm: its own clone, the
        // remote moved on once more.
        let mirror = root.join(format!("reference-{round}.git"));
        git(
            &root,
            &["clone", "--quiet", "--bare", &url, &mirror.display().to_string()],
        )?;
        move_main(&root, &bare, 1000 + round)?;
        rows[4].1.push(reference(&mirror, &root, &format!("omoi/ref-{round}"))?);
        std::fs::remove_dir_all(&mirror)?;
        drop(cached);
        std::fs::remove_dir_all(root.join(format!("cache-{round}")))?;
    }
    println!(
        "repository: {} files, {} MB work tree, {} MB on the remote, {} commits; median of {} rounds",
        args.files,
        tree / 1_000_000,
        packed / 1_000_000,
        args.commits,
        args.rounds
    );
    println!("{:<22} {:>9} {:>9} {:>9}", "", "prepare", "land", "total");
    let mut totals = Vec::new();
    for (name, samples) in &rows {
        let prepare = median(samples.iter().map(|s| s.0).collect());
        let land = median(samples.iter().map(|s| s.1).collect());
        let total = median(samples.iter().map(|s| s.0 + s.1).collect());
        totals.push(total);
        println!(
            "{name:<22} {:>8.2}s {:>8.2}s {:>8.2}s",
            prepare.as_secs_f64(),
            land.as_secs_f64(),
            total.as_secs_f64()
        );
    }
    println!(
        "warm cache / reference: {:.2}×; reused checkout / reference: {:.2}×; clone per attempt / warm cache: {:.1}×",
        totals[2].as_secs_f64() / totals[4].as_secs_f64(),
        totals[3].as_secs_f64() / totals[4].as_secs_f64(),
        totals[0].as_secs_f64() / totals[2].as_secs_f64()
    );
    if temporary {
        std::fs::remove_dir_all(&root)?;
    }
    Ok(())
}
