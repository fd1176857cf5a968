//! Who may do what on omoi's NATS: the credentials a NATS URL carries, and
//! the nats-server authorization that gives each component only its part.
//! The services own the streams; an executor may publish its agents'
//! output, keep session checkpoints in its Object Store bucket and ask
//! JetStream about those — never publish an event, touch the events
//! stream, or delete or purge a stream that is not its bucket.

use crate::Topology;

/// The user and password (or, alone, the token) in the first of `urls`
/// (a comma list) that carries any: `nats://user:password@host:4222`,
/// `nats://token@host:4222`.
pub fn credentials(urls: &str) -> Option<(String, Option<String>)> {
    urls.split(',').find_map(|url| {
        let rest = url.trim().split_once("://").map_or(url.trim(), |(_, r)| r);
        let authority = rest.split(['/', '?', '#']).next()?;
        let (userinfo, _) = authority.rsplit_once('@')?;
        let (user, password) = match userinfo.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (userinfo, None),
        };
        let decode = |s: &str| percent_decode(s);
        (!user.is_empty()).then(|| (decode(user), password.map(decode)))
    })
}

/// `urls` with any credentials taken out, to name in a message or a log.
pub fn redacted(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let url = url.trim();
            let (scheme, rest) = match url.split_once("://") {
                Some((s, r)) => (format!("{s}://"), r),
                None => (String::new(), url),
            };
            let cut = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..cut].rsplit_once('@') {
                Some((_, host)) => format!("{scheme}***@{host}{}", &rest[cut..]),
                None => url.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A user of the server and its password.
pub struct User<'a> {
    pub name: &'a str,
    pub password: &'a str,
}

/// What a NATS user may publish and subscribe to (nats-server's
/// `permissions`, a user JWT's `pub`/`sub`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub publish_allow: Vec<String>,
    /// Said outright as well, so that no later allow can open them.
    pub publish_deny: Vec<String>,
    pub subscribe_allow: Vec<String>,
}

/// An executor's part of one omoi deployment (see the module), with
/// `bucket` the Object Store bucket of its checkpoints: what
/// [`server_authorization`] gives the executor's user, and what an
/// operator's executor user (JWT) should carry.
pub fn executor_permissions(topology: &Topology, bucket: &str) -> Permissions {
    let events = &topology.stream;
    let output = topology.output_stream();
    let prefix = &topology.prefix;
    let obj = format!("OBJ_{bucket}");
    Permissions {
        publish_allow: vec![
            format!("{prefix}.output.>"),
            format!("$O.{bucket}.>"),
            "$JS.API.INFO".to_owned(),
            format!("$JS.API.STREAM.INFO.{output}"),
            format!("$JS.API.STREAM.CREATE.{output}"),
            format!("$JS.API.STREAM.UPDATE.{output}"),
            format!("$JS.API.STREAM.INFO.{obj}"),
            format!("$JS.API.STREAM.CREATE.{obj}"),
            format!("$JS.API.STREAM.PURGE.{obj}"),
            format!("$JS.API.STREAM.MSG.GET.{obj}"),
            format!("$JS.API.DIRECT.GET.{obj}"),
            format!("$JS.API.DIRECT.GET.{obj}.>"),
            format!("$JS.API.CONSUMER.CREATE.{obj}"),
            format!("$JS.API.CONSUMER.CREATE.{obj}.>"),
            format!("$JS.API.CONSUMER.DELETE.{obj}.>"),
            format!("$JS.API.CONSUMER.INFO.{obj}.>"),
            "$JS.FC.>".to_owned(),
            "$JS.ACK.>".to_owned(),
            "_INBOX.>".to_owned(),
        ],
        publish_deny: vec![
            format!("{prefix}.events.>"),
            format!("{prefix}.control.>"),
            "$JS.API.STREAM.DELETE.>".to_owned(),
            format!("$JS.API.STREAM.PURGE.{events}"),
            format!("$JS.API.STREAM.PURGE.{output}"),
        ],
        subscribe_allow: vec!["_INBOX.>".to_owned()],
    }
}

/// The `authorization` block of a nats-server configuration for one omoi
/// deployment: `services` may do anything; `executor` only its part (see
/// [`executor_permissions`]).
pub fn server_authorization(topology: &Topology, bucket: &str, services: &User, executor: &User) -> String {
    let quote = |items: &[String]| items.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
    let p = executor_permissions(topology, bucket);
    format!(
        r#"authorization {{
  users = [
    {{ user: {svc_user:?}, password: {svc_pass:?} }}
    {{
      user: {ex_user:?}, password: {ex_pass:?}
      permissions: {{
        publish: {{ allow: [{allow}], deny: [{deny}] }}
        subscribe: {{ allow: [{subscribe}] }}
      }}
    }}
  ]
}}
"#,
        svc_user = services.name,
        svc_pass = services.password,
        ex_user = executor.name,
        ex_pass = executor.password,
        allow = quote(&p.publish_allow),
        deny = quote(&p.publish_deny),
        subscribe = quote(&p.subscribe_allow),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_from_the_url_and_never_go_out_with_it() {
        assert_eq!(
            credentials("nats://omoi-executor:p%40ss@nats:4222"),
            Some(("omoi-executor".into(), Some("p@ss".into())))
        );
        assert_eq!(
            credentials("nats://a:4222, nats://tok@b:4222"),
            Some(("tok".into(), None))
        );
        assert_eq!(credentials("nats://127.0.0.1:4222"), None);
        assert_eq!(
            redacted("nats://u:secret@a:4222,nats://b:4222"),
            "nats://***@a:4222,nats://b:4222"
        );
        assert_eq!(redacted("tok@host"), "***@host");
    }

    #[test]
    fn the_executor_may_publish_output_and_checkpoints_and_no_event() {
        let config = server_authorization(
            &Topology::default(),
            "OMOI_SESSIONS",
            &User {
                name: "omoi",
                password: "a",
            },
            &User {
                name: "omoi-executor",
                password: "b",
            },
        );
        assert!(config.contains(r#""omoi.output.>""#));
        assert!(config.contains(r#""$O.OMOI_SESSIONS.>""#));
        assert!(config.contains(r#"deny: ["omoi.events.>""#));
        assert!(config.contains(r#""$JS.API.STREAM.DELETE.>""#));
    }
}
