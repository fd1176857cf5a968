//! Where a sandboxed agent may connect: the hosts the operator allows
//! (`OMOI_AGENT_ALLOWED_HOSTS`), never the mesh's own addresses.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};

/// One entry of the allow-list: a host name or address, or every name
/// under a domain (`*.domain`), on one port or any.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Allowed {
    /// Lower case; for a wildcard, the domain after `*.`.
    host: String,
    wildcard: bool,
    port: Option<u16>,
}

/// The hosts agents may reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(Vec<Allowed>);

impl AllowList {
    /// The list `OMOI_AGENT_ALLOWED_HOSTS` gives; an entry that is not a
    /// host (a URL, a path, a bare `*`) is refused, named.
    pub fn parse(list: &str) -> Result<Self, String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|entry| {
                parse_entry(entry).ok_or_else(|| {
                    format!(
                        "OMOI_AGENT_ALLOWED_HOSTS: {entry:?} is not a host, host:port or *.domain (no scheme, path or bare wildcard)"
                    )
                })
            })
            .collect::<Result<_, _>>()
            .map(AllowList)
    }

    pub fn permits(&self, host: &str, port: u16) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.0.iter().any(|a| {
            let named = if a.wildcard {
                host.strip_suffix(a.host.as_str())
                    .is_some_and(|head| head.ends_with('.') && head.len() > 1)
            } else {
                host == a.host
            };
            named && a.port.is_none_or(|p| p == port)
        })
    }
}

fn parse_entry(entry: &str) -> Option<Allowed> {
    let entry = entry.to_ascii_lowercase();
    let (host, port) = split_port(&entry)?;
    let (host, wildcard) = match host.strip_prefix("*.") {
        Some(domain) => (domain, true),
        None => (host, false),
    };
    let host = host.trim_end_matches('.');
    let name_ok = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    let address = host.parse::<IpAddr>().is_ok();
    if wildcard && address {
        return None;
    }
    (name_ok || address).then(|| Allowed {
        host: host.to_owned(),
        wildcard,
        port,
    })
}

/// `host[:port]`, an IPv6 address in brackets when it has a port.
fn split_port(entry: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = entry.strip_prefix('[') {
        let (host, tail) = rest.split_once(']')?;
        return match tail.strip_prefix(':') {
            Some(port) => Some((host, Some(port.parse().ok()?))),
            None if tail.is_empty() => Some((host, None)),
            None => None,
        };
    }
    if entry.parse::<IpAddr>().is_ok() {
        return Some((entry, None));
    }
    match entry.rsplit_once(':') {
        Some((host, port)) => Some((host, Some(port.parse().ok()?))),
        None => Some((entry, None)),
    }
}

/// The mesh's own addresses, which no agent may reach: as they resolved
/// at start, and by name (one that did not resolve then is still refused
/// by its name).
#[derive(Debug, Clone, Default)]
pub struct Denied {
    addrs: Vec<SocketAddr>,
    names: Vec<(String, u16)>,
}

impl Denied {
    /// The addresses of `endpoints` (setting, URL or `host:port`); one whose
    /// address cannot be told is refused, named by its setting.
    pub fn resolve<'a>(endpoints: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, String> {
        let mut denied = Denied::default();
        for (setting, endpoint) in endpoints {
            let Some(hostport) = host_port(endpoint) else {
                return Err(format!("{setting}: cannot tell the address of {endpoint:?}"));
            };
            if let Some((host, port)) = hostport.rsplit_once(':').and_then(|(h, p)| Some((h, p.parse().ok()?))) {
                let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
                denied.names.push((host, port));
            }
            match hostport.to_socket_addrs() {
                Ok(resolved) => denied.addrs.extend(resolved),
                Err(e) => tracing::warn!(
                    setting,
                    endpoint = %hostport,
                    error = %e,
                    "a mesh address does not resolve now; agents are refused it by name"
                ),
            }
        }
        denied.addrs.sort();
        denied.addrs.dedup();
        Ok(denied)
    }

    /// Whether `host` (as the agent asked for it) on `port` names one of
    /// the mesh's endpoints.
    pub fn names(&self, host: &str, port: u16) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.');
        self.names
            .iter()
            .any(|(h, p)| *p == port && h.eq_ignore_ascii_case(host))
    }

    /// Whether `to` is one of the mesh's addresses: the same address and
    /// port, or the same port on this machine when the mesh listens on it
    /// (loopback, every interface, or one of the machine's own addresses —
    /// all of which reach the same listener).
    pub fn covers(&self, to: SocketAddr) -> bool {
        self.addrs.iter().any(|d| {
            d.port() == to.port() && (d.ip() == to.ip() || (on_this_machine(d.ip()) && on_this_machine(to.ip())))
        })
    }
}

