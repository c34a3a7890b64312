//! The last minute of refusals, per CA, for the operator: which reasons, how fast, and which
//! clients are retrying. Sampled from the ledger's running totals every few seconds by the audit
//! writer; nothing on the refusal path.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::ledger::{RefusalLedger, OTHER_TARGET};

/// How often the totals are sampled, and how far back the view looks.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
const WINDOW: Duration = Duration::from_secs(60);
const TOP_CLIENTS: usize = 5;

/// One CA's refusals over the last minute (or since start, if that is shorter).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct CaRefusals {
    /// The CA, or `(other)` for refusals of no configured profile.
    pub ca: String,
    pub per_second: f64,
    /// Refusals a second by reason, most first.
    pub by_reason: Vec<(String, f64)>,
    /// The clients refused most, with their refusals in the window.
    pub top_clients: Vec<(String, u64)>,
    /// The window the rates are over, in seconds.
    pub window_s: f64,
}

/// One CA's refusals in the window, by reason and by client.
type Counts = (HashMap<&'static str, u64>, HashMap<String, u64>);

/// The CA a refusal's target (a profile) belongs to; [`OTHER_TARGET`] for anything else.
pub fn ca_of<'a>(ca_of_profile: &'a HashMap<String, String>, target: &str) -> &'a str {
    ca_of_profile.get(target).map_or(OTHER_TARGET, String::as_str)
}

/// Snapshots of the ledger's totals, the oldest no older than the window.
#[derive(Default)]
pub struct RecentRefusals {
    samples: Mutex<VecDeque<(Instant, Vec<u64>)>>,
}

impl RecentRefusals {
    pub fn sample(&self, ledger: &RefusalLedger) {
        let now = Instant::now();
        let totals = ledger.totals();
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.push_back((now, totals));
        while samples.len() > 2 && samples.get(1).is_some_and(|(at, _)| now.duration_since(*at) >= WINDOW) {
            samples.pop_front();
        }
    }

    /// Per CA, what was refused between the oldest sample and now.
    pub fn last_minute(&self, ledger: &RefusalLedger, ca_of_profile: &HashMap<String, String>) -> Vec<CaRefusals> {
        let now_totals = ledger.totals();
        let (window, oldest) = {
            let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
            match samples.front() {
                Some((at, totals)) => (at.elapsed(), totals.clone()),
                None => return Vec::new(),
            }
        };
        let seconds = window.as_secs_f64().max(1.0);
        let mut by_ca: HashMap<String, Counts> = HashMap::new();
        for (slot, (now, then)) in now_totals.iter().zip(oldest.iter()).enumerate() {
            let n = now.saturating_sub(*then);
            if n == 0 {
                continue;
            }
            let (client, target, reason) = ledger.kind_of(slot);
            let (reasons, clients) = by_ca.entry(ca_of(ca_of_profile, target).to_string()).or_default();
            *reasons.entry(reason).or_default() += n;
            *clients.entry(client.to_string()).or_default() += n;
        }
        let mut out: Vec<CaRefusals> = by_ca
            .into_iter()
            .map(|(ca, (reasons, clients))| {
                let total: u64 = reasons.values().sum();
                let mut by_reason: Vec<(String, f64)> =
                    reasons.into_iter().map(|(r, n)| (r.to_string(), n as f64 / seconds)).collect();
                by_reason.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                let mut top_clients: Vec<(String, u64)> = clients.into_iter().collect();
                top_clients.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                top_clients.truncate(TOP_CLIENTS);
                CaRefusals { ca, per_second: total as f64 / seconds, by_reason, top_clients, window_s: seconds }
            })
            .collect();
        out.sort_by(|a, b| a.ca.cmp(&b.ca));
        out
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::audit::Action;
    use crate::error::EngineError;
    use crate::metrics::Metrics;

    #[test]
    fn the_last_minute_groups_refusals_by_ca_with_reasons_and_clients() {
        let ledger = RefusalLedger::new(["demo", "other"], ["p256", "p384"], Arc::new(Metrics::new()));
        let cas: HashMap<String, String> =
            [("p256", "ica-p256"), ("p384", "ica-p384")].map(|(p, c)| (p.to_string(), c.to_string())).into();
        let recent = RecentRefusals::default();
        let disabled = EngineError::CaDisabled("ica-p384".into());
        ledger.record("demo", Action::Issue, "p384", &disabled, 0); // before the first sample: not counted
        recent.sample(&ledger);
        for _ in 0..30 {
            ledger.record("demo", Action::Issue, "p384", &disabled, 0);
        }
        for _ in 0..10 {
            ledger.record("other", Action::Submit, "p384", &disabled, 0);
        }
        ledger.record("demo", Action::Issue, "nonsense", &EngineError::UnknownProfile("nonsense".into()), 0);
        let view = recent.last_minute(&ledger, &cas);
        assert_eq!(view.iter().map(|v| v.ca.as_str()).collect::<Vec<_>>(), ["(other)", "ica-p384"]);
        let p384 = &view[1];
        assert_eq!(p384.top_clients, vec![("demo".to_string(), 30), ("other".to_string(), 10)]);
        assert_eq!(p384.by_reason.len(), 1);
        assert_eq!(p384.by_reason[0].0, "ca-disabled");
        // Less than a second of window counts as one second.
        assert_eq!(p384.per_second, 40.0);
    }
}
