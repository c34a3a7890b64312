//! A CA's circuit breaker: closed → open when too many of this CA's signatures fail within a
//! window → half-open after `open_for`, letting a few probes through → closed when they succeed
//! (or open again when one fails). Only signer failures are recorded here; the cell never
//! reports refusals, policy errors, deadlines or database trouble, for any CA.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::BreakerConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open { until: Instant },
    HalfOpen,
}

impl BreakerState {
    pub fn name(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }

    /// 0 closed, 1 half-open, 2 open (the `castellum_breaker_state` gauge).
    pub fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open { .. } => 2,
        }
    }
}

pub struct Breaker {
    cfg: BreakerConfig,
    state: BreakerState,
    outcomes: VecDeque<(Instant, bool)>,
    /// Failures among `outcomes`, kept as they enter and leave (never recounted).
    failures_in_window: u32,
    probes_in_flight: u32,
    probe_successes: u32,
    failures_in_a_row: u32,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Breaker {
        Breaker {
            cfg,
            state: BreakerState::Closed,
            outcomes: VecDeque::new(),
            failures_in_window: 0,
            probes_in_flight: 0,
            probe_successes: 0,
            failures_in_a_row: 0,
        }
    }

    /// Start open (a CA whose key could not be loaded at start-up).
    pub fn open_now(&mut self, now: Instant) -> Option<BreakerState> {
        self.transition(BreakerState::Open { until: now + self.cfg.open_for })
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// May a job be dispatched now? Moves open → half-open when the open time is over; in
    /// half-open, lets at most `half_open_probes` jobs through at once. Returns the transition.
    pub fn admit(&mut self, now: Instant) -> (bool, Option<BreakerState>) {
        let mut changed = None;
        if let BreakerState::Open { until } = self.state {
            if now < until {
                return (false, None);
            }
            changed = self.transition(BreakerState::HalfOpen);
        }
        match self.state {
            BreakerState::Closed => (true, changed),
            BreakerState::HalfOpen if self.probes_in_flight < self.cfg.half_open_probes.max(1) => {
                self.probes_in_flight += 1;
                (true, changed)
            }
            _ => (false, changed),
        }
    }

    /// A job admitted in half-open ended without a signing outcome (deadline, store error).
    pub fn release_probe(&mut self) {
        if self.state == BreakerState::HalfOpen {
            self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
        }
    }

    /// Record a signature's outcome; returns the new state if it changed.
    pub fn record(&mut self, now: Instant, success: bool) -> Option<BreakerState> {
        match self.state {
            BreakerState::HalfOpen => {
                self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
                if !success {
                    return self.transition(BreakerState::Open { until: now + self.cfg.open_for });
                }
                self.probe_successes += 1;
                if self.probe_successes >= self.cfg.half_open_probes.max(1) {
                    return self.transition(BreakerState::Closed);
                }
                None
            }
            BreakerState::Open { .. } => None,
            BreakerState::Closed => {
                self.failures_in_a_row = if success { 0 } else { self.failures_in_a_row + 1 };
                if self.failures_in_a_row >= self.cfg.consecutive_failures.max(1) {
                    return self.transition(BreakerState::Open { until: now + self.cfg.open_for });
                }
                self.outcomes.push_back((now, success));
                self.failures_in_window += u32::from(!success);
                while self.outcomes.front().is_some_and(|(t, _)| now.duration_since(*t) > self.cfg.window) {
                    if let Some((_, ok)) = self.outcomes.pop_front() {
                        self.failures_in_window -= u32::from(!ok);
                    }
                }
                let total = self.outcomes.len() as u32;
                let failures = f64::from(self.failures_in_window);
                if total >= self.cfg.min_requests.max(1) && failures / f64::from(total) >= self.cfg.failure_ratio {
                    return self.transition(BreakerState::Open { until: now + self.cfg.open_for });
                }
                None
            }
        }
    }

    /// Close now, whatever the state (an operator's reset).
    pub fn reset(&mut self) -> Option<BreakerState> {
        self.transition(BreakerState::Closed)
    }

    /// Time left before an open breaker lets probes through.
    pub fn retry_after(&self, now: Instant) -> Duration {
        match self.state {
            BreakerState::Open { until } => until.saturating_duration_since(now).max(Duration::from_secs(1)),
            _ => Duration::from_secs(1),
        }
    }

    fn transition(&mut self, to: BreakerState) -> Option<BreakerState> {
        if std::mem::discriminant(&self.state) == std::mem::discriminant(&to) {
            self.state = to;
            return None;
        }
        self.state = to;
        self.outcomes.clear();
        self.failures_in_window = 0;
        self.failures_in_a_row = 0;
        self.probes_in_flight = 0;
        self.probe_successes = 0;
        Some(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            window: Duration::from_secs(10),
            min_requests: 4,
            failure_ratio: 0.5,
            consecutive_failures: 3,
            open_for: Duration::from_secs(2),
            half_open_probes: 2,
        }
    }

    #[test]
    fn failures_in_a_row_open_it_despite_a_healthy_history() {
        let mut b = Breaker::new(cfg());
        let t = Instant::now();
        for _ in 0..100 {
            b.record(t, true);
        }
        assert_eq!(b.record(t, false), None);
        assert_eq!(b.record(t, false), None);
        assert!(matches!(b.record(t, false), Some(BreakerState::Open { .. })), "three in a row");
        assert_eq!(b.admit(t + Duration::from_millis(1999)), (false, None), "open for open_for");
        assert_eq!(b.admit(t + Duration::from_secs(2)), (true, Some(BreakerState::HalfOpen)));
    }

    #[test]
    fn opens_on_the_failure_ratio_and_closes_after_probes() {
        let mut b = Breaker::new(cfg());
        let t = Instant::now();
        assert_eq!(b.record(t, true), None);
        assert_eq!(b.record(t, false), None);
        assert_eq!(b.record(t, true), None);
        assert!(matches!(b.record(t, false), Some(BreakerState::Open { .. })), "2 of 4 failed");
        assert_eq!(b.admit(t + Duration::from_secs(1)), (false, None));
        let later = t + Duration::from_secs(3);
        assert_eq!(b.admit(later), (true, Some(BreakerState::HalfOpen)));
        assert_eq!(b.admit(later), (true, None));
        assert_eq!(b.admit(later), (false, None), "only two probes at once");
        assert_eq!(b.record(later, true), None);
        assert_eq!(b.record(later, true), Some(BreakerState::Closed));
    }

    #[test]
    fn a_failed_probe_opens_again() {
        let mut b = Breaker::new(cfg());
        let t = Instant::now();
        b.open_now(t);
        let later = t + Duration::from_secs(3);
        assert!(b.admit(later).0);
        assert!(matches!(b.record(later, false), Some(BreakerState::Open { .. })));
        assert_eq!(b.admit(later + Duration::from_millis(1999)), (false, None), "open for open_for again");
        assert_eq!(b.admit(later + Duration::from_secs(2)), (true, Some(BreakerState::HalfOpen)));
    }

    #[test]
    fn too_few_outcomes_or_old_ones_never_open_it() {
        let mut b = Breaker::new(cfg());
        let t = Instant::now();
        for _ in 0..2 {
            assert_eq!(b.record(t, false), None, "below min_requests");
        }
        let much_later = t + Duration::from_secs(60);
        assert_eq!(b.record(much_later, true), None, "old failures left the window");
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn states_have_stable_names_and_gauge_values() {
        let t = Instant::now();
        let states = [BreakerState::Closed, BreakerState::HalfOpen, BreakerState::Open { until: t }];
        assert_eq!(states.map(BreakerState::name), ["closed", "half-open", "open"]);
        assert_eq!(states.map(BreakerState::gauge), [0, 1, 2]);
    }

    #[test]
    fn a_closed_breaker_admits_everything() {
        let mut b = Breaker::new(BreakerConfig { half_open_probes: 1, ..cfg() });
        let t = Instant::now();
        for _ in 0..10 {
            assert_eq!(b.admit(t), (true, None));
        }
    }

    #[test]
    fn a_success_resets_the_failures_in_a_row() {
        let mut b = Breaker::new(BreakerConfig { min_requests: 1000, ..cfg() });
        let t = Instant::now();
        for _ in 0..5 {
            assert_eq!(b.record(t, false), None);
            assert_eq!(b.record(t, false), None);
            assert_eq!(b.record(t, true), None, "never three in a row");
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn the_ratio_opens_it_exactly_at_the_threshold_and_not_below() {
        let t = Instant::now();
        let mut below = Breaker::new(BreakerConfig { consecutive_failures: 100, ..cfg() });
        for ok in [true, true, false, true, true, false, true] {
            assert_eq!(below.record(t, ok), None, "2 of 7 is below one half");
        }
        let mut at = Breaker::new(BreakerConfig { consecutive_failures: 100, ..cfg() });
        for ok in [true, false, true] {
            assert_eq!(at.record(t, ok), None, "fewer than min_requests");
        }
        assert!(matches!(at.record(t, false), Some(BreakerState::Open { .. })), "2 of 4: exactly one half");
    }

    #[test]
    fn an_outcome_exactly_one_window_old_still_counts() {
        let mut b = Breaker::new(BreakerConfig { consecutive_failures: 100, ..cfg() });
        let t = Instant::now();
        b.record(t, false);
        b.record(t, false);
        b.record(t, true);
        let edge = t + cfg().window;
        assert!(matches!(b.record(edge, true), Some(BreakerState::Open { .. })), "2 of 4 within the window");
        let mut b = Breaker::new(BreakerConfig { consecutive_failures: 100, ..cfg() });
        b.record(t, false);
        b.record(t, false);
        b.record(t, true);
        let past = edge + Duration::from_millis(1);
        assert_eq!(b.record(past, true), None, "the first three left the window");
    }

    #[test]
    fn open_refuses_until_its_time_and_says_how_long() {
        let mut b = Breaker::new(cfg());
        let t = Instant::now();
        assert_eq!(b.open_now(t).map(BreakerState::name), Some("open"));
        assert_eq!(b.retry_after(t), Duration::from_secs(2));
        assert_eq!(b.retry_after(t + Duration::from_millis(1900)), Duration::from_secs(1), "at least a second");
        assert_eq!(b.record(t, true), None, "an outcome while open changes nothing");
        assert_eq!(b.admit(t + Duration::from_millis(1999)), (false, None));
        assert_eq!(b.admit(t + Duration::from_secs(2)), (true, Some(BreakerState::HalfOpen)), "open_for is over");
        assert_eq!(b.retry_after(t), Duration::from_secs(1));
    }

    #[test]
    fn a_released_probe_frees_its_place() {
        let mut b = Breaker::new(BreakerConfig { half_open_probes: 1, ..cfg() });
        let t = Instant::now();
        b.open_now(t);
        let later = t + Duration::from_secs(3);
        assert!(b.admit(later).0);
        assert!(!b.admit(later).0, "one probe at a time");
        b.release_probe();
        assert!(b.admit(later).0, "the released place is taken again");
        b.release_probe();
        b.release_probe();
        assert!(b.admit(later).0);
        assert!(!b.admit(later).0, "releasing more than were taken frees nothing extra");
    }

    #[test]
    fn release_outside_half_open_changes_nothing() {
        let mut b = Breaker::new(BreakerConfig { half_open_probes: 1, ..cfg() });
        let t = Instant::now();
        b.release_probe();
        b.open_now(t);
        let later = t + Duration::from_secs(3);
        assert!(b.admit(later).0);
        assert!(!b.admit(later).0);
    }

    #[test]
    fn zero_probes_configured_still_lets_one_through_and_one_success_closes() {
        let mut b = Breaker::new(BreakerConfig { half_open_probes: 0, consecutive_failures: 0, ..cfg() });
        let t = Instant::now();
        assert!(matches!(b.record(t, false), Some(BreakerState::Open { .. })), "0 in a row means 1");
        let later = t + Duration::from_secs(3);
        assert!(b.admit(later).0);
        assert!(!b.admit(later).0);
        assert_eq!(b.record(later, true), Some(BreakerState::Closed));
    }

    #[test]
    fn closing_forgets_the_history_and_reset_closes_from_any_state() {
        let mut b = Breaker::new(cfg());
        let t = Instant::now();
        b.record(t, false);
        b.record(t, false);
        b.open_now(t);
        assert_eq!(b.reset(), Some(BreakerState::Closed));
        assert_eq!(b.reset(), None, "already closed");
        assert_eq!(b.record(t, false), None, "the failures before the reset are forgotten");
        assert_eq!(b.record(t, false), None);
        assert!(matches!(b.record(t, false), Some(BreakerState::Open { .. })));
        let later = t + Duration::from_secs(3);
        assert!(b.admit(later).0);
        assert_eq!(b.record(later, true), None, "one of two probes");
        assert!(b.admit(later).0);
        assert!(b.admit(later).0, "the finished probe's place is free");
    }

    #[test]
    fn a_second_open_only_moves_its_end() {
        let mut b = Breaker::new(cfg());
        let t = Instant::now();
        assert!(b.open_now(t).is_some());
        assert_eq!(b.open_now(t + Duration::from_secs(1)), None, "no new transition");
        assert_eq!(b.admit(t + Duration::from_millis(2500)), (false, None), "the later end stands");
    }

    #[test]
    fn failures_that_leave_the_window_stop_counting() {
        let mut b = Breaker::new(BreakerConfig { consecutive_failures: 100, ..cfg() });
        let t = Instant::now();
        for ok in [true, false, false] {
            assert_eq!(b.record(t, ok), None);
        }
        let later = t + cfg().window + Duration::from_secs(1);
        for ok in [true, true, true] {
            assert_eq!(b.record(later, ok), None);
        }
        assert_eq!(b.record(later, false), None, "1 of 4 in the window: the old failures are gone");
        assert_eq!(b.record(later, false), None, "2 of 5");
        assert!(matches!(b.record(later, false), Some(BreakerState::Open { .. })), "3 of 6");
    }
}
