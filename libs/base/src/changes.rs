//! Following a table's change announcements for a service's watchers,
//! through database restarts and lost connections.

use omoi_runtime::background::{pause, policy};
use omoi_store::Store;
use tokio_util::sync::CancellationToken;

/// What a watcher is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A write committed; the trigger's payload.
    Changed(String),
    /// Listening again after the connection was lost: writes may have gone
    /// by unannounced, so whatever a watcher shows must be read afresh.
    Missed,
}

/// Listens on `channel` until `shutdown`, telling each announcement, and
/// `Missed` each time listening resumes after it was interrupted.
pub async fn follow(store: Store, channel: &'static str, shutdown: CancellationToken, tell: impl Fn(Notice)) {
    let mut backoff = policy::DATABASE.start();
    let mut first = true;
    while !shutdown.is_cancelled() {
        let mut listener = match store.listen(channel).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, channel, "listening for changes");
                if !pause(&shutdown, backoff.next_delay()).await {
                    return;
                }
                continue;
            }
        };
        backoff.reset();
        if !std::mem::take(&mut first) {
            tell(Notice::Missed);
        }
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                n = listener.next() => n,
            };
            match next {
                Ok(Some(payload)) => tell(Notice::Changed(payload)),
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, channel, "changes interrupted");
                    break;
                }
            }
        }
    }
}
