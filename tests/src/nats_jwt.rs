//! A NATS deployment in operator (JWT) mode, minted for a test: an
//! operator, one account with JetStream, and users with the permissions
//! asked for, each as a credentials file like `nsc` writes — what
//! `NATS_CREDS_FILE` is for.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nkeys::KeyPair;
use omoi_bus::auth::Permissions;
use serde_json::{Value, json};

/// The server's side (configuration to run nats-server with) and the
/// account that signs users.
pub struct Operator {
    /// The `operator`/`resolver` part of a nats-server configuration.
    pub server_config: String,
    account: KeyPair,
}

/// A signed JWT: header and claims (with `iat`, `iss`, `jti`) as NATS
/// expects them.
fn jwt(mut claims: Value, signer: &KeyPair) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    claims["iat"] = json!(now);
    claims["iss"] = json!(signer.public_key());
    claims["jti"] = json!(uuid::Uuid::new_v4().simple().to_string().to_uppercase());
    let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{header}.{body}");
    let signature = signer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}

impl Operator {
    pub fn new() -> Self {
        let operator = KeyPair::new_operator();
        let account = KeyPair::new_account();
        let operator_jwt = jwt(
            json!({"sub": operator.public_key(), "name": "omoi-test", "nats": {"type": "operator", "version": 2}}),
            &operator,
        );
        let unlimited = json!({
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true,
            "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
        });
        let account_jwt = jwt(
            json!({"sub": account.public_key(), "name": "OMOI", "nats": {"limits": unlimited, "type": "account", "version": 2}}),
            &operator,
        );
        // JetStream needs the server's own (system) account.
        let system = KeyPair::new_account();
        let system_jwt = jwt(
            json!({"sub": system.public_key(), "name": "SYS", "nats": {"type": "account", "version": 2}}),
            &operator,
        );
        let server_config = format!(
            "operator: {operator_jwt}\nsystem_account: {sys}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {sys}: {system_jwt}\n  {acc}: {account_jwt}\n}}\n",
            sys = system.public_key(),
            acc = account.public_key()
        );
        Self { server_config, account }
    }

    /// A user of the account named `name`, limited to `permissions` (None:
    /// anything), as a credentials file in `dir`.
    pub fn user(&self, dir: &Path, name: &str, permissions: Option<&Permissions>) -> PathBuf {
        let user = KeyPair::new_user();
        let mut nats = json!({"subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2});
        if let Some(p) = permissions {
            nats["pub"] = json!({"allow": p.publish_allow, "deny": p.publish_deny});
            nats["sub"] = json!({"allow": p.subscribe_allow});
        }
        let token = jwt(
            json!({"sub": user.public_key(), "name": name, "nats": nats}),
            &self.account,
        );
        let creds = format!(
            "-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        );
        let file = dir.join(format!("{name}.creds"));
        std::fs::write(&file, creds).unwrap();
        file
    }
}

impl Default for Operator {
    fn default() -> Self {
        Self::new()
    }
}
