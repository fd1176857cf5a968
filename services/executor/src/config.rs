//! The executor's whole configuration: flags with environment fallbacks.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use omoi_bus::BusArgs;
use omoi_runtime::config::{HostArgs, parse_listen, secret_file};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RunnerKind {
    /// A configured program, given the prompt on stdin and in OMOI_TASK_PROMPT.
    Command,
    /// An OpenHands agent server over its HTTP API.
    Openhands,
    /// Claude Code (`claude -p ... --output-format stream-json`).
    ClaudeCode,
    /// Codex (`codex exec --json`).
    Codex,
    /// Gemini CLI (`gemini -p ... --output-format stream-json`).
    Gemini,
}

impl RunnerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RunnerKind::Command => "command",
            RunnerKind::Openhands => "openhands",
            RunnerKind::ClaudeCode => "claude-code",
            RunnerKind::Codex => "codex",
            RunnerKind::Gemini => "gemini",
        }
    }

    /// The CLI a coding-agent runner starts unless OMOI_AGENT_BIN says.
    pub fn default_bin(self) -> Option<&'static str> {
        match self {
            RunnerKind::ClaudeCode => Some("claude"),
            RunnerKind::Codex => Some("codex"),
            RunnerKind::Gemini => Some("gemini"),
            RunnerKind::Command | RunnerKind::Openhands => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorkspacePolicy {
    /// Keep every workspace.
    Keep,
    /// Remove a workspace once its run succeeded; keep failures to inspect.
    RemoveOnSuccess,
    /// Remove every workspace when its run ends.
    Remove,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SandboxMode {
    Auto,
    On,
    Off,
    /// Each attempt in a Kubernetes pod of its own (see [`PodArgs`]).
    Pod,
}

/// Where and how `OMOI_AGENT_SANDBOX=pod` runs each attempt: a pod of its
/// own in the executor's namespace, on the workspaces' volume, reaching the
/// network only through this executor's proxies.
#[derive(Debug, Clone, clap::Args)]
pub struct PodArgs {
    /// The image attempts' pods run (the executor's own: it holds the
    /// agent CLIs and this binary, the pod's first process).
    #[arg(long, env = "OMOI_AGENT_POD_IMAGE")]
    pub agent_pod_image: Option<String>,

    /// The namespace of the pods; default the executor's own (its service
    /// account's).
    #[arg(long, env = "OMOI_AGENT_POD_NAMESPACE")]
    pub agent_pod_namespace: Option<String>,

    /// The PersistentVolumeClaim holding OMOI_WORKSPACE_ROOT, which each
    /// pod mounts its attempt's workspace and home from.
    #[arg(long, env = "OMOI_AGENT_POD_WORKSPACE_CLAIM")]
    pub agent_pod_workspace_claim: Option<String>,

    /// The executor's own pod (the downward API's metadata.name and
    /// metadata.uid): attempts' pods are its dependents, deleted with it,
    /// and swept by it when it restarts.
    #[arg(long, env = "OMOI_AGENT_POD_OWNER_NAME")]
    pub agent_pod_owner_name: Option<String>,
    #[arg(long, env = "OMOI_AGENT_POD_OWNER_UID")]
    pub agent_pod_owner_uid: Option<String>,

    /// The address attempts' pods reach this executor's proxies at (its
    /// pod's IP: the downward API's status.podIP).
    #[arg(long, env = "OMOI_AGENT_POD_PROXY_HOST")]
    pub agent_pod_proxy_host: Option<String>,

    /// Where this executor listens for its attempts' pods (both proxies,
    /// each connection naming its attempt's proxy by a token).
    #[arg(long, env = "OMOI_AGENT_POD_PROXY_ADDR", default_value = "0.0.0.0:13130")]
    pub agent_pod_proxy_addr: std::net::SocketAddr,

    /// The pods' RuntimeClass (gVisor, Kata); empty = the cluster's default.
    #[arg(long, env = "OMOI_AGENT_POD_RUNTIME_CLASS", default_value = "")]
    pub agent_pod_runtime_class: String,

    /// The pods' service account (its token is never mounted); empty = the
    /// namespace's default.
    #[arg(long, env = "OMOI_AGENT_POD_SERVICE_ACCOUNT", default_value = "")]
    pub agent_pod_service_account: String,

    /// The agent container's resources, as JSON (`{"requests": {...},
    /// "limits": {...}}`); empty = none set.
    #[arg(long, env = "OMOI_AGENT_POD_RESOURCES", default_value = "")]
    pub agent_pod_resources: String,

    /// Labels (comma list of key=value) every attempt's pod carries besides
    /// omoi's own: what the chart's NetworkPolicy selects them by.
    #[arg(long, env = "OMOI_AGENT_POD_LABELS", default_value = "")]
    pub agent_pod_labels: String,

    /// Seconds a pod may take to start (scheduling, image pull) before the
    /// attempt fails, retryably.
    #[arg(long, env = "OMOI_AGENT_POD_START_SECONDS", default_value_t = 300)]
    pub agent_pod_start_seconds: u64,

    /// The Kubernetes API; default the in-cluster one
    /// (`https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`).
    #[arg(long, env = "OMOI_AGENT_POD_API")]
    pub agent_pod_api: Option<String>,

    /// The bearer token and CA the API is called with (the service
    /// account's).
    #[arg(
        long,
        env = "OMOI_AGENT_POD_API_TOKEN_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub agent_pod_api_token_file: PathBuf,
    #[arg(
        long,
        env = "OMOI_AGENT_POD_API_CA_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    )]
    pub agent_pod_api_ca_file: PathBuf,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "omoi-executor",
    version,
    about = "omoi's executor: runs assigned tasks in isolated workspaces"
)]
pub struct Config {
    #[command(flatten)]
    pub host: HostArgs,

    #[command(flatten)]
    pub bus: BusArgs,

    /// Address the gRPC server listens on.
    #[arg(long, env = "OMOI_LISTEN_ADDR", default_value = "0.0.0.0:50054", value_parser = parse_listen)]
    pub listen_addr: SocketAddr,

    #[arg(long, env = "OMOI_TASK_QUEUE_URL", default_value = "http://127.0.0.1:50052")]
    pub task_queue_url: String,

    #[arg(long, env = "OMOI_HEALTH_URL", default_value = "http://127.0.0.1:50053")]
    pub health_url: String,

    #[arg(long, env = "OMOI_TICKET_URL", default_value = "http://127.0.0.1:50051")]
    pub ticket_url: String,

    /// Which runner works the tasks.
    #[arg(long, env = "OMOI_RUNNER", value_enum, default_value_t = RunnerKind::Command)]
    pub runner: RunnerKind,

    /// Program and arguments of the command runner, split like a shell and
    /// templated with {prompt} {workspace} {task_id} {phase}.
    #[arg(long, env = "OMOI_RUNNER_COMMAND")]
    pub runner_command: Option<String>,

    /// Directory holding one workspace per task attempt.
    #[arg(long, env = "OMOI_WORKSPACE_ROOT", default_value = "/tmp/omoi/workspaces")]
    pub workspace_root: PathBuf,

    #[arg(long, env = "OMOI_WORKSPACE_POLICY", value_enum, default_value_t = WorkspacePolicy::Keep)]
    pub workspace_policy: WorkspacePolicy,

    /// The guardian (see README): the same call or error this many times
    /// is a loop.
    #[arg(long, env = "OMOI_GUARDIAN_REPEAT_THRESHOLD")]
    pub guardian_repeat_threshold: Option<String>,
    /// Seconds without a file written or a new command while tokens flow (0: off).
    #[arg(long, env = "OMOI_GUARDIAN_STALL_SECONDS")]
    pub guardian_stall_seconds: Option<String>,
    /// Dollars a minute an attempt may spend (0: off).
    #[arg(long, env = "OMOI_GUARDIAN_SPEND_PER_MINUTE_USD")]
    pub guardian_spend_per_minute_usd: Option<String>,
    /// Turns of one attempt (0: off).
    #[arg(long, env = "OMOI_GUARDIAN_MAX_TURNS")]
    pub guardian_max_turns: Option<String>,
    /// Share of what the ticket may still spend one attempt may use (0: off).
    #[arg(long, env = "OMOI_GUARDIAN_BUDGET_SHARE")]
    pub guardian_budget_share: Option<String>,
    /// Nudges before a loop or a stall stops the attempt.
    #[arg(long, env = "OMOI_GUARDIAN_NUDGES")]
    pub guardian_nudges: Option<String>,
    /// Seconds between the reviewer's looks at a running attempt (0: no
    /// reviewer): this executor's agent, shown the task and the attempt's
    /// recent events, says whether it progresses and what to tell it.
    #[arg(long, env = "OMOI_GUARDIAN_REVIEW_SECONDS")]
    pub guardian_review_seconds: Option<String>,

    /// Work trees of tickets' attempts kept for their tickets' next
    /// attempts on this executor, which bring them to their base instead
    /// of checking out every file again; 0: none.
    #[arg(long, env = "OMOI_WORKSPACE_REUSE_SLOTS", default_value_t = 8)]
    pub workspace_reuse_slots: usize,

    /// Runs at once.
    #[arg(long, env = "OMOI_EXECUTOR_CAPACITY", default_value_t = 1)]
    pub capacity: i32,

    /// Phases this executor takes (comma list of INITIAL, IMPLEMENTATION,
    /// INTEGRATION, REFACTORING); empty = all.
    #[arg(long, env = "OMOI_AGENT_PHASES", default_value = "")]
    pub phases: String,

    /// The agent's identity, kept across restarts: a UUID, or any other
    /// name (e.g. the pod's) from which one is derived. Unique per running
    /// executor. Unset: a new identity each start.
    #[arg(long, env = "OMOI_AGENT_ID")]
    pub agent_id: Option<String>,

    #[arg(long, env = "OMOI_AGENT_TYPE", default_value = "executor")]
    pub agent_type: String,

    /// Labels of the agent, `key=value` comma list.
    #[arg(long, env = "OMOI_AGENT_LABELS", default_value = "")]
    pub labels: String,

    /// The unprivileged user (name or uid) agent processes run as, so that
    /// they cannot read the executor's secrets; needs the executor to run as
    /// root. Unset: the executor's own user.
    #[arg(long, env = "OMOI_AGENT_USER")]
    pub agent_user: Option<String>,

    /// Environment variables the agent process may see (comma list); the
    /// executor's own secrets stay out.
    #[arg(
        long,
        env = "OMOI_RUNNER_ENV_ALLOW",
        default_value = "PATH,HOME,LANG,LC_ALL,TZ,TMPDIR,USER"
    )]
    pub env_allow: String,

    /// Most a ticket's check command may run (seconds) before it is killed
    /// and counts as failed.
    #[arg(long, env = "OMOI_CHECK_TIMEOUT_SECONDS", default_value_t = 900)]
    pub check_timeout_seconds: u64,

    /// Seconds between SIGTERM and SIGKILL when a run is stopped.
    #[arg(long, env = "OMOI_KILL_GRACE_SECONDS", default_value_t = 5.0)]
    pub kill_grace_seconds: f64,

    /// The coding-agent CLI (claude-code, codex, gemini runners); default
    /// `claude`, `codex` or `gemini` on PATH.
    #[arg(long, env = "OMOI_AGENT_BIN")]
    pub agent_bin: Option<String>,

    /// The model the coding agent uses; its own default when unset.
    #[arg(long, env = "OMOI_AGENT_MODEL")]
    pub agent_model: Option<String>,

    /// Arguments appended to the coding agent's command line (split like a
    /// shell).
    #[arg(long, env = "OMOI_AGENT_ARGS", default_value = "")]
    pub agent_args: String,

    /// Claude Code's API key (from a secret; only the claude-code agent
    /// sees it, never logged).
    #[arg(long, env = "ANTHROPIC_API_KEY", hide_env_values = true)]
    pub anthropic_api_key: Option<String>,

    /// A file holding ANTHROPIC_API_KEY, read instead of it (the secret stays out of
    /// the executor's environment). Parsed, the field holds the content.
    #[arg(long, env = "ANTHROPIC_API_KEY_FILE", value_parser = secret_file, hide_env_values = true)]
    pub anthropic_api_key_file: Option<String>,

    /// Claude Code's model API address, when not Anthropic's.
    #[arg(long, env = "ANTHROPIC_BASE_URL")]
    pub anthropic_base_url: Option<String>,

    /// Codex's API key (from a secret; only the codex agent sees it).
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub openai_api_key: Option<String>,

    /// A file holding OPENAI_API_KEY, read instead of it (the secret stays out of
    /// the executor's environment). Parsed, the field holds the content.
    #[arg(long, env = "OPENAI_API_KEY_FILE", value_parser = secret_file, hide_env_values = true)]
    pub openai_api_key_file: Option<String>,

    /// Codex's Responses API address, when not OpenAI's (configured as a
    /// model provider of its own).
    #[arg(long, env = "OPENAI_BASE_URL")]
    pub openai_base_url: Option<String>,

    /// Gemini CLI's API key (from a secret; only the gemini agent sees it).
    #[arg(long, env = "GEMINI_API_KEY", hide_env_values = true)]
    pub gemini_api_key: Option<String>,

    /// A file holding GEMINI_API_KEY, read instead of it (the secret stays out of
    /// the executor's environment). Parsed, the field holds the content.
    #[arg(long, env = "GEMINI_API_KEY_FILE", value_parser = secret_file, hide_env_values = true)]
    pub gemini_api_key_file: Option<String>,

    /// Gemini CLI's model API address, when not Google's.
    #[arg(long, env = "GOOGLE_GEMINI_BASE_URL")]
    pub google_gemini_base_url: Option<String>,

    /// Prices (USD per million tokens) to add to or override the built-in
    /// table that estimates the cost of agents that report no money.
    #[arg(long, env = "OMOI_PRICE_TABLE_FILE")]
    pub price_table_file: Option<PathBuf>,

    /// Author (and committer) of the commits a task's work lands as.
    #[arg(long, env = "OMOI_GIT_AUTHOR_NAME", default_value = "omoi")]
    pub git_author_name: String,

    #[arg(long, env = "OMOI_GIT_AUTHOR_EMAIL", default_value = "omoi@localhost")]
    pub git_author_email: String,

    /// HTTPS token for tickets' repositories (from a secret): given to git
    /// alone, through a credential helper, never to the agent or a workspace.
    #[arg(long, env = "OMOI_GIT_TOKEN", hide_env_values = true)]
    pub git_token: Option<String>,

    /// A file holding OMOI_GIT_TOKEN, read instead of it (the secret stays out of
    /// the executor's environment). Parsed, the field holds the content.
    #[arg(long, env = "OMOI_GIT_TOKEN_FILE", value_parser = secret_file, hide_env_values = true)]
    pub git_token_file: Option<String>,

    /// The user name that goes with OMOI_GIT_TOKEN (GitHub accepts any).
    #[arg(long, env = "OMOI_GIT_USERNAME", default_value = "x-access-token")]
    pub git_username: String,

    /// SSH private key for tickets' `ssh://` repositories (git alone uses it).
    #[arg(long, env = "OMOI_GIT_SSH_KEY_FILE")]
    pub git_ssh_key_file: Option<PathBuf>,

    /// Where the executor keeps one mirror of each repository its tasks
    /// work on (fetched, not cloned, per attempt); unset: `.git-cache`
    /// under OMOI_WORKSPACE_ROOT.
    #[arg(long, env = "OMOI_GIT_CACHE_DIR")]
    pub git_cache_dir: Option<PathBuf>,

    /// Most bytes the git cache may hold: beyond it, the least recently
    /// used mirrors no attempt uses are removed (0: no bound).
    #[arg(long, env = "OMOI_GIT_CACHE_MAX_BYTES", default_value_t = 10 * 1024 * 1024 * 1024)]
    pub git_cache_max_bytes: u64,

    /// OpenHands agent server (openhands runner).
    #[arg(long, env = "OPENHANDS_URL", default_value = "http://127.0.0.1:8000")]
    pub openhands_url: String,

    /// Session API key of the OpenHands server, when it has one.
    #[arg(long, env = "OPENHANDS_API_KEY", hide_env_values = true)]
    pub openhands_api_key: Option<String>,

    /// A file holding OPENHANDS_API_KEY, read instead of it (the secret stays out of
    /// the executor's environment). Parsed, the field holds the content.
    #[arg(long, env = "OPENHANDS_API_KEY_FILE", value_parser = secret_file, hide_env_values = true)]
    pub openhands_api_key_file: Option<String>,

    /// How often a running conversation is polled, in milliseconds.
    #[arg(long, env = "OPENHANDS_POLL_MS", default_value_t = 1000)]
    pub openhands_poll_ms: u64,

    /// The model the OpenHands agent uses.
    #[arg(long, env = "LLM_MODEL", default_value = "openhands/claude-sonnet-4-5-20250929")]
    pub llm_model: String,

    /// The model's API key (from a secret; never logged).
    #[arg(long, env = "LLM_API_KEY", hide_env_values = true)]
    pub llm_api_key: Option<String>,

    /// A file holding LLM_API_KEY, read instead of it (the secret stays out of
    /// the executor's environment). Parsed, the field holds the content.
    #[arg(long, env = "LLM_API_KEY_FILE", value_parser = secret_file, hide_env_values = true)]
    pub llm_api_key_file: Option<String>,

    /// Seconds between two checkpoints of a running agent (its session's
    /// files and the workspace's work so far); one more is stored when it
    /// ends. 0: only at the end.
    #[arg(long, env = "OMOI_CHECKPOINT_SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub checkpoint_seconds: u64,

    /// The JetStream Object Store bucket holding the checkpoints.
    #[arg(long, env = "OMOI_SESSIONS_BUCKET", default_value = "OMOI_SESSIONS")]
    pub sessions_bucket: String,

    /// Seconds a checkpoint is kept (the bucket's age limit, set when the
    /// executor creates it); as long as tasks are kept by default.
    #[arg(long, env = "OMOI_SESSION_RETENTION_SECONDS", default_value_t = 604_800, value_parser = clap::value_parser!(u64).range(60..))]
    pub session_retention_seconds: u64,

    /// Whether each agent run is sandboxed (bubblewrap: its own network,
    /// PID and mount namespaces, a filesystem view of its workspace, its
    /// home and the read-only system; the network only through the
    /// executor's egress and model proxies). `auto`: where the kernel
    /// allows it, else without, said loudly at start; `on`: refuse to start
    /// without; `off`: never; `pod`: each attempt in a Kubernetes pod of
    /// its own (`OMOI_AGENT_POD_*`).
    #[arg(long, env = "OMOI_AGENT_SANDBOX", value_enum, default_value_t = SandboxMode::Auto)]
    pub sandbox: SandboxMode,

    #[command(flatten)]
    pub pod: PodArgs,

    /// The bubblewrap program.
    #[arg(long, env = "OMOI_AGENT_SANDBOX_BWRAP", default_value = "bwrap")]
    pub sandbox_bwrap: String,

    /// The program that starts an agent inside its sandbox (run as
    /// `<program> --sandbox-init`): this executor's own binary unless set,
    /// for an executor embedded in another program.
    #[arg(long, env = "OMOI_AGENT_SANDBOX_INIT")]
    pub sandbox_init: Option<PathBuf>,

    /// Paths (comma list) a sandboxed agent may read besides the system,
    /// its program and the directories on its PATH.
    #[arg(long, env = "OMOI_AGENT_SANDBOX_READ_ONLY", default_value = "")]
    pub sandbox_read_only: String,

    /// Hosts a sandboxed agent may reach through the egress proxy (comma
    /// list of `host`, `host:port`, `*.domain`, `*.domain:port`): the
    /// package registries, the forge, whatever the operator allows. The
    /// model API is reached through the model proxy, not this list.
    #[arg(long, env = "OMOI_AGENT_ALLOWED_HOSTS", default_value = "")]
    pub agent_allowed_hosts: String,

    /// Addresses (`host:port` or URLs, comma list) of the mesh no agent may reach
    /// whatever the allow-list says, besides those this executor knows
    /// (NATS, the services, its own): PostgreSQL, and anything else.
    #[arg(long, env = "OMOI_AGENT_DENIED_ADDRS", default_value = "")]
    pub agent_denied_addrs: String,

    /// The largest checkpoint stored, compressed (a bigger one is skipped
    /// with a warning: the attempt goes on).
    #[arg(long, env = "OMOI_CHECKPOINT_MAX_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub checkpoint_max_bytes: u64,
}

