//! Intake: where a request enters the engine. It authenticates the client, checks the CSR,
//! finds the profile in the registry's current snapshot, refuses at once what can never succeed
//! (unknown or disabled profile, disabled CA, a profile the client may not use, a bad CSR), and
//! hands the rest to the CA's cell with `try_send`, never a blocking send.
//!
//! Intake runs on the caller's task rather than in a mailbox of its own: verifying a CSR is CPU
//! work that must scale with the callers, and it reads the registry's snapshot without locking.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::cell::{Enqueue, Job};
use super::registry::{ca_state, SharedSnapshot};
use super::supervisor::CellSlot;
use crate::config::{Config, Lane, LanesConfig, Sabotage, Sabotages};
use crate::engine::types::Client;
use crate::error::EngineError;
use crate::pki::identity::IdentityDraft;
use crate::pki::profile::ApprovedNames;
use crate::pki::{csr, CaMaterial, CheckedCsr, Profile};

/// Everything fixed at start-up: profiles, clients, CA material.
pub struct Catalog {
    pub profiles: HashMap<String, Arc<Profile>>,
    pub clients_by_key: HashMap<[u8; 32], Arc<Client>>,
    pub clients_by_name: HashMap<String, Arc<Client>>,
    pub cas: HashMap<String, Arc<CaMaterial>>,
}

impl Catalog {
    pub fn build(config: &Config, cas: HashMap<String, CaMaterial>) -> Catalog {
        let profiles = config.profiles.iter().map(|p| (p.id.clone(), Arc::new(Profile::from_config(p)))).collect();
        let mut clients_by_key = HashMap::new();
        let mut clients_by_name = HashMap::new();
        for c in &config.clients {
            let client = Arc::new(Client { name: c.name.clone(), profiles: c.profiles.iter().cloned().collect() });
            let mut key = [0u8; 32];
            if hex::decode_to_slice(c.api_key_sha256.to_ascii_lowercase(), &mut key).is_ok() {
                clients_by_key.insert(key, client.clone());
            }
            clients_by_name.insert(c.name.clone(), client);
        }
        let cas = cas.into_iter().map(|(id, m)| (id, Arc::new(m))).collect();
        Catalog { profiles, clients_by_key, clients_by_name, cas }
    }
}

/// A request that passed intake: ready to become a job.
pub struct Admitted {
    pub profile: Arc<Profile>,
    pub csr: Arc<CheckedCsr>,
    pub names: Arc<ApprovedNames>,
    /// The CA is parked: store the request as parked instead of queueing it.
    pub hold: bool,
    /// A disposable identity: the engine's sealed key, stored with the certificate.
    pub identity: Option<Arc<IdentityDraft>>,
}

impl Admitted {
    /// The fingerprint of what was asked for, to recognise an idempotent retry: the profile and
    /// CSR, or for an identity the profile and subject (its key is new on every attempt).
    pub fn body_sha256(&self) -> String {
        let mut h = openssl::sha::Sha256::new();
        match &self.identity {
            Some(draft) => h.update(&draft.fingerprint),
            None => {
                h.update(self.profile.id.as_bytes());
                h.update(b"\n");
                h.update(&self.csr.der);
            }
        }
        hex::encode(h.finish())
    }
}

type Limiter = governor::DefaultDirectRateLimiter;

#[derive(Clone)]
pub struct Intake {
    pub catalog: Arc<Catalog>,
    pub snapshot: SharedSnapshot,
    pub cells: Arc<HashMap<String, CellSlot>>,
    pub lanes: LanesConfig,
    /// Per-client GCRA limiters (clients without a configured rate have none).
    limiters: Arc<HashMap<String, Limiter>>,
    /// Dev-only deliberate defects (see [`Sabotage`]).
    sabotage: Sabotages,
}

