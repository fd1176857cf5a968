//! Change announcements: tables whose watchers must hear of writes from any
//! replica have a trigger that NOTIFYs a channel when a write commits; a
//! watcher LISTENs on a connection of its own.

use sqlx::postgres::PgListener;

use crate::{Result, Store};

/// Announcements on one channel, in this database.
pub struct Listener(PgListener);

impl Store {
    /// Listens on `channel` on a connection of its own (outside the pool's
    /// count): from now on, every committed announcement arrives.
    pub async fn listen(&self, channel: &str) -> Result<Listener> {
        let mut listener = PgListener::connect_with(self.pool()).await?;
        listener.listen(channel).await?;
        Ok(Listener(listener))
    }
}

impl Listener {
    /// The next announcement's payload; None when the connection was lost,
    /// after which announcements may have been missed (listen again).
    pub async fn next(&mut self) -> Result<Option<String>> {
        Ok(self.0.try_recv().await?.map(|note| note.payload().to_owned()))
    }
}