impl Config {
    /// The guardian's thresholds: the defaults, with what `OMOI_GUARDIAN_*`
    /// set; refused naming the setting out of range.
    pub fn guardian(&self) -> anyhow::Result<omoi_domain::guardian::Thresholds> {
        let given = |name: &str| match name {
            "OMOI_GUARDIAN_REPEAT_THRESHOLD" => self.guardian_repeat_threshold.clone(),
            "OMOI_GUARDIAN_STALL_SECONDS" => self.guardian_stall_seconds.clone(),
            "OMOI_GUARDIAN_SPEND_PER_MINUTE_USD" => self.guardian_spend_per_minute_usd.clone(),
            "OMOI_GUARDIAN_MAX_TURNS" => self.guardian_max_turns.clone(),
            "OMOI_GUARDIAN_BUDGET_SHARE" => self.guardian_budget_share.clone(),
            "OMOI_GUARDIAN_NUDGES" => self.guardian_nudges.clone(),
            "OMOI_GUARDIAN_REVIEW_SECONDS" => self.guardian_review_seconds.clone(),
            _ => None,
        };
        Ok(omoi_domain::guardian::Thresholds::from_settings(given)?)
    }

    pub fn from_env() -> Self {
        Config::parse_from(["omoi-executor"])
    }

    /// The executor's own directory beside the workspaces, which are
    /// `<root>/<task id>/<attempt>`.
    pub fn state_dir(&self) -> PathBuf {
        self.workspace_root.join(".omoi")
    }

