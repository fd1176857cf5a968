//! The settings every serving process shares, and the helpers for reading
//! secrets and addresses from them.

use std::net::SocketAddr;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for pods).
    Json,
}

/// What every omoi process that serves gRPC shares: the API's limits,
/// auth, TLS, metrics, probes, logs and stop. Each binary flattens it into
/// its own clap configuration, so one `--help` lists it all with the
/// variables.
#[derive(Debug, Clone, clap::Args)]
pub struct HostArgs {
    /// Bearer token required on every RPC but health and reflection; unset = no auth.
    #[arg(long, env = "OMOI_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,

    /// A file holding the bearer token, read instead of OMOI_AUTH_TOKEN.
    #[arg(long, env = "OMOI_AUTH_TOKEN_FILE", value_parser = secret_file, hide_env_values = true)]
    pub auth_token_file: Option<String>,

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

impl HostArgs {
    pub fn auth_token(&self) -> Option<String> {
        secret(&self.auth_token, &self.auth_token_file)
    }

    /// How this process calls the other services.
    pub fn connector(&self) -> anyhow::Result<crate::grpc::Connector> {
        crate::grpc::Connector::new(self.auth_token().as_deref(), &self.tls)
    }
}

/// A URL with its password hidden, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..scheme + 3], &creds[..colon], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_hides_passwords_only() {
        assert_eq!(super::redact("postgres://u:pw@h/db"), "postgres://u:***@h/db");
        assert_eq!(super::redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(super::redact("nats://h:4222"), "nats://h:4222");
    }
}
