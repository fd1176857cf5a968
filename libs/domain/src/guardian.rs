//! The guardian: signals over an attempt's normalized agent events that say
//! it is going in circles or stalled while it spends — the same for every
//! runner, since every runner's events are normalized the same way.
//!
//! A [`Watch`] follows one attempt's events in order and says when a signal
//! trips ([`Trip`], with the evidence: the events by their `seq`). What is
//! done about a trip (a nudge, then stopping the attempt) is the caller's;
//! [`Watch::action`] says which, in escalating order.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::DomainError;
use crate::usage::Usage;

/// When a signal trips. Zero turns a limit off (not `repeat`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Thresholds {
    /// The same call (tool and input) or the same error this many times
    /// is a loop.
    pub repeat: u32,
    /// Seconds without a file written or a new command while tokens flow.
    pub stall_seconds: u32,
    /// Dollars a minute, over the attempt so far (after its first minute).
    pub spend_per_minute_usd: f64,
    /// Turns of the agent's conversation in one attempt.
    pub max_turns: u32,
    /// Share of the ticket's budget one attempt may spend (0 to 1).
    pub budget_share: f64,
    /// Nudges before a trip stops the attempt.
    pub nudges: u32,
    /// Seconds between the reviewer's looks at a running attempt (0: no
    /// reviewer).
    pub review_seconds: u32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            repeat: 5,
            stall_seconds: 600,
            spend_per_minute_usd: 2.0,
            max_turns: 0,
            budget_share: 0.5,
            nudges: 2,
            review_seconds: 0,
        }
    }
}

/// The settings' names, for errors and the environment
/// (`OMOI_GUARDIAN_<NAME>`).
pub const SETTINGS: [&str; 7] = [
    "REPEAT_THRESHOLD",
    "STALL_SECONDS",
    "SPEND_PER_MINUTE_USD",
    "MAX_TURNS",
    "BUDGET_SHARE",
    "NUDGES",
    "REVIEW_SECONDS",
];

impl Thresholds {
    /// Checks every threshold's range; `field` prefixes the name of the one
    /// out of range (e.g. `guardian.` or `OMOI_GUARDIAN_`).
    pub fn validated(self, field: &str, upper: bool) -> Result<Thresholds, DomainError> {
        let name = |lower: &str, env: &str| {
            if upper {
                format!("{field}{env}")
            } else {
                format!("{field}{lower}")
            }
        };
        // `off`: 0 is allowed too, and turns the signal off.
        let count = |value: u32, min: u32, max: u32, off: bool, lower: &str, env: &str| {
            if off && value == 0 || (min..=max).contains(&value) {
                return Ok(());
            }
            let zero = if off { "0 (off) or " } else { "" };
            Err(DomainError::invalid(
                name(lower, env),
                format!("must be {zero}{min} to {max}, got {value}"),
            ))
        };
        count(self.repeat, 2, 1000, false, "repeat", "REPEAT_THRESHOLD")?;
        count(self.stall_seconds, 1, 86_400, true, "stall_seconds", "STALL_SECONDS")?;
        count(self.max_turns, 1, 100_000, true, "max_turns", "MAX_TURNS")?;
        count(self.nudges, 0, 10, false, "nudges", "NUDGES")?;
        count(self.review_seconds, 1, 86_400, true, "review_seconds", "REVIEW_SECONDS")?;
        if !(self.spend_per_minute_usd.is_finite() && (0.0..=1000.0).contains(&self.spend_per_minute_usd)) {
            return Err(DomainError::invalid(
                name("spend_per_minute_usd", "SPEND_PER_MINUTE_USD"),
                format!("must be 0 (off) to 1000, got {}", self.spend_per_minute_usd),
            ));
        }
        if !(self.budget_share.is_finite() && (0.0..=1.0).contains(&self.budget_share)) {
            return Err(DomainError::invalid(
                name("budget_share", "BUDGET_SHARE"),
                format!("must be 0 (off) to 1, got {}", self.budget_share),
            ));
        }
        Ok(self)
    }

    /// The thresholds `OMOI_GUARDIAN_*` set over the defaults (`get` reads
    /// one, e.g. the environment); INVALID_ARGUMENT naming the variable
    /// that is not a number or out of range.
    pub fn from_settings(get: impl Fn(&str) -> Option<String>) -> Result<Thresholds, DomainError> {
        let mut t = Thresholds::default();
        for setting in SETTINGS {
            let var = format!("OMOI_GUARDIAN_{setting}");
            let Some(raw) = get(&var).filter(|v| !v.trim().is_empty()) else {
                continue;
            };
            let raw = raw.trim();
            let bad = || DomainError::invalid(var.clone(), format!("is not a number: {raw:?}"));
            match setting {
                "REPEAT_THRESHOLD" => t.repeat = raw.parse().map_err(|_| bad())?,
                "STALL_SECONDS" => t.stall_seconds = raw.parse().map_err(|_| bad())?,
                "SPEND_PER_MINUTE_USD" => t.spend_per_minute_usd = raw.parse().map_err(|_| bad())?,
                "MAX_TURNS" => t.max_turns = raw.parse().map_err(|_| bad())?,
                "BUDGET_SHARE" => t.budget_share = raw.parse().map_err(|_| bad())?,
                "REVIEW_SECONDS" => t.review_seconds = raw.parse().map_err(|_| bad())?,
                _ => t.nudges = raw.parse().map_err(|_| bad())?,
            }
        }
        t.validated("OMOI_GUARDIAN_", true)
    }
}

