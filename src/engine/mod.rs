//! The engine as a library: `Engine::start(config)` inside the caller's actix system, then a
//! cloneable handle with typed async methods. The HTTP API and the CLI are thin adapters on it.

pub mod admin;
pub mod identity;
mod identity_services;
mod issue;
mod ocsp;
mod ocsp_cache;
mod probe;
mod revocation;
/// The types an embedding application exchanges with the engine (defined in [`crate::types`]).
pub use crate::types;
pub use ocsp_cache::{OcspAnswer, OcspService, ResponderStatus};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

use crate::actors::cell::{self, CellSlot, CellStatus};
use crate::actors::crl_publisher::CrlPublisher;
use crate::actors::gauges::CellGauges;
use crate::actors::history::History;
use crate::actors::intake::{Catalog, Intake};
use crate::actors::registry::{self, Registry, RegistryChanged, SharedSnapshot, Snapshot};
use crate::actors::resumer::Resumer;
use crate::actors::store::StoreHandle;
use crate::actors::supervisor::{CellFactory, CellSupervisor};
use crate::audit::{AuditLog, AuditWriter, RefusalLedger};
use crate::config::{Config, ConfigProblem, Sabotage, Sabotages};
use crate::db::{migrate, queries, Backend, DbConn, Pools};
use crate::error::{DbError, EngineError};
use crate::metrics::Metrics;
use crate::pki::{CaMaterial, RevocationReason};
use crate::states::CaState;
use crate::types::*;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Config(Vec<ConfigProblem>),
    #[error("database: {0}")]
    Database(#[from] DbError),
    #[error("start-up task failed: {0}")]
    Task(String),
}

/// Run blocking database work with a connection of `pool`, off the event loop, in the caller's
/// span (so a long hold names its holder).
async fn on_pool<T: Send + 'static>(
    pool: crate::db::DbPool,
    f: impl FnOnce(&mut DbConn) -> Result<T, DbError> + Send + 'static,
) -> Result<T, EngineError> {
    let span = tracing::Span::current();
    actix_web::rt::task::spawn_blocking(move || {
        let _span = span.entered();
        let mut conn = pool.get()?;
        f(&mut conn)
    })
    .await
    .map_err(|e| EngineError::Internal(e.to_string()))?
    .map_err(EngineError::from)
}

/// How often current database holds are scanned for leaks.
const HOLD_SCAN_INTERVAL: Duration = Duration::from_millis(500);

/// Where an engine is in its life; it only moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Serving = 0,
    /// Stopping soon: still serving everything, while `/readyz` tells load balancers to send
    /// elsewhere.
    Draining = 1,
    /// Refusing new work, finishing what it holds.
    Stopping = 2,
}

/// A running engine. Cheap to clone; every clone talks to the same actors.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    instance: Arc<str>,
    intake: Intake,
    /// What the engine reads itself (shared with intake, which only answers questions about it).
    catalog: Arc<Catalog>,
    snapshot: SharedSnapshot,
    cells: Arc<HashMap<String, CellSlot>>,
    store: StoreHandle,
    pools: Pools,
    metrics: Arc<Metrics>,
    /// Bounds concurrent reads: as many as the status pool has connections may hold one and as
    /// many again may wait (at most the pool's checkout timeout); beyond that, refused at once.
    read_permits: Arc<Semaphore>,
    /// Pool counters at the previous readiness check, to report what happened since.
    readiness_seen: std::sync::Mutex<HashMap<&'static str, (u64, u64)>>,
    /// What the background probe last found of the database (readiness never waits on it).
    database_probe: probe::DatabaseProbe,
    started_at: i64,
    /// Serving, draining or stopping: a [`Phase`] (as its `u8`), which only moves forward.
    phase: std::sync::atomic::AtomicU8,
    /// Dev-only deliberate defects, fixed at start (empty outside dev mode).
    sabotage: Sabotages,
    /// Set by the first overload refusal; read only by [`Sabotage::StickyOverload`].
    overload_latched: AtomicBool,
    arbiters: Arbiters,
    /// Refusal tallies and the audit writer (not the issuance Store).
    audit: AuditLog,
    /// Each CA's last minutes, for the console.
    history: History,
    _supervisor: Addr<CellSupervisor>,
    registry: Addr<Registry>,
    resumer: Addr<Resumer>,
    _crl_publisher: Addr<CrlPublisher>,
    /// OCSP responders and their cached answers.
    ocsp: Arc<ocsp_cache::OcspService>,
    stop_listener: Arc<AtomicBool>,
    /// Key pool, vault and sweeper, when a key-encryption key is configured.
    identities: Option<identity_services::IdentityServices>,
}

