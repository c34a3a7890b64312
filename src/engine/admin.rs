//! The operator's levers on the engine's handle: CA and profile state (disable, enable, retire,
//! park, drain), resubmission of parked work. Every change is one database transaction that
//! bumps the registry version, is audited with the operator's name, and notifies every instance;
//! this instance applies it before the call returns.

use super::Engine;
use crate::actors::registry::{self, ca_state, Apply};
use crate::actors::resumer::Resubmit;
use crate::db::queries::{self, StateChange};
use crate::db::DbConn;
use crate::error::{DbError, EngineError};
use crate::pki::now_ms;

impl Engine {
    /// Run blocking work on the control pool.
    async fn control<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut DbConn) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let pool = self.inner.pools.control.clone();
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

    /// Change a CA's state (`enabled`, `parked`, `draining`, `disabled`, `retired`); returns the
    /// new registry version.
    pub async fn set_ca_state(&self, actor: &str, ca: &str, state: &str) -> Result<i64, EngineError> {
        if !self.inner.intake.catalog.cas.contains_key(ca) {
            return Err(EngineError::NotFound);
        }
        let state = ca_state::ALL
            .iter()
            .find(|s| **s == state)
            .ok_or_else(|| EngineError::MalformedRequest(format!("unknown CA state {state:?}")))?;
        let current = self.inner.intake.snapshot.load().ca_state(ca).to_string();
        if current == ca_state::RETIRED && *state != ca_state::RETIRED {
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
        if !self.inner.intake.catalog.profiles.contains_key(profile) {
            return Err(EngineError::NotFound);
        }
        let state = if enabled { "enabled" } else { "disabled" };
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
            .control(move |conn| {
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
        if !self.inner.intake.snapshot.load().ca_enabled(ca) {
            return Err(EngineError::Conflict(format!("CA {ca:?} must be enabled (unparked) before resubmitting")));
        }
        let ca_owned = ca.to_string();
        let parked = self.control(move |conn| queries::count_parked(conn, &ca_owned)).await?;
        let rate = cfg.resubmit_rate.max(1);
        self.inner
            .resumer
            .try_send(Resubmit { ca: ca.to_string(), per_second: rate })
            .map_err(|_| EngineError::ShuttingDown)?;
        self.audit(actor, "ca.resubmit", ca, &format!("{parked} parked, {rate}/s"));
        Ok(parked)
    }

    fn audit(&self, actor: &str, action: &str, target: &str, detail: &str) {
        self.inner.store.write_detached(queries::WriteOp::Audit(crate::db::models::NewAuditEvent {
            at: now_ms(),
            instance: self.instance_id().to_string(),
            actor: actor.to_string(),
            action: action.to_string(),
            target: target.to_string(),
            outcome: "ok".into(),
            detail: detail.to_string(),
        }));
    }
}