/// A ticket's own thresholds, where they differ from the deployment's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repeat: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stall_seconds: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spend_per_minute_usd: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_turns: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_share: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nudges: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub review_seconds: Option<u32>,
}

impl Overrides {
    /// `base` with these in place.
    pub fn over(&self, base: Thresholds) -> Thresholds {
        Thresholds {
            repeat: self.repeat.unwrap_or(base.repeat),
            stall_seconds: self.stall_seconds.unwrap_or(base.stall_seconds),
            spend_per_minute_usd: self.spend_per_minute_usd.unwrap_or(base.spend_per_minute_usd),
            max_turns: self.max_turns.unwrap_or(base.max_turns),
            budget_share: self.budget_share.unwrap_or(base.budget_share),
            nudges: self.nudges.unwrap_or(base.nudges),
            review_seconds: self.review_seconds.unwrap_or(base.review_seconds),
        }
    }

    /// Each one given in range (named `<field>.<name>`).
    pub fn validated(self, field: &str) -> Result<Overrides, DomainError> {
        self.over(Thresholds::default())
            .validated(&format!("{field}."), false)
            .map(|_| self)
    }
}

/// What the guardian reads of an agent event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The model's text or reasoning.
    Message,
    ToolCall,
    ToolResult,
    Command,
    FileChange,
    Usage,
    Error,
    /// Anything else (messages, thinking, plans, output).
    Other,
}

/// One event of an attempt, as the guardian reads it.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    /// The attempt it is of.
    pub attempt: i32,
    pub seq: i64,
    /// When, in milliseconds since any fixed point.
    pub at_ms: i64,
    pub kind: Kind,
    pub text: &'a str,
    pub tool: &'a str,
    pub exit_code: Option<i32>,
    pub is_error: bool,
    /// The attempt's usage so far (USAGE events).
    pub usage: Option<&'a Usage>,
}

/// What tripped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    RepeatedCall,
    RepeatedError,
    Stall,
    SpendRate,
    Turns,
    BudgetShare,
    /// The reviewer found the attempt not progressing.
    Review,
}

impl Signal {
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::RepeatedCall => "repeated_call",
            Signal::RepeatedError => "repeated_error",
            Signal::Stall => "stall",
            Signal::SpendRate => "spend_rate",
            Signal::Turns => "turns",
            Signal::BudgetShare => "budget_share",
            Signal::Review => "review",
        }
    }
}

/// An event that is part of the evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// The attempt the event is of: an earlier one's where a retry took up
    /// its counts (0 in records from before attempts were named: the
    /// intervention's own).
    #[serde(default)]
    pub attempt: i32,
    pub seq: i64,
    pub text: String,
}

impl Evidence {
    /// The event as evidence: its place, and its text bounded.
    pub fn of(e: &Observed<'_>) -> Evidence {
        Evidence {
            attempt: e.attempt,
            seq: e.seq,
            text: excerpt(e.text),
        }
    }
}

/// A signal that tripped, why, and the events that show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trip {
    pub signal: Signal,
    /// Said to a person, and to the agent in a nudge.
    pub reason: String,
    pub evidence: Vec<Evidence>,
    /// The attempt and the event it tripped at.
    #[serde(default)]
    pub attempt: i32,
    pub seq: i64,
}

impl Trip {
    /// Its evidence's events, as a person reads them: by seq, those of an
    /// earlier attempt as `<attempt>:<seq>`.
    pub fn events(&self) -> String {
        let named: Vec<String> = self
            .evidence
            .iter()
            .map(|e| match e.attempt {
                a if a == self.attempt || a == 0 => e.seq.to_string(),
                a => format!("{a}:{}", e.seq),
            })
            .collect();
        named.join(", ")
    }

    /// What the guardian says on the attempt's output when it acts: read
    /// back by [`ended_attempt`].
    pub fn said(&self, action: Action) -> String {
        format!(
            "{GUARDIAN}{} — {} (events {})",
            action.as_str(),
            self.reason,
            self.events()
        )
    }
}

