//! `omoi create --plan plan.yaml`: a ticket's tasks from a YAML file, as
//! people write them (phases by name, dependencies by title or position).
//!
//! ```yaml
//! - title: Sketch the parser
//!   phase: initial
//! - title: Write the parser
//!   phase: implementation
//!   depends_on: [Sketch the parser]
//!   timeout_seconds: 1800
//! - title: Wire it in
//!   phase: integration
//!   depends_on: [1]
//!   concurrency_key: ci-runners
//!   requires: {runner: codex}
//! - title: Implement the endpoint
//!   phase: implementation
//!   candidates: {count: 3, requires: [{runner: claude-code}, {runner: codex}, {runner: gemini}]}
//! ```

use std::collections::HashMap;
use std::path::Path;

use omoi_proto::ticket::TaskSpec;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    title: String,
    phase: String,
    #[serde(default)]
    description: String,
    priority: Option<i32>,
    #[serde(default)]
    depends_on: Vec<Dependency>,
    max_retries: Option<i32>,
    #[serde(default)]
    timeout_seconds: i32,
    #[serde(default)]
    concurrency_key: String,
    /// Labels the agent must carry (`runner: codex`).
    #[serde(default)]
    requires: HashMap<String, String>,
    /// Run as best-of-N candidates.
    candidates: Option<CandidatesEntry>,
}

/// `candidates: {count: 3, requires: [{runner: codex}, …]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CandidatesEntry {
    count: i32,
    #[serde(default)]
    requires: Vec<HashMap<String, String>>,
    /// The judge's labels (`{runner: claude-code}`).
    #[serde(default)]
    judge: HashMap<String, String>,
}

/// Another task of the plan, by its position (from 0) or its title.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Dependency {
    Index(i32),
    Title(String),
}

/// The plan in `path`.
pub fn read(path: &Path) -> anyhow::Result<Vec<TaskSpec>> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    parse(&text).map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))
}

pub fn parse(text: &str) -> anyhow::Result<Vec<TaskSpec>> {
    let entries: Vec<Entry> = serde_saphyr::from_str(text)?;
    anyhow::ensure!(!entries.is_empty(), "the plan has no tasks");
    let mut by_title: HashMap<&str, Option<i32>> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        by_title
            .entry(e.title.trim())
            .and_modify(|seen| *seen = None)
            .or_insert(Some(i as i32));
    }
    entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let depends_on = e
                .depends_on
                .iter()
                .map(|d| match d {
                    Dependency::Index(n) => Ok(*n),
                    Dependency::Title(t) => match by_title.get(t.trim()) {
                        Some(Some(n)) => Ok(*n),
                        Some(None) => anyhow::bail!("task {i} ({:?}): several tasks are titled {t:?}", e.title),
                        None => anyhow::bail!("task {i} ({:?}): no task is titled {t:?}", e.title),
                    },
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok(TaskSpec {
                title: e.title.clone(),
                description: e.description.clone(),
                phase: crate::ops::phase(&e.phase).map_err(|err| anyhow::anyhow!("task {i} ({:?}): {err}", e.title))?,
                priority: e.priority,
                depends_on,
                max_retries: e.max_retries,
                timeout_seconds: e.timeout_seconds,
                concurrency_key: e.concurrency_key.clone(),
                requires: e.requires.clone(),
                candidates: e.candidates.as_ref().map(|c| omoi_proto::ticket::Candidates {
                    count: c.count,
                    requires: c
                        .requires
                        .iter()
                        .map(|labels| omoi_proto::ticket::LabelSet { labels: labels.clone() })
                        .collect(),
                    judge: c.judge.clone(),
                }),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_by_name_and_dependencies_by_title_or_position() {
        let plan = parse(
            "- title: Sketch\n  phase: initial\n\
             - title: Build\n  phase: IMPLEMENTATION\n  depends_on: [Sketch]\n  max_retries: 1\n\
             - title: Ship\n  phase: integration\n  depends_on: [0, Build]\n  concurrency_key: ci\n  \
             requires: {runner: codex, gpu: 'true'}\n",
        )
        .unwrap();
        assert_eq!(plan.len(), 3);
        assert_eq!((plan[0].phase, plan[1].phase, plan[2].phase), (1, 2, 3));
        assert_eq!(plan[1].depends_on, [0]);
        assert_eq!(plan[2].depends_on, [0, 1]);
        assert_eq!(plan[1].max_retries, Some(1));
        assert_eq!(plan[2].concurrency_key, "ci");
        assert_eq!(plan[2].requires.get("runner").map(String::as_str), Some("codex"));
        assert_eq!(plan[2].requires.get("gpu").map(String::as_str), Some("true"));
        assert!(plan[0].requires.is_empty());
        let best = parse(
            "- title: Build\n  phase: implementation\n  \
             candidates: {count: 2, requires: [{runner: codex}, {runner: claude-code}]}\n",
        )
        .unwrap();
        let c = best[0].candidates.as_ref().unwrap();
        assert_eq!(c.count, 2);
        assert_eq!(
            c.requires[1].labels.get("runner").map(String::as_str),
            Some("claude-code")
        );
    }

    #[test]
    fn mistakes_are_named() {
        let err = |text: &str| parse(text).unwrap_err().to_string();
        assert!(err("- title: A\n  phase: dreaming\n").contains("\"dreaming\""));
        assert!(err("- title: A\n  phase: initial\n  depends_on: [B]\n").contains("no task is titled \"B\""));
        assert!(
            err("- title: A\n  phase: initial\n- title: A\n  phase: initial\n- title: C\n  phase: initial\n  depends_on: [A]\n")
                .contains("several tasks")
        );
        assert!(err("- title: A\n  phase: initial\n  colour: red\n").contains("colour"));
        assert!(err("[]").contains("no tasks"));
    }
}
