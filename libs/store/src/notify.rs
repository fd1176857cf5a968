//! Notifications: subscriptions, and each event's delivery to each
//! subscription (`deliveries`): written as events are consumed, claimed by
//! a sender for one try at a time (a ticket's in stream order), and
//! recorded try by try.

use std::time::Duration;

use chrono::{DateTime, Utc};
use omoi_domain::notify::{DeliveryState, Format};
use serde_json::Value;
use uuid::Uuid;

use crate::statements::sql;
use crate::{Result, Store, StoreError};

/// A subscription as stored (its secret only for the sender).
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    pub id: Uuid,
    pub url: String,
    pub event_types: Vec<String>,
    pub format: Format,
    pub created_at: DateTime<Utc>,
}

type SubscriptionRow = (Uuid, String, Vec<String>, String, DateTime<Utc>);

fn subscription_of((id, url, event_types, format, created_at): SubscriptionRow) -> Result<Subscription> {
    Ok(Subscription {
        id,
        url,
        event_types,
        format: Format::parse(&format).ok_or_else(|| decode(format!("format {format}")))?,
        created_at,
    })
}

fn decode(what: String) -> StoreError {
    StoreError::from(sqlx::Error::Decode(what.into()))
}

/// An event to deliver to the subscriptions that ask for its type.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub stream_seq: i64,
    pub event_type: String,
    pub ticket_id: Option<Uuid>,
    pub occurred_at: DateTime<Utc>,
    /// The event as the API's JSON shows it.
    pub event: Value,
}

/// One delivery as a person reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub event_id: Uuid,
    pub event_type: String,
    pub ticket_id: Option<Uuid>,
    pub state: DeliveryState,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub next_at: DateTime<Utc>,
    pub attempts: Vec<Attempt>,
}

/// One try at a delivery.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Attempt {
    pub at: DateTime<Utc>,
    /// 0: no answer.
    pub status_code: u16,
    pub latency_ms: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// A delivery a sender holds for one try.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub subscription_id: Uuid,
    pub event_id: Uuid,
    pub url: String,
    pub format: Format,
    pub secret: String,
    pub event: Value,
    pub created_at: DateTime<Utc>,
    /// Tries before this one.
    pub tries: u32,
}

/// A claimed delivery's row, with its subscription's address and secret.
#[derive(sqlx::FromRow)]
struct ClaimedRow {
    subscription_id: Uuid,
    event_id: Uuid,
    url: String,
    format: String,
    secret: String,
    event: Value,
    created_at: DateTime<Utc>,
    tries: i32,
}

type DeliveryRow = (
    Uuid,
    String,
    Option<Uuid>,
    String,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    DateTime<Utc>,
    Value,
);

fn delivery_of(row: DeliveryRow) -> Result<Delivery> {
    let (event_id, event_type, ticket_id, state, created_at, delivered_at, next_at, attempts) = row;
    Ok(Delivery {
        event_id,
        event_type,
        ticket_id,
        state: DeliveryState::parse(&state).ok_or_else(|| decode(format!("delivery state {state}")))?,
        created_at,
        delivered_at,
        next_at,
        attempts: serde_json::from_value(attempts).map_err(|e| decode(format!("attempts: {e}")))?,
    })
}

impl Store {
    pub async fn create_subscription(
        &self,
        id: Uuid,
        url: &str,
        event_types: &[String],
        format: Format,
        secret: &str,
    ) -> Result<Subscription> {
        let row: SubscriptionRow = sqlx::query_as(sql!(
            "INSERT INTO subscriptions (id, url, event_types, format, secret) VALUES ($1, $2, $3, $4, $5)
             RETURNING id, url, event_types, format, created_at"
        ))
        .bind(id)
        .bind(url)
        .bind(event_types)
        .bind(format.as_str())
        .bind(secret)
        .fetch_one(self.pool())
        .await?;
        subscription_of(row)
    }

    /// Every subscription, oldest first.
    pub async fn subscriptions(&self) -> Result<Vec<Subscription>> {
        let rows: Vec<SubscriptionRow> = sqlx::query_as(sql!(
            "SELECT id, url, event_types, format, created_at FROM subscriptions ORDER BY created_at, id"
        ))
        .fetch_all(self.pool())
        .await?;
        rows.into_iter().map(subscription_of).collect()
    }

    /// Removes a subscription with its deliveries.
    pub async fn delete_subscription(&self, id: Uuid) -> Result<()> {
        let gone = sqlx::query(sql!("DELETE FROM subscriptions WHERE id = $1"))
            .bind(id)
            .execute(self.pool())
            .await?
            .rows_affected();
        if gone == 0 {
            return Err(StoreError::NotFound {
                entity: "subscription",
                id,
            });
        }
        Ok(())
    }

