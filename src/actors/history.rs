//! A few minutes of each CA's recent life, kept in memory for the admin console: issued/s, p99
//! of the time in its cell, queue depth and refusals/s, sampled every `admin.history_interval`.
//! No external monitoring is needed to see a storm arrive; nothing here is on a request's path.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use super::gauges::{latency_bound, CellGauges, LATENCY_BUCKETS};

/// Points kept per CA.
const POINTS: usize = 60;

/// One sample of a CA.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Point {
    pub at: i64,
    pub issued_per_s: f64,
    /// p99 of the time issued jobs spent in the cell over the interval (0 if none).
    pub p99_ms: f64,
    pub queued: usize,
    pub refusals_per_s: f64,
}

/// What the last sample of a CA read, to take differences from.
struct Reading {
    at: Instant,
    signatures: u64,
    latency: [u64; LATENCY_BUCKETS],
    refusals: u64,
}

#[derive(Default)]
pub struct History {
    points: Mutex<HashMap<String, VecDeque<Point>>>,
    last: Mutex<HashMap<String, Reading>>,
}

impl History {
    /// Sample every CA: its cell's gauges, and its refusals so far (by CA).
    pub fn sample<'a>(
        &self,
        cells: impl IntoIterator<Item = (&'a String, &'a CellGauges)>,
        refusals: &HashMap<String, u64>,
    ) {
        let now = Instant::now();
        let at = crate::pki::now_ms();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let mut points = self.points.lock().unwrap_or_else(|e| e.into_inner());
        for (ca, g) in cells {
            let reading = Reading {
                at: now,
                signatures: g.signatures.load(Ordering::Relaxed),
                latency: g.issued_latency(),
                refusals: refusals.get(ca).copied().unwrap_or(0),
            };
            if let Some(before) = last.get(ca) {
                let seconds = now.duration_since(before.at).as_secs_f64().max(0.001);
                let latency: [u64; LATENCY_BUCKETS] =
                    std::array::from_fn(|i| reading.latency[i].saturating_sub(before.latency[i]));
                let queue = g.interactive_depth.load(Ordering::Relaxed) + g.background_depth.load(Ordering::Relaxed);
                let series = points.entry(ca.clone()).or_default();
                series.push_back(Point {
                    at,
                    issued_per_s: reading.signatures.saturating_sub(before.signatures) as f64 / seconds,
                    p99_ms: p99(&latency),
                    queued: queue,
                    refusals_per_s: reading.refusals.saturating_sub(before.refusals) as f64 / seconds,
                });
                while series.len() > POINTS {
                    series.pop_front();
                }
            }
            last.insert(ca.clone(), reading);
        }
    }

    /// A CA's points, oldest first.
    pub fn of(&self, ca: &str) -> Vec<Point> {
        let points = self.points.lock().unwrap_or_else(|e| e.into_inner());
        points.get(ca).map(|p| p.iter().cloned().collect()).unwrap_or_default()
    }
}

/// The upper bound (ms) of the bucket holding the 99th percentile; 0 with no samples.
fn p99(buckets: &[u64; LATENCY_BUCKETS]) -> f64 {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let rank = (total as f64 * 0.99).ceil() as u64;
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return latency_bound(i).as_secs_f64() * 1e3;
        }
    }
    latency_bound(LATENCY_BUCKETS - 1).as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_is_the_bound_of_the_bucket_it_falls_in() {
        let mut b = [0u64; LATENCY_BUCKETS];
        assert_eq!(p99(&b), 0.0);
        b[2] = 99; // ≤ 1 ms
        b[6] = 1; // ≤ 16 ms
        assert_eq!(p99(&b), 1.0);
        b[6] = 2;
        assert_eq!(p99(&b), 16.0);
    }
}
