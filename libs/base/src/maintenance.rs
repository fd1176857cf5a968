//! The upkeep every database service does for its own tables: vacuum where
//! nothing else does, retention, forgetting consumed-event records, and
//! the outbox gauge. Each is a pass repeated every period until the stop
//! (`background::every`): a failed pass is logged and the next one comes a
//! period later; a stop lets the pass under way finish.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use omoi_runtime::background::{every, pause};
use omoi_store::Store;
use tokio_util::sync::CancellationToken;

/// Vacuums those of `tables` nothing else vacuums, every `period`.
pub async fn vacuum(store: Store, tables: &'static [&'static str], period: Duration, stop: CancellationToken) {
    let announced = AtomicBool::new(false);
    let (store, announced) = (&store, &announced);
    // The tables were just migrated or written: the first pass waits a period.
    if !pause(&stop, period).await {
        return;
    }
    every("vacuuming", period, &stop, move || async move {
        let done = store.vacuum_unattended(tables).await?;
        if !done.is_empty() && !announced.swap(true, Ordering::Relaxed) {
            tracing::info!(tables = ?done, every = ?period, "autovacuum is off for these tables; vacuuming them");
        }
        Ok::<_, omoi_store::StoreError>(())
    })
    .await
}

/// Deletes what is past `keep`, a batch at a time until a pass finds less
/// than a batch, every [`prune_interval`] of it.
pub async fn retention<F, Fut>(what: &'static str, store: Store, keep: Duration, prune: F, stop: CancellationToken)
where
    F: Fn(Store, Duration, i64) -> Fut,
    Fut: Future<Output = omoi_store::Result<u64>>,
{
    const BATCH: i64 = 1000;
    let failed = format!("removing {what} past their retention");
    let (store, prune) = (&store, &prune);
    every(&failed, prune_interval(keep), &stop, move || async move {
        let mut gone = 0;
        loop {
            let n = prune(store.clone(), keep, BATCH).await?;
            gone += n;
            if n < BATCH as u64 {
                break;
            }
        }
        if gone > 0 {
            tracing::info!(removed = gone, "removed {what} past their retention");
        }
        Ok::<_, omoi_store::StoreError>(())
    })
    .await
}

/// Forgets consumed-event records a day after the stream stops keeping
/// their events (it can no longer redeliver them), every hour.
pub async fn forget_consumed(store: Store, stream_keeps: Duration, stop: CancellationToken) {
    let keep = stream_keeps + Duration::from_secs(86_400);
    let failed = "removing consumed-event records past their retention";
    let store = &store;
    every(failed, Duration::from_secs(3600), &stop, move || async move {
        let n = store.prune_processed_events(keep).await?;
        if n > 0 {
            tracing::info!(removed = n, "removed consumed-event records past their retention");
        }
        Ok::<_, omoi_store::StoreError>(())
    })
    .await
}

/// How often a retention of `keep` is applied: a tenth of it, between a
/// second and a minute.
pub fn prune_interval(keep: Duration) -> Duration {
    (keep / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Keeps the outbox backlog gauge current, every 5 s; a reading that fails
/// (the database away) leaves the gauge as it was.
pub async fn sample_outbox(store: Store, stop: CancellationToken) {
    let store = &store;
    every(
        "reading the outbox backlog",
        Duration::from_secs(5),
        &stop,
        move || async move {
            if let Ok(n) = store.outbox_backlog().await {
                omoi_runtime::metrics::OUTBOX_BACKLOG.set(n);
            }
            Ok::<_, std::convert::Infallible>(())
        },
    )
    .await
}