/// How each line the guardian says begins.
const GUARDIAN: &str = "guardian: ";

/// Whether a line an attempt's output holds says the guardian ended it
/// (stopped it, or paused its ticket): what the attempt counted is then
/// behind it, and a retry starts counting afresh.
pub fn ended_attempt(line: &str) -> bool {
    line.strip_prefix(GUARDIAN).is_some_and(|rest| {
        [Action::Stop, Action::Pause]
            .iter()
            .any(|a| rest.starts_with(&format!("{} — ", a.as_str())))
    })
}

/// What to do about a trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Stop the agent and resume its session with guidance.
    Nudge,
    /// Stop the attempt as a retryable failure, with the evidence.
    Stop,
    /// Pause the ticket for a person (spending is not the agent's to fix).
    Pause,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Nudge => "nudge",
            Action::Stop => "stop",
            Action::Pause => "pause",
        }
    }
}

/// Longest text of an evidence event kept.
const EVIDENCE_CHARS: usize = 300;

/// One attempt's events, followed.
#[derive(Debug, Clone)]
pub struct Watch {
    thresholds: Thresholds,
    /// The ticket's budget, when it has one.
    budget_usd: Option<f64>,
    /// Each call (tool, normalized input) and error (normalized) seen since
    /// it last tripped: the events by seq.
    calls: HashMap<(String, String), Vec<Evidence>>,
    errors: HashMap<String, Vec<Evidence>>,
    /// Commands seen (normalized): a new one is progress.
    commands: std::collections::HashSet<String>,
    first_ms: Option<i64>,
    progress_ms: Option<i64>,
    tokens_at_progress: i64,
    /// The model's messages and calls since the last progress: it is at
    /// work even where its usage is told only at the end.
    active_since_progress: u32,
    tokens: i64,
    cost_usd: f64,
    turns: i32,
    /// Spending signals trip once an attempt.
    spent_tripped: std::collections::HashSet<Signal>,
    trips: u32,
    /// What the earlier attempts taken up spent: a retry's usage events
    /// count from its own start.
    carried: Spent,
    /// When the last event came, and whether the next one starts an attempt
    /// taken up (the time between the two is nobody's work).
    last_ms: Option<i64>,
    resuming: bool,
}

/// Usage totals.
#[derive(Debug, Clone, Copy, Default)]
struct Spent {
    tokens: i64,
    cost_usd: f64,
    turns: i32,
}

impl Watch {
    pub fn new(thresholds: Thresholds, budget_usd: Option<f64>) -> Watch {
        Watch {
            thresholds,
            budget_usd: budget_usd.filter(|b| *b > 0.0),
            calls: HashMap::new(),
            errors: HashMap::new(),
            commands: Default::default(),
            first_ms: None,
            progress_ms: None,
            tokens_at_progress: 0,
            active_since_progress: 0,
            tokens: 0,
            cost_usd: 0.0,
            turns: 0,
            spent_tripped: Default::default(),
            trips: 0,
            carried: Spent::default(),
            last_ms: None,
            resuming: false,
        }
    }

    /// Takes the events followed so far as an earlier attempt's, which the
    /// next events (a retry's, of the same session) go on from: the counts
    /// carry on, the retry's usage adds to what was spent, the time between
    /// the two attempts counts for no stall or rate, and the budget is what
    /// the ticket could spend when the first attempt taken up started
    /// (`budget_left_usd` at the retry's start, plus what they spent).
    pub fn carry_on(&mut self, budget_left_usd: Option<f64>) {
        self.carried = Spent {
            tokens: self.tokens,
            cost_usd: self.cost_usd,
            turns: self.turns,
        };
        self.resuming = self.last_ms.is_some();
        // What tripped then (with another budget) was the earlier
        // attempt's to act on.
        self.spent_tripped.clear();
        self.budget_usd = budget_left_usd.filter(|b| *b > 0.0).map(|b| b + self.cost_usd);
    }

    /// The events that follow are another run of the same attempt (the
    /// agent's session resumed after a nudge), whose usage events count
    /// from the run's own start: they add to what the attempt spent.
    pub fn next_run(&mut self) {
        self.carried = Spent {
            tokens: self.tokens,
            cost_usd: self.cost_usd,
            turns: self.turns,
        };
    }

    /// What the attempt spent so far, as its events said.
    pub fn cost_usd(&self) -> f64 {
        self.cost_usd
    }

    /// Tokens the attempt used so far, as its events said.
    pub fn tokens(&self) -> i64 {
        self.tokens
    }