/// A serial as the API accepts it: hex, at most 20 octets, compared lower-case; anything else
/// names no certificate (`404`, without a database read).
fn normalize_serial(serial: &str) -> Result<String, EngineError> {
    let serial = serial.to_ascii_lowercase();
    if serial.is_empty() || serial.len() > 40 || !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(EngineError::NotFound);
    }
    Ok(serial)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, StartError> {
    actix_web::rt::task::spawn_blocking(f).await.map_err(|e| StartError::Task(e.to_string()))
}

impl Engine {
    /// Check the configuration, migrate the database, load the registry, and start every actor
    /// on the current actix system.
    pub async fn start(config: Config) -> Result<Engine, StartError> {
        let materials = accept_config(&config).await?;
        let metrics = Arc::new(Metrics::new());
        let (pools, snapshot) = open_database(&config, &metrics).await?;
        let instance: Arc<str> = config.instance_id().into();
        let shared = Arc::new(ArcSwap::from_pointee(snapshot));

        let store = StoreHandle::start(pools.issuance.clone(), &config.store, metrics.clone());
        let catalog = Arc::new(Catalog::build(&config, materials));
        let audit = start_audit(&config, &pools, &instance, &metrics);
        let factory = CellFactory {
            config: Arc::new(config.clone()),
            catalog: catalog.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            instance: instance.clone(),
            snapshot: shared.clone(),
        };
        let (cells, subscribers, arbiters) = start_cells(&config, &factory);
        let intake = Intake::new(&config, catalog.clone(), shared.clone(), cells.clone());
        let snapshot = shared.clone();
        let deaf = config.sabotaged(Sabotage::DeafRegistry);
        let registry = Registry::new(
            pools.control.clone(),
            shared,
            if deaf { config.registry.poll_interval * 5 } else { config.registry.poll_interval },
            instance.clone(),
            format!("api {} · admin {}", config.http.listen, config.admin.listen).into(),
            metrics.clone(),
            subscribers,
        )
        .start();
        let supervisor = CellSupervisor::new(factory, cells.clone(), registry.clone(), arbiters.clone()).start();
        let stop_listener = Arc::new(AtomicBool::new(false));
        if config.registry.listen && !deaf && pools.control.backend() == Backend::Postgres {
            registry::listener(pools.control.clone(), registry.clone(), stop_listener.clone());
        }
        let resumer = Resumer::new(
            &config,
            intake.clone(),
            pools.control.clone(),
            store.clone(),
            instance.clone(),
            metrics.clone(),
        )
        .start();
        let ocsp = Arc::new(
            ocsp_cache::OcspService::new(&catalog.cas, &config.cas).map_err(|e| StartError::Task(e.to_string()))?,
        );
        let crl_publisher = CrlPublisher::new(
            Arc::new(catalog.cas.clone()),
            pools.control.clone(),
            instance.clone(),
            config.crl.clone(),
            metrics.clone(),
            {
                let ocsp = ocsp.clone();
                Arc::new(move |shards: &[crate::db::models::CrlShardRow]| ocsp.shards_seen(shards))
            },
        )
        .start();
        let identities = start_identities(&config, &pools, &instance, &metrics)?;
        watch_connection_holds(&config, &pools, &metrics, stop_listener.clone());
        tracing::info!(instance = %instance, cas = config.cas.len(), profiles = config.profiles.len(), "engine started");
        let sabotage = config.sabotages();
        let engine = Engine {
            inner: Arc::new(Inner {
                read_permits: Arc::new(Semaphore::new(2 * pools.status.max_size as usize)),
                readiness_seen: std::sync::Mutex::new(HashMap::new()),
                database_probe: probe::DatabaseProbe::new(crate::pki::now_ms()),
                started_at: crate::pki::now_ms(),
                config,
                instance,
                intake,
                catalog,
                snapshot,
                cells,
                store,
                audit,
                history: History::default(),
                pools,
                metrics,
                phase: std::sync::atomic::AtomicU8::new(Phase::Serving as u8),
                sabotage,
                overload_latched: AtomicBool::new(false),
                arbiters,
                _supervisor: supervisor,
                registry,
                resumer,
                _crl_publisher: crl_publisher,
                ocsp,
                stop_listener,
                identities,
            }),
        };
        engine.probe_database_periodically();
        engine.publish_tree_periodically();
        engine.record_history_periodically();
        engine.renew_ocsp_responders_periodically();
        Ok(engine)
    }

