//! The one event schema every runner speaks (`omoi.common.v1.AgentEvent`):
//! runners build events with the helpers here and hand them to a sink, which
//! numbers, stamps and publishes them.

use omoi_proto::common::{AgentEvent, AgentEventKind, OutputStream, Usage};

/// Longest text an event carries; a longer one is cut, saying so. Keeps
/// every event well inside a NATS message.
pub const MAX_TEXT_BYTES: usize = 16 * 1024;

/// Receives a run's events.
pub trait EventSink: Send + Sync {
    /// Records one event; the sink sets `seq`, `at` and the run's ids.
    fn emit(&self, event: AgentEvent);

    /// A raw line of output.
    fn line(&self, stream: OutputStream, text: String) {
        self.emit(output(stream, text));
    }
}

/// A raw line of output of `stream`.
pub fn output(stream: OutputStream, text: String) -> AgentEvent {
    AgentEvent {
        stream: stream.into(),
        ..event(AgentEventKind::Output, text)
    }
}

/// An event of `kind` saying `text` (cut to `MAX_TEXT_BYTES`).
pub fn event(kind: AgentEventKind, text: impl Into<String>) -> AgentEvent {
    AgentEvent {
        kind: kind.into(),
        text: bounded(text.into()),
        ..Default::default()
    }
}

/// A tool invocation: its name, its input, and the file it targets.
pub fn tool_call(tool: &str, input: String, path: Option<&str>) -> AgentEvent {
    AgentEvent {
        tool: tool.to_owned(),
        path: path.unwrap_or_default().to_owned(),
        ..event(AgentEventKind::ToolCall, input)
    }
}

/// What a tool returned.
pub fn tool_result(tool: &str, output: String, is_error: bool) -> AgentEvent {
    AgentEvent {
        tool: tool.to_owned(),
        is_error,
        ..event(AgentEventKind::ToolResult, output)
    }
}

/// A file the agent wrote or edited.
pub fn file_change(path: &str, how: &str) -> AgentEvent {
    AgentEvent {
        path: path.to_owned(),
        ..event(AgentEventKind::FileChange, how)
    }
}

/// A shell command the agent ran, with its exit code once known.
pub fn command(text: &str, exit_code: Option<i32>, is_error: bool) -> AgentEvent {
    AgentEvent {
        exit_code,
        is_error,
        ..event(AgentEventKind::Command, text)
    }
}

/// The usage so far.
pub fn usage(usage: &Usage) -> AgentEvent {
    AgentEvent {
        usage: Some(usage.clone()),
        ..event(
            AgentEventKind::Usage,
            format!(
                "{} input, {} output, {} cache read, {} cache write tokens; ${:.6}",
                usage.input_tokens,
                usage.output_tokens,
                usage.cache_read_tokens,
                usage.cache_write_tokens,
                usage.cost_usd
            ),
        )
    }
}

/// Adds what an attempt spent to the process's agent metrics.
pub fn count_usage(usage: &Usage) {
    use omoi_runtime::metrics::{AGENT_COST_USD, AGENT_TOKENS};
    let model = usage.model.as_str();
    let tokens = [
        ("input", usage.input_tokens),
        ("output", usage.output_tokens),
        ("cache_read", usage.cache_read_tokens),
        ("cache_write", usage.cache_write_tokens),
    ];
    for (kind, n) in tokens {
        AGENT_TOKENS
            .with_label_values(&[model, kind])
            .inc_by(u64::try_from(n).unwrap_or_default());
    }
    if usage.cost_usd.is_finite() && usage.cost_usd > 0.0 {
        AGENT_COST_USD.with_label_values(&[model]).inc_by(usage.cost_usd);
    }
}

/// `text` cut at a character boundary to at most `MAX_TEXT_BYTES`.
pub fn bounded(mut text: String) -> String {
    if text.len() > MAX_TEXT_BYTES {
        const MARK: &str = "… (cut)";
        text.truncate(text.floor_char_boundary(MAX_TEXT_BYTES - MARK.len()));
        text.push_str(MARK);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_texts_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_TEXT_BYTES);
        let cut = bounded(long);
        assert!(cut.len() <= MAX_TEXT_BYTES);
        assert!(cut.ends_with("… (cut)"));
        assert_eq!(bounded("short".into()), "short");
    }
}