    /// Follows one more event; the signals it tripped.
    pub fn observe(&mut self, e: &Observed<'_>) -> Vec<Trip> {
        let t = self.thresholds;
        if std::mem::take(&mut self.resuming)
            && let Some(last) = self.last_ms
        {
            let gap = (e.at_ms - last).max(0);
            self.first_ms = self.first_ms.map(|f| f + gap);
            self.progress_ms = self.progress_ms.map(|p| p + gap);
        }
        self.last_ms = Some(e.at_ms);
        let first = *self.first_ms.get_or_insert(e.at_ms);
        let mut out = Vec::new();
        let evidence = Evidence::of(e);
        if matches!(e.kind, Kind::Message | Kind::ToolCall) {
            self.active_since_progress += 1;
        }
        match e.kind {
            Kind::ToolCall | Kind::Command => {
                let tool = if e.kind == Kind::Command && e.tool.is_empty() {
                    "command"
                } else {
                    e.tool
                };
                let input = normalize(e.text);
                if e.kind == Kind::Command && e.exit_code.is_none() && self.commands.insert(input.clone()) {
                    self.progressed(e.at_ms);
                }
                // A command's end repeats its start: only the start counts.
                if e.kind == Kind::ToolCall || e.exit_code.is_none() {
                    let seen = self.calls.entry((tool.to_owned(), input)).or_default();
                    seen.push(evidence.clone());
                    if seen.len() as u32 >= t.repeat {
                        let evidence = std::mem::take(seen);
                        out.push(Trip {
                            signal: Signal::RepeatedCall,
                            reason: format!("the same {tool} call {} times: {}", evidence.len(), excerpt(e.text)),
                            evidence,
                            attempt: e.attempt,
                            seq: e.seq,
                        });
                    }
                }
                if e.kind == Kind::Command && e.exit_code.is_some_and(|c| c != 0) {
                    out.extend(self.error(e, evidence.clone()));
                }
            }
            Kind::ToolResult if e.is_error => out.extend(self.error(e, evidence.clone())),
            Kind::Error => out.extend(self.error(e, evidence.clone())),
            Kind::FileChange => {
                self.progressed(e.at_ms);
                // The same call after a change is the next step, not a
                // repeat (tests run after each edit); the same error after
                // a change still counts (edits that fail the same way).
                self.calls.clear();
            }
            Kind::Usage => {
                if let Some(u) = e.usage {
                    let c = self.carried;
                    self.tokens =
                        c.tokens + u.input_tokens + u.output_tokens + u.cache_read_tokens + u.cache_write_tokens;
                    self.cost_usd = c.cost_usd + u.cost_usd;
                    self.turns = c.turns + u.turns;
                }
                out.extend(self.spending(e, first));
            }
            _ => {}
        }
        if t.stall_seconds > 0 {
            let since = self.progress_ms.unwrap_or(first);
            let working = self.tokens > self.tokens_at_progress || self.active_since_progress > 0;
            if e.at_ms - since >= i64::from(t.stall_seconds) * 1000 && working {
                out.push(Trip {
                    signal: Signal::Stall,
                    reason: format!(
                        "{} s of work ({} messages and calls, {} tokens) without writing a file or running a new command",
                        (e.at_ms - since) / 1000,
                        self.active_since_progress,
                        self.tokens - self.tokens_at_progress
                    ),
                    evidence: vec![evidence],
                    attempt: e.attempt,
                    seq: e.seq,
                });
                // Once a stall period.
                self.progressed(e.at_ms);
            }
        }
        self.trips += out.len() as u32;
        out
    }

    /// What to do about the latest trip: spending pauses the ticket; a loop
    /// or stall is nudged `nudges` times, then stops the attempt.
    pub fn action(&self, trip: &Trip) -> Action {
        match trip.signal {
            Signal::SpendRate | Signal::BudgetShare => Action::Pause,
            _ if self.trips <= self.thresholds.nudges => Action::Nudge,
            _ => Action::Stop,
        }
    }

    fn progressed(&mut self, at_ms: i64) {
        self.progress_ms = Some(at_ms);
        self.tokens_at_progress = self.tokens;
        self.active_since_progress = 0;
    }

    fn error(&mut self, e: &Observed<'_>, evidence: Evidence) -> Option<Trip> {
        let seen = self.errors.entry(normalize(e.text)).or_default();
        seen.push(evidence);
        if (seen.len() as u32) < self.thresholds.repeat {
            return None;
        }
        let evidence = std::mem::take(seen);
        Some(Trip {
            signal: Signal::RepeatedError,
            reason: format!("the same error {} times: {}", evidence.len(), excerpt(e.text)),
            evidence,
            attempt: e.attempt,
            seq: e.seq,
        })
    }

