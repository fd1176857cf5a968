//! NotificationService: subscriptions of people's receivers to the mesh's
//! ticket events, and their delivery (see `deliver`).

pub mod deliver;
pub mod target;

use omoi_base::{ApiError, ApiResult};
use omoi_domain::notify::{self as rules, DeliveryState, Format};
use omoi_proto::convert::timestamp;
use omoi_proto::notify::{self as pb, notification_service_server::NotificationService};
use omoi_store::Store;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use target::{Targets, Unreachable};

pub struct Notifications {
    store: Store,
    targets: Targets,
}

impl Notifications {
    pub fn new(store: Store, targets: Targets) -> Self {
        Self { store, targets }
    }

    async fn create(&self, req: pb::CreateSubscriptionRequest) -> ApiResult<pb::CreateSubscriptionResponse> {
        let pb::CreateSubscriptionRequest {
            url,
            event_types,
            format,
            secret,
        } = req;
        let target = self.targets.parse(&url).map_err(|why| ApiError::invalid("url", why))?;
        let event_types = rules::event_types("event_types", &event_types)?;
        let format = match pb::SubscriptionFormat::try_from(format) {
            Ok(pb::SubscriptionFormat::Unspecified | pb::SubscriptionFormat::Json) => Format::Json,
            Ok(pb::SubscriptionFormat::Slack) => Format::Slack,
            Err(_) => return Err(ApiError::invalid("format", format!("{format} is not a known format"))),
        };
        rules::secret("secret", &secret)?;
        // A name that does not resolve yet is taken (it is looked up
        // again before every try); one that resolves to the mesh is not.
        if let Err(Unreachable::Forbidden(why)) = self.targets.resolve(&target).await {
            return Err(ApiError::invalid("url", why));
        }
        let created = self
            .store
            .create_subscription(Uuid::now_v7(), url.trim(), &event_types, format, &secret)
            .await?;
        tracing::info!(subscription_id = %created.id, host = %target.host, ?event_types, "subscription created");
        Ok(pb::CreateSubscriptionResponse {
            subscription: Some(subscription(&created)),
        })
    }

    async fn list(&self) -> ApiResult<pb::ListSubscriptionsResponse> {
        Ok(pb::ListSubscriptionsResponse {
            subscriptions: self.store.subscriptions().await?.iter().map(subscription).collect(),
        })
    }

    async fn delete(&self, req: pb::DeleteSubscriptionRequest) -> ApiResult<pb::DeleteSubscriptionResponse> {
        let pb::DeleteSubscriptionRequest { subscription_id } = req;
        let id = omoi_domain::validate::uuid("subscription_id", &subscription_id)?;
        self.store.delete_subscription(id).await?;
        tracing::info!(subscription_id = %id, "subscription deleted");
        Ok(pb::DeleteSubscriptionResponse {})
    }

    async fn deliveries(&self, req: pb::ListDeliveriesRequest) -> ApiResult<pb::ListDeliveriesResponse> {
        let pb::ListDeliveriesRequest {
            subscription_id,
            page_size,
            page_token,
        } = req;
        let id = omoi_domain::validate::uuid("subscription_id", &subscription_id)?;
        let size = match page_size {
            0 => 100,
            n => omoi_domain::validate::range("page_size", n, 1, 1000)?,
        };
        let before = if page_token.is_empty() {
            None
        } else {
            Some(page(&page_token).ok_or_else(|| ApiError::invalid("page_token", "is not a token this API gave"))?)
        };
        let (deliveries, next) = self.store.deliveries(id, i64::from(size), before).await?;
        Ok(pb::ListDeliveriesResponse {
            deliveries: deliveries.iter().map(delivery).collect(),
            next_page_token: next
                .map(|(at, event_id)| format!("{}~{event_id}", at.timestamp_micros()))
                .unwrap_or_default(),
        })
    }
}

/// A page token read back: the last delivery's (created_at, event_id).
fn page(token: &str) -> Option<(chrono::DateTime<chrono::Utc>, Uuid)> {
    let (micros, id) = token.split_once('~')?;
    let at = chrono::DateTime::from_timestamp_micros(micros.parse().ok()?)?;
    Some((at, id.parse().ok()?))
}

fn subscription(s: &omoi_store::notify::Subscription) -> pb::Subscription {
    pb::Subscription {
        id: s.id.to_string(),
        url: s.url.clone(),
        event_types: s.event_types.clone(),
        format: match s.format {
            Format::Json => pb::SubscriptionFormat::Json,
            Format::Slack => pb::SubscriptionFormat::Slack,
        }
        .into(),
        created_at: Some(timestamp(s.created_at)),
    }
}

fn delivery(d: &omoi_store::notify::Delivery) -> pb::Delivery {
    pb::Delivery {
        event_id: d.event_id.to_string(),
        event_type: d.event_type.clone(),
        ticket_id: d.ticket_id.map(|t| t.to_string()).unwrap_or_default(),
        state: match d.state {
            DeliveryState::Pending => pb::DeliveryState::Pending,
            DeliveryState::Delivered => pb::DeliveryState::Delivered,
            DeliveryState::Refused => pb::DeliveryState::Refused,
            DeliveryState::Expired => pb::DeliveryState::Expired,
        }
        .into(),
        created_at: Some(timestamp(d.created_at)),
        delivered_at: d.delivered_at.map(timestamp),
        next_attempt_at: (d.state == DeliveryState::Pending).then(|| timestamp(d.next_at)),
        attempts: d
            .attempts
            .iter()
            .map(|a| pb::DeliveryAttempt {
                at: Some(timestamp(a.at)),
                status_code: i32::from(a.status_code),
                latency_ms: a.latency_ms,
                error: a.error.clone(),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl NotificationService for Notifications {
    async fn create_subscription(
        &self,
        request: Request<pb::CreateSubscriptionRequest>,
    ) -> Result<Response<pb::CreateSubscriptionResponse>, Status> {
        Ok(Response::new(self.create(request.into_inner()).await?))
    }

    async fn list_subscriptions(
        &self,
        _: Request<pb::ListSubscriptionsRequest>,
    ) -> Result<Response<pb::ListSubscriptionsResponse>, Status> {
        Ok(Response::new(self.list().await?))
    }

    async fn delete_subscription(
        &self,
        request: Request<pb::DeleteSubscriptionRequest>,
    ) -> Result<Response<pb::DeleteSubscriptionResponse>, Status> {
        Ok(Response::new(self.delete(request.into_inner()).await?))
    }

    async fn list_deliveries(
        &self,
        request: Request<pb::ListDeliveriesRequest>,
    ) -> Result<Response<pb::ListDeliveriesResponse>, Status> {
        Ok(Response::new(self.deliveries(request.into_inner()).await?))
    }
}
