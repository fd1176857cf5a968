//! omoi's event bus on NATS JetStream: where it is and how it is laid out
//! (settings, subjects, the events and output streams) and the durable
//! consumers services react to each other's events through. The relay that
//! fills the events stream from the PostgreSQL outbox is `omoi-base`'s.

pub mod auth;
pub mod consumer;

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use omoi_domain::{Entity, EventType};
use omoi_runtime::config::secret_file;

/// Where a process finds NATS and how omoi's subjects and streams are
/// named there; every binary that talks to NATS flattens it into its own
/// configuration.
#[derive(Debug, Clone, clap::Args)]
pub struct BusArgs {
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

    /// A NATS credentials file (a user JWT and its nkey seed, as `nsc`
    /// writes them) to connect with, for servers in operator (JWT) mode;
    /// else the URL's user:password or token, if any.
    #[arg(long, env = "NATS_CREDS_FILE")]
    pub nats_creds_file: Option<std::path::PathBuf>,

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
}

impl BusArgs {
    pub fn nats_url(&self) -> &str {
        self.nats_url_file.as_deref().unwrap_or(&self.nats_url)
    }

    /// Where this process's events and output go on NATS.
    pub fn topology(&self) -> Topology {
        Topology {
            prefix: self.subject_prefix.clone(),
            stream: self.events_stream.clone(),
            events_max_age: Duration::from_secs(self.events_max_age_seconds),
            output_max_age: Duration::from_secs(self.output_max_age_seconds),
        }
    }

    /// Connects to NATS as `name` (see [`connect`]).
    pub async fn connect(&self, name: &str) -> Result<async_nats::Client, BusError> {
        connect_with(self.nats_url(), self.nats_creds_file.as_deref(), name).await
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot reach NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("JetStream stream {stream}: {message}")]
    Stream { stream: String, message: String },
    #[error("NATS_CREDS_FILE {path}: {source}")]
    Credentials {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("publishing failed: {0}")]
    Publish(String),
}

/// Where omoi's messages go. Tests give each run its own prefix and stream,
/// so runs sharing one NATS server never see each other's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Subject prefix, `omoi` by default: events go under `<prefix>.events.>`,
    /// replica-to-replica control messages under `<prefix>.control.>`.
    pub prefix: String,
    /// The JetStream stream holding the events, `OMOI_EVENTS` by default.
    pub stream: String,
    /// How long the events stream keeps an event (7 days by default).
    pub events_max_age: Duration,
    /// How long the output stream keeps an agent's output line (a day).
    pub output_max_age: Duration,
}

/// How long the events stream keeps events unless told otherwise.
pub const EVENTS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long the output stream keeps agents' output unless told otherwise.
pub const OUTPUT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

impl Default for Topology {
    fn default() -> Self {
        Self {
            prefix: "omoi".to_owned(),
            stream: "OMOI_EVENTS".to_owned(),
            events_max_age: EVENTS_MAX_AGE,
            output_max_age: OUTPUT_MAX_AGE,
        }
    }
}

impl Topology {
    /// `<prefix>.events.<entity_type>.<event_type lowercased>.<ticket_id or "none">`.
    pub fn event_subject(&self, entity_type: &str, event_type: &str, ticket_id: Option<&str>) -> String {
        format!(
            "{}.events.{}.{}.{}",
            self.prefix,
            entity_type,
            event_type.to_ascii_lowercase(),
            ticket_id.unwrap_or("none")
        )
    }

    /// Every event of one type.
    pub fn event_filter(&self, event_type: EventType) -> String {
        format!(
            "{}.events.{}.{}.>",
            self.prefix,
            event_type.entity().as_str(),
            event_type.as_str().to_ascii_lowercase()
        )
    }

    /// Every event about one kind of entity.
    pub fn entity_filter(&self, entity: Entity) -> String {
        format!("{}.events.{}.>", self.prefix, entity.as_str())
    }

    /// Every event about one ticket (the ticket's own and its tasks').
    pub fn ticket_filter(&self, ticket_id: &str) -> String {
        format!("{}.events.*.*.{}", self.prefix, ticket_id)
    }

    /// The stream holding agents' output lines.
    pub fn output_stream(&self) -> String {
        format!("{}_OUTPUT", self.stream)
    }

    /// Output lines of one task.
    pub fn output_subject(&self, task_id: &str) -> String {
        format!("{}.output.{task_id}", self.prefix)
    }

    /// Every event subject.
    pub fn events_wildcard(&self) -> String {
        format!("{}.events.>", self.prefix)
    }

    /// A core-NATS subject for control messages between replicas.
    pub fn control_subject(&self, name: &str) -> String {
        format!("{}.control.{name}", self.prefix)
    }
}

/// Connects to NATS; the client reconnects by itself for as long as the
/// process lives, and buffers publications meanwhile.
pub async fn connect(url: &str, name: &str) -> Result<async_nats::Client, BusError> {
    connect_with(url, None, name).await
}

