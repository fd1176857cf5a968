//! Dispatch pauses: scopes whose tasks the claim hands out to nobody until
//! resumed (`dispatch_pauses`; the claim statement checks it).

use chrono::{DateTime, Utc};
pub use omoi_domain::rules::Pause;
use omoi_domain::rules::{self, Scope};
use uuid::Uuid;

use crate::codes::{phase_code, phase_of};
use crate::events;
use crate::statements::sql;
use crate::{Result, Store, StoreError};

type PauseRow = (Option<i16>, Option<Uuid>, String, DateTime<Utc>);

fn pause_of((phase, ticket_id, reason, paused_at): PauseRow) -> Result<Pause> {
    let phase = match phase {
        Some(code) => {
            Some(phase_of(code).ok_or_else(|| StoreError::from(sqlx::Error::Decode(format!("phase {code}").into())))?)
        }
        None => None,
    };
    Ok(Pause {
        scope: Scope { phase, ticket_id },
        reason,
        paused_at,
    })
}

impl Store {
    /// Pauses `scope` (QUEUE_PAUSED); pausing it again keeps it paused and
    /// only updates the reason.
    pub async fn pause(&self, scope: Scope, reason: &str) -> Result<Pause> {
        let mut tx = self.pool().begin().await?;
        // xmax = 0: the row was inserted, not updated.
        let (phase, ticket_id, stored_reason, paused_at, created): (
            Option<i16>,
            Option<Uuid>,
            String,
            DateTime<Utc>,
            bool,
        ) = sqlx::query_as(sql!(
            "INSERT INTO dispatch_pauses (phase, ticket_id, reason) VALUES ($1, $2, $3)
                 ON CONFLICT (phase, ticket_id) DO UPDATE SET reason = EXCLUDED.reason
                 RETURNING phase, ticket_id, reason, paused_at, xmax = 0"
        ))
        .bind(scope.phase.map(phase_code))
        .bind(scope.ticket_id)
        .bind(reason)
        .fetch_one(&mut *tx)
        .await?;
        if created {
            events::insert(&mut tx, &[rules::paused(scope, reason)]).await?;
        }
        self.commit(tx).await?;
        pause_of((phase, ticket_id, stored_reason, paused_at))
    }

    /// Lifts the pause of `scope`, or every pause for the whole-queue
    /// scope (QUEUE_RESUMED for each); the lifted ones, none when nothing
    /// was paused.
    pub async fn resume(&self, scope: Scope) -> Result<Vec<Pause>> {
        let mut tx = self.pool().begin().await?;
        let rows: Vec<PauseRow> = sqlx::query_as(sql!(
            "DELETE FROM dispatch_pauses
             WHERE ($3 OR (phase IS NOT DISTINCT FROM $1 AND ticket_id IS NOT DISTINCT FROM $2))
             RETURNING phase, ticket_id, reason, paused_at"
        ))
        .bind(scope.phase.map(phase_code))
        .bind(scope.ticket_id)
        .bind(scope.is_everything())
        .fetch_all(&mut *tx)
        .await?;
        let lifted = rows.into_iter().map(pause_of).collect::<Result<Vec<_>>>()?;
        let evs: Vec<_> = lifted.iter().map(|p| rules::resumed(p.scope)).collect();
        events::insert(&mut tx, &evs).await?;
        self.commit(tx).await?;
        Ok(lifted)
    }

    /// Every pause, oldest first.
    pub async fn pauses(&self) -> Result<Vec<Pause>> {
        let rows: Vec<PauseRow> = sqlx::query_as(sql!(
            "SELECT phase, ticket_id, reason, paused_at FROM dispatch_pauses ORDER BY paused_at"
        ))
        .fetch_all(self.pool())
        .await?;
        rows.into_iter().map(pause_of).collect()
    }
}
