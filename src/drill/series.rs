//! What a drill records: every sample, and the engine's gauges every half second, in buckets.

use std::collections::HashMap;
use std::time::Duration;

use super::load::{percentile, Kind, Sample};
use super::storm::{StormReport, STORM_BUCKET};

pub const BUCKET: Duration = Duration::from_millis(500);

/// The engine's state at one moment, from `/metrics` (and `pg_stat_activity`).
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    pub at: Duration,
    pub queue_depth: i64,
    /// The engine's connections as PostgreSQL counts them (`None`: not measured, on SQLite).
    pub server_connections: Option<i64>,
    /// Connections the engine's own pools say are in use.
    pub pool_in_use: i64,
    pub queue_depth_by_ca: HashMap<String, i64>,
}

impl Gauges {
    /// Read the figures a drill needs from Prometheus text.
    pub fn parse(at: Duration, metrics: &str, server_connections: Option<i64>) -> Gauges {
        let mut g = Gauges { at, server_connections, ..Gauges::default() };
        for line in metrics.lines().filter(|l| !l.starts_with('#')) {
            let Some((name_labels, value)) = line.rsplit_once(' ') else { continue };
            let value: f64 = value.parse().unwrap_or(0.0);
            let label = |key: &str| {
                name_labels.split(&format!("{key}=\"")).nth(1).and_then(|rest| rest.split('"').next()).map(String::from)
            };
            if name_labels.starts_with("castellum_queue_depth{") {
                g.queue_depth += value as i64;
                if let Some(ca) = label("ca") {
                    *g.queue_depth_by_ca.entry(ca).or_default() += value as i64;
                }
            } else if name_labels.starts_with("castellum_db_pool_in_use{") {
                g.pool_in_use += value as i64;
            }
        }
        g
    }
}

#[derive(Default)]
pub struct Recording {
    pub samples: Vec<Sample>,
    pub gauges: Vec<Gauges>,
    /// Storms run by other processes: when each started, and its report.
    pub storms: Vec<(Duration, StormReport)>,
}

/// One bucket of the time series, all streams together.
#[derive(Debug, Clone, Default)]
pub struct Point {
    pub at: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub ok_per_s: f64,
    pub limited_per_s: f64,
    pub unavailable_per_s: f64,
    pub other_per_s: f64,
    pub queue_depth: i64,
    /// PostgreSQL's count of the engine's connections, when measured.
    pub server_connections: Option<i64>,
    pub pool_in_use: i64,
    /// Requests of storms (other processes) answered per second.
    pub storm_per_s: f64,
}

impl Recording {
    pub fn samples_of(&self, stream: usize, from: Duration, until: Duration) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(move |s| s.stream == stream && s.at >= from && s.at < until)
    }

    /// Storm requests answered that were sent in the bucket starting at `at` s.
    fn storm_answered(&self, at: f64) -> f64 {
        let mut answered = 0;
        for (started, report) in &self.storms {
            let offset = at - started.as_secs_f64();
            if offset < -STORM_BUCKET.as_secs_f64() / 2.0 {
                continue;
            }
            // The storm's buckets are as long as ours; it started within one of them.
            let i = (offset / STORM_BUCKET.as_secs_f64()).round() as usize;
            answered += report.answered_per_bucket.get(i).copied().unwrap_or(0);
        }
        answered as f64
    }

    pub fn points(&self, length: Duration) -> Vec<Point> {
        // Whole buckets only: a last, partial one would read as a collapse.
        let n = ((length.as_secs_f64() / BUCKET.as_secs_f64()).floor() as usize).max(1);
        let mut buckets: Vec<Vec<&Sample>> = vec![Vec::new(); n];
        for s in &self.samples {
            let i = ((s.at.as_secs_f64() / BUCKET.as_secs_f64()) as usize).min(n - 1);
            buckets[i].push(s);
        }
        let per_s = 1.0 / BUCKET.as_secs_f64();
        buckets
            .iter()
            .enumerate()
            .map(|(i, samples)| {
                let at = i as f64 * BUCKET.as_secs_f64();
                let mut ok: Vec<Duration> =
                    samples.iter().filter(|s| s.kind == Kind::Success).map(|s| s.latency).collect();
                let count = |k: Kind| samples.iter().filter(|s| s.kind == k).count() as f64 * per_s;
                let gauge = self.gauges.iter().rev().find(|g| g.at.as_secs_f64() <= at + BUCKET.as_secs_f64());
                Point {
                    at,
                    p50_ms: percentile(&mut ok, 0.50).as_secs_f64() * 1e3,
                    p99_ms: percentile(&mut ok, 0.99).as_secs_f64() * 1e3,
                    ok_per_s: count(Kind::Success),
                    limited_per_s: count(Kind::Limited429),
                    unavailable_per_s: count(Kind::Unavailable503),
                    other_per_s: count(Kind::Other) + count(Kind::NoAnswer) + count(Kind::Refused409),
                    queue_depth: gauge.map(|g| g.queue_depth).unwrap_or(0),
                    server_connections: gauge.and_then(|g| g.server_connections),
                    pool_in_use: gauge.map(|g| g.pool_in_use).unwrap_or(0),
                    storm_per_s: self.storm_answered(at) * per_s,
                }
            })
            .collect()
    }
}
