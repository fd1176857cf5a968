//! Tool calls of the CLIs that report a call and, later, its result by id
//! (Claude Code, Gemini CLI): TOOL_CALL when called (with the file it
//! targets, and a PLAN for a to-do list), TOOL_RESULT when it returns, then
//! COMMAND for a shell tool and FILE_CHANGE for a file-writing one.

use std::collections::HashMap;
use std::path::PathBuf;

use omoi_proto::common::{AgentEvent, AgentEventKind};
use serde_json::Value;

use super::cli::{relative, str_at};
use crate::events::{self, event};

/// How one CLI names its tools and their inputs.
#[derive(Debug)]
pub struct Dialect {
    /// Input keys naming the file a tool works on, in order of preference.
    pub path_keys: &'static [&'static str],
    /// The tool that runs a shell command (its input's `command`).
    pub shell: &'static str,
    /// Tools that write the file their input names.
    pub file_writers: &'static [&'static str],
    /// The to-do list tool, and the key of an item's text.
    pub todos: (&'static str, &'static str),
}

#[derive(Debug, Clone)]
struct Pending {
    tool: String,
    path: Option<String>,
    command: Option<String>,
}

/// The calls waiting for their results.
#[derive(Debug)]
pub struct Tools {
    dialect: &'static Dialect,
    workspace: PathBuf,
    pending: HashMap<String, Pending>,
}

impl Tools {
    pub fn new(dialect: &'static Dialect, workspace: PathBuf) -> Self {
        Self {
            dialect,
            workspace,
            pending: HashMap::new(),
        }
    }

    /// Call `id` of `tool` with `input`.
    pub fn called(&mut self, id: &str, tool: &str, input: &Value) -> Vec<AgentEvent> {
        let path = self
            .dialect
            .path_keys
            .iter()
            .find_map(|k| input.get(*k).and_then(Value::as_str))
            .map(|p| relative(&self.workspace, p));
        let mut out = vec![events::tool_call(tool, input.to_string(), path.as_deref())];
        let (todo_tool, todo_text) = self.dialect.todos;
        if tool == todo_tool
            && let Some(todos) = input.get("todos").and_then(Value::as_array)
        {
            let plan: Vec<String> = todos
                .iter()
                .map(|t| format!("[{}] {}", str_at(t, "status"), str_at(t, todo_text)))
                .collect();
            out.push(event(AgentEventKind::Plan, plan.join("\n")));
        }
        let command = input.get("command").and_then(Value::as_str).map(str::to_owned);
        let pending = Pending {
            tool: tool.to_owned(),
            path,
            command,
        };
        self.pending.insert(id.to_owned(), pending);
        out
    }

    /// Call `id` returned `output`; `written` says how a file it wrote
    /// changed ("created", "edited", …).
    pub fn returned(&mut self, id: &str, output: String, is_error: bool, written: &str) -> Vec<AgentEvent> {
        let pending = self.pending.remove(id).unwrap_or(Pending {
            tool: String::new(),
            path: None,
            command: None,
        });
        let mut out = vec![events::tool_result(&pending.tool, output, is_error)];
        if let Some(command) = &pending.command
            && pending.tool == self.dialect.shell
        {
            out.push(events::command(command, None, is_error));
        }
        if !is_error
            && self.dialect.file_writers.contains(&pending.tool.as_str())
            && let Some(path) = &pending.path
        {
            out.push(events::file_change(path, written));
        }
        out
    }
}