    /// Each CA's recent history for the console, sampled until the engine stops.
    fn record_history_periodically(&self) {
        let engine = self.clone();
        let every = self.inner.config.admin.history_interval;
        actix_web::rt::spawn(async move {
            let mut tick = tokio::time::interval(every);
            while !engine.is_shutting_down() {
                tick.tick().await;
                let gauges = engine.inner.cells.iter().map(|(ca, slot)| (ca, slot.gauges.as_ref()));
                engine.inner.history.sample(gauges, &engine.inner.audit.refusals_by_ca());
            }
        });
    }

    /// The database probe readiness answers from: one `SELECT 1` at a time, every
    /// [`probe::PROBE_EVERY`] (a probe waiting on a frozen database is bounded by the status
    /// read's own deadline, and readiness sees its answer grow old meanwhile).
    fn probe_database_periodically(&self) {
        let engine = self.clone();
        actix_web::rt::spawn(async move {
            let mut tick = tokio::time::interval(probe::PROBE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !engine.is_shutting_down() {
                tick.tick().await;
                let result = engine.read(queries::ping).await;
                engine.inner.database_probe.record(result, crate::pki::now_ms());
            }
        });
    }

    /// Every instance publishes its actor tree with its heartbeat, so any console can show it.
    fn publish_tree_periodically(&self) {
        let publisher = self.clone();
        let every = self.inner.config.registry.poll_interval;
        actix_web::rt::spawn(async move {
            let mut tick = tokio::time::interval(every);
            while !publisher.is_shutting_down() {
                tick.tick().await;
                if let Err(e) = publisher.publish_tree().await {
                    tracing::debug!(error = %e, "could not publish the actor tree");
                }
            }
        });
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn instance_id(&self) -> &str {
        &self.inner.instance
    }

    /// The database pools (for components of the embedding application that share them).
    pub fn pools(&self) -> &Pools {
        &self.inner.pools
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The metrics, for a part that outlives a borrow of the handle (a listener's bounds).
    pub fn shared_metrics(&self) -> Arc<Metrics> {
        self.inner.metrics.clone()
    }

    /// The client holding this bearer API key.
    pub fn authenticate(&self, api_key: &str) -> Result<Arc<Client>, EngineError> {
        self.inner.intake.authenticate(api_key)
    }

    /// The client a verified TLS client certificate authenticates, by the certificate's names.
    pub fn authenticate_certificate(&self, names: &[String]) -> Result<Arc<Client>, EngineError> {
        self.inner.intake.authenticate_certificate(names)
    }

    /// A configured client by name, for applications that authenticate callers themselves.
    pub fn client(&self, name: &str) -> Option<Arc<Client>> {
        self.inner.catalog.clients_by_name.get(name).cloned()
    }

    /// Run a read on the status pool, off the event loop, refusing at once when all its
    /// connections are busy, and answering within the interactive deadline: a database that
    /// stops answering on an open connection (neither `statement_timeout` nor TCP timeouts see
    /// a peer that acknowledges and never replies) holds a thread, never the caller.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut DbConn) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, EngineError> {
        self.read_bounded(f).await.map_err(|e| match e {
            EngineError::DatabaseUnavailable if self.inner.sabotage.has(Sabotage::BareErrors) => {
                EngineError::Internal("no database connection (sabotage bare-errors)".into())
            }
            e => e,
        })
    }

    async fn read_bounded<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut DbConn) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, EngineError> {
        // The permit goes with the read onto its thread: a read the caller stopped waiting for
        // still counts against the bound until it ends.
        let permit = self.inner.read_permits.clone().try_acquire_owned().map_err(|_| {
            self.inner.metrics.pool_refused.get_or_create(&crate::metrics::pool("status")).inc();
            EngineError::DatabaseUnavailable
        })?;
        let bound = self.inner.config.lanes.interactive.default_deadline;
        let read = on_pool(self.inner.pools.status.clone(), move |conn| {
            let _permit = permit;
            f(conn)
        });
        tokio::time::timeout(bound, read).await.unwrap_or_else(|_| {
            tracing::warn!(bound_ms = bound.as_millis() as u64, "a database read got no answer in time");
            Err(EngineError::DatabaseUnavailable)
        })
    }

    pub async fn certificate(&self, client: &Client, serial: &str) -> Result<CertificateRecord, EngineError> {
        let serial = normalize_serial(serial)?;
        let row = self.read(move |c| queries::load_certificate(c, &serial)).await?.ok_or(EngineError::NotFound)?;
        // Another client's certificate is indistinguishable from none at all.
        if row.client != client.name {
            return Err(EngineError::NotFound);
        }
        let der = row.cert_der.ok_or(EngineError::NotFound)?;
        Ok(CertificateRecord {
            chain: self.chain_of(&row.ca_id),
            serial: row.serial,
            ca: row.ca_id,
            profile: row.profile,
            state: row.state,
            certificate: crate::pki::cert_pem(&der),
            not_before: row.not_before,
            not_before_rfc3339: rfc3339(row.not_before),
            not_after: row.not_after,
            not_after_rfc3339: rfc3339(row.not_after),
            issued_at: row.issued_at,
            issued_at_rfc3339: row.issued_at.map(rfc3339),
            revocation: match (row.revoked_at, row.revocation_reason.and_then(RevocationReason::from_code)) {
                (Some(revoked_at), Some(reason)) => {
                    Some(RevocationInfo { revoked_at, revoked_at_rfc3339: rfc3339(revoked_at), reason })
                }
                _ => None,
            },
        })
    }

    fn chain_of(&self, ca: &str) -> crate::types::Chain {
        self.inner.catalog.cas.get(ca).map(|m| m.chain_pem.clone()).unwrap_or_default()
    }

    /// Every configured CA, its live state and its chain.
    pub fn cas(&self) -> Vec<CaInfo> {
        let snapshot = self.inner.snapshot.load();
        let mut out: Vec<CaInfo> = self
            .inner
            .catalog
            .cas
            .values()
            .map(|m| CaInfo {
                id: m.id.clone(),
                state: snapshot.ca_state(&m.id).map_or("unknown", CaState::as_str).to_string(),
                key_type: format!("{:?}", m.key_type),
                not_after: crate::pki::unix_ms(m.not_after),
                not_after_rfc3339: rfc3339(crate::pki::unix_ms(m.not_after)),
                chain: m.chain_pem.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    pub async fn cell_status(&self) -> Vec<CellStatus> {
        let mut out = Vec::new();
        for (ca, slot) in self.inner.cells.iter() {
            let addr = (**slot.addr.load()).clone();
            match addr.send(cell::GetStatus).await {
                Ok(status) => out.push(status),
                // Dead (its supervisor replaces it, at most 5 times a minute): shown, not hidden.
                Err(_) => out.push(CellStatus::down(ca)),
            }
        }
        out.sort_by(|a, b| a.ca.cmp(&b.ca));
        out
    }

    /// For `/readyz`: database reachable, registry loaded, at least one CA serving.
    pub async fn readiness(&self) -> Readiness {
        let mut reasons = Vec::new();
        let database = match self.inner.database_probe.verdict(crate::pki::now_ms()) {
            Ok(()) => "ok".to_string(),
            Err(why) => {
                reasons.push(why);
                "unavailable".into()
            }
        };
        let snapshot = self.inner.snapshot.load();
        let mut serving = 0;
        for (id, material) in &self.inner.catalog.cas {
            if !snapshot.ca_enabled(id) {
                continue;
            }
            let cell_running = self.inner.cells.get(id).is_some_and(|slot| slot.addr.load().connected());
            match material.key.unavailable_reason() {
                None if cell_running => serving += 1,
                None => reasons.push(format!("CA {id}: its cell is down")),
                Some(why) => reasons.push(format!("CA {id}: {why}")),
            }
        }
        // One failed CA does not make the instance unready while others serve.
        if serving > 0 {
            reasons.retain(|r| !r.starts_with("CA "));
        }
        if snapshot.version == 0 {
            reasons.push("registry not loaded".into());
        }
        if serving == 0 {
            reasons.push("no CA is serving".into());
        }
        match self.phase() {
            Phase::Serving => {}
            Phase::Draining => reasons.push("draining: this instance is stopping and still serves meanwhile".into()),
            Phase::Stopping => reasons.push("shutting down".into()),
        }
        let (pools, mut warnings) = self.pool_readiness();
        warnings.extend(self.inner.ocsp.warnings());
        Readiness {
            ready: reasons.is_empty(),
            database,
            registry_version: snapshot.version,
            cas_serving: serving,
            reasons,
            warnings,
            pools,
        }
    }

    /// Each pool's use, and what went wrong in it since the previous check, in words.
    fn pool_readiness(&self) -> (Vec<PoolReadiness>, Vec<String>) {
        let m = &self.inner.metrics;
        let mut seen = self.inner.readiness_seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut pools = Vec::new();
        let mut warnings = Vec::new();
        for pool in self.inner.pools.all() {
            let labels = crate::metrics::pool(pool.name);
            let (timeouts, refused) =
                (m.pool_timeouts.get_or_create(&labels).get(), m.pool_refused.get_or_create(&labels).get());
            let (last_timeouts, last_refused) = seen.insert(pool.name, (timeouts, refused)).unwrap_or((0, 0));
            let state = pool.state();
            let p = PoolReadiness {
                name: pool.name,
                in_use: state.connections - state.idle_connections,
                max: pool.max_size,
                checkout_timeouts: timeouts - last_timeouts,
                refused: refused - last_refused,
            };
            if (p.checkout_timeouts > 0 || p.refused > 0) && !self.inner.sabotage.has(Sabotage::QuietReadiness) {
                warnings.push(format!(
                    "pool {} is saturated: {} of {} connections in use; since the last check {} checkouts timed out and {} requests were refused; raise database.pools.{}.max_size or lower the load",
                    p.name, p.in_use, p.max, p.checkout_timeouts, p.refused, p.name
                ));
            }
            pools.push(p);
        }
        (pools, warnings)
    }

    /// [`Sabotage::ConnectionPerRequest`]: a connection outside the pools, held by the caller
    /// until it is answered. `None` (and no cost but a comparison) on an engine built right.
    async fn stray_connection(&self) -> Option<crate::db::StrayConnection> {
        if !self.inner.sabotage.has(Sabotage::ConnectionPerRequest) {
            return None;
        }
        let url = self.inner.config.database.url.clone();
        match actix_web::rt::task::spawn_blocking(move || crate::db::StrayConnection::open(&url)).await {
            Ok(Ok(conn)) => Some(conn),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "sabotage connection-per-request: the extra connection was refused");
                None
            }
            Err(_) => None,
        }
    }

    /// Prometheus text exposition of this engine's metrics.
    pub fn metrics_text(&self) -> String {
        self.inner.pools.export_state(&self.inner.metrics);
        self.inner.metrics.render()
    }

    /// Stop taking work, let every cell finish what it holds (bounded by the longest lane
    /// deadline), give back claims on pending asynchronous requests, and stop the cells.
    pub async fn shutdown(&self) {
        if self.inner.phase.swap(Phase::Stopping as u8, Ordering::SeqCst) == Phase::Stopping as u8 {
            return;
        }
        let limit =
            self.inner.config.lanes.interactive.max_deadline.max(self.inner.config.lanes.background.max_deadline);
        let mut waits = Vec::new();
        for slot in self.inner.cells.values() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if slot.addr.load().try_send(cell::Drain(tx)).is_ok() {
                waits.push(rx);
            }
        }
        let drained = tokio::time::timeout(limit, futures_util::future::join_all(waits)).await.is_ok();
        if !drained {
            tracing::warn!("shutdown: some cells did not drain in time");
        }
        let pool = self.inner.pools.control.clone();
        let instance = self.inner.instance.to_string();
        let released = actix_web::rt::task::spawn_blocking(move || {
            pool.get().and_then(|mut c| queries::release_claims(&mut c, &instance))
        })
        .await;
        if let Ok(Ok(n)) = released {
            if n > 0 {
                tracing::info!(released = n, "gave back claims on pending asynchronous requests");
            }
        }
        self.inner.stop_listener.store(true, Ordering::Relaxed);
        if let Some(identities) = &self.inner.identities {
            identities.stop();
        }
        // The last refusal tallies and events, so that a clean stop loses none.
        if let Err(e) = self.inner.audit.flush().await {
            tracing::warn!(error = %e, "shutdown: the last audit rows could not be written");
        }
        if let Ok(mut arbiters) = self.inner.arbiters.lock() {
            for arbiter in arbiters.drain(..) {
                arbiter.stop();
            }
        }
        tracing::info!("engine stopped");
    }

    pub fn is_shutting_down(&self) -> bool {
        self.phase() == Phase::Stopping
    }

    /// Tell load balancers to stop sending (`/readyz` answers 503, "draining") while every
    /// request is still served: the first step of a graceful stop, before [`Engine::shutdown`].
    pub fn begin_drain(&self) {
        let serving = Phase::Serving as u8;
        let _ = self.inner.phase.compare_exchange(serving, Phase::Draining as u8, Ordering::SeqCst, Ordering::SeqCst);
    }

    pub fn phase(&self) -> Phase {
        match self.inner.phase.load(Ordering::Relaxed) {
            0 => Phase::Serving,
            1 => Phase::Draining,
            _ => Phase::Stopping,
        }
    }
}

/// Check the configuration and load the CA material: fatal problems stop the start; a CA whose
/// key is unavailable starts failed (its key is retried), and warnings are logged.
async fn accept_config(config: &Config) -> Result<HashMap<String, CaMaterial>, StartError> {
    let cfg = config.clone();
    let (problems, materials) = blocking(move || crate::check::check_config(&cfg)).await?;
    let (warnings, problems): (Vec<_>, Vec<_>) = problems.into_iter().partition(|p| p.warning);
    for w in &warnings {
        tracing::warn!(problem = %w, "configuration warning");
    }
    let (unavailable, fatal): (Vec<_>, Vec<_>) = problems.into_iter().partition(|p| p.key_unavailable);
    if !fatal.is_empty() {
        return Err(StartError::Config(fatal));
    }
    for p in &unavailable {
        tracing::error!(problem = %p, "a CA key is unavailable: that CA starts failed and its key is retried");
    }
    Ok(materials)
}

/// Migrate the database, open the bounded pools and read the registry's first snapshot.
async fn open_database(config: &Config, metrics: &Arc<Metrics>) -> Result<(Pools, Snapshot), StartError> {
    let url = config.database.url.clone();
    let ran = blocking(move || migrate::run(&url)).await??;
    if ran > 0 {
        tracing::info!(migrations = ran, "database migrated");
    }
    let mut pools = Pools::build(&config.database, metrics.clone())?;
    if config.sabotaged(Sabotage::SharedPool) {
        pools.issuance = pools.control.clone();
    }
    let (control, cfg) = (pools.control.clone(), config.clone());
    let snapshot = blocking(move || registry::bootstrap(&control, &cfg)).await??;
    Ok((pools, snapshot))
}

type Subscribers = HashMap<String, Recipient<RegistryChanged>>;
type Arbiters = Arc<std::sync::Mutex<Vec<Arbiter>>>;

/// One cell per CA whose material loaded, each on its own arbiter.
fn start_cells(config: &Config, factory: &CellFactory) -> (Arc<HashMap<String, CellSlot>>, Subscribers, Arbiters) {
    let mut cells = HashMap::new();
    let mut subscribers = HashMap::new();
    let mut arbiters = Vec::new();
    for ca_cfg in &config.cas {
        let gauges = Arc::new(CellGauges::default());
        let Some((addr, arbiter)) = factory.start(&ca_cfg.id, gauges.clone()) else { continue };
        subscribers.insert(ca_cfg.id.clone(), addr.clone().recipient());
        cells.insert(ca_cfg.id.clone(), CellSlot { addr: ArcSwap::from_pointee(addr), gauges });
        arbiters.push(arbiter);
    }
    (Arc::new(cells), subscribers, Arc::new(std::sync::Mutex::new(arbiters)))
}

/// The disposable-identity services, when a key-encryption key is configured.
fn start_identities(
    config: &Config,
    pools: &Pools,
    instance: &Arc<str>,
    metrics: &Arc<Metrics>,
) -> Result<Option<identity_services::IdentityServices>, StartError> {
    if config.identities.kek_file.is_none() && config.identities.kek_env.is_none() {
        return Ok(None);
    }
    let kek = crate::pki::kek::Kek::load(&config.identities, config.mode).map_err(|e| {
        StartError::Config(vec![ConfigProblem {
            path: "identities".into(),
            message: e.to_string(),
            key_unavailable: false,
            warning: false,
        }])
    })?;
    let services = identity_services::IdentityServices::start(
        config,
        kek,
        pools.control.clone(),
        instance.clone(),
        metrics.clone(),
    );
    Ok(Some(services))
}

/// The refusal tallies for every configured client and profile, and their writer.
fn start_audit(config: &Config, pools: &Pools, instance: &Arc<str>, metrics: &Arc<Metrics>) -> AuditLog {
    let ledger = RefusalLedger::new(
        config.clients.iter().map(|c| c.name.as_str()),
        config.profiles.iter().map(|p| p.id.as_str()),
        metrics.clone(),
    );
    let ca_of_profile = config.profiles.iter().map(|p| (p.id.clone(), p.ca.clone())).collect();
    AuditWriter::start(
        pools.audit.clone(),
        Arc::new(ledger),
        metrics.clone(),
        instance.clone(),
        &config.audit,
        ca_of_profile,
    )
}

/// Scan the pools for connections held too long, until the engine stops.
fn watch_connection_holds(config: &Config, pools: &Pools, metrics: &Arc<Metrics>, stop: Arc<AtomicBool>) {
    let (watched, metrics, threshold) = (pools.clone(), metrics.clone(), config.database.slow_hold_threshold);
    let silent_leaks = config.sabotaged(Sabotage::SilentLeaks);
    actix_web::rt::spawn(async move {
        let mut tick = tokio::time::interval(HOLD_SCAN_INTERVAL);
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            if !silent_leaks {
                watched.scan_holds(&metrics, threshold);
            }
        }
    });
}
