//! The Registry: owns the live state of CAs and profiles (enabled, disabled, retired) and its
//! version. It loads them from the database, publishes an immutable [`Snapshot`] that intake
//! reads without locking, and polls the version (and writes this instance's heartbeat) every
//! `poll_interval`, so a change made by any instance reaches this one within one interval.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use arc_swap::ArcSwap;

use crate::config::Config;
use crate::db::{queries, DbPool};
use crate::error::DbError;
use crate::metrics::Metrics;
use crate::pki::now_ms;

/// The registry's state at one version.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub version: i64,
    pub cas: HashMap<String, String>,
    pub profiles: HashMap<String, String>,
}

impl Snapshot {
    pub fn ca_state(&self, id: &str) -> &str {
        self.cas.get(id).map(String::as_str).unwrap_or("unknown")
    }
    pub fn ca_enabled(&self, id: &str) -> bool {
        self.ca_state(id) == "enabled"
    }
    pub fn profile_enabled(&self, id: &str) -> bool {
        self.profiles.get(id).is_some_and(|s| s == "enabled")
    }
}

pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

/// Make sure every configured CA and profile has a state row, then read the registry.
pub fn bootstrap(control: &DbPool, config: &Config) -> Result<Snapshot, DbError> {
    let state = |enabled: bool| if enabled { "enabled" } else { "disabled" };
    let cas: Vec<_> = config
        .cas
        .iter()
        .map(|c| (c.id.clone(), state(c.enabled)))
        .collect();
    let profiles: Vec<_> = config
        .profiles
        .iter()
        .map(|p| (p.id.clone(), p.ca.clone(), state(p.enabled)))
        .collect();
    let mut conn = control.get()?;
    queries::ensure_registry_rows(&mut conn, &cas, &profiles, now_ms())?;
    load(&mut conn)
}

fn load(conn: &mut crate::db::DbConn) -> Result<Snapshot, DbError> {
    let s = queries::load_registry(conn)?;
    Ok(Snapshot {
        version: s.version,
        cas: s.cas.into_iter().collect(),
        profiles: s.profiles.into_iter().collect(),
    })
}

pub struct Registry {
    pub control: DbPool,
    pub shared: SharedSnapshot,
    pub poll_interval: Duration,
    pub instance: Arc<str>,
    pub started_at: i64,
    pub metrics: Arc<Metrics>,
    polling: bool,
}

impl Registry {
    pub fn new(
        control: DbPool,
        shared: SharedSnapshot,
        poll_interval: Duration,
        instance: Arc<str>,
        metrics: Arc<Metrics>,
    ) -> Registry {
        Registry {
            control,
            shared,
            poll_interval,
            instance,
            started_at: now_ms(),
            metrics,
            polling: false,
        }
    }

    fn poll(&mut self, ctx: &mut Context<Self>) {
        if self.polling {
            return;
        }
        self.polling = true;
        let pool = self.control.clone();
        let instance = self.instance.clone();
        let started_at = self.started_at;
        let known = self.shared.load().version;
        let work =
            actix_web::rt::task::spawn_blocking(move || -> Result<Option<Snapshot>, DbError> {
                let mut conn = pool.get()?;
                queries::heartbeat(&mut conn, &instance, started_at, known, now_ms())?;
                if queries::registry_version(&mut conn)? == known {
                    return Ok(None);
                }
                load(&mut conn).map(Some)
            });
        ctx.spawn(work.into_actor(self).map(|result, act, _| {
            act.polling = false;
            match result {
                Ok(Ok(Some(snapshot))) => {
                    tracing::info!(version = snapshot.version, "registry changed");
                    act.metrics.registry_version.set(snapshot.version);
                    act.shared.store(Arc::new(snapshot));
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "registry poll failed; serving the last known state")
                }
                Err(e) => tracing::error!(error = %e, "registry poll task failed"),
            }
        }));
    }
}

impl Actor for Registry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.metrics
            .registry_version
            .set(self.shared.load().version);
        ctx.run_interval(self.poll_interval, |act, ctx| act.poll(ctx));
    }
}
