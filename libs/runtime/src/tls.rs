//! Optional TLS (rustls) for the mesh's gRPC: a process presents one
//! certificate, as a server and, when the peer asks for one, as a client;
//! it trusts servers chaining to `OMOI_TLS_CA` and, with
//! `OMOI_TLS_CLIENT_CA`, serves only clients whose certificate chains to it.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// TLS settings of a process that calls services (and of a server: the
/// certificate and key are the ones it serves with).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate chain this process presents: as a server (TLS on when
    /// set) and as a client to servers that require one (mTLS). With mTLS on
    /// both sides it must allow serverAuth and clientAuth.
    #[arg(long, env = "OMOI_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of OMOI_TLS_CERT.
    #[arg(long, env = "OMOI_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificates that servers reached over https:// must chain to;
    /// unset = the system's roots.
    #[arg(long, env = "OMOI_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

/// Why a TLS setting cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{var} {path}: {source}")]
    Read {
        var: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{var} {path} holds no PEM {what}")]
    NotPem {
        var: &'static str,
        path: String,
        what: &'static str,
    },
    #[error("{0} is set but OMOI_TLS_CERT and OMOI_TLS_KEY are not: a server needs its own certificate first")]
    NeedsIdentity(&'static str),
}

fn read_pem(var: &'static str, path: &Path, what: &'static str, marker: &str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        var,
        path: path.display().to_string(),
        source,
    })?;
    // tonic only finds out at the first handshake; say so at start instead.
    if !String::from_utf8_lossy(&bytes).contains(marker) {
        return Err(TlsError::NotPem {
            var,
            path: path.display().to_string(),
            what,
        });
    }
    Ok(bytes)
}

impl TlsArgs {
    fn identity(&self) -> Result<Option<Identity>, TlsError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(Identity::from_pem(
                read_pem("OMOI_TLS_CERT", cert, "certificate", "-----BEGIN CERTIFICATE-----")?,
                read_pem("OMOI_TLS_KEY", key, "private key", "PRIVATE KEY-----")?,
            ))),
            _ => Ok(None),
        }
    }

    /// How this process connects to https:// URLs: trusting OMOI_TLS_CA (or
    /// the system roots) and presenting its certificate when it has one.
    pub fn client(&self) -> Result<ClientTlsConfig, TlsError> {
        let mut config = ClientTlsConfig::new();
        config = match &self.tls_ca {
            Some(ca) => config.ca_certificate(Certificate::from_pem(read_pem(
                "OMOI_TLS_CA",
                ca,
                "certificate",
                "-----BEGIN CERTIFICATE-----",
            )?)),
            None => config.with_native_roots(),
        };
        if let Some(identity) = self.identity()? {
            config = config.identity(identity);
        }
        Ok(config)
    }

    /// The server side: None when no certificate is configured (plaintext),
    /// else TLS with it, requiring client certificates that chain to
    /// `client_ca` when that is set.
    pub fn server(&self, client_ca: Option<&Path>) -> Result<Option<ServerTlsConfig>, TlsError> {
        let Some(identity) = self.identity()? else {
            return match client_ca {
                Some(_) => Err(TlsError::NeedsIdentity("OMOI_TLS_CLIENT_CA")),
                None => Ok(None),
            };
        };
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = client_ca {
            config = config.client_ca_root(Certificate::from_pem(read_pem(
                "OMOI_TLS_CLIENT_CA",
                ca,
                "certificate",
                "-----BEGIN CERTIFICATE-----",
            )?));
        }
        Ok(Some(config))
    }
}

/// The subject's common name of a DER certificate (a verified client's:
/// who made a request), if it has one.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .trim()
        .to_owned();
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_unless_a_certificate_is_set() {
        assert!(TlsArgs::default().server(None).unwrap().is_none());
        let err = TlsArgs::default().server(Some(Path::new("/ca.pem"))).unwrap_err();
        assert!(err.to_string().contains("OMOI_TLS_CLIENT_CA"), "{err}");
    }

    #[test]
    fn unreadable_or_non_pem_files_are_named() {
        let dir = std::env::temp_dir().join(format!("omoi-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let args = TlsArgs {
            tls_cert: Some(junk.clone()),
            tls_key: Some(junk.clone()),
            tls_ca: Some(dir.join("missing.pem")),
        };
        let err = args.server(None).unwrap_err().to_string();
        assert!(
            err.starts_with("OMOI_TLS_CERT") && err.contains("no PEM certificate"),
            "{err}"
        );
        let err = args.client().unwrap_err().to_string();
        assert!(err.starts_with("OMOI_TLS_CA") && err.contains("missing.pem"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
