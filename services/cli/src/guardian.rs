//! `omoi guardian-replay`: runs the guardian over recorded event streams —
//! tasks' output from the task queue, or files of `omoi logs --output json`
//! exported anywhere — and says which interventions would have fired, and
//! what each attempt spent after the one that would have stopped it, so
//! that thresholds are tuned on data.

use std::collections::BTreeMap;
use std::path::PathBuf;

use futures::StreamExt;
use omoi_domain::guardian::{Action, Overrides, Thresholds, Watch};
use omoi_domain::usage::Usage;
use omoi_proto::common::{AgentEvent, OutputStream};
use omoi_proto::taskqueue as tq;
use prost_reflect::DynamicMessage;

use crate::ops::{POOL, Queue};

/// The guardian's thresholds as `omoi guardian-replay` takes them (the
/// defaults, or `OMOI_GUARDIAN_*`, unless given).
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// The same call or error this many times is a loop.
    #[arg(long)]
    repeat: Option<u32>,
    /// Seconds without a file written or a new command while tokens flow (0: off).
    #[arg(long)]
    stall_seconds: Option<u32>,
    /// Dollars a minute over an attempt (0: off).
    #[arg(long)]
    spend_per_minute_usd: Option<f64>,
    /// Turns of one attempt (0: off).
    #[arg(long)]
    max_turns: Option<u32>,
    /// Share of the ticket's budget one attempt may spend (0: off).
    #[arg(long)]
    budget_share: Option<f64>,
    /// Nudges before a trip stops the attempt.
    #[arg(long)]
    nudges: Option<u32>,
    /// The ticket's budget, for the budget share.
    #[arg(long)]
    budget_usd: Option<f64>,
}

impl Settings {
    fn thresholds(&self) -> anyhow::Result<Thresholds> {
        let given = Overrides {
            repeat: self.repeat,
            stall_seconds: self.stall_seconds,
            spend_per_minute_usd: self.spend_per_minute_usd,
            max_turns: self.max_turns,
            budget_share: self.budget_share,
            nudges: self.nudges,
            // The reviewer asks a model: no replay has one.
            review_seconds: None,
        };
        let t = given.over(Thresholds::from_settings(|k| std::env::var(k).ok())?);
        // Named as the options are.
        t.validated("", false).map_err(|e| match e {
            omoi_domain::DomainError::InvalidArgument(f) => {
                anyhow::anyhow!("--{}: {}", f.field.replace('_', "-"), f.reason)
            }
            other => other.into(),
        })
    }
}

/// A ticket's guardian settings from `NAME=VALUE` pairs (`--guardian`):
/// the names of `GuardianSettings`; the service checks the ranges.
pub fn given(pairs: &[String]) -> anyhow::Result<omoi_proto::ticket::GuardianSettings> {
    let mut g = omoi_proto::ticket::GuardianSettings::default();
    for pair in pairs {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--guardian {pair:?}: say NAME=VALUE"))?;
        let bad = |e: &dyn std::fmt::Display| anyhow::anyhow!("--guardian {name}: {value:?} is not a number: {e}");
        let int = || value.trim().parse::<i32>().map_err(|e| bad(&e));
        let real = || value.trim().parse::<f64>().map_err(|e| bad(&e));
        match name.trim() {
            "repeat" => g.repeat = Some(int()?),
            "stall_seconds" => g.stall_seconds = Some(int()?),
            "spend_per_minute_usd" => g.spend_per_minute_usd = Some(real()?),
            "max_turns" => g.max_turns = Some(int()?),
            "budget_share" => g.budget_share = Some(real()?),
            "nudges" => g.nudges = Some(int()?),
            "review_seconds" => g.review_seconds = Some(int()?),
            other => anyhow::bail!(
                "--guardian {other:?}: not a threshold; name repeat, stall_seconds, spend_per_minute_usd, \
                 max_turns, budget_share, nudges or review_seconds"
            ),
        }
    }
    Ok(g)
}

/// One attempt's events, in order.
type Attempts = BTreeMap<(String, i32), Vec<AgentEvent>>;

/// Replays the guardian over each task's (every attempt's) events and each
/// file's, printing what would have fired.
pub async fn replay(q: &mut Queue, tasks: Vec<String>, files: Vec<PathBuf>, settings: &Settings) -> anyhow::Result<()> {
    let thresholds = settings.thresholds()?;
    let mut attempts = Attempts::new();
    for task_id in tasks {
        let mut events = q
            .stream_task_output(tq::StreamTaskOutputRequest { task_id, follow: false })
            .await?
            .into_inner();
        while let Some(msg) = events.next().await {
            if let Some(e) = msg?.event {
                attempts.entry((e.task_id.clone(), e.attempt)).or_default().push(e);
            }
        }
    }
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let e = read_event(line).map_err(|e| anyhow::anyhow!("{}:{}: {e}", file.display(), n + 1))?;
            attempts.entry((e.task_id.clone(), e.attempt)).or_default().push(e);
        }
    }
    let (mut nudged, mut stopped, mut paused, mut saved) = (0, 0, 0, 0i64);
    for ((task, attempt), mut events) in attempts {
        events.sort_by_key(|e| e.seq);
        let r = watch(&events, thresholds, settings.budget_usd);
        println!(
            "task {task} attempt {attempt}: {} events, {} tokens, ${:.4}",
            events.len(),
            r.tokens,
            r.cost_usd
        );
        for (seq, signal, action, reason, evidence) in &r.trips {
            println!("  #{seq:<5} {signal:<15} {action:<6} {reason} (events {evidence})");
        }
        if let Some((seq, tokens)) = r.stopped_at {
            println!(
                "  stopped at #{seq}: {} tokens after it would not have been spent",
                r.tokens - tokens
            );
            saved += r.tokens - tokens;
            stopped += 1;
        }
        nudged += usize::from(r.trips.iter().any(|t| t.2 == Action::Nudge.as_str()));
        paused += usize::from(r.trips.iter().any(|t| t.2 == Action::Pause.as_str()));
    }
    println!("{nudged} attempts nudged, {stopped} stopped, {paused} paused; {saved} tokens saved by stopping");
    Ok(())
}

