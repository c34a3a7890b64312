//! The operator's levers on the engine's handle: CA and profile state (disable, enable, retire,
//! park, drain), resubmission of parked work. Every change is one database transaction that
//! bumps the registry version, is audited with the operator's name, and notifies every instance;
//! this instance applies it before the call returns.

use std::time::Duration;

use serde::Serialize;

use super::Engine;
use crate::actors::cell::{CellStatus, Crash, ResetBreaker, Stall};
use crate::actors::registry::{self, Apply};
use crate::actors::resumer::Resubmit;
use crate::db::models::AuditEvent;
use crate::db::queries::{self, StateChange};
use crate::db::revocation;
use crate::db::DbConn;
use crate::error::{DbError, EngineError};
use crate::pki::now_ms;
use crate::states::{CaState, ProfileState};

impl Engine {
    /// Run blocking work on the admin pool: the operator's capacity, which issuance, the audit
    /// writer and a retry storm cannot take.
    pub(super) async fn on_admin_pool<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut DbConn) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let pool = match self.inner.sabotage.has(crate::config::Sabotage::BrittleConsole) {
            true => &self.inner.pools.control,
            false => &self.inner.pools.admin,
        };
        super::on_pool(pool.clone(), f).await
    }

    /// Change a CA's state (`enabled`, `parked`, `draining`, `disabled`, `retired`); returns the
    /// new registry version.
    pub async fn set_ca_state(&self, actor: &str, ca: &str, state: &str) -> Result<i64, EngineError> {
        if !self.inner.catalog.cas.contains_key(ca) {
            return Err(EngineError::NotFound);
        }
        let state: CaState =
            state.parse().map_err(|_| EngineError::MalformedRequest(format!("unknown CA state {state:?}")))?;
        let current = self.inner.snapshot.load().ca_state(ca);
        if current.is_some_and(|current| !current.may_become(state)) {
            return Err(EngineError::Conflict(format!("CA {ca:?} is retired: its key is destroyed")));
        }
        let (ca, actor, instance) = (ca.to_string(), actor.to_string(), self.instance_id().to_string());
        self.apply_change(move |conn| {
            let change = StateChange { actor: &actor, instance: &instance, now: now_ms() };
            queries::set_ca_state(conn, &ca, state, &change)
        })
        .await
    }

    /// Enable or disable a profile; returns the new registry version.
    pub async fn set_profile_state(&self, actor: &str, profile: &str, enabled: bool) -> Result<i64, EngineError> {
        if !self.inner.catalog.profiles.contains_key(profile) {
            return Err(EngineError::NotFound);
        }
        let state = ProfileState::from_enabled(enabled);
        let (profile, actor, instance) = (profile.to_string(), actor.to_string(), self.instance_id().to_string());
        self.apply_change(move |conn| {
            let change = StateChange { actor: &actor, instance: &instance, now: now_ms() };
            queries::set_profile_state(conn, &profile, state, &change)
        })
        .await
    }

    async fn apply_change(
        &self,
        change: impl FnOnce(&mut DbConn) -> Result<Option<i64>, DbError> + Send + 'static,
    ) -> Result<i64, EngineError> {
        let (version, snapshot) = self
            .on_admin_pool(move |conn| {
                let version = change(conn)?;
                Ok((version, registry::read(conn)?))
            })
            .await?;
        let version = version.ok_or(EngineError::NotFound)?;
        // Applied here before returning; other instances learn of it by NOTIFY or by polling.
        let _ = self.inner.registry.send(Apply(snapshot)).await;
        Ok(version)
    }

    /// Feed a CA's parked requests back to it at its configured rate; returns how many were
    /// parked when it started.
    pub async fn resubmit(&self, actor: &str, ca: &str) -> Result<i64, EngineError> {
        let Some(cfg) = self.inner.config.cas.iter().find(|c| c.id == ca) else {
            return Err(EngineError::NotFound);
        };
        if !self.inner.snapshot.load().ca_enabled(ca) {
            return Err(EngineError::Conflict(format!("CA {ca:?} must be enabled (unparked) before resubmitting")));
        }
        let ca_owned = ca.to_string();
        let parked = self.on_admin_pool(move |conn| queries::count_parked(conn, &ca_owned)).await?;
        let rate = cfg.resubmit_rate.max(1);
        self.inner
            .resumer
            .try_send(Resubmit { ca: ca.to_string(), per_second: rate })
            .map_err(|_| EngineError::ShuttingDown)?;
        self.audit(actor, "ca.resubmit", ca, &format!("{parked} parked, {rate}/s"));
        Ok(parked)
    }

    /// Close a CA's breaker now (after the operator fixed its signer).
    pub async fn reset_breaker(&self, actor: &str, ca: &str) -> Result<(), EngineError> {
        let cell = (**self.inner.cells.get(ca).ok_or(EngineError::NotFound)?.addr.load()).clone();
        cell.send(ResetBreaker).await.map_err(|_| EngineError::ShuttingDown)?;
        self.audit(actor, "ca.breaker_reset", ca, "");
        Ok(())
    }

    /// Fault injection for drills and tests, refused outside dev mode: kill a CA's cell so its
    /// supervisor replaces it.
    pub fn crash_cell(&self, ca: &str) -> Result<(), EngineError> {
        self.refuse_faults_outside_dev()?;
        let slot = self.inner.cells.get(ca).ok_or(EngineError::NotFound)?;
        slot.addr.load().try_send(Crash).map_err(|_| EngineError::ShuttingDown)
    }

    /// Fault injection for tests, refused outside dev mode: block a CA's cell (its thread) for
    /// `how_long`, so that its mailbox fills.
    pub fn stall_cell(&self, ca: &str, how_long: Duration) -> Result<(), EngineError> {
        self.refuse_faults_outside_dev()?;
        let slot = self.inner.cells.get(ca).ok_or(EngineError::NotFound)?;
        slot.addr.load().try_send(Stall(how_long)).map_err(|_| EngineError::ShuttingDown)
    }

    /// Fault injection for tests, refused outside dev mode: the next `count` signatures of CA
    /// `ca` panic inside its signer (caught there and answered as signer failures).
    pub fn panic_signer(&self, ca: &str, count: u32) -> Result<(), EngineError> {
        self.refuse_faults_outside_dev()?;
        let slot = self.inner.cells.get(ca).ok_or(EngineError::NotFound)?;
        slot.gauges.injected_signer_panics.fetch_add(count, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Fault injection for tests, refused outside dev mode: the next batch a store worker takes
    /// panics (caught there; the batch's writes are answered as errors).
    pub fn panic_store(&self) -> Result<(), EngineError> {
        self.refuse_faults_outside_dev()?;
        self.inner.store.inject_panic();
        Ok(())
    }

    fn refuse_faults_outside_dev(&self) -> Result<(), EngineError> {
        if self.inner.config.mode != crate::config::Mode::Dev {
            return Err(EngineError::Forbidden("fault injection is refused unless mode = \"dev\"".into()));
        }
        Ok(())
    }

    /// Fault injection for drills, refused outside dev mode: a component that takes
    /// `connections` connections from `pool`, one every `every`, and keeps each for `hold`.
    pub fn inject_leak(
        &self,
        actor: &str,
        pool: &str,
        connections: u32,
        every: Duration,
        hold: Duration,
    ) -> Result<(), EngineError> {
        self.refuse_faults_outside_dev()?;
        self.audit(actor, "fault.leak", pool, &format!("{connections} connections, held {} ms", hold.as_millis()));
        let pool = self
            .inner
            .pools
            .all()
            .into_iter()
            .find(|p| p.name == pool)
            .cloned()
            .ok_or_else(|| EngineError::MalformedRequest(format!("no pool {pool:?}")))?;
        std::thread::Builder::new()
            .name("leaky-component".into())
            .spawn(move || {
                let _span = tracing::info_span!("leaky_component").entered();
                let mut held = Vec::new();
                for _ in 0..connections {
                    if let Ok(conn) = pool.get() {
                        held.push((std::time::Instant::now(), conn));
                    }
                    std::thread::sleep(every);
                    held.retain(|(since, _)| since.elapsed() < hold);
                }
                while let Some((since, conn)) = held.pop() {
                    std::thread::sleep(hold.saturating_sub(since.elapsed()));
                    drop(conn);
                }
            })
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        Ok(())
    }

    /// Everything the admin console shows about this instance and the cluster.
    pub async fn admin_status(&self) -> Result<AdminStatus, EngineError> {
        let snapshot = self.inner.snapshot.load_full();
        let stale_after = self.inner.config.registry.stale_after.as_millis() as i64;
        // The console must keep answering when the control pool is exhausted (that is when it is
        // needed most): what needs the database is left out, and said so.
        // OCSP responders missing or past their renewal point (also in /readyz's warnings).
        let mut warnings = self.inner.ocsp.warnings();
        let ca_ids: Vec<String> = self.inner.catalog.cas.keys().cloned().collect();
        let read = move |conn: &mut crate::db::DbConn| {
            let parked: Result<Vec<(String, i64)>, crate::error::DbError> =
                ca_ids.iter().map(|ca| Ok((ca.clone(), queries::count_parked(conn, ca)?))).collect();
            let chains = crate::audit::chain::heads(conn)?;
            let revocation = (revocation::shards(conn)?, revocation::revoked_counts(conn, now_ms())?);
            Ok((queries::instances(conn)?, queries::recent_audit(conn, 50)?, parked?, chains, revocation))
        };
        let (instances, audit, parked, audit_chains, (shards, revoked)) = match self.on_admin_pool(read).await {
            Ok(found) => found,
            Err(e) if self.inner.sabotage.has(crate::config::Sabotage::BrittleConsole) => return Err(e),
            Err(e) => {
                warnings.push(format!("cluster view, parked counts and audit log unavailable: {e} (admin pool)"));
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), (Vec::new(), Vec::new()))
            }
        };
        let mut cells = self.cell_status().await;
        for cell in &mut cells {
            cell.parked = parked.iter().find(|(ca, _)| *ca == cell.ca).map(|(_, n)| *n);
            cell.restarts = self.inner.metrics.cell_restarts.get_or_create(&crate::metrics::ca(&cell.ca)).get();
            cell.history = self.inner.history.of(&cell.ca);
        }
        let now = now_ms();
        let pools = self.pool_statuses();
        let mut profiles: Vec<_> = snapshot.profiles.iter().map(|(id, s)| (id.clone(), *s)).collect();
        profiles.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(AdminStatus {
            instance: self.instance_id().to_string(),
            registry_version: snapshot.version,
            started_at: self.inner.started_at,
            cells,
            store: self.inner.store.status().await,
            identities: self.inner.identities.as_ref().map(|i| i.status()),
            pools,
            profiles,
            instances: instances
                .into_iter()
                .map(|(id, started_at, heartbeat_at, registry_version, address, tree)| InstanceStatus {
                    stale: now - heartbeat_at > stale_after || registry_version < snapshot.version,
                    uptime_s: (now - started_at).max(0) / 1000,
                    address,
                    tree: serde_json::from_str(&tree).unwrap_or(serde_json::Value::Null),
                    id,
                    started_at,
                    heartbeat_at,
                    registry_version,
                })
                .collect(),
            audit,
            refusals: self.inner.audit.recent_refusals(),
            audit_chains,
            audit_verified: self.inner.audit.last_verification(),
            revocation: RevocationStatus {
                revoked,
                shards: shards.into_iter().map(ShardStatus::from).collect(),
                responders: self.inner.ocsp.responders(),
                cached_answers: self.inner.ocsp.cached_count(),
            },
            warnings,
        })
    }

    /// Write this instance's actor tree into its heartbeat row (every registry poll interval).
    pub async fn publish_tree(&self) -> Result<(), EngineError> {
        let pools: Vec<PoolStatus> = self.pool_statuses();
        let tree = serde_json::json!({
            "cells": self.cell_status().await,
            "store": self.inner.store.status().await,
            "pools": pools,
        })
        .to_string();
        let instance = self.instance_id().to_string();
        // A heartbeat, not an operator's action: on the control pool, leaving the admin pool free.
        super::on_pool(self.inner.pools.control.clone(), move |conn| queries::publish_tree(conn, &instance, &tree))
            .await
    }

    fn pool_statuses(&self) -> Vec<PoolStatus> {
        self.inner
            .pools
            .all()
            .into_iter()
            .map(|p| {
                let state = p.state();
                PoolStatus {
                    name: p.name.into(),
                    max: p.max_size,
                    open: state.connections,
                    idle: state.idle_connections,
                    in_use: state.connections - state.idle_connections,
                    longest_hold_ms: p.holds.longest().as_millis() as u64,
                    wait_p99_ms: p.waits.p99().as_secs_f64() * 1e3,
                    timeouts: self.inner.metrics.pool_timeouts.get_or_create(&crate::metrics::pool(p.name)).get(),
                }
            })
            .collect()
    }

    fn audit(&self, actor: &str, action: &str, target: &str, detail: &str) {
        self.inner.audit.event(crate::db::models::NewAuditEvent {
            at: now_ms(),
            instance: self.instance_id().to_string(),
            actor: actor.to_string(),
            action: action.to_string(),
            target: target.to_string(),
            outcome: "ok".into(),
            detail: detail.to_string(),
        });
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AdminStatus {
    pub instance: String,
    pub registry_version: i64,
    pub started_at: i64,
    pub cells: Vec<CellStatus>,
    pub store: Option<crate::actors::store::StoreStatus>,
    /// The identity key pool and vault, when identities are configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identities: Option<super::identity::IdentitiesStatus>,
    pub pools: Vec<PoolStatus>,
    pub profiles: Vec<(String, ProfileState)>,
    pub instances: Vec<InstanceStatus>,
    pub audit: Vec<AuditEvent>,
    /// Refusals over the last minute, per CA: rate by reason and the clients refused most.
    pub refusals: Vec<crate::audit::recent::CaRefusals>,
    /// The head of every instance's audit hash chain.
    pub audit_chains: Vec<crate::audit::chain::Head>,
    /// When this instance last verified its own chain (every `audit.verify_interval`).
    pub audit_verified: Option<crate::audit::chain::Verification>,
    pub revocation: RevocationStatus,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Revocation as the console shows it: what the CRLs list, each shard's latest CRL, and this
/// instance's OCSP responders.
#[derive(Debug, Clone, Serialize)]
pub struct RevocationStatus {
    /// Per CA: revoked certificates not yet expired (its CRLs' entries).
    pub revoked: Vec<(String, i64)>,
    pub shards: Vec<ShardStatus>,
    pub responders: Vec<super::ocsp_cache::ResponderStatus>,
    /// OCSP answers this instance holds signed.
    pub cached_answers: usize,
}

/// One CRL shard (times in Unix ms).
#[derive(Debug, Clone, Serialize)]
pub struct ShardStatus {
    pub ca: String,
    pub shard: i32,
    /// The latest CRL's number (0: none yet).
    pub crl_number: i64,
    pub this_update: Option<i64>,
    pub next_update: Option<i64>,
    /// Since when a revocation has been waiting for the next CRL.
    pub stale_since: Option<i64>,
    /// The instance that last held the lease to make it.
    pub made_by: Option<String>,
}

impl From<crate::db::models::CrlShardRow> for ShardStatus {
    fn from(row: crate::db::models::CrlShardRow) -> Self {
        ShardStatus {
            ca: row.ca_id,
            shard: row.shard,
            crl_number: row.crl_number,
            this_update: row.this_update,
            next_update: row.next_update,
            stale_since: row.stale_since,
            made_by: row.lease_owner,
        }
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PoolStatus {
    pub name: std::borrow::Cow<'static, str>,
    pub max: u32,
    pub open: u32,
    pub idle: u32,
    pub in_use: u32,
    pub longest_hold_ms: u64,
    pub wait_p99_ms: f64,
    pub timeouts: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct InstanceStatus {
    pub id: String,
    pub address: String,
    pub started_at: i64,
    pub uptime_s: i64,
    pub heartbeat_at: i64,
    pub registry_version: i64,
    /// Its heartbeat is old, or it serves an older registry version than this instance.
    pub stale: bool,
    /// The actor tree it last published: cells, store, pools.
    pub tree: serde_json::Value,
}
