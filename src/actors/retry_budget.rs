//! A client that keeps retrying a CA which is refusing its work (breaker open, disabled,
//! parked, draining) is told, past a small budget per (client, CA) and second, to back off
//! harder: `429 too-many-retries` with a `Retry-After` that doubles with each second spent over
//! the budget (up to a minute) and falls back as the client calms down. Like every refusal, it
//! costs a few atomic operations on a table fixed at start-up: no lock, no allocation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::time::Duration;

use crate::error::EngineError;

/// The doubling stops here: 2^6 s = 64 s.
const MAX_LEVEL: u32 = 6;

#[derive(Default)]
struct Strikes {
    /// The second (since the epoch) `count` is counting.
    second: AtomicI64,
    count: AtomicU32,
    /// How many seconds over the budget, less the quiet ones since.
    level: AtomicU32,
}

pub struct RetryBudget {
    clients: HashMap<String, usize>,
    cas: HashMap<String, usize>,
    strikes: Box<[Strikes]>,
    per_second: u32,
}

impl RetryBudget {
    pub fn new<'a>(
        clients: impl IntoIterator<Item = &'a str>,
        cas: impl IntoIterator<Item = &'a str>,
        per_second: u32,
    ) -> RetryBudget {
        let clients: HashMap<String, usize> = clients.into_iter().enumerate().map(|(i, c)| (c.into(), i)).collect();
        let cas: HashMap<String, usize> = cas.into_iter().enumerate().map(|(i, c)| (c.into(), i)).collect();
        let strikes = (0..clients.len() * cas.len()).map(|_| Strikes::default()).collect();
        RetryBudget { clients, cas, strikes, per_second }
    }

    /// `err`, or — for a client over its budget of refusals by this CA this second —
    /// `too-many-retries` with a Retry-After that grows while it keeps on.
    pub fn judge(&self, client: &str, err: EngineError, now_ms: i64) -> EngineError {
        let ca = match &err {
            EngineError::CaUnavailable { ca, .. } | EngineError::CaDisabled(ca) if self.per_second > 0 => ca,
            _ => return err,
        };
        let (Some(&c), Some(&a)) = (self.clients.get(client), self.cas.get(ca.as_str())) else { return err };
        let s = &self.strikes[c * self.cas.len() + a];
        let second = now_ms.div_euclid(1000);
        let seen = s.second.load(Ordering::Relaxed);
        if seen != second && s.second.compare_exchange(seen, second, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            // The first refusal of a new second closes the last one: each quiet second since
            // (at most the budget's worth of refusals) takes one doubling back.
            let last = s.count.swap(0, Ordering::Relaxed);
            let quiet = (second - seen - 1).max(0) + i64::from(last <= self.per_second);
            let quiet = u32::try_from(quiet).unwrap_or(u32::MAX);
            let _ = s.level.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| Some(l.saturating_sub(quiet)));
        }
        let n = s.count.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= self.per_second {
            return err;
        }
        let level = if n == self.per_second + 1 {
            s.level.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| Some((l + 1).min(MAX_LEVEL))).unwrap_or(0)
                + 1
        } else {
            s.level.load(Ordering::Relaxed)
        }
        .min(MAX_LEVEL);
        EngineError::TooManyRetries { ca: ca.clone(), retry_after: Duration::from_secs(1 << level) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disabled() -> EngineError {
        EngineError::CaDisabled("ica-p384".into())
    }

    fn retry_after(e: &EngineError) -> Option<u64> {
        match e {
            EngineError::TooManyRetries { retry_after, .. } => Some(retry_after.as_secs()),
            _ => None,
        }
    }

    #[test]
    fn past_the_budget_a_client_is_told_to_back_off_longer_each_second() {
        let b = RetryBudget::new(["demo", "other"], ["ica-p384", "ica-p256"], 5);
        let at = |s: i64| s * 1000;
        for _ in 0..5 {
            assert_eq!(b.judge("demo", disabled(), at(100)), disabled(), "within the budget");
        }
        assert_eq!(retry_after(&b.judge("demo", disabled(), at(100))), Some(2));
        assert_eq!(retry_after(&b.judge("demo", disabled(), at(100))), Some(2));
        // Another client, another CA: budgets of their own.
        assert_eq!(b.judge("other", disabled(), at(100)), disabled());
        let p256 = EngineError::CaDisabled("ica-p256".into());
        assert_eq!(b.judge("demo", p256.clone(), at(100)), p256);
        // Still storming the next second: the wait doubles.
        for _ in 0..5 {
            b.judge("demo", disabled(), at(101));
        }
        assert_eq!(retry_after(&b.judge("demo", disabled(), at(101))), Some(4));
        for s in 102..110 {
            for _ in 0..6 {
                b.judge("demo", disabled(), at(s));
            }
        }
        assert_eq!(retry_after(&b.judge("demo", disabled(), at(109))), Some(64), "capped at a minute");
        // Ten quiet seconds later the client starts over.
        assert_eq!(b.judge("demo", disabled(), at(120)), disabled());
        for _ in 0..5 {
            b.judge("demo", disabled(), at(120));
        }
        assert_eq!(retry_after(&b.judge("demo", disabled(), at(120))), Some(2));
    }

    #[test]
    fn only_a_cas_refusals_count_and_a_zero_budget_is_off() {
        let b = RetryBudget::new(["demo"], ["ica-p384"], 1);
        let overloaded =
            EngineError::CaOverloaded { ca: "ica-p384".into(), reason: "busy".into(), retry_after: Duration::ZERO };
        for _ in 0..10 {
            assert_eq!(b.judge("demo", overloaded.clone(), 0), overloaded, "overload is not a refusal to retry");
        }
        let off = RetryBudget::new(["demo"], ["ica-p384"], 0);
        for _ in 0..10 {
            assert_eq!(off.judge("demo", disabled(), 0), disabled());
        }
    }
}
