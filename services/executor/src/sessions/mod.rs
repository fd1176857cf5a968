//! Agent sessions that outlive their executor: checkpoints (the agent's
//! session files and the workspace's work so far, see [`archive`]) kept in
//! a JetStream Object Store bucket (`OMOI_SESSIONS`), which every executor
//! of the mesh reaches, so that the next attempt of a task, or a follow-up,
//! resumes the conversation wherever it runs.

pub mod archive;

use std::time::Duration;

use async_nats::jetstream::{self, object_store};
use tokio::io::AsyncReadExt;

use crate::config::Config;
use archive::{CorruptCheckpoint, Redactor};
use omoi_runtime::config::secret;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("checkpoint store {bucket}: {message}")]
    Store { bucket: String, message: String },
    #[error("no checkpoint {0} in the store (expired or never stored)")]
    Missing(String),
    #[error(transparent)]
    Corrupt(#[from] CorruptCheckpoint),
    #[error("checkpoint of {bytes} bytes is over OMOI_CHECKPOINT_MAX_BYTES ({max})")]
    TooLarge { bytes: u64, max: u64 },
}

/// The checkpoint store.
pub struct Sessions {
    js: jetstream::Context,
    bucket_name: String,
    retention: Duration,
    max_bytes: u64,
    bucket: tokio::sync::Mutex<Option<object_store::ObjectStore>>,
    pub redactor: Redactor,
}

/// How long one store operation may take before it counts as failed (the
/// attempt goes on without it).
const STORE_WITHIN: Duration = Duration::from_secs(60);

impl Sessions {
    pub fn new(nats: async_nats::Client, config: &Config) -> Self {
        let secrets = [
            secret(&config.anthropic_api_key, &config.anthropic_api_key_file),
            secret(&config.openai_api_key, &config.openai_api_key_file),
            secret(&config.gemini_api_key, &config.gemini_api_key_file),
            secret(&config.llm_api_key, &config.llm_api_key_file),
            secret(&config.openhands_api_key, &config.openhands_api_key_file),
            secret(&config.git_token, &config.git_token_file),
            config.host.auth_token(),
        ];
        Self {
            js: jetstream::new(nats),
            bucket_name: config.sessions_bucket.clone(),
            retention: Duration::from_secs(config.session_retention_seconds),
            max_bytes: config.checkpoint_max_bytes,
            bucket: tokio::sync::Mutex::new(None),
            redactor: Redactor::new(secrets.into_iter().flatten()),
        }
    }

    fn failed(&self, message: impl std::fmt::Display) -> SessionError {
        SessionError::Store {
            bucket: self.bucket_name.clone(),
            message: message.to_string(),
        }
    }

    /// The bucket, created (with the retention as its age limit) by the
    /// first executor that needs it.
    async fn bucket(&self) -> Result<object_store::ObjectStore, SessionError> {
        let mut held = self.bucket.lock().await;
        if let Some(b) = held.as_ref() {
            return Ok(b.clone());
        }
        let bucket = match self.js.get_object_store(&self.bucket_name).await {
            Ok(b) => b,
            Err(e) if e.kind() == jetstream::context::ObjectStoreErrorKind::GetStore => self
                .js
                .create_object_store(object_store::Config {
                    bucket: self.bucket_name.clone(),
                    description: Some("omoi: agent session checkpoints".into()),
                    max_age: self.retention,
                    ..Default::default()
                })
                .await
                .map_err(|e| self.failed(e))?,
            Err(e) => return Err(self.failed(e)),
        };
        *held = Some(bucket.clone());
        Ok(bucket)
    }

    /// Stores `data` as `name` (replacing an earlier one); its size.
    pub async fn put(&self, name: &str, data: Vec<u8>) -> Result<u64, SessionError> {
        let bytes = data.len() as u64;
        if bytes > self.max_bytes {
            return Err(SessionError::TooLarge {
                bytes,
                max: self.max_bytes,
            });
        }
        let stored = tokio::time::timeout(STORE_WITHIN, async {
            let bucket = self.bucket().await?;
            bucket.put(name, &mut data.as_slice()).await.map_err(|e| self.failed(e))
        })
        .await
        .map_err(|_| self.failed("timed out"))??;
        Ok(stored.size as u64)
    }

    /// The checkpoint stored as `name`.
    pub async fn get(&self, name: &str) -> Result<Vec<u8>, SessionError> {
        tokio::time::timeout(STORE_WITHIN, async {
            let bucket = self.bucket().await?;
            let mut object = match bucket.get(name).await {
                Ok(o) => o,
                Err(e) if e.kind() == object_store::GetErrorKind::NotFound => {
                    return Err(SessionError::Missing(name.to_owned()));
                }
                Err(e) => return Err(self.failed(e)),
            };
            let mut data = Vec::new();
            // A digest that does not match is an error of the read.
            object.read_to_end(&mut data).await.map_err(|e| {
                SessionError::Corrupt(CorruptCheckpoint::Io(std::io::Error::other(format!("{name}: {e}"))))
            })?;
            Ok(data)
        })
        .await
        .map_err(|_| self.failed("timed out"))?
    }
}