impl Intake {
    pub fn new(
        config: &Config,
        catalog: Arc<Catalog>,
        snapshot: SharedSnapshot,
        cells: Arc<HashMap<String, CellSlot>>,
    ) -> Intake {
        let limiters = config
            .clients
            .iter()
            .filter_map(|c| {
                let rate = c.rate.as_ref()?;
                let quota = governor::Quota::per_second(NonZeroU32::new(rate.per_second)?)
                    .allow_burst(NonZeroU32::new(rate.burst)?);
                Some((c.name.clone(), governor::RateLimiter::direct(quota)))
            })
            .collect();
        Intake {
            catalog,
            snapshot,
            cells,
            lanes: config.lanes.clone(),
            limiters: Arc::new(limiters),
            sabotage: config.sabotages(),
        }
    }

    /// The client's own rate: over it is `429`, whatever the CAs' state.
    pub fn check_rate(&self, client: &Client) -> Result<(), EngineError> {
        use governor::clock::{Clock, DefaultClock};
        let Some(limiter) = self.limiters.get(&client.name) else { return Ok(()) };
        limiter.check().map_err(|not_until| EngineError::RateLimited {
            retry_after: not_until.wait_time_from(DefaultClock::default().now()).max(Duration::from_secs(1)),
        })
    }

