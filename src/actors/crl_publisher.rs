//! The CRL publisher: every instance runs one; for each CA's shard, one instance at a time (the
//! holder of the shard's lease in the database) makes its CRL when it is due:
//!
//! - it has none yet;
//! - a revocation made it stale (re-made within `crl.delay`: the publisher looks every
//!   `crl.poll_interval()`, a quarter of the delay);
//! - half of its validity has passed (so relying parties never hold an expired one).
//!
//! The CRL is signed with the CA key on a blocking thread and stored with the next CRL number;
//! every instance serves the latest one from the database.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use actix::prelude::*;

use crate::config::CrlConfig;
use crate::db::models::CrlShardRow;
use crate::db::revocation::{self, NewCrl};
use crate::db::DbPool;
use crate::error::{DbError, EngineError};
use crate::metrics::Metrics;
use crate::pki::crl::{sign_crl, CrlContents, CrlEntry};
use crate::pki::{now_ms, CaMaterial, RevocationReason};

/// Called with the shards' bookkeeping at every look.
pub type ShardWatcher = Arc<dyn Fn(&[CrlShardRow]) + Send + Sync>;

pub struct CrlPublisher {
    cas: Arc<HashMap<String, Arc<CaMaterial>>>,
    control: DbPool,
    instance: Arc<str>,
    config: CrlConfig,
    metrics: Arc<Metrics>,
    /// Told of every look's shards (the OCSP cache drops answers on a shard revoked elsewhere).
    on_look: ShardWatcher,
    busy: bool,
    /// The last failure per (CA, shard), so a failing shard is logged when its failure changes,
    /// not at every look.
    failing: HashMap<(String, i32), String>,
}

/// What one look at the shards did.
#[derive(Debug, Default)]
struct Round {
    published: Vec<(String, i32, usize)>,
    failed: Vec<((String, i32), String)>,
    succeeded: Vec<(String, i32)>,
}

impl CrlPublisher {
    pub fn new(
        cas: Arc<HashMap<String, Arc<CaMaterial>>>,
        control: DbPool,
        instance: Arc<str>,
        config: CrlConfig,
        metrics: Arc<Metrics>,
        on_look: ShardWatcher,
    ) -> CrlPublisher {
        CrlPublisher { cas, control, instance, config, metrics, on_look, busy: false, failing: HashMap::new() }
    }

    fn look(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        self.busy = true;
        let (cas, pool, instance, config, ocsp) =
            (self.cas.clone(), self.control.clone(), self.instance.clone(), self.config.clone(), self.on_look.clone());
        let work = actix_web::rt::task::spawn_blocking(move || publish_due(&cas, &pool, &instance, &config, &*ocsp));
        ctx.spawn(work.into_actor(self).map(|result, act, _| {
            act.busy = false;
            match result {
                Ok(Ok(round)) => act.report(round),
                Ok(Err(e)) => tracing::warn!(error = %e, "could not look at the CRL shards"),
                Err(e) => tracing::error!(error = %e, "CRL publisher task failed"),
            }
        }));
    }

    fn report(&mut self, round: Round) {
        for (ca, shard, entries) in round.published {
            self.metrics.crls_published.get_or_create(&crate::metrics::ca(&ca)).inc();
            tracing::debug!(ca, shard, entries, "CRL published");
        }
        for key in round.succeeded {
            if self.failing.remove(&key).is_some() {
                tracing::info!(ca = key.0, shard = key.1, "CRL publishing works again");
            }
        }
        for (key, why) in round.failed {
            self.metrics.crl_failures.get_or_create(&crate::metrics::ca(&key.0)).inc();
            if self.failing.get(&key) != Some(&why) {
                tracing::warn!(ca = key.0, shard = key.1, error = %why, "could not publish a CRL");
                self.failing.insert(key, why);
            }
        }
    }
}

