//! Where notifications may go: https anywhere, http only to the hosts the
//! operator allows, never to the mesh's own addresses (its services, its
//! database and NATS, the console) nor to link-local ones (a cloud's
//! metadata service). Checked when a subscription is made and again, on
//! the addresses its host resolves to then, before every try — a name
//! that comes to resolve to the mesh is refused, not followed.

use std::net::{IpAddr, SocketAddr};

use http::Uri;

/// The addresses a deployment keeps notifications away from.
#[derive(Debug, Clone, Default)]
pub struct Targets {
    /// Hosts an http:// subscription may name (lowercase).
    pub allow_http_hosts: Vec<String>,
    /// The mesh's own endpoints, as configured (host, port).
    pub mesh: Vec<(String, u16)>,
}

/// Why a destination cannot be reached now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unreachable {
    /// Its name does not resolve (now: it may later).
    Unresolved(String),
    /// It resolves to an address notifications never go to.
    Forbidden(String),
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unreachable::Unresolved(why) | Unreachable::Forbidden(why) => f.write_str(why),
        }
    }
}

/// A checked destination: the URI, its host and port.
#[derive(Debug, Clone)]
pub struct Target {
    pub uri: Uri,
    pub host: String,
    pub port: u16,
}

impl Targets {
    /// `url` read as a destination, or why it may not be one.
    pub fn parse(&self, url: &str) -> Result<Target, String> {
        if url.len() > omoi_domain::notify::MAX_URL_BYTES {
            return Err(format!("is longer than {} bytes", omoi_domain::notify::MAX_URL_BYTES));
        }
        let uri: Uri = url.trim().parse().map_err(|e| format!("is not a URL: {e}"))?;
        let scheme = uri.scheme_str().unwrap_or_default().to_ascii_lowercase();
        let authority = uri.authority().ok_or("has no host")?;
        if authority.as_str().contains('@') {
            return Err("must not carry user information (put credentials in the secret)".into());
        }
        let host = authority.host().trim_matches(['[', ']']).to_ascii_lowercase();
        if host.is_empty() {
            return Err("has no host".into());
        }
        let port = match (scheme.as_str(), authority.port_u16()) {
            (_, Some(p)) => p,
            ("https", None) => 443,
            ("http", None) => 80,
            _ => 0,
        };
        match scheme.as_str() {
            "https" => {}
            "http" if self.allow_http_hosts.contains(&host) => {}
            "http" => {
                return Err(format!(
                    "must be https (http only to hosts in OMOI_NOTIFY_ALLOW_HTTP_HOSTS; {host} is not)"
                ));
            }
            other => return Err(format!("must be https, not {other:?}")),
        }
        Ok(Target { uri, host, port })
    }

    /// The addresses `target` may be reached at now: its host resolved,
    /// each address checked.
    pub async fn resolve(&self, target: &Target) -> Result<Vec<SocketAddr>, Unreachable> {
        let found: Vec<SocketAddr> = tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .map_err(|e| Unreachable::Unresolved(format!("{} cannot be resolved: {e}", target.host)))?
            .collect();
        let mesh = self.mesh_addresses().await;
        for addr in &found {
            if let Some(why) = forbidden(*addr, &mesh) {
                return Err(Unreachable::Forbidden(format!(
                    "{} resolves to {addr}: {why}",
                    target.host
                )));
            }
        }
        if found.is_empty() {
            return Err(Unreachable::Unresolved(format!(
                "{} resolves to no address",
                target.host
            )));
        }
        Ok(found)
    }

    /// The mesh's endpoints resolved (those that resolve now).
    async fn mesh_addresses(&self) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        for (host, port) in &self.mesh {
            if let Ok(addrs) = tokio::net::lookup_host((host.as_str(), *port)).await {
                out.extend(addrs);
            }
        }
        out
    }
}

