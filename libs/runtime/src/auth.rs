//! Bearer-token authentication for the services' RPCs.

use std::sync::Arc;

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Server side: requires `authorization: Bearer <token>` when a token is
/// configured. Health and reflection are served without it.
#[derive(Clone, Default)]
pub struct RequireBearer {
    token: Option<Arc<[u8]>>,
}

impl RequireBearer {
    pub fn new(token: Option<&str>) -> Self {
        Self {
            token: token.filter(|t| !t.is_empty()).map(|t| Arc::from(t.as_bytes())),
        }
    }
}

impl RequireBearer {
    /// Checks an `authorization` header value (gRPC metadata or HTTP).
    pub fn check(&self, authorization: Option<&str>) -> Result<(), Status> {
        let Some(expected) = &self.token else {
            return Ok(());
        };
        match authorization.and_then(|v| v.strip_prefix("Bearer ")).map(str::as_bytes) {
            Some(p) if constant_time_eq(p, expected) => Ok(()),
            Some(_) => Err(Status::unauthenticated("invalid bearer token")),
            None => Err(Status::unauthenticated("missing authorization: Bearer <token>")),
        }
    }
}

impl Interceptor for RequireBearer {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        self.check(presented)?;
        Ok(request)
    }
}

/// Client side: adds the bearer token (when one is set) and the caller's
/// trace context to every request.
#[derive(Clone, Default)]
pub struct Outgoing {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Outgoing {
    /// Fails when the token holds characters a header cannot carry.
    pub fn new(token: Option<&str>) -> Result<Self, Status> {
        let header = match token.filter(|t| !t.is_empty()) {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| Status::invalid_argument("auth token holds characters not allowed in a header"))?,
            ),
            None => None,
        };
        Ok(Self { header })
    }
}

impl Interceptor for Outgoing {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            request.metadata_mut().insert("authorization", h.clone());
        }
        crate::trace::inject_current(request.metadata_mut());
        Ok(request)
    }
}

/// Compares in time that depends only on the lengths, not on where the
/// inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(auth: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(a) = auth {
            r.metadata_mut().insert("authorization", a.parse().unwrap());
        }
        r
    }

    #[test]
    fn no_token_configured_lets_everything_through() {
        let mut auth = RequireBearer::new(None);
        assert!(auth.call(request(None)).is_ok());
        assert!(RequireBearer::new(Some("")).call(request(None)).is_ok());
    }

    #[test]
    fn token_is_required_and_compared() {
        let mut auth = RequireBearer::new(Some("s3cret"));
        assert!(auth.call(request(Some("Bearer s3cret"))).is_ok());
        for bad in [
            None,
            Some("Bearer nope"),
            Some("s3cret"),
            Some("Bearer s3cre"),
            Some("Basic s3cret"),
        ] {
            let err = auth.call(request(bad)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
    }

    #[test]
    fn client_attaches_the_token() {
        let mut attach = Outgoing::new(Some("abc")).unwrap();
        let r = attach.call(Request::new(())).unwrap();
        assert_eq!(r.metadata().get("authorization").unwrap(), "Bearer abc");
        assert!(Outgoing::new(Some("bad\ntoken")).is_err());
    }

    #[test]
    fn constant_time_eq_matches_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