impl Actor for CrlPublisher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let (cas, pool) = (self.cas.clone(), self.control.clone());
        // Every configured shard gets a row, so each has a CRL before anything is revoked.
        let ensure = actix_web::rt::task::spawn_blocking(move || -> Result<(), DbError> {
            let mut conn = pool.get()?;
            for ca in cas.values() {
                revocation::ensure_shards(&mut conn, &ca.id, ca.crl_shards)?;
            }
            Ok(())
        });
        ctx.spawn(ensure.into_actor(self).map(|result, act, ctx| {
            if !matches!(result, Ok(Ok(()))) {
                tracing::warn!("could not create the CRL shard rows; retrying at the next look");
            }
            act.look(ctx);
            ctx.run_interval(act.config.poll_interval(), |act, ctx| act.look(ctx));
        }));
    }
}

fn is_due(row: &CrlShardRow, now: i64, validity_ms: i64) -> bool {
    match (row.has_crl, row.this_update) {
        (true, Some(this_update)) => row.stale_since.is_some() || now >= this_update + validity_ms / 2,
        _ => true,
    }
}

/// One look: make and store every due shard's CRL that this instance can lease.
fn publish_due(
    cas: &HashMap<String, Arc<CaMaterial>>,
    pool: &DbPool,
    instance: &str,
    config: &CrlConfig,
    on_look: &(dyn Fn(&[CrlShardRow]) + Send + Sync),
) -> Result<Round, DbError> {
    let mut conn = pool.get()?;
    let now = now_ms();
    let validity_ms = config.validity.as_millis() as i64;
    let mut round = Round::default();
    let shards = revocation::shards(&mut conn)?;
    on_look(&shards);
    for ca in cas.values() {
        // Shards added since start (more configured) get their rows at the next look.
        if shards.iter().filter(|r| r.ca_id == ca.id).count() < ca.crl_shards as usize {
            revocation::ensure_shards(&mut conn, &ca.id, ca.crl_shards)?;
        }
    }
    for row in shards.iter().filter(|r| is_due(r, now, validity_ms)) {
        let Some(ca) = cas.get(&row.ca_id) else { continue };
        let key = (row.ca_id.clone(), row.shard);
        if !ca.key.is_available() {
            round.failed.push((key, "the CA key is unavailable".into()));
            continue;
        }
        let lease_until = now + config.lease.as_millis() as i64;
        if !revocation::take_lease(&mut conn, &row.ca_id, row.shard, instance, now, lease_until)? {
            continue; // another instance is making it
        }
        match publish(&mut conn, ca, row, instance, config) {
            Ok(Some(entries)) => {
                round.published.push((row.ca_id.clone(), row.shard, entries));
                round.succeeded.push(key);
            }
            Ok(None) => {}
            Err(e) => round.failed.push((key, e.to_string())),
        }
    }
    Ok(round)
}

/// Make one shard's CRL and store it; the number of entries, or None if another CRL got there
/// first (this one is then dropped).
fn publish(
    conn: &mut crate::db::DbConn,
    ca: &CaMaterial,
    row: &CrlShardRow,
    instance: &str,
    config: &CrlConfig,
) -> Result<Option<usize>, EngineError> {
    let now = now_ms();
    let this_update = UNIX_EPOCH + Duration::from_millis(now as u64);
    // An entry stays until its certificate has expired (Baseline Requirements 4.10.1).
    let entries: Vec<CrlEntry> = revocation::revoked_on_shard(conn, &row.ca_id, row.shard, now)?
        .into_iter()
        .map(|(serial_hex, at, code)| CrlEntry {
            serial_hex,
            revoked_at: UNIX_EPOCH + Duration::from_millis(at.max(0) as u64),
            reason: RevocationReason::from_code(code).unwrap_or(RevocationReason::Unspecified),
        })
        .collect();
    let der = sign_crl(
        ca,
        &CrlContents {
            shard: row.shard as u32,
            number: (row.crl_number + 1) as u64,
            this_update,
            next_update: this_update + config.validity,
            entries: &entries,
        },
    )?;
    let stored = revocation::store_crl(
        conn,
        &NewCrl {
            ca: &row.ca_id,
            shard: row.shard,
            previous_number: row.crl_number,
            this_update: now,
            next_update: now + config.validity.as_millis() as i64,
            der: &der,
            revision: row.revision,
            me: instance,
        },
    )?;
    Ok(stored.then_some(entries.len()))
}