/// Why `addr` may not be notified, if it may not.
fn forbidden(addr: SocketAddr, mesh: &[SocketAddr]) -> Option<&'static str> {
    let ip = addr.ip();
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    };
    if link_local {
        return Some("a link-local address");
    }
    let local = |ip: IpAddr| ip.is_loopback() || ip.is_unspecified();
    let ours = mesh
        .iter()
        .any(|m| m.port() == addr.port() && (m.ip() == ip || (local(m.ip()) && local(ip))));
    ours.then_some("one of the mesh's own addresses")
}

/// The (host, port) of a URL-like endpoint (`scheme://[user@]host[:port]/…`,
/// comma lists too), with `default_port` when it names none.
pub fn endpoints(url: &str, default_port: u16) -> Vec<(String, u16)> {
    url.split(',')
        .filter_map(|one| {
            let rest = one.trim().split_once("://").map_or(one.trim(), |(_, r)| r);
            let authority = rest.split(['/', '?']).next()?;
            let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
            let (host, port) = match authority.strip_prefix('[') {
                Some(v6) => {
                    let (host, after) = v6.split_once(']')?;
                    (host, after.strip_prefix(':').and_then(|p| p.parse().ok()))
                }
                None => match authority.rsplit_once(':') {
                    Some((h, p)) => (h, p.parse().ok()),
                    None => (authority, None),
                },
            };
            (!host.is_empty()).then(|| (host.to_ascii_lowercase(), port.unwrap_or(default_port)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets() -> Targets {
        Targets {
            allow_http_hosts: vec!["receiver.internal".into(), "127.0.0.1".into()],
            mesh: vec![("127.0.0.1".into(), 50052), ("0.0.0.0".into(), 50051)],
        }
    }

    #[test]
    fn subscriptions_go_over_https_or_to_allowed_http_hosts() {
        let t = targets();
        assert_eq!(t.parse("https://hooks.slack.com/services/T/B/x").unwrap().port, 443);
        assert_eq!(t.parse("http://receiver.internal:8080/hook").unwrap().port, 8080);
        for (url, why) in [
            ("http://example.com/hook", "must be https"),
            ("ftp://example.com/", "must be https"),
            ("https://user:pw@example.com/", "user information"),
            ("not a url", "is not a URL"),
            ("/relative", "has no host"),
        ] {
            let err = t.parse(url).unwrap_err();
            assert!(err.contains(why), "{url}: {err}");
        }
        assert!(t.parse(&format!("https://example.com/{}", "x".repeat(2048))).is_err());
    }

    #[tokio::test]
    async fn the_mesh_and_link_local_addresses_are_never_notified() {
        let t = targets();
        let at = |url: &str| t.parse(url).unwrap();
        // The task queue's port on loopback, and the ticket service's own
        // (it listens on every address).
        for url in ["http://127.0.0.1:50052/", "http://127.0.0.1:50051/"] {
            let err = t.resolve(&at(url)).await.unwrap_err();
            assert!(
                matches!(&err, Unreachable::Forbidden(why) if why.contains("the mesh's own")),
                "{url}: {err}"
            );
        }
        let err = t.resolve(&at("https://169.254.169.254/latest")).await.unwrap_err();
        assert!(
            matches!(&err, Unreachable::Forbidden(why) if why.contains("link-local")),
            "{err}"
        );
        let err = t.resolve(&at("https://no-such-host.invalid/")).await.unwrap_err();
        assert!(matches!(err, Unreachable::Unresolved(_)), "{err}");
        // Another port of the same machine is someone else's receiver.
        assert_eq!(
            t.resolve(&at("http://127.0.0.1:9999/")).await.unwrap(),
            vec!["127.0.0.1:9999".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn endpoints_are_read_from_the_mesh_urls() {
        assert_eq!(
            endpoints("postgres://root@127.0.0.1:5432/omoi?sslmode=disable", 5432),
            vec![("127.0.0.1".to_owned(), 5432)]
        );
        assert_eq!(
            endpoints("nats://a:4222,nats://user:pw@b", 4222),
            vec![("a".to_owned(), 4222), ("b".to_owned(), 4222)]
        );
        assert_eq!(endpoints("http://[::1]:50052", 80), vec![("::1".to_owned(), 50052)]);
    }
}
