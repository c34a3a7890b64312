//! The Registry: owns the live state of CAs and profiles (enabled, parked, draining, disabled,
//! retired) and its version. It loads them from the database, publishes an immutable
//! [`Snapshot`] (intake reads it without locking) and pushes each new one to its subscribers
//! (the CA cells).
//!
//! A change made by any instance reaches this one three ways: at once when made here
//! ([`Reload`]); within ~20 ms through PostgreSQL `LISTEN` (the [`listener`] thread); and at
//! worst within one `poll_interval`, when the version poll (which also writes this instance's
//! heartbeat) sees a new version — so a lost notification costs at most one interval.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use arc_swap::ArcSwap;

use crate::config::Config;
use crate::db::{queries, DbConn, DbPool};
use crate::error::DbError;
use crate::metrics::Metrics;
use crate::pki::now_ms;
use crate::states::{CaState, ProfileState};

/// The registry's state at one version.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub version: i64,
    pub cas: HashMap<String, CaState>,
    pub profiles: HashMap<String, ProfileState>,
}

impl Snapshot {
    /// The CA's state; `None` for a CA the registry does not know.
    pub fn ca_state(&self, id: &str) -> Option<CaState> {
        self.cas.get(id).copied()
    }
    pub fn ca_enabled(&self, id: &str) -> bool {
        self.ca_state(id) == Some(CaState::Enabled)
    }
    pub fn profile_enabled(&self, id: &str) -> bool {
        self.profiles.get(id) == Some(&ProfileState::Enabled)
    }
}

pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

/// Pushed to subscribers whenever the registry's version changes.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct RegistryChanged(pub Arc<Snapshot>);

/// Read the registry now (after a change made here, or a notification).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reload;

/// Add a subscriber, or replace the one under the same key (a restarted cell).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Subscribe {
    pub key: String,
    pub recipient: Recipient<RegistryChanged>,
}

/// Publish a snapshot read right after a change made by this instance, so the change applies
/// here before the call that made it returns.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Apply(pub Snapshot);

/// Make sure every configured CA and profile has a state row, then read the registry.
pub fn bootstrap(control: &DbPool, config: &Config) -> Result<Snapshot, DbError> {
    let ca_state = |enabled: bool| if enabled { CaState::Enabled } else { CaState::Disabled };
    let cas: Vec<_> = config.cas.iter().map(|c| (c.id.clone(), ca_state(c.enabled))).collect();
    let profiles: Vec<_> =
        config.profiles.iter().map(|p| (p.id.clone(), p.ca.clone(), ProfileState::from_enabled(p.enabled))).collect();
    let mut conn = control.get()?;
    queries::ensure_registry_rows(&mut conn, &cas, &profiles, now_ms())?;
    load(&mut conn)
}

fn load(conn: &mut DbConn) -> Result<Snapshot, DbError> {
    let s = queries::load_registry(conn)?;
    Ok(Snapshot { version: s.version, cas: s.cas.into_iter().collect(), profiles: s.profiles.into_iter().collect() })
}

pub struct Registry {
    control: DbPool,
    shared: SharedSnapshot,
    poll_interval: Duration,
    instance: Arc<str>,
    /// Where this instance listens (API, admin), for the cluster view.
    address: Arc<str>,
    started_at: i64,
    metrics: Arc<Metrics>,
    subscribers: HashMap<String, Recipient<RegistryChanged>>,
    polling: bool,
    /// A reload was asked for while a poll was running: poll again when it ends.
    reload_pending: bool,
}

impl Registry {
    pub fn new(
        control: DbPool,
        shared: SharedSnapshot,
        poll_interval: Duration,
        instance: Arc<str>,
        address: Arc<str>,
        metrics: Arc<Metrics>,
        subscribers: HashMap<String, Recipient<RegistryChanged>>,
    ) -> Registry {
        Registry {
            control,
            shared,
            poll_interval,
            instance,
            address,
            started_at: now_ms(),
            metrics,
            subscribers,
            polling: false,
            reload_pending: false,
        }
    }

