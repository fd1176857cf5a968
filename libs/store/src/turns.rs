//! Work one replica does at a time: a pass of a background loop that talks
//! to the outside world (the forge), which every replica runs but which
//! must not be done twice at once. A turn is a PostgreSQL advisory lock
//! held on a connection of its own: a replica that dies gives it back as
//! its connection closes.

use sqlx::Postgres;
use sqlx::pool::PoolConnection;

use crate::statements::sql;

use crate::{Result, Store};

/// The turns there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// A look at the open pull requests (`OMOI_GITHUB_POLL_SECONDS`).
    PullRequestLook,
    /// Asking whether pull requests whose base moved still merge.
    MergeCheck,
}

impl Turn {
    /// Its advisory lock's key (the outbox relay's is `0x6f6d_6f69_0001`).
    fn key(self) -> i64 {
        match self {
            Turn::PullRequestLook => 0x6f6d_6f69_0101,
            Turn::MergeCheck => 0x6f6d_6f69_0102,
        }
    }
}

/// A turn held, until [`Held::release`] (or, dropped, until its connection
/// closes).
pub struct Held {
    conn: Option<PoolConnection<Postgres>>,
    turn: Turn,
}

impl Store {
    /// Takes `turn` when no other replica holds it; None when one does.
    pub async fn take_turn(&self, turn: Turn) -> Result<Option<Held>> {
        let mut conn = self.pool().acquire().await?;
        let held: bool = sqlx::query_scalar(sql!("SELECT pg_try_advisory_lock($1)"))
            .bind(turn.key())
            .fetch_one(&mut *conn)
            .await?;
        Ok(held.then_some(Held { conn: Some(conn), turn }))
    }
}

impl Held {
    /// Gives the turn back.
    pub async fn release(mut self) -> Result<()> {
        if let Some(mut conn) = self.conn.take() {
            let unlocked = sqlx::query(sql!("SELECT pg_advisory_unlock($1)"))
                .bind(self.turn.key())
                .execute(&mut *conn)
                .await;
            if unlocked.is_err() {
                // Not back in the pool holding the lock: closed, which
                // gives it back.
                drop(conn.detach());
            }
            unlocked?;
        }
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Never back in the pool holding the lock: the connection closes.
        if let Some(conn) = self.conn.take() {
            drop(conn.detach());
        }
    }
}
