//! What a ticket's check command said of a task's work (`result.check`):
//! written by the executor that ran it, read by the choice among
//! candidates, the CLI and the console.

use serde::{Deserialize, Serialize};

/// A check's verdict and evidence.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Check {
    pub command: String,
    /// It exited 0.
    pub passed: bool,
    /// None when it did not exit by itself (killed at its limit, stopped,
    /// or it could not start).
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub duration_ms: u64,
    /// Its last lines, stdout and stderr as they came.
    pub output_tail: Vec<String>,
}

impl Check {
    /// The check a task's result records, if any.
    pub fn of(result: Option<&serde_json::Value>) -> Option<Check> {
        serde_json::from_value(result?.get("check")?.clone()).ok()
    }

    /// `check passed: cargo test (exit 0, 12.3 s)`.
    pub fn line(&self) -> String {
        let how = match (self.exit_code, self.timed_out) {
            (_, true) => "killed at its time limit".to_owned(),
            (Some(code), _) => format!("exit {code}"),
            (None, _) => "did not finish".to_owned(),
        };
        let verdict = if self.passed { "passed" } else { "failed" };
        format!(
            "check {verdict}: {} ({how}, {:.1} s)",
            self.command,
            self.duration_ms as f64 / 1000.0
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_reads_back_from_a_result_and_says_how_it_ended() {
        let result = serde_json::json!({"summary": "done", "check": {
            "command": "cargo test", "passed": false, "exit_code": 101, "timed_out": false,
            "duration_ms": 12345, "output_tail": ["test x ... FAILED"]}});
        let c = Check::of(Some(&result)).unwrap();
        assert_eq!(c.line(), "check failed: cargo test (exit 101, 12.3 s)");
        assert_eq!(c.output_tail, ["test x ... FAILED"]);
        let hung = Check { timed_out: true, ..c };
        assert!(hung.line().contains("killed at its time limit"));
        assert_eq!(Check::of(Some(&serde_json::json!({"summary": "done"}))), None);
        assert_eq!(Check::of(None), None);
    }
}