    fn spending(&mut self, e: &Observed<'_>, first: i64) -> Vec<Trip> {
        let t = self.thresholds;
        let minutes = (e.at_ms - first) as f64 / 60_000.0;
        let mut checks = Vec::new();
        if t.spend_per_minute_usd > 0.0 && minutes >= 1.0 && self.cost_usd / minutes > t.spend_per_minute_usd {
            checks.push((
                Signal::SpendRate,
                format!(
                    "${:.4} in {minutes:.1} minutes: ${:.4} a minute, above ${:.4}",
                    self.cost_usd,
                    self.cost_usd / minutes,
                    t.spend_per_minute_usd
                ),
            ));
        }
        if t.max_turns > 0 && self.turns > t.max_turns as i32 {
            checks.push((Signal::Turns, format!("{} turns, above {}", self.turns, t.max_turns)));
        }
        if let Some(budget) = self.budget_usd
            && t.budget_share > 0.0
            && self.cost_usd >= budget * t.budget_share
        {
            checks.push((
                Signal::BudgetShare,
                format!(
                    "${:.4} of the ticket's ${budget:.4} budget in one attempt ({:.0}%)",
                    self.cost_usd,
                    100.0 * self.cost_usd / budget
                ),
            ));
        }
        checks
            .into_iter()
            .filter(|(s, _)| self.spent_tripped.insert(*s))
            .map(|(signal, reason)| Trip {
                signal,
                reason,
                evidence: vec![Evidence::of(e)],
                attempt: e.attempt,
                seq: e.seq,
            })
            .collect()
    }
}

/// The reviewer's answer, in the schema its prompt asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Review {
    /// Whether the agent is getting closer to finishing the task.
    pub progressing: bool,
    /// What to tell the agent (when it is not progressing).
    #[serde(default)]
    pub say: String,
}

/// Most events of the digest the reviewer is shown.
pub const DIGEST_EVENTS: usize = 40;

/// How an event reads in the reviewer's digest: `#seq kind tool: text`,
/// one line, bounded.
pub fn digest_line(e: &Observed<'_>) -> String {
    let kind = match e.kind {
        Kind::Message => "message",
        Kind::ToolCall => "call",
        Kind::ToolResult if e.is_error => "error",
        Kind::ToolResult => "result",
        Kind::Command => "command",
        Kind::FileChange => "file",
        Kind::Usage => "usage",
        Kind::Error => "error",
        Kind::Other => "output",
    };
    let exit = e.exit_code.map(|c| format!(" (exit {c})")).unwrap_or_default();
    let tool = if e.tool.is_empty() {
        String::new()
    } else {
        format!(" {}", e.tool)
    };
    format!("#{} {kind}{tool}{exit}: {}", e.seq, excerpt(&e.text.replace('\n', " ")))
}

/// What the reviewer is asked: the task, the attempt's recent events, and
/// one JSON object for an answer.
pub fn review_prompt(title: &str, description: &str, minutes: f64, digest: &[String]) -> String {
    format!(
        "omoi's guardian asks you to review a coding agent's work in progress. Do not use any tool; \
         read, and answer.\n\n## The agent's task\n\n{title}\n\n{description}\n\n\
         ## What the agent did lately ({minutes:.1} minutes into its attempt; its last {} events)\n\n{}\n\n\
         ## Your answer\n\nIs the agent getting closer to finishing the task, or going in circles or \
         off the task? Answer with one JSON object and nothing else: {{\"progressing\": true|false, \
         \"say\": \"what to tell the agent, in one or two sentences, when it is not progressing\"}}",
        digest.len(),
        digest.join("\n")
    )
}

/// Reads the reviewer's answer; why not, when it is not the schema.
pub fn review(answer: &str) -> Result<Review, String> {
    let excerpt: String = answer.chars().take(200).collect();
    crate::candidates::json_answer(answer)
        .ok_or_else(|| format!("the reviewer's answer is not {{\"progressing\": …, \"say\": \"…\"}}: {excerpt:?}"))
}

impl Watch {
    /// The reviewer's verdict as a trip, when it found the agent not
    /// progressing (shown `shown`, the digest's events): it escalates as
    /// the other signals do.
    pub fn reviewed(&mut self, review: &Review, shown: &[Evidence], attempt: i32) -> Option<Trip> {
        if review.progressing {
            return None;
        }
        let say = excerpt(&review.say);
        let say = if say.is_empty() {
            "(it said nothing more)".to_owned()
        } else {
            say
        };
        self.trips += 1;
        Some(Trip {
            signal: Signal::Review,
            reason: format!("the reviewer finds it not progressing: {say}"),
            evidence: shown.iter().rev().take(5).rev().cloned().collect(),
            attempt,
            seq: shown.last().map_or(0, |e| e.seq),
        })
    }
}

fn excerpt(text: &str) -> String {
    let line = text.trim();
    if line.chars().count() <= EVIDENCE_CHARS {
        return line.to_owned();
    }
    let cut: String = line.chars().take(EVIDENCE_CHARS).collect();
    format!("{cut}…")
}

