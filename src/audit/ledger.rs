//! Refusals counted in memory. A retry storm multiplies whatever one refusal costs by thousands
//! a second, so recording one is a few atomic operations on a tally fixed at start-up — no
//! database write, no lock, no allocation after the first of its kind in an interval. The audit
//! writer drains the tallies into one row per (client, target, action, reason) per interval.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwapOption;
use prometheus_client::metrics::counter::Counter;

use crate::error::EngineError;
use crate::metrics::Metrics;

/// What a client was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Issue,
    Submit,
    IdentityCreate,
    IdentitySign,
}

impl Action {
    const ALL: [Action; 4] = [Action::Issue, Action::Submit, Action::IdentityCreate, Action::IdentitySign];

    /// The audit log's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Issue => "certificate.issue",
            Action::Submit => "certificate.submit",
            Action::IdentityCreate => "identity.create",
            Action::IdentitySign => "identity.sign",
        }
    }

    fn index(self) -> usize {
        match self {
            Action::Issue => 0,
            Action::Submit => 1,
            Action::IdentityCreate => 2,
            Action::IdentitySign => 3,
        }
    }
}

/// What a tally's target is called when it is not a configured profile: an unknown profile
/// name (the client's text is kept in the row's example, never as a key), or an identity.
pub const OTHER_TARGET: &str = "(other)";

/// Refusals of one kind: (client, target, action, reason).
#[derive(Default)]
struct Tally {
    /// Since the audit writer last drained this tally.
    pending: AtomicU64,
    first_ms: AtomicI64,
    last_ms: AtomicI64,
    /// The first refusal's message in this interval (what the client sent, truncated).
    example: ArcSwapOption<String>,
    /// Exported as `castellum_refusals_total`, created on the first refusal of this kind; also
    /// the tally's count since start, for the console's view of the last minute.
    counter: OnceLock<Counter>,
}

/// One row's worth of refusals, taken out of the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalCount {
    pub client: String,
    pub target: String,
    pub action: &'static str,
    pub reason: &'static str,
    pub count: u64,
    pub first_ms: i64,
    pub last_ms: i64,
    pub example: String,
}

/// Every kind of refusal the configuration allows, each with its tally.
pub struct RefusalLedger {
    clients: HashMap<String, usize>,
    client_names: Vec<String>,
    targets: HashMap<String, usize>,
    /// The configured profiles, then [`OTHER_TARGET`].
    target_names: Vec<String>,
    tallies: Box<[Tally]>,
    metrics: Arc<Metrics>,
}

const REASONS: usize = EngineError::SLUGS.len();
const ACTIONS: usize = Action::ALL.len();
const EXAMPLE_CHARS: usize = 512;

