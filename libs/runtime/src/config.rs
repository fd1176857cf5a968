//! Settings every service shares; each binary flattens these into its own
//! clap configuration, so one `--help` lists them all with their variables.

use std::net::SocketAddr;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for pods).
    Json,
}

#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// PostgreSQL URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/omoi"
    )]
    pub database_url: String,

    /// A file holding the PostgreSQL URL, read instead of DATABASE_URL (so
    /// that the secret is not in the process's environment). Parsed, the
    /// field holds the file's content.
    #[arg(long, env = "DATABASE_URL_FILE", value_parser = secret_file, hide_env_values = true)]
    pub database_url_file: Option<String>,

    /// NATS URL (JetStream enabled).
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        hide_env_values = true
    )]
    pub nats_url: String,

    /// A file holding the NATS URL, read instead of NATS_URL.
    #[arg(long, env = "NATS_URL_FILE", value_parser = secret_file, hide_env_values = true)]
    pub nats_url_file: Option<String>,

    /// Bearer token required on every RPC but health and reflection; unset = no auth.
    #[arg(long, env = "OMOI_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,

    /// A file holding the bearer token, read instead of OMOI_AUTH_TOKEN.
    #[arg(long, env = "OMOI_AUTH_TOKEN_FILE", value_parser = secret_file, hide_env_values = true)]
    pub auth_token_file: Option<String>,

    /// Subject prefix of omoi's NATS messages.
    #[arg(long, env = "OMOI_SUBJECT_PREFIX", default_value = "omoi")]
    pub subject_prefix: String,

    /// JetStream stream holding the events.
    #[arg(long, env = "OMOI_EVENTS_STREAM", default_value = "OMOI_EVENTS")]
    pub events_stream: String,

    /// Seconds the events stream keeps an event (consumers' records of
    /// what they applied are kept a day longer).
    #[arg(long, env = "OMOI_EVENTS_MAX_AGE_SECONDS", default_value_t = 604_800, value_parser = clap::value_parser!(u64).range(60..))]
    pub events_max_age_seconds: u64,

    /// Seconds the output stream keeps agents' output lines.
    #[arg(long, env = "OMOI_OUTPUT_MAX_AGE_SECONDS", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(60..))]
    pub output_max_age_seconds: u64,

    /// Seconds between vacuums of the service's tables that nothing else
    /// vacuums (the server's or the table's autovacuum is off).
    #[arg(long, env = "OMOI_VACUUM_INTERVAL_SECONDS", default_value_t = 30.0)]
    pub vacuum_interval_seconds: f64,

    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env = "OMOI_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Requests one client connection may have in progress; more wait.
    #[arg(long, env = "OMOI_MAX_CONCURRENT_REQUESTS_PER_CONNECTION", default_value_t = 256)]
    pub max_concurrent_requests_per_connection: usize,

    /// Where to serve Prometheus metrics (`/metrics`), e.g. 0.0.0.0:9090; unset = off.
    #[arg(long, env = "OMOI_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,

    /// PEM CA certificates client certificates must chain to: set, the server
    /// requires one from every caller (mTLS). Needs OMOI_TLS_CERT.
    #[arg(long, env = "OMOI_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<std::path::PathBuf>,

    /// A plaintext address serving only grpc.health.v1, e.g. 0.0.0.0:8086,
    /// for probes that cannot speak TLS (the kubelet's); unset = none.
    #[arg(long, env = "OMOI_PROBE_ADDR")]
    pub probe_addr: Option<SocketAddr>,

    /// Log format.
    #[arg(long, env = "OMOI_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Seconds a stopping service waits for streams and in-flight work.
    #[arg(long, env = "OMOI_SHUTDOWN_GRACE_SECONDS", default_value_t = 20)]
    pub shutdown_grace_seconds: u64,
}

/// The secret in the file a `*_FILE` setting names, without its trailing
/// line break.
pub fn secret_file(path: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

/// A secret given by a file (preferred) or by value.
pub fn secret(value: &Option<String>, file: &Option<String>) -> Option<String> {
    file.clone().or_else(|| value.clone()).filter(|s| !s.is_empty())
}

/// A listen address flag with a per-service default.
pub fn parse_listen(value: &str) -> Result<SocketAddr, String> {
    value
        .parse()
        .map_err(|_| format!("{value:?} is not a socket address like 0.0.0.0:50052"))
}

/// What a service binary does; serving is the default.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Serve gRPC (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
}

impl CommonArgs {
    pub fn database_url(&self) -> &str {
        self.database_url_file.as_deref().unwrap_or(&self.database_url)
    }

    pub fn nats_url(&self) -> &str {
        self.nats_url_file.as_deref().unwrap_or(&self.nats_url)
    }

    pub fn auth_token(&self) -> Option<String> {
        secret(&self.auth_token, &self.auth_token_file)
    }

    /// How this process calls the other services.
    pub fn connector(&self) -> anyhow::Result<crate::grpc::Connector> {
        crate::grpc::Connector::new(self.auth_token().as_deref(), &self.tls)
    }

    /// Where this process's events and output go on NATS.
    pub fn topology(&self) -> omoi_bus::Topology {
        omoi_bus::Topology {
            prefix: self.subject_prefix.clone(),
            stream: self.events_stream.clone(),
            events_max_age: std::time::Duration::from_secs(self.events_max_age_seconds),
            output_max_age: std::time::Duration::from_secs(self.output_max_age_seconds),
        }
    }
}