    /// A delivery of each event to each subscription that asks for its type
    /// and existed when it happened (once: a redelivered event adds none);
    /// how many were added.
    pub async fn add_deliveries(&self, events: &[NewEvent]) -> Result<u64> {
        if events.is_empty() {
            return Ok(0);
        }
        Ok(sqlx::query(sql!(
            "INSERT INTO deliveries (subscription_id, event_id, stream_seq, event_type, ticket_id, event)
             SELECT s.id, e.event_id, e.seq, e.event_type, e.ticket_id, e.event
             FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::uuid[], $5::timestamptz[], $6::jsonb[])
                  AS e(event_id, seq, event_type, ticket_id, occurred_at, event)
             JOIN subscriptions s ON e.event_type = ANY (s.event_types) AND s.created_at <= e.occurred_at
             ON CONFLICT DO NOTHING"
        ))
        .bind(events.iter().map(|e| e.event_id).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.stream_seq).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.event_type.as_str()).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.ticket_id).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.occurred_at).collect::<Vec<_>>())
        .bind(events.iter().map(|e| &e.event).collect::<Vec<_>>())
        .execute(self.pool())
        .await?
        .rows_affected())
    }

    /// Up to `limit` deliveries due now, held for `hold` (one try): of each
    /// ticket's pending deliveries to a subscription only the first in
    /// stream order, so that a receiver sees a ticket's events in order.
    pub async fn claim_deliveries(&self, limit: i64, hold: Duration) -> Result<Vec<Claimed>> {
        let rows: Vec<ClaimedRow> = sqlx::query_as(sql!(
            "WITH due AS (
                 SELECT p.subscription_id, p.event_id FROM deliveries p
                 WHERE p.state = 'pending' AND p.next_at <= now()
                   AND (p.claimed_until IS NULL OR p.claimed_until < now())
                   AND NOT EXISTS (
                       SELECT 1 FROM deliveries e
                       WHERE e.subscription_id = p.subscription_id AND e.ticket_id = p.ticket_id
                         AND e.state = 'pending' AND e.stream_seq < p.stream_seq)
                 ORDER BY p.next_at LIMIT $1
                 FOR UPDATE SKIP LOCKED),
             claimed AS (
                 UPDATE deliveries d SET claimed_until = now() + make_interval(secs => $2)
                 FROM due WHERE d.subscription_id = due.subscription_id AND d.event_id = due.event_id
                 RETURNING d.subscription_id, d.event_id, d.event, d.created_at, jsonb_array_length(d.attempts) AS tries)
             SELECT c.subscription_id, c.event_id, s.url, s.format, s.secret, c.event, c.created_at, c.tries
             FROM claimed c JOIN subscriptions s ON s.id = c.subscription_id"
        ))
        .bind(limit)
        .bind(hold.as_secs_f64())
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(Claimed {
                    subscription_id: r.subscription_id,
                    event_id: r.event_id,
                    url: r.url,
                    format: Format::parse(&r.format).ok_or_else(|| decode(format!("format {}", r.format)))?,
                    secret: r.secret,
                    event: r.event,
                    created_at: r.created_at,
                    tries: u32::try_from(r.tries).unwrap_or(0),
                })
            })
            .collect()
    }

    /// Records a try: the delivery is now `state`, tried next after `wait`
    /// when still pending; its hold ends.
    pub async fn record_try(
        &self,
        subscription_id: Uuid,
        event_id: Uuid,
        attempt: &Attempt,
        state: DeliveryState,
        wait: Duration,
    ) -> Result<()> {
        let attempt = serde_json::to_value(attempt).map_err(|e| StoreError::from(sqlx::Error::Encode(Box::new(e))))?;
        sqlx::query(sql!(
            "UPDATE deliveries SET state = $3, attempts = attempts || jsonb_build_array($4::jsonb),
                 next_at = now() + make_interval(secs => $5), claimed_until = NULL,
                 delivered_at = CASE WHEN $3 = 'delivered' THEN now() ELSE delivered_at END
             WHERE subscription_id = $1 AND event_id = $2"
        ))
        .bind(subscription_id)
        .bind(event_id)
        .bind(state.as_str())
        .bind(attempt)
        .bind(wait.as_secs_f64())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// A subscription's deliveries, newest first; `before` is the previous
    /// page's last (created_at, event_id).
    pub async fn deliveries(
        &self,
        subscription_id: Uuid,
        page_size: i64,
        before: Option<(DateTime<Utc>, Uuid)>,
    ) -> Result<(Vec<Delivery>, Option<(DateTime<Utc>, Uuid)>)> {
        let exists: Option<i32> = sqlx::query_scalar(sql!("SELECT 1 FROM subscriptions WHERE id = $1"))
            .bind(subscription_id)
            .fetch_optional(self.pool())
            .await?;
        if exists.is_none() {
            return Err(StoreError::NotFound {
                entity: "subscription",
                id: subscription_id,
            });
        }
        let rows: Vec<DeliveryRow> = sqlx::query_as(sql!(
            "SELECT event_id, event_type, ticket_id, state, created_at, delivered_at, next_at, attempts
             FROM deliveries WHERE subscription_id = $1
               AND ($2::timestamptz IS NULL OR (created_at, event_id) < ($2, $3))
             ORDER BY created_at DESC, event_id DESC LIMIT $4"
        ))
        .bind(subscription_id)
        .bind(before.map(|b| b.0))
        .bind(before.map(|b| b.1))
        .bind(page_size + 1)
        .fetch_all(self.pool())
        .await?;
        let mut out = rows.into_iter().map(delivery_of).collect::<Result<Vec<_>>>()?;
        let next = if out.len() as i64 > page_size {
            out.truncate(page_size as usize);
            out.last().map(|d| (d.created_at, d.event_id))
        } else {
            None
        };
        Ok((out, next))
    }

    /// Deletes up to `batch` deliveries that ended (delivered, refused,
    /// expired) more than `keep` ago; how many went.
    pub async fn prune_deliveries(&self, keep: Duration, batch: i64) -> Result<u64> {
        Ok(sqlx::query(sql!(
            "DELETE FROM deliveries WHERE (subscription_id, event_id) IN (
                 SELECT subscription_id, event_id FROM deliveries
                 WHERE state <> 'pending' AND created_at < now() - make_interval(secs => $1)
                 LIMIT $2 FOR UPDATE SKIP LOCKED)"
        ))
        .bind(keep.as_secs_f64())
        .bind(batch)
        .execute(self.pool())
        .await?
        .rows_affected())
    }
}