    /// CAs that can sign right now: enabled, key loaded, breaker not open.
    pub fn serving_cas(&self) -> std::collections::HashSet<String> {
        let snapshot = self.snapshot.load();
        let now = crate::pki::now_ms();
        self.cells
            .iter()
            .filter(|(id, slot)| {
                slot.addr.load().connected()
                    && snapshot.ca_enabled(id)
                    && slot.gauges.breaker_open_until_ms.load(Ordering::Relaxed) <= now
                    && self.catalog.cas.get(*id).is_some_and(|m| m.key.is_available())
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// A CA whose breaker is open is refused before any work is spent on the request.
    pub fn check_breaker(&self, profile: &Profile) -> Result<(), EngineError> {
        let Some(gauges) = self.cells.get(&profile.ca).map(|slot| &slot.gauges) else { return Ok(()) };
        let mut open_until = gauges.breaker_open_until_ms.load(Ordering::Relaxed);
        let backs_off = self.sabotage.has(Sabotage::GlobalBackOff)
            || (profile.lane == Lane::Background && self.sabotage.has(Sabotage::BackgroundBackOff));
        if backs_off {
            let slots = self.cells.values();
            open_until = slots.map(|s| s.gauges.breaker_open_until_ms.load(Ordering::Relaxed)).max().unwrap_or(0);
        }
        let now = crate::pki::now_ms();
        if open_until > now {
            return Err(EngineError::CaUnavailable {
                ca: profile.ca.clone(),
                reason: "circuit breaker open: the CA's signer is failing".into(),
                retry_after: Duration::from_millis((open_until - now) as u64),
            });
        }
        Ok(())
    }

    /// Refuse now what its CA cannot serve in time: a predicted queue wait longer than the
    /// time the request has left.
    pub fn check_capacity(&self, profile: &Profile, deadline: Instant) -> Result<(), EngineError> {
        let Some(gauges) = self.cells.get(&profile.ca).map(|slot| &slot.gauges) else { return Ok(()) };
        if self.sabotage.has(Sabotage::IgnoreDeadlines) {
            return Ok(());
        }
        let predicted = gauges.predicted_wait(profile.lane);
        let left = deadline.saturating_duration_since(Instant::now());
        if predicted > left {
            return Err(EngineError::CaOverloaded {
                ca: profile.ca.clone(),
                reason: format!(
                    "predicted queue wait {}ms exceeds the {}ms this request has left",
                    predicted.as_millis(),
                    left.as_millis()
                ),
                retry_after: predicted.max(Duration::from_secs(1)),
            });
        }
        Ok(())
    }
    /// The client holding this bearer API key.
    pub fn authenticate(&self, api_key: &str) -> Result<Arc<Client>, EngineError> {
        let digest = openssl::sha::sha256(api_key.as_bytes());
        self.catalog.clients_by_key.get(&digest).cloned().ok_or(EngineError::Unauthorized)
    }

    /// Which profile, may this client use it, are it and its CA taking this kind of work.
    /// Returns the profile and whether the work must be held (the CA is parked: asynchronous
    /// work is accepted and stored as parked).
    pub fn profile_for(
        &self,
        client: &Client,
        profile_id: &str,
        is_async: bool,
    ) -> Result<(Arc<Profile>, bool), EngineError> {
        let profile = self
            .catalog
            .profiles
            .get(profile_id)
            .cloned()
            .ok_or_else(|| EngineError::UnknownProfile(profile_id.into()))?;
        if !client.profiles.contains(profile_id) {
            return Err(EngineError::ForbiddenProfile(profile_id.into()));
        }
        let snapshot = self.snapshot.load();
        if !snapshot.profile_enabled(profile_id) {
            return Err(EngineError::ProfileDisabled(profile_id.into()));
        }
        if !self.catalog.cas.contains_key(&profile.ca) {
            return Err(EngineError::CaDisabled(profile.ca.clone()));
        }
        let unavailable = |reason: &str| EngineError::CaUnavailable {
            ca: profile.ca.clone(),
            reason: reason.into(),
            retry_after: Duration::from_secs(30),
        };
        let hold = match snapshot.ca_state(&profile.ca) {
            _ if self.sabotage.has(Sabotage::IgnoreCaState) => false,
            ca_state::ENABLED => false,
            ca_state::PARKED if self.sabotage.has(Sabotage::IgnorePark) => false,
            ca_state::PARKED if is_async => true,
            ca_state::PARKED => return Err(unavailable("the CA is parked; asynchronous requests are accepted")),
            ca_state::DRAINING => return Err(unavailable("the CA is draining")),
            _ => return Err(EngineError::CaDisabled(profile.ca.clone())),
        };
        Ok((profile, hold))
    }

    /// Everything that can be decided without the CA: profile, permission, state, CSR, policy.
    pub fn admit(
        &self,
        client: &Client,
        profile_id: &str,
        csr_pem: &str,
        is_async: bool,
    ) -> Result<Admitted, EngineError> {
        self.check_rate(client)?;
        let (profile, hold) = self.profile_for(client, profile_id, is_async)?;
        if !hold {
            self.check_breaker(&profile)?;
        }
        let csr = csr::check_csr_pem(csr_pem)?;
        let mut admitted = self.admit_checked(profile, csr)?;
        admitted.hold = hold;
        Ok(admitted)
    }

    pub fn admit_checked(&self, profile: Arc<Profile>, csr: CheckedCsr) -> Result<Admitted, EngineError> {
        let names = profile.approve(&csr)?;
        Ok(Admitted { profile, csr: Arc::new(csr), names: Arc::new(names), hold: false, identity: None })
    }

    /// The request's absolute deadline: its lane's default, shortened (never lengthened past
    /// the lane's maximum) by the client's own wait.
    pub fn deadline(&self, profile: &Profile, wait: Option<Duration>) -> Instant {
        let lane = self.lanes.get(profile.lane);
        let budget = match wait {
            Some(w) => w.min(lane.max_deadline),
            None => lane.default_deadline,
        };
        Instant::now() + budget
    }

    /// Hand a job to its CA's cell. A full mailbox is an immediate `503`, never a wait.
    pub fn hand_to_cell(&self, mut job: Job) -> Result<(), EngineError> {
        let ca = job.profile.ca.clone();
        let Some(slot) = self.cells.get(&ca) else {
            return Err(EngineError::CaDisabled(ca));
        };
        match slot.addr.load().try_send(Enqueue(job)) {
            Ok(()) => Ok(()),
            Err(SendError::Full(Enqueue(j))) => {
                job = j;
                drop(job.reply.take());
                Err(EngineError::CaOverloaded {
                    ca,
                    reason: "mailbox full".into(),
                    retry_after: Duration::from_secs(1),
                })
            }
            Err(SendError::Closed(_)) => Err(EngineError::CaUnavailable {
                ca,
                reason: "the CA's cell is down (restarted at most 5 times a minute, then left down)".into(),
                retry_after: Duration::from_secs(1),
            }),
        }
    }
}