/// What the guardian made of one attempt.
struct Replayed {
    /// (seq, signal, action, reason, evidence seqs) of each trip.
    trips: Vec<(i64, &'static str, &'static str, String, String)>,
    /// Where it would have stopped, and the tokens used by then.
    stopped_at: Option<(i64, i64)>,
    tokens: i64,
    cost_usd: f64,
}

fn watch(events: &[AgentEvent], thresholds: Thresholds, budget_usd: Option<f64>) -> Replayed {
    let mut w = Watch::new(thresholds, budget_usd);
    let mut out = Replayed {
        trips: Vec::new(),
        stopped_at: None,
        tokens: 0,
        cost_usd: 0.0,
    };
    for e in events {
        // A nudge recorded: the agent's next run tells its usage afresh.
        if e.stream() == OutputStream::System && e.text.starts_with("guardian: nudge — ") {
            w.next_run();
        }
        let usage = e.usage.clone().map(Usage::from);
        let observed = omoi_proto::domain::observed(e, usage.as_ref());
        for trip in w.observe(&observed) {
            let action = w.action(&trip);
            if action == Action::Stop && out.stopped_at.is_none() {
                out.stopped_at = Some((trip.seq, w.tokens()));
            }
            let evidence = trip.events();
            out.trips
                .push((trip.seq, trip.signal.as_str(), action.as_str(), trip.reason, evidence));
        }
    }
    out.tokens = w.tokens();
    out.cost_usd = w.cost_usd();
    out
}

/// An event as `omoi logs --output json` writes it.
fn read_event(line: &str) -> anyhow::Result<AgentEvent> {
    let descriptor = POOL
        .get_message_by_name("omoi.common.v1.AgentEvent")
        .ok_or_else(|| anyhow::anyhow!("no AgentEvent in the API"))?;
    let mut de = serde_json::Deserializer::from_str(line);
    let message = DynamicMessage::deserialize(descriptor, &mut de)?;
    Ok(message.transcode_to::<AgentEvent>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use omoi_proto::common::AgentEventKind;

    #[test]
    fn thresholds_are_given_by_name() {
        let pairs = ["repeat=3", "budget_share=0", " review_seconds = 60"].map(String::from);
        let g = given(&pairs).unwrap();
        assert_eq!(
            (g.repeat, g.budget_share, g.review_seconds),
            (Some(3), Some(0.0), Some(60))
        );
        assert_eq!(g.nudges, None, "not given: the deployment's");
        for (bad, says) in [
            ("repeat", "NAME=VALUE"),
            ("repeat=lots", "not a number"),
            ("loops=3", "not a threshold"),
        ] {
            let e = given(&[bad.to_owned()]).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn an_exported_loop_replays_to_two_nudges_and_a_stop_with_the_tokens_it_saves() {
        let mut lines = Vec::new();
        for i in 0..40 {
            let call = AgentEvent {
                seq: 2 * i,
                kind: AgentEventKind::ToolCall as i32,
                tool: "Bash".into(),
                text: "cargo test".into(),
                task_id: "t".into(),
                attempt: 1,
                ..Default::default()
            };
            let usage = AgentEvent {
                seq: 2 * i + 1,
                kind: AgentEventKind::Usage as i32,
                usage: Some(omoi_proto::common::Usage {
                    input_tokens: 1000 * (i + 1),
                    ..Default::default()
                }),
                task_id: "t".into(),
                attempt: 1,
                ..Default::default()
            };
            lines.push(crate::ops::json_line(&call, "omoi.common.v1.AgentEvent").unwrap());
            lines.push(crate::ops::json_line(&usage, "omoi.common.v1.AgentEvent").unwrap());
        }
        let events: Vec<AgentEvent> = lines.iter().map(|l| read_event(l).unwrap()).collect();
        let r = watch(&events, Thresholds::default(), None);
        let actions: Vec<&str> = r.trips.iter().map(|t| t.2).take(3).collect();
        assert_eq!(actions, ["nudge", "nudge", "stop"]);
        assert_eq!(r.trips[0].4, "0, 2, 4, 6, 8");
        // Stopped at the 15th call (seq 28), 15,000 tokens used by then.
        assert_eq!(r.stopped_at, Some((28, 14_000)));
        assert_eq!(r.tokens, 40_000);
    }
}
