//! The database as readiness sees it: probed in the background, so that `/readyz` answers at
//! once from what the last probe found, whatever the database does. A load balancer's check
//! timeout must never be what decides whether an instance is ready (with PostgreSQL frozen, a
//! check that asked the database itself took its full 2 s bound).

use arc_swap::ArcSwap;
use std::time::Duration;

use crate::error::EngineError;

/// How often the database is probed (a `SELECT 1` on the status pool).
pub(super) const PROBE_EVERY: Duration = Duration::from_millis(250);
/// A database whose last answer is older than this is unavailable: a probe is waiting on it.
const ANSWER_MAX_AGE_MS: i64 = 2_000;

/// What the last finished probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Probe {
    /// The database answered at `at_ms`.
    Answered { at_ms: i64 },
    /// The last probe failed: the database refused, or no status connection was free.
    Failed { reason: String },
}

pub(super) struct DatabaseProbe(ArcSwap<Probe>);

impl DatabaseProbe {
    /// The engine has just used the database to start (migrations, registry): it answered.
    pub fn new(now_ms: i64) -> DatabaseProbe {
        DatabaseProbe(ArcSwap::from_pointee(Probe::Answered { at_ms: now_ms }))
    }

    pub fn record(&self, result: Result<(), EngineError>, now_ms: i64) {
        let probe = match result {
            Ok(()) => Probe::Answered { at_ms: now_ms },
            Err(e) => Probe::Failed { reason: e.to_string() },
        };
        self.0.store(probe.into());
    }

    /// Available as of `now_ms`, or why not.
    pub fn verdict(&self, now_ms: i64) -> Result<(), String> {
        match &**self.0.load() {
            Probe::Answered { at_ms } if now_ms - at_ms <= ANSWER_MAX_AGE_MS => Ok(()),
            Probe::Answered { at_ms } => Err(format!("database: no answer for {} ms", now_ms - at_ms)),
            Probe::Failed { reason } => Err(format!("database: {reason}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn available_while_answers_are_recent_and_unavailable_once_they_stop_or_fail() {
        let probe = DatabaseProbe::new(1_000);
        assert_eq!(probe.verdict(1_000 + ANSWER_MAX_AGE_MS), Ok(()));
        assert_eq!(
            probe.verdict(1_001 + ANSWER_MAX_AGE_MS),
            Err(format!("database: no answer for {} ms", ANSWER_MAX_AGE_MS + 1)),
            "a probe waiting on a frozen database"
        );
        probe.record(Err(EngineError::DatabaseUnavailable), 5_000);
        assert!(probe.verdict(5_000).unwrap_err().starts_with("database: "), "a failed probe");
        probe.record(Ok(()), 6_000);
        assert_eq!(probe.verdict(6_100), Ok(()), "answering again");
    }
}
