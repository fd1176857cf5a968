//! gRPC plumbing shared by the services: health probes that follow the
//! service's dependencies, reflection, listeners and client channels.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

pub use tonic_health::server::health_reporter;

use crate::auth::Outgoing;
use crate::tls::TlsArgs;

/// Reflection v1 and v1alpha (grpcurl 1.8 speaks v1alpha) listing `served`
/// (full service names), grpc.health.v1 and reflection itself; the types of
/// the whole omoi API resolve.
pub fn reflection(
    served: &[&str],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(omoi_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        for name in served.iter().copied().chain([
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]) {
            b = b.with_service_name(name);
        }
        b
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

/// Keeps the health status of `services` (and the server as a whole, "")
/// at SERVING while `ready()` holds and NOT_SERVING otherwise, re-checking
/// every `every`, until `shutdown`, when everything turns NOT_SERVING.
pub async fn follow_readiness<F, Fut>(
    reporter: HealthReporter,
    services: Vec<&'static str>,
    every: Duration,
    shutdown: CancellationToken,
    mut ready: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let mut last: Option<bool> = None;
    loop {
        let now = ready().await;
        if last != Some(now) {
            let status = if now {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            tracing::info!(ready = now, "health status changed");
            set_all(&reporter, &services, status).await;
            last = Some(now);
        }
        // Until first ready, look often: a probe should not wait a full period.
        let wait = if now {
            every
        } else {
            every.min(Duration::from_millis(250))
        };
        if !crate::background::pause(&shutdown, wait).await {
            break;
        }
    }
    set_all(&reporter, &services, ServingStatus::NotServing).await;
}

/// Health service name that stays SERVING while the process runs: the
/// liveness probe's, so that a database outage (NOT_SERVING on readiness)
/// does not get pods restarted.
pub const LIVENESS: &str = "liveness";

pub async fn set_all(reporter: &HealthReporter, services: &[&'static str], status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for s in services {
        reporter.set_service_status(*s, status).await;
    }
}

/// Binds a listener with TCP_NODELAY (small gRPC frames must not wait for
/// Nagle) and keepalive.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpIncoming> {
    Ok(TcpIncoming::bind(addr)?
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(30))))
}

/// Takes an already bound listener (tests bind port 0 to learn the port).
pub fn incoming(listener: tokio::net::TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(30)))
}

/// How this process reaches other services: TLS for `https://` URLs
/// (OMOI_TLS_CA or the system roots; its own certificate for mTLS) and the
/// bearer token on every call. The default is plaintext without a token.
#[derive(Clone, Default)]
pub struct Connector {
    tls: Option<ClientTlsConfig>,
    outgoing: Outgoing,
}

/// A client stub's transport: a channel with the connector's metadata.
pub type Client = InterceptedService<Channel, Outgoing>;

impl Connector {
    pub fn new(token: Option<&str>, tls: &TlsArgs) -> anyhow::Result<Self> {
        Ok(Self {
            tls: Some(tls.client()?),
            outgoing: Outgoing::new(token).map_err(|e| anyhow::anyhow!("{}", e.message()))?,
        })
    }

    /// A lazily connecting channel to `url` (`http://` or `https://host:port`).
    pub fn channel(&self, url: &str) -> Result<Channel, tonic::transport::Error> {
        let mut endpoint = Endpoint::from_shared(url.to_owned())?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        if url.starts_with("https://") {
            let tls = self
                .tls
                .clone()
                .unwrap_or_else(|| ClientTlsConfig::new().with_native_roots());
            endpoint = endpoint.tls_config(tls)?;
        }
        Ok(endpoint.connect_lazy())
    }

    /// `channel(url)` with the bearer token attached to every call; `what`
    /// names the setting the URL came from, for the error.
    pub fn client(&self, url: &str, what: &str) -> anyhow::Result<Client> {
        let channel = self
            .channel(url)
            .map_err(|e| anyhow::anyhow!("{what} {url:?} is not a usable URL: {e}"))?;
        Ok(InterceptedService::new(channel, self.outgoing.clone()))
    }

    /// The grpc.health.v1 status of `service` ("" = the whole server) at
    /// `url`, or why there is none.
    pub async fn health_status(&self, url: &str, service: &str) -> Result<ServingStatus, String> {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_check_response::ServingStatus as Wire;
        use tonic_health::pb::health_client::HealthClient;
        let channel = self.channel(url).map_err(|e| e.to_string())?;
        let r = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .map_err(|e| e.message().to_owned())?;
        Ok(match Wire::try_from(r.get_ref().status) {
            Ok(Wire::Serving) => ServingStatus::Serving,
            Ok(Wire::NotServing) => ServingStatus::NotServing,
            _ => ServingStatus::Unknown,
        })
    }

    /// Waits until the server at `url` reports SERVING as a whole.
    pub async fn wait_serving(&self, url: &str, within: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let last = match self.health_status(url, "").await {
                Ok(ServingStatus::Serving) => return Ok(()),
                Ok(other) => format!("status {other:?}"),
                Err(e) => e,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("{url} not SERVING within {within:?}: {last}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