    /// The git cache's directory (OMOI_GIT_CACHE_DIR, or its default).
    pub fn git_cache_dir(&self) -> PathBuf {
        self.git_cache_dir
            .clone()
            .unwrap_or_else(|| self.workspace_root.join(".git-cache"))
    }

    /// The agent id `OMOI_AGENT_ID` gives: itself when a UUID, else derived
    /// from the name (the same name, the same id); a new one when unset.
    pub fn agent_id(&self) -> Uuid {
        /// The namespace of names-turned-agent-ids.
        const AGENT_NAMES: Uuid = Uuid::from_u128(0x6f6d_6f69_6167_656e_7400_0000_0000_0001);
        match self.agent_id.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            None => Uuid::now_v7(),
            Some(s) => s.parse().unwrap_or_else(|_| Uuid::new_v5(&AGENT_NAMES, s.as_bytes())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_id_is_given_derived_from_a_name_or_new() {
        let with = |id: Option<&str>| Config {
            agent_id: id.map(str::to_owned),
            ..Config::from_env()
        };
        let given = "01a2122c-5a88-73bc-993d-dc045b7a7905";
        assert_eq!(with(Some(given)).agent_id().to_string(), given);
        let pod = with(Some("omoi-executor-7d9f8-abcde")).agent_id();
        assert_eq!(pod, with(Some("omoi-executor-7d9f8-abcde")).agent_id());
        assert_ne!(pod, with(Some("omoi-executor-7d9f8-zzzzz")).agent_id());
        assert_ne!(with(None).agent_id(), with(None).agent_id());
    }
}
