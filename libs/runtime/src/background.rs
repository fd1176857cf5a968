//! The shapes of a process's background work, written once: a pause that
//! a stop cuts short, a pass repeated every period until the stop, and a
//! call retried by a named [`Policy`] until it is answered. What each does
//! when its work fails and when the process stops is part of its contract
//! (below), so a loop built on them says it by what it calls.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use omoi_domain::backoff::Policy;
use tokio_util::sync::CancellationToken;

/// The retry policies of the mesh's processes, by what they wait for.
/// Every one is jittered: after an outage, replicas and executors that lost
/// the same peer at the same moment do not all come back in lockstep.
pub mod policy {
    use std::time::Duration;

    use omoi_domain::backoff::Policy;

    /// PostgreSQL down or restarting (migrations, change listeners): 200 ms
    /// doubling to 5 s.
    pub const DATABASE: Policy = Policy::exponential(Duration::from_millis(200), Duration::from_secs(5)).jitter(0.25);

    /// NATS or JetStream not answering (the relay, consumers, streams):
    /// 200 ms doubling to 6.4 s.
    pub const NATS: Policy = Policy::exponential(Duration::from_millis(200), Duration::from_millis(6400)).jitter(0.25);

    /// A peer service's stream or registration lost (an executor's
    /// assignment stream and registration): 100 ms doubling to 5 s.
    pub const RECONNECT: Policy = Policy::exponential(Duration::from_millis(100), Duration::from_secs(5)).jitter(0.25);

    /// An agent's report of an attempt (StartTask, CompleteTask, FailTask):
    /// 100 ms doubling to 2 s, 60 attempts (about two minutes); after that
    /// the queue's leases and timeouts take over.
    pub const REPORT: Policy = Policy::exponential(Duration::from_millis(100), Duration::from_secs(2))
        .jitter(0.25)
        .attempts(60);

    /// An agent's output lines on their way to JetStream: 50 ms doubling to
    /// 2 s.
    pub const OUTPUT: Policy = Policy::exponential(Duration::from_millis(50), Duration::from_secs(2)).jitter(0.25);

    /// A forge that failed a request (GitHub down or rate-limiting): 2 s
    /// doubling to 10 minutes, the attempts counted in the database.
    pub const FORGE: Policy = Policy::exponential(Duration::from_secs(2), Duration::from_secs(600));
}

/// Waits `wait`, unless `stop` fires first: false then.
pub async fn pause(stop: &CancellationToken, wait: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

/// Runs `pass` now and then every `period` (after each pass ends) until
/// `stop`.
///
/// On failure: the error is logged as `what` failing and the next pass
/// comes a period later, as usual. On stop: a pass under way finishes, then
/// the loop ends.
pub async fn every<F, Fut, E>(what: &str, period: Duration, stop: &CancellationToken, mut pass: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    loop {
        if let Err(e) = pass().await {
            tracing::warn!(error = %e, "{what} failed; trying again in {period:?}");
        }
        if !pause(stop, period).await {
            return;
        }
    }
}

/// What became of a call made by [`retry`].
#[derive(Debug, PartialEq, Eq)]
pub enum Retried<T, E> {
    Done(T),
    /// An answer that retrying cannot change.
    Refused(E),
    /// The policy's attempts ran out on this (transient) error.
    GaveUp(E),
    /// The stop came first.
    Stopped,
}

/// Makes `call` until it succeeds, is refused (`transient` says no), the
/// policy runs out of attempts, or `stop`.
///
/// On a transient failure: logged at debug level as `what`, then waited
/// out by the policy. On stop: a call under way finishes; no other is made.
pub async fn retry<T, E, F, Fut>(
    what: &str,
    policy: Policy,
    stop: &CancellationToken,
    transient: impl Fn(&E) -> bool,
    mut call: F,
) -> Retried<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Display,
{
    let mut backoff = policy.start();
    loop {
        if stop.is_cancelled() {
            return Retried::Stopped;
        }
        let error = match call().await {
            Ok(done) => return Retried::Done(done),
            Err(e) if !transient(&e) => return Retried::Refused(e),
            Err(e) => e,
        };
        let wait = backoff.next_delay();
        if !backoff.may_retry() {
            return Retried::GaveUp(error);
        }
        tracing::debug!(error = %error, retry_in = ?wait, "{what} failed; retrying");
        if !pause(stop, wait).await {
            return Retried::Stopped;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    const QUICK: Policy = Policy::fixed(Duration::from_millis(1)).attempts(3);

    #[tokio::test]
    async fn a_call_is_retried_while_transient_until_it_succeeds() {
        let calls = AtomicU32::new(0);
        let got = retry(
            "call",
            QUICK,
            &CancellationToken::new(),
            |_: &String| true,
            || async {
                match calls.fetch_add(1, Ordering::Relaxed) {
                    0 | 1 => Err("down".to_owned()),
                    n => Ok(n),
                }
            },
        )
        .await;
        assert_eq!(got, Retried::Done(2));
    }

    #[tokio::test]
    async fn a_refusal_ends_at_once_and_attempts_run_out() {
        let calls = AtomicU32::new(0);
        let refused: Retried<(), String> = retry(
            "call",
            QUICK,
            &CancellationToken::new(),
            |e| e != "no",
            || async {
                calls.fetch_add(1, Ordering::Relaxed);
                Err("no".to_owned())
            },
        )
        .await;
        assert_eq!(
            (refused, calls.swap(0, Ordering::Relaxed)),
            (Retried::Refused("no".into()), 1)
        );
        let gave_up: Retried<(), String> = retry(
            "call",
            QUICK,
            &CancellationToken::new(),
            |_| true,
            || async {
                calls.fetch_add(1, Ordering::Relaxed);
                Err("down".to_owned())
            },
        )
        .await;
        assert_eq!(
            (gave_up, calls.load(Ordering::Relaxed)),
            (Retried::GaveUp("down".into()), 3)
        );
    }

    #[tokio::test]
    async fn a_stop_ends_retries_and_periodic_passes() {
        let stop = CancellationToken::new();
        let forever = Policy::fixed(Duration::from_secs(3600));
        let (calls, passes) = (AtomicU32::new(0), AtomicU32::new(0));
        let retried = retry(
            "call",
            forever,
            &stop,
            |_: &String| true,
            || async {
                calls.fetch_add(1, Ordering::Relaxed);
                stop.cancel();
                Err("down".to_owned())
            },
        );
        assert_eq!(retried.await, Retried::<(), String>::Stopped);
        let stop = CancellationToken::new();
        every("pass", Duration::from_secs(3600), &stop, || async {
            passes.fetch_add(1, Ordering::Relaxed);
            stop.cancel();
            Err::<(), _>("failed")
        })
        .await;
        assert_eq!((calls.load(Ordering::Relaxed), passes.load(Ordering::Relaxed)), (1, 1));
    }
}