    fn poll(&mut self, ctx: &mut Context<Self>, heartbeat: bool) {
        if self.polling {
            self.reload_pending = true;
            return;
        }
        self.polling = true;
        let pool = self.control.clone();
        let (instance, address) = (self.instance.clone(), self.address.clone());
        let started_at = self.started_at;
        let known = self.shared.load().version;
        let work = actix_web::rt::task::spawn_blocking(move || -> Result<Option<Snapshot>, DbError> {
            let _span = tracing::info_span!("registry_poll").entered();
            let mut conn = pool.get()?;
            if heartbeat {
                queries::heartbeat(&mut conn, &instance, &address, started_at, known, now_ms())?;
            }
            if queries::registry_version(&mut conn)? == known {
                return Ok(None);
            }
            load(&mut conn).map(Some)
        });
        ctx.spawn(work.into_actor(self).map(|result, act, ctx| {
            act.polling = false;
            match result {
                Ok(Ok(Some(snapshot))) => act.publish(snapshot),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "registry poll failed; serving the last known state"),
                Err(e) => tracing::error!(error = %e, "registry poll task failed"),
            }
            if std::mem::take(&mut act.reload_pending) {
                act.poll(ctx, false);
            }
        }));
    }

    fn publish(&mut self, snapshot: Snapshot) {
        if snapshot.version <= self.shared.load().version {
            return;
        }
        tracing::info!(version = snapshot.version, "registry changed");
        self.metrics.registry_version.set(snapshot.version);
        let snapshot = Arc::new(snapshot);
        self.shared.store(snapshot.clone());
        for subscriber in self.subscribers.values() {
            if subscriber.try_send(RegistryChanged(snapshot.clone())).is_err() {
                tracing::warn!("a registry subscriber's mailbox is full; it will catch up on the next change");
            }
        }
    }
}

impl Actor for Registry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.metrics.registry_version.set(self.shared.load().version);
        // The heartbeat row appears at once, not one interval later.
        self.poll(ctx, true);
        ctx.run_interval(self.poll_interval, |act, ctx| act.poll(ctx, true));
    }
}

impl Handler<Reload> for Registry {
    type Result = ();

    fn handle(&mut self, _: Reload, ctx: &mut Self::Context) {
        self.poll(ctx, false);
    }
}

impl Handler<Subscribe> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Subscribe, _: &mut Self::Context) {
        // The replacement starts from the current snapshot already; later changes reach it.
        self.subscribers.insert(msg.key, msg.recipient);
    }
}

impl Handler<Apply> for Registry {
    type Result = ();

    fn handle(&mut self, Apply(snapshot): Apply, _: &mut Self::Context) {
        self.publish(snapshot);
    }
}

/// Read the current snapshot (for [`Apply`]).
pub fn read(conn: &mut DbConn) -> Result<Snapshot, DbError> {
    load(conn)
}

/// PostgreSQL `LISTEN`: a thread holding one control connection, draining notifications every
/// 20 ms and asking the registry to reload when one arrives. Reconnects after a failure; stops
/// when `stop` is set.
pub fn listener(pool: DbPool, registry: Addr<Registry>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    use diesel::RunQueryDsl;
    std::thread::Builder::new()
        .name("castellum-listen".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut held = match pool.get() {
                    Ok(held) => held,
                    Err(e) => {
                        tracing::warn!(error = %e, "registry listener cannot connect; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                };
                held.exempt_from_leak_reports();
                let DbConn::Postgres(conn) = &mut *held else { return };
                if let Err(e) = diesel::sql_query(format!("LISTEN {}", queries::REGISTRY_CHANNEL)).execute(&mut *conn) {
                    tracing::warn!(error = %e, "LISTEN failed; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
                // Changes made while we were not listening are caught by this first reload.
                let _ = registry.try_send(Reload);
                let mut idle_ticks = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let mut notified = false;
                    let mut failed = false;
                    for n in conn.notifications_iter() {
                        match n {
                            Ok(_) => notified = true,
                            Err(_) => failed = true,
                        }
                    }
                    if notified {
                        let _ = registry.try_send(Reload);
                    }
                    idle_ticks += 1;
                    // Every few seconds prove the connection is alive; a dead one is replaced.
                    if failed || (idle_ticks % 250 == 0 && diesel::sql_query("SELECT 1").execute(&mut *conn).is_err()) {
                        tracing::warn!("registry listener lost its connection; reconnecting");
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        })
        .expect("spawn the registry listener thread")
}
