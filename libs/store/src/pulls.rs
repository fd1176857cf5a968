//! Completed tickets whose branch should end in a pull request: taken one
//! at a time by whichever replica asks first (the row stays locked while
//! the forge is asked), then recorded as opened, refused or due again.

use std::time::Duration;

use omoi_domain::event::PullRequestOpened;
use omoi_domain::{Envelope, Event, Ticket};
use sqlx::{Postgres, Transaction};

use crate::statements::sql;
use crate::tickets::{TicketRow, ticket_columns};
use crate::{Result, Store, events};

/// A due ticket, held until its outcome is recorded (dropping it releases
/// the ticket untouched).
pub struct PullRequestClaim {
    store: Store,
    tx: Transaction<'static, Postgres>,
    pub ticket: Ticket,
    /// Attempts made before this one.
    pub attempts: i32,
}

impl Store {
    /// The completed ticket whose pull request is most overdue, locked for
    /// this caller; None when nothing is due.
    pub async fn next_pull_request(&self) -> Result<Option<PullRequestClaim>> {
        let mut tx = self.pool().begin().await?;
        let row: Option<(TicketRow, i32)> = sqlx::query_as(sql!(concat!(
            "SELECT ",
            ticket_columns!(),
            ", pull_request_attempts FROM tickets
             WHERE pull_request AND pull_request_url = '' AND status = 'completed'
               AND pull_request_next_at <= now()
             ORDER BY pull_request_next_at
             LIMIT 1 FOR UPDATE SKIP LOCKED"
        )))
        .fetch_optional(&mut *tx)
        .await?
        .map(|row: TicketRowWithAttempts| (row.0, row.1));
        Ok(row.map(|(TicketRow(ticket), attempts)| PullRequestClaim {
            store: self.clone(),
            tx,
            ticket,
            attempts,
        }))
    }
}

/// A ticket row with its attempts counter.
struct TicketRowWithAttempts(TicketRow, i32);

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for TicketRowWithAttempts {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> sqlx::Result<Self> {
        use sqlx::Row;
        Ok(Self(TicketRow::from_row(row)?, row.try_get("pull_request_attempts")?))
    }
}

impl PullRequestClaim {
    /// The pull request exists: recorded, with its event.
    pub async fn opened(mut self, opened: PullRequestOpened) -> Result<()> {
        sqlx::query(sql!(
            "UPDATE tickets SET pull_request_url = $2, pull_request_error = '',
                 pull_request_attempts = pull_request_attempts + 1, updated_at = now()
             WHERE id = $1"
        ))
        .bind(self.ticket.id)
        .bind(&opened.url)
        .execute(&mut *self.tx)
        .await?;
        let id = self.ticket.id;
        let event = Envelope::new(id, Some(id), Event::TicketPullRequestOpened(opened));
        events::insert(&mut self.tx, &[event]).await?;
        self.store.commit(self.tx).await
    }

    /// The forge said no (rights, a branch it does not have): its message is
    /// recorded and no attempt follows.
    pub async fn refused(self, message: &str) -> Result<()> {
        self.record(message, None).await
    }

    /// The forge could not be asked now: tried again after `delay`.
    pub async fn retry_after(self, message: &str, delay: Duration) -> Result<()> {
        self.record(message, Some(delay)).await
    }

    async fn record(mut self, message: &str, delay: Option<Duration>) -> Result<()> {
        sqlx::query(sql!(
            "UPDATE tickets SET pull_request_error = $2, pull_request_attempts = pull_request_attempts + 1,
                 pull_request_next_at = CASE WHEN $3::float8 IS NULL THEN 'infinity'
                                             ELSE now() + make_interval(secs => $3) END,
                 updated_at = now()
             WHERE id = $1"
        ))
        .bind(self.ticket.id)
        .bind(message)
        .bind(delay.map(|d| d.as_secs_f64()))
        .execute(&mut *self.tx)
        .await?;
        self.store.commit(self.tx).await
    }
}