/// An input or error as the guardian compares them: whitespace collapsed,
/// numbers (counts, times, line numbers, ids) as `#`, lower case, bounded.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(512));
    let mut last_space = false;
    let mut last_digit = false;
    for c in text.chars() {
        if c.is_ascii_digit() {
            if !last_digit {
                out.push('#');
            }
            last_digit = true;
            last_space = false;
            continue;
        }
        last_digit = false;
        if c.is_whitespace() {
            if !last_space && !out.is_empty() {
                out.push(' ');
            }
            last_space = true;
            continue;
        }
        last_space = false;
        out.extend(c.to_lowercase());
        if out.len() >= 512 {
            break;
        }
    }
    out.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(seq: i64, at_s: i64, text: &str) -> Observed<'_> {
        Observed {
            attempt: 1,
            seq,
            at_ms: at_s * 1000,
            kind: Kind::ToolCall,
            text,
            tool: "Bash",
            exit_code: None,
            is_error: false,
            usage: None,
        }
    }

    #[test]
    fn the_same_call_repeated_trips_with_its_events_and_escalates() {
        let mut w = Watch::new(Thresholds::default(), None);
        let mut trips = Vec::new();
        for i in 0..15 {
            // The same command, whatever its counts and spacing.
            let text = format!("npm   test -- --seed {i}");
            trips.extend(w.observe(&call(i, i, &text)));
            if i % 3 == 0 {
                let other = ["ls", "pwd", "git status", "cat a.rs", "echo hi"][i as usize / 3];
                assert!(w.observe(&call(100 + i, i, other)).is_empty());
            }
        }
        assert_eq!(trips.len(), 3, "{trips:?}");
        assert_eq!(trips[0].signal, Signal::RepeatedCall);
        let seqs: Vec<i64> = trips[0].evidence.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [0, 1, 2, 3, 4]);
        assert_eq!(trips[0].reason, "the same Bash call 5 times: npm   test -- --seed 4");
        // Two nudges, then the attempt stops.
        let mut w = Watch::new(Thresholds::default(), None);
        let mut actions = Vec::new();
        for i in 0..15 {
            for t in w.observe(&call(i, i, "make")) {
                actions.push(w.action(&t));
            }
        }
        assert_eq!(actions, [Action::Nudge, Action::Nudge, Action::Stop]);
    }

    #[test]
    fn a_steady_worker_running_its_tests_after_each_edit_never_trips() {
        // Edit, test, edit, test…, for an hour, every test run passing.
        let mut w = Watch::new(Thresholds::default(), None);
        for i in 0..120 {
            let edit = Observed {
                kind: Kind::FileChange,
                ..call(3 * i, 30 * i, "src/lib.rs")
            };
            assert!(w.observe(&edit).is_empty());
            assert!(
                w.observe(&call(3 * i + 1, 30 * i + 10, "cargo test")).is_empty(),
                "run {i}"
            );
            let passed = Observed {
                kind: Kind::ToolResult,
                ..call(3 * i + 2, 30 * i + 20, "test result: ok. 12 passed")
            };
            assert!(w.observe(&passed).is_empty());
        }
        // Edits that fail the same way each time are going in circles.
        let mut w = Watch::new(Thresholds::default(), None);
        let mut trips = Vec::new();
        for i in 0..5 {
            let edit = Observed {
                kind: Kind::FileChange,
                ..call(3 * i, 30 * i, "src/lib.rs")
            };
            trips.extend(w.observe(&edit));
            trips.extend(w.observe(&call(3 * i + 1, 30 * i + 10, "cargo test")));
            let failed = Observed {
                kind: Kind::ToolResult,
                is_error: true,
                ..call(
                    3 * i + 2,
                    30 * i + 20,
                    "error[E0308]: mismatched types at src/lib.rs:12",
                )
            };
            trips.extend(w.observe(&failed));
        }
        let signals: Vec<Signal> = trips.iter().map(|t| t.signal).collect();
        assert_eq!(signals, [Signal::RepeatedError]);
    }

    #[test]
    fn the_same_error_repeated_trips_and_distinct_ones_do_not() {
        let mut w = Watch::new(
            Thresholds {
                repeat: 3,
                ..Default::default()
            },
            None,
        );
        let failed = |seq, text| Observed {
            kind: Kind::Command,
            exit_code: Some(1),
            ..call(seq, seq, text)
        };
        let mut trips = Vec::new();
        for (i, text) in ["error at line 12", "error at line 40", "error at line 7"]
            .iter()
            .enumerate()
        {
            trips.extend(w.observe(&failed(i as i64, text)));
        }
        assert_eq!(trips.len(), 1);
        assert_eq!(trips[0].signal, Signal::RepeatedError);
        let mut w = Watch::new(
            Thresholds {
                repeat: 3,
                ..Default::default()
            },
            None,
        );
        for (i, text) in ["no such file a.rs", "type mismatch", "missing ;"].iter().enumerate() {
            assert!(w.observe(&failed(i as i64, text)).is_empty());
        }
    }

    #[test]
    fn a_stall_while_tokens_flow_trips_and_steady_work_never_does() {
        let u = |seq: i64, at_s: i64, u: &'static Usage| Observed {
            kind: Kind::Usage,
            usage: Some(u),
            ..call(seq, at_s, "")
        };
        static U1: std::sync::LazyLock<Usage> = std::sync::LazyLock::new(|| Usage {
            input_tokens: 1000,
            ..Default::default()
        });
        static U2: std::sync::LazyLock<Usage> = std::sync::LazyLock::new(|| Usage {
            input_tokens: 9000,
            ..Default::default()
        });
        let t = Thresholds {
            stall_seconds: 60,
            ..Default::default()
        };
        let mut w = Watch::new(t, None);
        assert!(w.observe(&u(0, 0, &U1)).is_empty());
        assert!(w.observe(&u(1, 30, &U2)).is_empty());
        let trips = w.observe(&u(2, 61, &U2));
        assert_eq!(trips.len(), 1);
        assert_eq!(trips[0].signal, Signal::Stall);
        // A file written every half minute for an hour: never.
        let mut w = Watch::new(t, None);
        for i in 0..120 {
            let write = Observed {
                kind: Kind::FileChange,
                ..call(i * 2, i * 30, "src/lib.rs")
            };
            assert!(w.observe(&write).is_empty());
            assert!(
                w.observe(&u(i * 2 + 1, i * 30 + 1, if i % 2 == 0 { &U1 } else { &U2 }))
                    .is_empty()
            );
        }
    }

    #[test]
    fn spending_trips_once_and_pauses() {
        static SPENT: std::sync::LazyLock<Usage> = std::sync::LazyLock::new(|| Usage {
            cost_usd: 6.0,
            turns: 40,
            ..Default::default()
        });
        let t = Thresholds {
            max_turns: 30,
            ..Default::default()
        };
        let mut w = Watch::new(t, Some(10.0));
        let at = |seq: i64, s: i64| Observed {
            kind: Kind::Usage,
            usage: Some(&SPENT),
            ..call(seq, s, "")
        };
        assert!(w.observe(&call(0, 0, "start")).is_empty());
        let trips = w.observe(&at(1, 120));
        let signals: Vec<Signal> = trips.iter().map(|t| t.signal).collect();
        assert_eq!(signals, [Signal::SpendRate, Signal::Turns, Signal::BudgetShare]);
        assert_eq!(w.action(&trips[0]), Action::Pause);
        assert!(w.observe(&at(2, 130)).is_empty(), "once an attempt");
    }

    #[test]
    fn a_retry_taking_up_an_attempt_goes_on_counting_from_where_it_stopped() {
        static EARLIER: std::sync::LazyLock<Usage> = std::sync::LazyLock::new(|| Usage {
            input_tokens: 5000,
            cost_usd: 3.0,
            turns: 4,
            ..Default::default()
        });
        static LATER: std::sync::LazyLock<Usage> = std::sync::LazyLock::new(|| Usage {
            input_tokens: 1000,
            cost_usd: 1.0,
            turns: 1,
            ..Default::default()
        });
        let t = Thresholds {
            repeat: 4,
            stall_seconds: 120,
            spend_per_minute_usd: 0.0,
            ..Default::default()
        };
        let usage = |seq: i64, at_s: i64, u: &'static Usage| Observed {
            kind: Kind::Usage,
            usage: Some(u),
            ..call(seq, at_s, "")
        };
        let mut w = Watch::new(t, None);
        for i in 0..3 {
            assert!(w.observe(&call(i, i, "cat missing.txt")).is_empty());
        }
        assert!(w.observe(&usage(3, 3, &EARLIER)).is_empty());
        // The executor died; the retry starts ten minutes later, with $6
        // left of the ticket's budget.
        w.carry_on(Some(6.0));
        let retry = |seq: i64, at_s: i64, text: &'static str| Observed {
            attempt: 2,
            ..call(seq, at_s, text)
        };
        // The ten minutes were nobody's stall.
        assert!(w.observe(&retry(0, 603, "ls")).is_empty());
        let trips = w.observe(&retry(1, 604, "cat missing.txt"));
        assert_eq!(trips.len(), 1, "the fourth call of the two attempts");
        let named: Vec<(i32, i64)> = trips[0].evidence.iter().map(|e| (e.attempt, e.seq)).collect();
        assert_eq!(named, [(1, 0), (1, 1), (1, 2), (2, 1)]);
        assert_eq!(trips[0].events(), "1:0, 1:1, 1:2, 1");
        assert_eq!(
            trips[0].said(Action::Stop),
            "guardian: stop — the same Bash call 4 times: cat missing.txt (events 1:0, 1:1, 1:2, 1)"
        );
        assert!(ended_attempt(&trips[0].said(Action::Stop)));
        assert!(ended_attempt(&trips[0].said(Action::Pause)));
        assert!(!ended_attempt(&trips[0].said(Action::Nudge)));
        // Its usage adds to what the earlier attempt spent: $4 of the $9
        // the ticket could spend when the first attempt started.
        assert!(
            w.observe(&Observed {
                attempt: 2,
                ..usage(2, 605, &LATER)
            })
            .is_empty()
        );
        assert_eq!((w.tokens(), w.cost_usd()), (6000, 4.0));
        let halfway = Usage {
            cost_usd: 1.5,
            ..LATER.clone()
        };
        let trips = w.observe(&Observed {
            attempt: 2,
            usage: Some(&halfway),
            ..usage(3, 606, &LATER)
        });
        let signals: Vec<Signal> = trips.iter().map(|t| t.signal).collect();
        assert_eq!(signals, [Signal::BudgetShare], "$4.50 of $9");
        // A nudged agent's next run tells its usage from its own start.
        w.next_run();
        assert!(
            w.observe(&Observed {
                attempt: 2,
                ..usage(4, 607, &LATER)
            })
            .is_empty()
        );
        assert_eq!((w.tokens(), w.cost_usd()), (7000, 5.5));
    }

    #[test]
    fn the_reviewers_answer_is_read_in_its_schema_and_escalates_like_a_signal() {
        let digest = [digest_line(&call(7, 1, "cat missing.txt\n"))];
        assert_eq!(digest[0], "#7 call Bash: cat missing.txt");
        let prompt = review_prompt("fix the build", "make passes", 2.5, &digest);
        assert!(prompt.contains("fix the build") && prompt.contains("#7 call Bash") && prompt.contains("2.5 minutes"));
        let answer = "Here it is:\n```json\n{\"progressing\": false, \"say\": \"Write the file first.\"}\n```";
        let r = review(answer).unwrap();
        assert_eq!((r.progressing, r.say.as_str()), (false, "Write the file first."));
        assert!(
            review("it looks fine to me")
                .unwrap_err()
                .contains("not {\"progressing\"")
        );
        let shown: Vec<Evidence> = (0..8)
            .map(|seq| Evidence {
                attempt: 1,
                seq,
                text: "cat missing.txt".into(),
            })
            .collect();
        let mut w = Watch::new(
            Thresholds {
                nudges: 1,
                ..Default::default()
            },
            None,
        );
        let progressing = Review {
            progressing: true,
            say: String::new(),
        };
        assert!(w.reviewed(&progressing, &shown, 1).is_none());
        let trip = w.reviewed(&r, &shown, 1).unwrap();
        assert_eq!(trip.signal, Signal::Review);
        assert_eq!(
            trip.reason,
            "the reviewer finds it not progressing: Write the file first."
        );
        assert_eq!(trip.events(), "3, 4, 5, 6, 7", "the last events it was shown");
        assert_eq!(w.action(&trip), Action::Nudge);
        let again = w.reviewed(&r, &shown, 1).unwrap();
        assert_eq!(w.action(&again), Action::Stop);
        // Off, or 1 s to a day.
        for (seconds, ok) in [(0, true), (1, true), (86_400, true), (86_401, false)] {
            let t = Thresholds {
                review_seconds: seconds,
                ..Default::default()
            };
            assert_eq!(t.validated("guardian.", false).is_ok(), ok, "{seconds}");
        }
    }

    #[test]
    fn thresholds_come_from_the_settings_and_out_of_range_ones_are_named() {
        let t = Thresholds::from_settings(|k| (k == "OMOI_GUARDIAN_REPEAT_THRESHOLD").then(|| "3".to_owned())).unwrap();
        assert_eq!(t.repeat, 3);
        for (var, value) in [
            ("OMOI_GUARDIAN_REPEAT_THRESHOLD", "1"),
            ("OMOI_GUARDIAN_REPEAT_THRESHOLD", "lots"),
            ("OMOI_GUARDIAN_BUDGET_SHARE", "1.5"),
            ("OMOI_GUARDIAN_NUDGES", "11"),
        ] {
            match Thresholds::from_settings(|k| (k == var).then(|| value.to_owned())) {
                Err(DomainError::InvalidArgument(e)) => assert_eq!(e.field, var, "{value}"),
                other => panic!("{var}={value}: {other:?}"),
            }
        }
        assert_eq!(
            Thresholds::from_settings(|k| (k == "OMOI_GUARDIAN_NUDGES").then(|| "0".to_owned()))
                .unwrap()
                .nudges,
            0
        );
    }
}