impl RefusalLedger {
    pub fn new<'a>(
        clients: impl IntoIterator<Item = &'a str>,
        profiles: impl IntoIterator<Item = &'a str>,
        metrics: Arc<Metrics>,
    ) -> RefusalLedger {
        let client_names: Vec<String> = clients.into_iter().map(String::from).collect();
        let mut target_names: Vec<String> = profiles.into_iter().map(String::from).collect();
        target_names.push(OTHER_TARGET.to_string());
        let size = client_names.len() * target_names.len() * ACTIONS * REASONS;
        RefusalLedger {
            clients: client_names.iter().enumerate().map(|(i, c)| (c.clone(), i)).collect(),
            targets: target_names.iter().enumerate().map(|(i, t)| (t.clone(), i)).collect(),
            client_names,
            target_names,
            tallies: (0..size).map(|_| Tally::default()).collect(),
            metrics,
        }
    }

    fn slot(&self, client: usize, target: usize, action: Action, reason: usize) -> usize {
        ((client * self.target_names.len() + target) * ACTIONS + action.index()) * REASONS + reason
    }

    /// Count one refusal. A client the configuration does not name is not counted here (only
    /// authenticated clients' refusals are audited).
    pub fn record(&self, client: &str, action: Action, target: &str, err: &EngineError, now_ms: i64) {
        let Some(&c) = self.clients.get(client) else { return };
        let t = self.targets.get(target).copied().unwrap_or(self.target_names.len() - 1);
        let tally = &self.tallies[self.slot(c, t, action, err.slug_index())];
        if tally.pending.fetch_add(1, Ordering::Relaxed) == 0 {
            // The first of its kind since the last drain: the only refusal that allocates.
            tally.first_ms.store(now_ms, Ordering::Relaxed);
            tally.example.store(Some(Arc::new(err.to_string().chars().take(EXAMPLE_CHARS).collect())));
        }
        tally.last_ms.fetch_max(now_ms, Ordering::Relaxed);
        tally
            .counter
            .get_or_init(|| {
                let labels = vec![
                    ("client", client.to_string()),
                    ("target", self.target_names[t].clone()),
                    ("action", action.as_str().to_string()),
                    ("reason", err.slug().to_string()),
                ];
                self.metrics.refusals.get_or_create(&labels).clone()
            })
            .inc();
    }

    /// Every tally's count since start, in slot order (for [`super::recent`]).
    pub fn totals(&self) -> Vec<u64> {
        self.tallies.iter().map(|t| t.counter.get().map_or(0, Counter::get)).collect()
    }

    /// (client, target, reason) of a slot.
    pub fn kind_of(&self, slot: usize) -> (&str, &str, &'static str) {
        let reason = EngineError::SLUGS[slot % REASONS];
        let target = (slot / REASONS / ACTIONS) % self.target_names.len();
        let client = slot / REASONS / ACTIONS / self.target_names.len();
        (&self.client_names[client], &self.target_names[target], reason)
    }

    /// Everything counted since the last drain, one entry per kind, and the tallies reset. A
    /// refusal counted while this runs lands in this drain or the next, never in neither.
    pub fn drain(&self) -> Vec<RefusalCount> {
        let mut out = Vec::new();
        for (slot, tally) in self.tallies.iter().enumerate() {
            if tally.pending.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let example = tally.example.load_full();
            let (first_ms, last_ms) = (tally.first_ms.load(Ordering::Relaxed), tally.last_ms.load(Ordering::Relaxed));
            let count = tally.pending.swap(0, Ordering::Relaxed);
            tally.last_ms.store(0, Ordering::Relaxed);
            let reason = slot % REASONS;
            let action = Action::ALL[(slot / REASONS) % ACTIONS];
            let target = (slot / REASONS / ACTIONS) % self.target_names.len();
            let client = slot / REASONS / ACTIONS / self.target_names.len();
            out.push(RefusalCount {
                client: self.client_names[client].clone(),
                target: self.target_names[target].clone(),
                action: action.as_str(),
                reason: EngineError::SLUGS[reason],
                count,
                first_ms,
                last_ms: last_ms.max(first_ms),
                example: example.map(|e| e.as_str().to_string()).unwrap_or_default(),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ledger() -> RefusalLedger {
        RefusalLedger::new(["demo", "other"], ["tls-server-p256", "ocsp-renewal"], Arc::new(Metrics::new()))
    }

    fn disabled() -> EngineError {
        EngineError::CaDisabled("ica-p384".into())
    }

    #[test]
    fn refusals_of_one_kind_become_one_count_with_their_first_and_last_time() {
        let l = ledger();
        for at in [1_000, 1_500, 1_200] {
            l.record("demo", Action::Issue, "tls-server-p256", &disabled(), at);
        }
        l.record("demo", Action::Submit, "tls-server-p256", &disabled(), 1_300);
        let rate = EngineError::RateLimited { retry_after: Duration::from_secs(1) };
        l.record("other", Action::Issue, "tls-server-p256", &rate, 1_400);
        let mut drained = l.drain();
        drained.sort_by(|a, b| (&a.client, a.action).cmp(&(&b.client, b.action)));
        assert_eq!(drained.len(), 3, "{drained:?}");
        let first = &drained[0];
        assert_eq!(
            (first.client.as_str(), first.action, first.target.as_str(), first.reason),
            ("demo", "certificate.issue", "tls-server-p256", "ca-disabled")
        );
        assert_eq!((first.count, first.first_ms, first.last_ms), (3, 1_000, 1_500));
        assert_eq!(first.example, "CA \"ica-p384\" is disabled or retired");
        assert_eq!((drained[1].action, drained[1].count), ("certificate.submit", 1));
        assert_eq!((drained[2].client.as_str(), drained[2].reason), ("other", "rate-limited"));
        assert!(l.drain().is_empty(), "a drain resets the tallies");
        l.record("demo", Action::Issue, "tls-server-p256", &disabled(), 2_000);
        let again = l.drain();
        assert_eq!((again[0].count, again[0].first_ms, again[0].last_ms), (1, 2_000, 2_000));
    }

    #[test]
    fn a_name_the_client_made_up_is_one_target_and_an_unknown_client_is_not_counted() {
        let l = ledger();
        for i in 0..1_000 {
            let name = format!("<b>profile-{i}</b>");
            l.record("demo", Action::Issue, &name, &EngineError::UnknownProfile(name.clone()), i);
        }
        l.record("nobody", Action::Issue, "tls-server-p256", &disabled(), 5);
        let drained = l.drain();
        assert_eq!(drained.len(), 1, "{drained:?}");
        assert_eq!((drained[0].target.as_str(), drained[0].count), (OTHER_TARGET, 1_000));
        assert_eq!(drained[0].example, "unknown profile \"<b>profile-0</b>\"", "the first one's text");
    }

    #[test]
    fn refusals_are_metrics_at_once() {
        let l = ledger();
        for _ in 0..5 {
            l.record("demo", Action::Issue, "ocsp-renewal", &disabled(), 1);
        }
        let text = l.metrics.render();
        let line = text.lines().find(|l| l.starts_with("castellum_refusals_total{")).expect(&text);
        assert!(line.contains("client=\"demo\"") && line.contains("reason=\"ca-disabled\""), "{line}");
        assert!(line.ends_with(" 5"), "{line}");
    }

    #[test]
    fn every_slug_has_its_place() {
        let errors = [
            EngineError::MalformedRequest(String::new()),
            EngineError::PayloadTooLarge,
            EngineError::Internal(String::new()),
            EngineError::CaOverloaded { ca: String::new(), reason: String::new(), retry_after: Duration::ZERO },
            EngineError::ShuttingDown,
        ];
        for e in errors {
            assert_eq!(EngineError::SLUGS[e.slug_index()], e.slug());
        }
        let unique: std::collections::HashSet<_> = EngineError::SLUGS.iter().collect();
        assert_eq!(unique.len(), EngineError::SLUGS.len());
    }
}
