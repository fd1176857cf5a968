//! Certificates for TLS tests: a CA of the test's own and leaves it signs.

use std::path::PathBuf;

use omoi_runtime::tls::TlsArgs;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// A CA and the certificates it issued, as PEM files in a directory.
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("omoi-pki-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        Self { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A self-signed CA written as `<name>.pem`; returns what signs with it.
    pub fn ca(&self, name: &str) -> Issuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("test certificate");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("omoi test {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("test certificate");
        let cert = params.self_signed(&key).expect("test certificate");
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).expect("write certificate");
        Issuer::new(params, key)
    }

    /// A leaf for 127.0.0.1 and localhost, good as server and as client,
    /// written as `<name>.pem` and `<name>.key`.
    pub fn leaf(&self, name: &str, ca: &Issuer<'static, KeyPair>) -> TlsArgs {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("valid names");
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("test certificate");
        let cert = params.signed_by(&key, ca).expect("test certificate");
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).expect("write certificate");
        std::fs::write(self.path(&format!("{name}.key")), key.serialize_pem()).expect("write certificate");
        TlsArgs {
            tls_cert: Some(self.path(&format!("{name}.pem"))),
            tls_key: Some(self.path(&format!("{name}.key"))),
            tls_ca: None,
        }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