/// [`connect`] with the credentials file `creds` (see
/// `BusArgs::nats_creds_file`) when one is given.
pub async fn connect_with(
    url: &str,
    creds: Option<&std::path::Path>,
    name: &str,
) -> Result<async_nats::Client, BusError> {
    // The URL's credentials, which the client library leaves to us.
    let options = match (creds, auth::credentials(url)) {
        (Some(path), _) => async_nats::ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|source| BusError::Credentials {
                path: path.display().to_string(),
                source,
            })?,
        (None, Some((user, Some(password)))) => async_nats::ConnectOptions::with_user_and_password(user, password),
        (None, Some((token, None))) => async_nats::ConnectOptions::with_token(token),
        (None, None) => async_nats::ConnectOptions::new(),
    };
    options
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .map_err(|source| BusError::Connect {
            url: auth::redacted(url),
            source,
        })
}

/// Creates the events stream if it does not exist, and gives an existing
/// one the configured retention. The duplicate window is what turns the
/// relay's at-least-once publishing into exactly-once storage.
pub async fn ensure_stream(js: &jetstream::Context, topology: &Topology) -> Result<stream::Stream, BusError> {
    let config = stream::Config {
        name: topology.stream.clone(),
        subjects: vec![topology.events_wildcard()],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        max_age: topology.events_max_age,
        ..Default::default()
    };
    keep_for(js, config).await
}

/// Gets or creates a stream; one whose `max_age` differs from `config`'s
/// (the retention was changed) is updated to it.
async fn keep_for(js: &jetstream::Context, config: stream::Config) -> Result<stream::Stream, BusError> {
    let failed = |name: &str, e: &dyn std::fmt::Display| BusError::Stream {
        stream: name.to_owned(),
        message: e.to_string(),
    };
    let name = config.name.clone();
    let max_age = config.max_age;
    let stream = js.get_or_create_stream(config).await.map_err(|e| failed(&name, &e))?;
    let current = stream.cached_info().config.clone();
    if current.max_age == max_age {
        return Ok(stream);
    }
    tracing::info!(stream = %name, from = ?current.max_age, to = ?max_age, "changing the stream's retention");
    js.update_stream(stream::Config { max_age, ..current })
        .await
        .map_err(|e| failed(&name, &e))?;
    js.get_stream(&name).await.map_err(|e| failed(&name, &e))
}

/// Reads the events stream's `filter` subjects from `deliver` on, in order
/// and without acknowledgements (a watcher's view; an ordered consumer
/// recreates itself after a hiccup from where it was). Gives up after 10 s.
pub async fn read_events(
    js: &jetstream::Context,
    topology: &Topology,
    filter: String,
    deliver: jetstream::consumer::DeliverPolicy,
) -> Result<jetstream::consumer::pull::Ordered, String> {
    let opened = async {
        let stream = ensure_stream(js, topology).await.map_err(|e| e.to_string())?;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter,
                deliver_policy: deliver,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        consumer.messages().await.map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(10), opened).await {
        Ok(opened) => opened,
        Err(_) => Err("timed out".to_owned()),
    }
}

/// Creates the output stream if it does not exist: `output_max_age` (a day)
/// of lines, at most 10,000 per task, so a chatty agent cannot fill the
/// server.
pub async fn ensure_output_stream(js: &jetstream::Context, topology: &Topology) -> Result<stream::Stream, BusError> {
    let config = stream::Config {
        name: topology.output_stream(),
        subjects: vec![format!("{}.output.>", topology.prefix)],
        storage: stream::StorageType::File,
        max_age: topology.output_max_age,
        max_messages_per_subject: 10_000,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    };
    keep_for(js, config).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_filter_by_entity_event_and_ticket() {
        let t = Topology::default();
        assert_eq!(
            t.event_subject("task", "TASK_COMPLETED", Some("0190f1c2-aaaa-7bbb-8ccc-000000000001")),
            "omoi.events.task.task_completed.0190f1c2-aaaa-7bbb-8ccc-000000000001"
        );
        assert_eq!(
            t.event_subject("agent", "AGENT_STALE", None),
            "omoi.events.agent.agent_stale.none"
        );
        assert_eq!(t.events_wildcard(), "omoi.events.>");
        assert_eq!(t.event_filter(EventType::AgentStale), "omoi.events.agent.agent_stale.>");
        assert_eq!(t.entity_filter(Entity::Task), "omoi.events.task.>");
        assert_eq!(t.control_subject("wake"), "omoi.control.wake");
    }

    #[tokio::test]
    async fn a_credentials_file_that_cannot_be_read_is_named() {
        let err = connect_with(
            "nats://127.0.0.1:4222",
            Some(std::path::Path::new("/nonexistent/omoi.creds")),
            "t",
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, BusError::Credentials { .. })
                && err.to_string().starts_with("NATS_CREDS_FILE /nonexistent/omoi.creds: "),
            "{err}"
        );
        let garbage = std::env::temp_dir().join(format!("omoi-{}.creds", uuid::Uuid::new_v4().simple()));
        std::fs::write(&garbage, "not a credentials file").unwrap();
        let err = connect_with("nats://127.0.0.1:4222", Some(&garbage), "t")
            .await
            .unwrap_err();
        assert!(matches!(err, BusError::Credentials { .. }), "{err}");
        let _ = std::fs::remove_file(garbage);
    }
}
