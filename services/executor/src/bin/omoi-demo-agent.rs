//! A small stand-in coding agent for local runs and tests: it reads the task
//! prompt (stdin or OMOI_TASK_PROMPT), does some visible work in its
//! workspace (a file per phase, and `agent-log/<phase>.md` saying what it
//! found of earlier phases' work), and reports on stdout; its last line is
//! the summary.
//!
//! Knobs (environment): OMOI_DEMO_SLEEP_MS (pause between steps, default
//! 200), OMOI_DEMO_FAIL (exit 1 with this message on stderr),
//! OMOI_DEMO_FAIL_FIRST (a phase, e.g. PHASE_IMPLEMENTATION: its first
//! attempt writes a stray file, then fails with a connection error),
//! OMOI_DEMO_TURNS (work over this many turns first, one pause each, kept
//! as a session the executor checkpoints: `$OMOI_SESSIONS_DIR/<id>/turns`,
//! declared with `omoi:session=<id>`; resumed from where it was with
//! `OMOI_RESUME_SESSION`; the summary says which attempt did each turn;
//! OMOI_DEMO_TURN_MS: a turn's pause, default OMOI_DEMO_SLEEP_MS's).

use std::io::Read;
use std::path::Path;
use std::time::Duration;

fn main() -> std::process::ExitCode {
    let mut prompt = String::new();
    let _ = std::io::stdin().read_to_string(&mut prompt);
    if prompt.trim().is_empty() {
        prompt = std::env::var("OMOI_TASK_PROMPT").unwrap_or_default();
    }
    let phase = std::env::var("OMOI_TASK_PHASE").unwrap_or_else(|_| "PHASE_UNSPECIFIED".into());
    let task = std::env::var("OMOI_TASK_ID").unwrap_or_default();
    let pause = Duration::from_millis(
        std::env::var("OMOI_DEMO_SLEEP_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200),
    );
    let title = prompt
        .lines()
        .next()
        .unwrap_or("")
        .trim_start_matches('#')
        .trim()
        .to_owned();
    println!("demo agent: {phase} for {title:?}");
    if let Ok(message) = std::env::var("OMOI_DEMO_FAIL") {
        eprintln!("{message}");
        return std::process::ExitCode::FAILURE;
    }
    let attempt = std::env::var("OMOI_TASK_ATTEMPT").unwrap_or_default();
    if std::env::var("OMOI_DEMO_FAIL_FIRST").is_ok_and(|p| p == phase) && attempt == "1" {
        let _ = std::fs::write("STRAY.md", "half-done work of a failed attempt\n");
        eprintln!("connection reset by peer");
        return std::process::ExitCode::FAILURE;
    }
    let conversation = match turns(&task, &attempt, pause) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot keep the session: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // What the phases before this one left in the workspace, and what the
    // prompt says they did.
    let earlier: Vec<&str> = ["PLAN.md", "src/feature.rs", "tests/feature.rs", "NOTES.md"]
        .into_iter()
        .filter(|f| Path::new(f).exists())
        .collect();
    let quoted: Vec<&str> = prompt
        .lines()
        .skip_while(|l| !l.starts_with("## Work this task builds on"))
        .filter(|l| l.contains(" done: "))
        .collect();
    if !earlier.is_empty() {
        println!("found earlier work: {}", earlier.join(", "));
    }
    let steps: &[(&str, &str)] = match phase.as_str() {
        "PHASE_INITIAL" => &[("PLAN.md", "# Plan\n\n1. Implement\n2. Integrate\n3. Refactor\n")],
        "PHASE_IMPLEMENTATION" => &[(
            "src/feature.rs",
            "pub fn feature() -> &'static str {\n    \"done\"\n}\n",
        )],
        "PHASE_INTEGRATION" => &[(
            "tests/feature.rs",
            "#[test]\nfn feature_works() {\n    assert_eq!(2 + 2, 4);\n}\n",
        )],
        _ => &[("NOTES.md", "Cleaned up.\n")],
    };
    for (i, (file, content)) in steps.iter().enumerate() {
        println!("step {}: writing {file}", i + 1);
        std::thread::sleep(pause);
        let path = Path::new(file);
        if let Some(dir) = path.parent()
            && std::fs::create_dir_all(dir).is_err()
        {
            eprintln!("permission denied: cannot create {}", dir.display());
            return std::process::ExitCode::FAILURE;
        }
        if let Err(e) = std::fs::write(path, content) {
            eprintln!("cannot write {file}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    let mut log = format!("{phase} {task}: {title}\n");
    if !earlier.is_empty() {
        log.push_str(&format!("found: {}\n", earlier.join(", ")));
    }
    for q in &quoted {
        log.push_str(&format!("told: {q}\n"));
    }
    let name = phase.trim_start_matches("PHASE_").to_ascii_lowercase();
    let _ = std::fs::create_dir_all("agent-log").and_then(|_| std::fs::write(format!("agent-log/{name}.md"), log));
    match conversation {
        Some(turns) => println!("{phase} done: {} file(s) written; turns {turns}", steps.len() + 1),
        None => println!("{phase} done: {} file(s) written", steps.len() + 1),
    }
    std::process::ExitCode::SUCCESS
}

/// The turns of OMOI_DEMO_TURNS, a pause each, in a session resumed where
/// it was: `turn:attempt` of each, or None when there are none to work.
fn turns(task: &str, attempt: &str, pause: Duration) -> std::io::Result<Option<String>> {
    let wanted: usize = std::env::var("OMOI_DEMO_TURNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let Some(root) = std::env::var_os("OMOI_SESSIONS_DIR").filter(|_| wanted > 0) else {
        return Ok(None);
    };
    let pause = std::env::var("OMOI_DEMO_TURN_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(pause, Duration::from_millis);
    let resumed = std::env::var("OMOI_RESUME_SESSION").ok().filter(|s| !s.is_empty());
    let id = resumed.clone().unwrap_or_else(|| format!("demo-{task}-{attempt}"));
    let dir = Path::new(&root).join(&id);
    std::fs::create_dir_all(&dir)?;
    println!("omoi:session={id}");
    let log = dir.join("turns");
    let mut done: Vec<String> = match std::fs::read_to_string(&log) {
        Ok(text) if resumed.is_some() => text.lines().map(str::to_owned).collect(),
        _ => Vec::new(),
    };
    if resumed.is_some() {
        println!("resumed session {id} after turn {}", done.len());
    }
    while done.len() < wanted {
        std::thread::sleep(pause);
        done.push(format!("{}:{attempt}", done.len() + 1));
        std::fs::write(&log, done.join("\n") + "\n")?;
        println!("turn {}", done.len());
    }
    Ok(Some(done.join(" ")))
}