/// Loopback, unspecified, or one of this machine's own addresses (which
/// a socket can bind).
fn on_this_machine(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    ip.is_loopback() || ip.is_unspecified() || UdpSocket::bind((ip, 0)).is_ok()
}

/// `host:port` of a URL (`scheme://[user@]host[:port][/…]`, ports by
/// scheme) or of a `host:port`.
fn host_port(endpoint: &str) -> Option<String> {
    let endpoint = endpoint.trim();
    let (scheme, rest) = match endpoint.split_once("://") {
        Some((scheme, rest)) => (Some(scheme.to_ascii_lowercase()), rest),
        None => (None, endpoint),
    };
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if authority.is_empty() {
        return None;
    }
    let default_port = match scheme.as_deref() {
        Some("http") => 80,
        Some("https") => 443,
        Some("nats" | "tls") | None => 4222,
        Some("postgres" | "postgresql") => 5432,
        Some(_) => return None,
    };
    let has_port = match authority.rsplit_once(']') {
        Some((_, tail)) => tail.starts_with(':'),
        None => authority.contains(':') && authority.parse::<IpAddr>().is_err(),
    };
    Some(if has_port {
        authority.to_owned()
    } else if authority.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[{authority}]:{default_port}")
    } else {
        format!("{authority}:{default_port}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_hosts_ports_or_domain_wildcards() {
        let list =
            AllowList::parse("registry.npmjs.org, *.pypi.org:443,api.github.com:443,10.0.0.7,[::1]:8080").unwrap();
        assert!(list.permits("registry.npmjs.org", 443));
        assert!(list.permits("Registry.NPMJS.org.", 80));
        assert!(list.permits("files.pypi.org", 443));
        assert!(
            !list.permits("pypi.org", 443),
            "a wildcard is for names under the domain"
        );
        assert!(!list.permits("files.pypi.org", 80));
        assert!(!list.permits("evilpypi.org", 443));
        assert!(list.permits("api.github.com", 443));
        assert!(!list.permits("github.com", 443));
        assert!(list.permits("10.0.0.7", 22));
        assert!(list.permits("[::1]", 8080));
        assert!(!list.permits("example.com", 443));
        assert_eq!(AllowList::parse(" , ").unwrap(), AllowList::default());
    }

    #[test]
    fn entries_that_are_not_hosts_are_refused_by_name() {
        for bad in [
            "*",
            "*.*",
            "https://api.github.com",
            "github.com/org",
            "host:notaport",
            "bad_host.com",
            "*.10.0.0.1",
            "-lead.example",
        ] {
            let e = AllowList::parse(&format!("ok.example, {bad}")).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }

    #[test]
    fn the_mesh_is_denied_on_every_local_address_of_its_ports() {
        let denied = Denied::resolve([
            ("NATS_URL", "nats://127.0.0.1:4222"),
            ("OMOI_TASK_QUEUE_URL", "http://127.0.0.1:50052"),
            ("OMOI_AGENT_DENIED_ADDRS", "localhost:5432"),
            ("OMOI_LISTEN_ADDR", "0.0.0.0:50054"),
        ])
        .unwrap();
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(denied.covers(at("127.0.0.1:4222")));
        assert!(denied.covers(at("127.0.0.2:4222")), "all of 127/8 is this machine");
        assert!(denied.covers(at("[::1]:4222")));
        assert!(denied.covers(at("0.0.0.0:5432")));
        assert!(denied.covers(at("127.0.0.1:50054")));
        assert!(!denied.covers(at("127.0.0.1:8080")));
        assert!(
            !denied.covers(at("192.0.2.1:4222")),
            "another machine's port is not the mesh's"
        );
        assert!(denied.names("LOCALHOST", 5432));
        // A name that does not resolve (yet) is still refused by name.
        let later = Denied::resolve([("X", "omoi-console.invalid:8080")]).unwrap();
        assert!(later.names("omoi-console.invalid", 8080));
        assert!(!later.names("omoi-console.invalid", 8081));
        assert!(Denied::resolve([("X", "ftp://x")]).unwrap_err().contains("X"));
    }

    #[test]
    fn endpoints_give_their_host_and_port() {
        assert_eq!(
            host_port("nats://user:pw@nats.omoi:4222").as_deref(),
            Some("nats.omoi:4222")
        );
        assert_eq!(host_port("http://queue.omoi/").as_deref(), Some("queue.omoi:80"));
        assert_eq!(host_port("https://[::1]/x").as_deref(), Some("[::1]:443"));
        assert_eq!(host_port("db:5432").as_deref(), Some("db:5432"));
        assert_eq!(host_port("127.0.0.1").as_deref(), Some("127.0.0.1:4222"));
        assert_eq!(host_port("ftp://x"), None);
    }
}
