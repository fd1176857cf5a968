//! The HTTP routes of the API, read from the protos' `google.api.http`
//! annotations in the embedded descriptor set: a newly annotated RPC is on
//! HTTP without a line of code here.

use std::sync::LazyLock;

use http::Method;
use http::uri::PathAndQuery;
use prost_reflect::{DescriptorPool, DynamicMessage, MethodDescriptor, Value};

pub static POOL: LazyLock<DescriptorPool> =
    LazyLock::new(|| DescriptorPool::decode(omoi_proto::FILE_DESCRIPTOR_SET).expect("the embedded descriptors decode"));

/// Which service of the mesh answers an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    Ticket,
    TaskQueue,
    Health,
}

impl Upstream {
    fn of(service: &str) -> Option<Self> {
        match service {
            // Notifications are the ticket service's too.
            "omoi.ticket.v1.TicketService" | "omoi.notify.v1.NotificationService" => Some(Self::Ticket),
            "omoi.taskqueue.v1.TaskQueueService" => Some(Self::TaskQueue),
            "omoi.health.v1.AgentHealthService" => Some(Self::Health),
            _ => None,
        }
    }
}

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// A request field (dotted for a nested one).
    Field(String),
}

/// Where the request body goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    None,
    /// Every field the path does not bind.
    All,
    /// One field.
    Field(String),
}

#[derive(Debug, Clone)]
pub struct Route {
    pub method: Method,
    pub template: String,
    segments: Vec<Segment>,
    verb: Option<String>,
    pub body: Body,
    pub rpc: MethodDescriptor,
    /// The gRPC path of the RPC, made once.
    pub grpc_path: PathAndQuery,
    pub upstream: Upstream,
}

/// Every annotated RPC of the mesh's services.
pub fn all() -> Vec<Route> {
    let Some(http) = POOL.get_extension_by_name("google.api.http") else {
        return Vec::new();
    };
    let mut routes = Vec::new();
    for service in POOL.services() {
        let Some(upstream) = Upstream::of(service.full_name()) else {
            continue;
        };
        for rpc in service.methods() {
            let options = rpc.options();
            if !options.has_extension(&http) {
                continue;
            }
            if let Value::Message(rule) = options.get_extension(&http).as_ref() {
                routes.extend(route(rule, &rpc, upstream));
            }
        }
    }
    routes
}

fn text(rule: &DynamicMessage, field: &str) -> String {
    rule.get_field_by_name(field)
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn route(rule: &DynamicMessage, rpc: &MethodDescriptor, upstream: Upstream) -> Option<Route> {
    let (method, template) = [
        (Method::GET, "get"),
        (Method::PUT, "put"),
        (Method::POST, "post"),
        (Method::DELETE, "delete"),
        (Method::PATCH, "patch"),
    ]
    .into_iter()
    .find_map(|(m, f)| {
        let t = text(rule, f);
        (!t.is_empty()).then_some((m, t))
    })?;
    let (path, verb) = match template.rsplit_once(':') {
        Some((p, v)) if !v.contains('/') && !v.contains('}') => (p.to_owned(), Some(v.to_owned())),
        _ => (template.clone(), None),
    };
    let segments = path
        .trim_start_matches('/')
        .split('/')
        .map(|s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(field) => Segment::Field(field.to_owned()),
            None => Segment::Literal(s.to_owned()),
        })
        .collect();
    let body = match text(rule, "body").as_str() {
        "" => Body::None,
        "*" => Body::All,
        f => Body::Field(f.to_owned()),
    };
    Some(Route {
        method,
        template,
        segments,
        verb,
        body,
        grpc_path: format!("/{}/{}", rpc.parent_service().full_name(), rpc.name())
            .parse()
            .ok()?,
        rpc: rpc.clone(),
        upstream,
    })
}

/// What matching a request's path found.
pub enum Found<'a> {
    Route(&'a Route, Vec<(String, String)>),
    /// The path exists, not for this method.
    WrongMethod,
    None,
}

/// The route for `method` and `path`, with the fields its variables bind.
pub fn find<'a>(routes: &'a [Route], method: &Method, path: &str) -> Found<'a> {
    let mut wrong_method = false;
    for r in routes {
        if let Some(vars) = r.bind(path) {
            if r.method == *method {
                return Found::Route(r, vars);
            }
            wrong_method = true;
        }
    }
    if wrong_method { Found::WrongMethod } else { Found::None }
}

impl Route {
    fn bind(&self, path: &str) -> Option<Vec<(String, String)>> {
        let path = path.trim_start_matches('/');
        let path = match (&self.verb, path.rsplit_once(':')) {
            (Some(want), Some((p, v))) if v == want => p,
            (Some(_), _) => return None,
            // A raw `:` ends the path before a custom verb; in a value it is
            // sent as %3A.
            (None, Some(_)) if path.rsplit('/').next().is_some_and(|last| last.contains(':')) => return None,
            (None, _) => path,
        };
        let parts: Vec<&str> = path.split('/').collect();
        if parts.len() != self.segments.len() {
            return None;
        }
        let mut vars = Vec::new();
        for (seg, part) in self.segments.iter().zip(parts) {
            match seg {
                Segment::Literal(l) if l == part => {}
                Segment::Literal(_) => return None,
                Segment::Field(_) if part.is_empty() => return None,
                Segment::Field(f) => vars.push((f.clone(), percent_decode(part)?)),
            }
        }
        Some(vars)
    }
}

/// `%XX` escapes decoded; None for a malformed escape or invalid UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find_rpc<'a>(routes: &'a [Route], method: Method, path: &str) -> Option<(&'a str, Vec<(String, String)>)> {
        match find(routes, &method, path) {
            Found::Route(r, vars) => Some((r.rpc.name(), vars)),
            _ => None,
        }
    }

    #[test]
    fn the_annotated_rpcs_are_routes() {
        let routes = all();
        let (rpc, vars) = find_rpc(&routes, Method::POST, "/v1/tickets/abc:cancel").unwrap();
        assert_eq!(rpc, "CancelTicket");
        assert_eq!(vars, [("ticket_id".to_owned(), "abc".to_owned())]);
        assert_eq!(
            find_rpc(&routes, Method::GET, "/v1/tickets/abc").unwrap().0,
            "GetTicket"
        );
        assert_eq!(find_rpc(&routes, Method::GET, "/v1/tickets").unwrap().0, "ListTickets");
        assert_eq!(
            find_rpc(&routes, Method::GET, "/v1/queue/stats").unwrap().0,
            "GetQueueStats"
        );
        assert_eq!(
            find_rpc(&routes, Method::POST, "/v1/queue:pause").unwrap().0,
            "PauseDispatch"
        );
        assert_eq!(
            find_rpc(&routes, Method::GET, "/v1/tasks/t%201/output").unwrap().1[0].1,
            "t 1"
        );
        assert_eq!(
            find_rpc(&routes, Method::GET, "/v1/tasks:batchGet").unwrap(),
            ("BatchGetTasks", vec![])
        );
        assert!(matches!(
            find(&routes, &Method::DELETE, "/v1/tickets"),
            Found::WrongMethod
        ));
        assert!(matches!(find(&routes, &Method::GET, "/v1/nothing"), Found::None));
        assert!(matches!(
            find(&routes, &Method::POST, "/v1/tickets/abc:explode"),
            Found::None
        ));
        // Agents' own RPCs stay on gRPC.
        assert!(routes.iter().all(|r| r.rpc.name() != "WatchAssignments"));
    }
}
