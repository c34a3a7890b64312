//! The engine's actors. Where a request goes:
//!
//! 1. [`intake`] (on the caller's task): authenticate, check the CSR, find the profile in the
//!    registry's snapshot, refuse what can never succeed, hand the rest to the CA's cell.
//! 2. [`cell`] (one per CA, on its own arbiter): bounded [`lanes`], deadlines, a [`coalescer`]
//!    for identical background work, the issuance pipeline.
//! 3. [`store`] (worker threads, one per issuance connection): the only writer on the issuance
//!    path, group-committing batches. The worker that commits a job's write-ahead record hands
//!    the job to its CA's signer.
//! 4. [`signer`] (threads of the CA's own, [`workers`]): sign the recorded TBS (the cell built and
//!    linted it) and hand the certificate back to the store, whose worker answers the cell.
//! 5. [`registry`]: live CA/profile state and its version, pushed to intake and cells.
//! 6. [`resumer`]: takes up pending asynchronous requests nobody owns (after a restart or crash).
//!
//! Disposable identities add three: [`keypool`] (keys generated ahead, on threads of their own),
//! [`vault`] (opens a sealed identity key and signs a digest, on threads of its own) and
//! [`sweeper`] (destroys expired identities).

pub mod breaker;
pub mod cell;
pub mod coalescer;
pub mod crl_publisher;
pub mod gauges;
pub mod history;
pub mod intake;
pub mod job;
pub mod keypool;
pub mod lanes;
pub mod pipeline;
pub mod registry;
pub mod resumer;
pub mod retry_budget;
pub mod signer;
pub mod store;
pub mod supervisor;
pub mod sweeper;
pub mod vault;
pub mod workers;

/// Run `f`, turning a panic into an error so a worker thread survives and its caller is answered.
pub(crate) fn catch_panic<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        tracing::error!(worker = what, panic = %msg, "worker panicked; answered as an error");
        msg
    })
}

/// Fault injection (dev mode only): panic here if `pending` holds an injected panic, taking it.
/// One atomic load when none is pending.
pub(crate) fn injected_panic(pending: &std::sync::atomic::AtomicU32, what: &str) {
    use std::sync::atomic::Ordering;
    if pending.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
        #[allow(clippy::panic)]
        {
            panic!("injected fault: {what} panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_panic_becomes_an_error_and_the_thread_lives_on() {
        let result = super::catch_panic("test", || -> u32 { panic!("boom") });
        assert_eq!(result, Err("boom".to_string()));
        assert_eq!(super::catch_panic("test", || 7), Ok(7));
    }
}
