//! Prometheus metrics, one registry per engine (so several engines in one process, as in tests,
//! never mix their figures). Rendered as Prometheus text by `GET /metrics`.

use std::sync::{Mutex, OnceLock};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

pub type Labels = Vec<(&'static str, String)>;

fn latency_histogram() -> Histogram {
    // 0.25 ms … ~8 s
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// 0.25 ms … ~9 min: a synchronous answer of the background lane may wait minutes.
fn wide_latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 22))
}

fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 10))
}

/// Request outcomes a counter is kept for: `issued`, `accepted`, then every problem slug.
const OUTCOMES: usize = 2 + crate::error::EngineError::SLUGS.len();

pub struct Metrics {
    registry: Mutex<Registry>,
    /// `requests`' counter per outcome, found once: counting a request (a refusal in a storm
    /// above all) is then one atomic add, no label allocation or family lock.
    outcome_counters: [OnceLock<Counter>; OUTCOMES],
    /// Requests by outcome (`issued`, `accepted`, or a problem slug), profile and CA.
    pub requests: Family<Labels, Counter>,
    /// Refusals of authenticated clients by client, target, action and reason, as they happen.
    pub refusals: Family<Labels, Counter>,
    /// Audit events the audit writer could not keep (its queue full, or the database down too
    /// long); each drop is also written as an `audit.dropped` row once the database answers.
    pub audit_dropped: Counter,
    /// Audit rows written, single events and refusal aggregates.
    pub audit_rows: Family<Labels, Counter>,
    /// End-to-end time of a synchronous issuance inside the engine.
    pub issue_seconds: Family<Labels, Histogram>,
    pub queue_depth: Family<Labels, Gauge>,
    pub in_flight: Family<Labels, Gauge>,
    /// Time a job waited in its CA's queue.
    pub queue_wait_seconds: Family<Labels, Histogram>,
    pub sign_seconds: Family<Labels, Histogram>,
    pub signatures: Family<Labels, Counter>,
    pub expired_in_queue: Family<Labels, Counter>,
    pub coalesced: Family<Labels, Counter>,
    pub worker_panics: Family<Labels, Counter>,
    pub cell_restarts: Family<Labels, Counter>,
    pub breaker_state: Family<Labels, Gauge>,
    pub breaker_transitions: Family<Labels, Counter>,
    pub pool_wait_seconds: Family<Labels, Histogram>,
    pub pool_hold_seconds: Family<Labels, Histogram>,
    pub pool_timeouts: Family<Labels, Counter>,
    /// Reads refused at once because the status pool and its short wait line were full.
    pub pool_refused: Family<Labels, Counter>,
    pub pool_connections: Family<Labels, Gauge>,
    pub pool_idle: Family<Labels, Gauge>,
    pub pool_in_use: Family<Labels, Gauge>,
    pub pool_max: Family<Labels, Gauge>,
    pub pool_longest_hold: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub pool_long_holds: Family<Labels, Counter>,
    pub store_batch_size: Histogram,
    pub store_commit_seconds: Histogram,
    pub store_pending: Gauge,
    /// Writes made without waiting (`write_detached`) that the store refused: counted, not
    /// logged, because they come at the rate of the failures that cause them.
    pub store_dropped: Counter,
    /// CRLs made and stored by this instance, per CA.
    pub crls_published: Family<Labels, Counter>,
    /// CRLs due that could not be made (key unavailable, database), per CA.
    pub crl_failures: Family<Labels, Counter>,
    /// Seconds until each CA's current OCSP responder certificate expires (updated every look).
    pub ocsp_responder_seconds_left: Family<Labels, Gauge>,
    pub ocsp_renewal_failures: Family<Labels, Counter>,
    /// OCSP answers signed (first questions and background refreshes; a cached answer is not).
    pub ocsp_signatures: Counter,
    pub registry_version: Gauge,
    pub async_resumed: Counter,
    /// Identity keys handed out, by kind and source (`pool`: pre-generated, `on-demand`).
    pub identity_keys: Family<Labels, Counter>,
    /// Answers by listener, route (its path template: the API description's, or the admin
    /// listener's table) and status: every request, refusals by the listener's bounds and the
    /// admin token check and actix's own 4xx to malformed JSON included.
    pub http_requests: Family<Labels, Counter>,
    /// Time to answer, by listener, route and status; buckets up to ~9 minutes (the background
    /// lane's deadlines).
    pub http_request_seconds: Family<Labels, Histogram>,
    /// Failed authentications, by listener (`api`, `admin`).
    pub auth_failures: Family<Labels, Counter>,
    /// Requests refused for their source address, by listener and reason (`connections`,
    /// `auth_failures`, `body_timeout`).
    pub source_refusals: Family<Labels, Counter>,
    /// TLS file reloads by listener and outcome (`loaded`, `refused`: changed files that did
    /// not load, the previous certificate kept).
    pub tls_reloads: Family<Labels, Counter>,
    /// When each listener's TLS certificate expires (Unix seconds), to alert before it does.
    pub tls_certificate_not_after: Family<Labels, Gauge>,
    /// The earliest nextUpdate of each listener's client CRLs (Unix seconds; 0 without them):
    /// after it, client certificates are refused until the file is renewed.
    pub tls_client_crl_next_update: Family<Labels, Gauge>,
    /// Pre-generated identity keys in stock, by kind.
    pub identity_key_pool: Family<Labels, Gauge>,
    /// Identities destroyed, by reason (`used`, `expired`).
    pub identities_destroyed: Family<Labels, Counter>,
    pub identity_sweeps: Counter,
    /// Identity operations by operation (`create`, `sign`) and outcome.
    pub identity_operations: Family<Labels, Counter>,
    pub identity_sign_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Mutex::new(Registry::with_prefix("castellum")),
            outcome_counters: std::array::from_fn(|_| OnceLock::new()),
            requests: Family::default(),
            refusals: Family::default(),
            audit_dropped: Counter::default(),
            audit_rows: Family::default(),
            issue_seconds: Family::new_with_constructor(wide_latency_histogram),
            http_requests: Family::default(),
            http_request_seconds: Family::new_with_constructor(wide_latency_histogram),
            queue_depth: Family::default(),
            in_flight: Family::default(),
            queue_wait_seconds: Family::new_with_constructor(latency_histogram),
            sign_seconds: Family::new_with_constructor(latency_histogram),
            signatures: Family::default(),
            expired_in_queue: Family::default(),
            coalesced: Family::default(),
            worker_panics: Family::default(),
            cell_restarts: Family::default(),
            breaker_state: Family::default(),
            breaker_transitions: Family::default(),
            pool_wait_seconds: Family::new_with_constructor(latency_histogram),
            pool_hold_seconds: Family::new_with_constructor(latency_histogram),
            pool_timeouts: Family::default(),
            pool_refused: Family::default(),
            pool_connections: Family::default(),
            pool_idle: Family::default(),
            pool_in_use: Family::default(),
            pool_max: Family::default(),
            pool_longest_hold: Family::default(),
            pool_long_holds: Family::default(),
            store_batch_size: batch_histogram(),
            store_commit_seconds: latency_histogram(),
            store_pending: Gauge::default(),
            store_dropped: Counter::default(),
            crls_published: Family::default(),
            crl_failures: Family::default(),
            ocsp_responder_seconds_left: Family::default(),
            ocsp_renewal_failures: Family::default(),
            ocsp_signatures: Counter::default(),
            registry_version: Gauge::default(),
            async_resumed: Counter::default(),
            identity_keys: Family::default(),
            auth_failures: Family::default(),
            source_refusals: Family::default(),
            tls_reloads: Family::default(),
            tls_certificate_not_after: Family::default(),
            tls_client_crl_next_update: Family::default(),
            identity_key_pool: Family::default(),
            identities_destroyed: Family::default(),
            identity_sweeps: Counter::default(),
            identity_operations: Family::default(),
            identity_sign_seconds: latency_histogram(),
        };
        {
            let mut r = m.registry.lock().expect("metrics registry lock");
            r.register("requests", "Requests by outcome", m.requests.clone());
            r.register(
                "refusals",
                "Refusals of authenticated clients, by client, target, action and reason",
                m.refusals.clone(),
            );
            r.register(
                "audit_dropped",
                "Audit events dropped by the audit writer (each also written as an audit.dropped row)",
                m.audit_dropped.clone(),
            );
            r.register(
                "audit_rows",
                "Audit rows written by the audit writer, by kind (event, refusals, dropped)",
                m.audit_rows.clone(),
            );
            r.register(
                "issue_duration_seconds",
                "Time to issue a certificate inside the engine, by CA and profile",
                m.issue_seconds.clone(),
            );
            r.register(
                "http_requests",
                "Answers by listener, route and status (refusals included)",
                m.http_requests.clone(),
            );
            r.register(
                "http_request_duration_seconds",
                "Time to answer, by listener, route and status",
                m.http_request_seconds.clone(),
            );
            r.register("queue_depth", "Jobs waiting in a CA's queue, per lane", m.queue_depth.clone());
            r.register("in_flight", "Jobs of a CA between dequeue and reply", m.in_flight.clone());
            r.register("queue_wait_seconds", "Time jobs waited in their CA's queue", m.queue_wait_seconds.clone());
            r.register("sign_duration_seconds", "CA signature time", m.sign_seconds.clone());
            r.register("signatures", "Certificates signed", m.signatures.clone());
            r.register(
                "expired_in_queue",
                "Jobs dropped because their deadline passed before signing",
                m.expired_in_queue.clone(),
            );
            r.register(
                "breaker_state",
                "Circuit breaker per CA: 0 closed, 1 half-open, 2 open",
                m.breaker_state.clone(),
            );
            r.register("breaker_transitions", "Circuit breaker transitions per CA", m.breaker_transitions.clone());
            r.register(
                "coalesced",
                "Background requests attached to an identical one queued or in flight",
                m.coalesced.clone(),
            );
            r.register("cell_restarts", "CA cells replaced by their supervisor after dying", m.cell_restarts.clone());
            r.register("worker_panics", "Panics caught in signer and store workers", m.worker_panics.clone());
            r.register("db_pool_wait_seconds", "Time waiting to check out a connection", m.pool_wait_seconds.clone());
            r.register("db_pool_hold_seconds", "Time a connection was held", m.pool_hold_seconds.clone());
            r.register("db_pool_timeouts", "Checkouts that timed out", m.pool_timeouts.clone());
            r.register(
                "db_pool_refused",
                "Reads refused at once: the pool and its wait line were full",
                m.pool_refused.clone(),
            );
            r.register("db_pool_connections", "Open connections per pool", m.pool_connections.clone());
            r.register("db_pool_idle", "Idle connections per pool", m.pool_idle.clone());
            r.register("db_pool_in_use", "Connections checked out per pool", m.pool_in_use.clone());
            r.register("db_pool_max", "Configured maximum connections per pool", m.pool_max.clone());
            r.register(
                "db_pool_longest_hold_seconds",
                "Longest current connection hold per pool",
                m.pool_longest_hold.clone(),
            );
            r.register(
                "db_pool_long_holds",
                "Holds that passed the slow-hold threshold, reported while held",
                m.pool_long_holds.clone(),
            );
            r.register("store_batch_size", "Writes per group commit", m.store_batch_size.clone());
            r.register("store_commit_seconds", "Time of one group commit", m.store_commit_seconds.clone());
            r.register("store_pending", "Writes waiting for a store worker", m.store_pending.clone());
            r.register(
                "store_dropped_writes",
                "Writes sent without waiting that the store refused (full, shutting down or database down)",
                m.store_dropped.clone(),
            );
            r.register("crls_published", "CRLs made and stored by this instance", m.crls_published.clone());
            r.register("crl_failures", "CRLs due that could not be made", m.crl_failures.clone());
            r.register(
                "ocsp_responder_valid_seconds",
                "Seconds until each CA's OCSP responder certificate expires",
                m.ocsp_responder_seconds_left.clone(),
            );
            r.register(
                "ocsp_renewal_failures",
                "Failed renewals of a CA's OCSP responder certificate",
                m.ocsp_renewal_failures.clone(),
            );
            r.register(
                "ocsp_signatures",
                "OCSP answers signed (a first question or a refresh; answers from the cache are not)",
                m.ocsp_signatures.clone(),
            );
            r.register("registry_version", "Registry version this instance serves", m.registry_version.clone());
            r.register(
                "async_resumed",
                "Pending asynchronous requests taken up by this instance",
                m.async_resumed.clone(),
            );
            r.register("identity_keys", "Identity keys handed out, by kind and source", m.identity_keys.clone());
            r.register("auth_failures", "Failed authentications, by listener", m.auth_failures.clone());
            r.register(
                "source_refusals",
                "Requests refused for their source address, by listener and reason",
                m.source_refusals.clone(),
            );
            r.register("tls_reloads", "TLS certificate reloads, by listener and outcome", m.tls_reloads.clone());
            r.register(
                "tls_certificate_not_after",
                "When each listener's TLS certificate expires (Unix seconds)",
                m.tls_certificate_not_after.clone(),
            );
            r.register(
                "tls_client_crl_next_update",
                "When the first of each listener's client CRLs goes stale (Unix seconds; 0 without them)",
                m.tls_client_crl_next_update.clone(),
            );
            r.register("identity_key_pool", "Pre-generated identity keys in stock", m.identity_key_pool.clone());
            r.register("identities_destroyed", "Identities destroyed, by reason", m.identities_destroyed.clone());
            r.register("identity_sweeps", "Runs of the expired-identity sweep", m.identity_sweeps.clone());
            r.register(
                "identity_operations",
                "Identity creations and signatures by outcome",
                m.identity_operations.clone(),
            );
            r.register(
                "identity_sign_duration_seconds",
                "Time to open an identity key and sign a digest",
                m.identity_sign_seconds.clone(),
            );
        }
        m
    }

    /// The `requests` counter of this outcome (`issued`, `accepted` or a problem slug).
    pub fn request_outcome(&self, outcome: &'static str) -> &Counter {
        let slot = match outcome {
            "issued" => 0,
            "accepted" => 1,
            slug => 2 + crate::error::EngineError::SLUGS.iter().position(|s| *s == slug).unwrap_or(OUTCOMES - 3),
        };
        self.outcome_counters[slot]
            .get_or_init(|| self.requests.get_or_create(&vec![("outcome", outcome.to_string())]).clone())
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().expect("metrics registry lock");
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &r);
        out
    }
}

pub fn ca(ca: &str) -> Labels {
    vec![("ca", ca.to_string())]
}

pub fn ca_lane(ca: &str, lane: crate::pki::Lane) -> Labels {
    vec![("ca", ca.to_string()), ("lane", lane.as_str().to_string())]
}

pub fn pool(name: &str) -> Labels {
    vec![("pool", name.to_string())]
}
