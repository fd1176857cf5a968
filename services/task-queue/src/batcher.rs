//! Group commit for the hot reports: concurrent StartTask and CompleteTask
//! calls are gathered while the previous batch commits and are written
//! together in one transaction; each RPC answers after its batch committed.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;

use omoi_base::status;
use omoi_store::tasks::Report;
use omoi_store::{Store, StoreError, Task};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

type Reply = oneshot::Sender<Result<Task, Status>>;
/// A batch write: one result per report, and how many dependents it
/// released.
type BatchFuture<'a> =
    Pin<Box<dyn Future<Output = Result<(Vec<Result<Task, StoreError>>, u64), StoreError>> + Send + 'a>>;

/// Largest batch written at once.
const MAX_BATCH: usize = 512;

#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<(Report, Reply)>,
}

#[derive(Clone, Copy)]
pub enum Kind {
    Start,
    Complete,
}

impl Batcher {
    /// Spawns the batch writer; it ends when every handle is dropped.
    /// `after_commit` gets the tasks a batch changed and how many
    /// dependents it released.
    pub fn spawn(store: Store, kind: Kind, after_commit: impl Fn(&[Task], u64) + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run(store, kind, rx, after_commit));
        Self { tx }
    }

    pub async fn submit(&self, report: Report) -> Result<Task, Status> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((report, reply))
            .await
            .map_err(|_| Status::unavailable("shutting down"))?;
        answer.await.map_err(|_| Status::unavailable("shutting down"))?
    }
}

async fn run(
    store: Store,
    kind: Kind,
    mut rx: mpsc::Receiver<(Report, Reply)>,
    after_commit: impl Fn(&[Task], u64) + Send + 'static,
) {
    let mut carried: Vec<(Report, Reply)> = Vec::new();
    loop {
        let mut batch = std::mem::take(&mut carried);
        if batch.is_empty() {
            match rx.recv().await {
                Some(item) => batch.push(item),
                None => return,
            }
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        // Two reports of one task go to separate batches, so each gets its
        // own verdict (the second sees what the first did).
        let mut seen = HashSet::new();
        let (batch, later): (Vec<_>, Vec<_>) = batch.into_iter().partition(|(r, _)| seen.insert(r.task_id));
        carried = later;

        let reports: Vec<Report> = batch.iter().map(|(r, _)| r.clone()).collect();
        let write: BatchFuture<'_> = match kind {
            Kind::Start => Box::pin(async { Ok((store.start_batch(&reports).await?, 0)) }),
            Kind::Complete => Box::pin(async {
                let done = store.complete_batch(&reports).await?;
                Ok((done.results, done.released))
            }),
        };
        match write.await {
            Ok((results, released)) => {
                let applied: Vec<Task> = results.iter().filter_map(|r| r.as_ref().ok().cloned()).collect();
                if !applied.is_empty() {
                    after_commit(&applied, released);
                }
                for ((_, reply), result) in batch.into_iter().zip(results) {
                    let _ = reply.send(result.map_err(status));
                }
            }
            Err(e) => {
                let refused = status(e);
                for (_, reply) in batch {
                    let _ = reply.send(Err(refused.clone()));
                }
            }
        }
    }
}
