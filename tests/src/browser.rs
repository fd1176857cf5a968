//! The browser scripts (`tests/browser/*.py`): Debian's headless Chromium
//! over WebDriver, from the project's Python environment.

use std::path::Path;
use std::time::Duration;

/// Runs `tests/browser/<script>` with `env` (and where screenshots go,
/// `target/browser-artefacts`) within `within`; fails the test with its
/// output unless it passed and printed `ok <step>` for each of `steps`.
pub async fn run(script: &str, env: &[(&str, &str)], steps: &[&str], within: Duration) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = tokio::process::Command::new(crate::tools_python());
    cmd.arg(root.join("browser").join(script))
        .env("OMOI_ARTEFACTS", root.join("../target/browser-artefacts"))
        // Selenium must not look for drivers on the network.
        .env("SE_OFFLINE", "true")
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(within, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{script} ended within {within:?}"))
        .expect("the browser script runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
    for step in steps {
        assert!(stdout.contains(&format!("ok {step}")), "{step} did not pass:\n{stdout}");
    }
    stdout
}
