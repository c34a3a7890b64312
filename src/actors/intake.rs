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

use super::cell::{CellSlot, Enqueue};
use super::job::{Admitted, Dispatch, Job, KeyToMake, Keyed};
use super::registry::SharedSnapshot;
use super::retry_budget::RetryBudget;
use crate::config::{Config, LanesConfig, Sabotage, Sabotages};
use crate::error::EngineError;
use crate::pki::identity::{self, IdentitySubject};
use crate::pki::names::certificate_name;
use crate::pki::names::ClientNames;
use crate::pki::profile::ApprovedNames;
use crate::pki::Lane;
use crate::pki::{csr, CaMaterial, CheckedCsr, Profile};
use crate::states::CaState;
use crate::types::Client;

/// Everything fixed at start-up: profiles, clients, CA material.
pub struct Catalog {
    pub profiles: HashMap<String, Arc<Profile>>,
    pub clients_by_key: HashMap<[u8; 32], Arc<Client>>,
    /// Clients by the names their TLS client certificates carry (`certificate_names`).
    pub clients_by_certificate_name: HashMap<String, Arc<Client>>,
    pub clients_by_name: HashMap<String, Arc<Client>>,
    pub cas: HashMap<String, Arc<CaMaterial>>,
}

impl Catalog {
    pub fn build(config: &Config, cas: HashMap<String, CaMaterial>) -> Catalog {
        let profiles = config.profiles.iter().map(|p| (p.id.clone(), Arc::new(Profile::from_config(p)))).collect();
        let mut clients_by_key = HashMap::new();
        let mut clients_by_name = HashMap::new();
        let mut clients_by_certificate_name = HashMap::new();
        for c in &config.clients {
            let client = Arc::new(Client {
                name: c.name.clone(),
                profiles: c.profiles.iter().cloned().collect(),
                names: ClientNames::from_config(&c.names),
            });
            let mut key = [0u8; 32];
            if hex::decode_to_slice(c.api_key_sha256.to_ascii_lowercase(), &mut key).is_ok() {
                clients_by_key.insert(key, client.clone());
            }
            for name in &c.certificate_names {
                clients_by_certificate_name.insert(certificate_name(name), client.clone());
            }
            clients_by_name.insert(c.name.clone(), client);
        }
        let cas = cas.into_iter().map(|(id, m)| (id, Arc::new(m))).collect();
        Catalog { profiles, clients_by_key, clients_by_certificate_name, clients_by_name, cas }
    }
}

type Limiter = governor::DefaultDirectRateLimiter;

/// How a request came, which decides the checks it gets and its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A caller waits, at most `wait` (within its lane's limits).
    Sync { wait: Option<Duration> },
    /// Stored and answered at once; a parked CA's work is held, not refused.
    Async,
    /// A stored request taken up again (after a crash, a lapsed claim, or a resubmit).
    Resume { expires_at_ms: i64 },
}

/// What a request asks to have certified, checked against the profile: the names approved and
/// the key they are bound to (or, for a disposable identity, the key still to be made).
pub trait Body {
    type Key;
    fn approve(self, profile: &Profile) -> Result<(ApprovedNames, Self::Key), EngineError>;
}

/// A body before or after the profile approved it (the CSR's checks are done once, in their
/// place, unless a sabotage moves them).
enum Approval<B: Body> {
    Pending(B),
    Done((ApprovedNames, B::Key)),
}

/// A CSR as the client sent it.
pub struct CsrPem<'a>(pub &'a str);

/// A CSR as a stored request holds it.
pub struct CsrDer(pub Vec<u8>);

/// The subject of a disposable identity.
pub struct Subject<'a>(pub &'a IdentitySubject);

fn keyed(profile: &Profile, csr: CheckedCsr) -> Result<(ApprovedNames, Keyed), EngineError> {
    let names = profile.approve(&csr)?;
    Ok((names, Keyed { csr: Arc::new(csr), identity: None }))
}

impl Body for CsrPem<'_> {
    type Key = Keyed;
    fn approve(self, profile: &Profile) -> Result<(ApprovedNames, Keyed), EngineError> {
        keyed(profile, csr::check_csr_pem(self.0)?)
    }
}

impl Body for CsrDer {
    type Key = Keyed;
    fn approve(self, profile: &Profile) -> Result<(ApprovedNames, Keyed), EngineError> {
        keyed(profile, csr::check_csr_der(self.0)?)
    }
}

impl Body for Subject<'_> {
    type Key = KeyToMake;
    fn approve(self, profile: &Profile) -> Result<(ApprovedNames, KeyToMake), EngineError> {
        Ok((identity::approve_subject(profile, self.0)?, KeyToMake))
    }
}

#[derive(Clone)]
pub struct Intake {
    catalog: Arc<Catalog>,
    snapshot: SharedSnapshot,
    cells: Arc<HashMap<String, CellSlot>>,
    lanes: LanesConfig,
    /// How long an asynchronous request may wait to be signed.
    async_max_age: Duration,
    /// Per-client GCRA limiters (clients without a configured rate have none).
    limiters: Arc<HashMap<String, Limiter>>,
    /// Clients retrying a refusing CA are told to back off harder.
    retry_budget: Arc<RetryBudget>,
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
            async_max_age: config.async_requests.max_age,
            limiters: Arc::new(limiters),
            retry_budget: Arc::new(RetryBudget::new(
                config.clients.iter().map(|c| c.name.as_str()),
                config.cas.iter().map(|c| c.id.as_str()),
                config.backoff.retries_per_second,
            )),
            sabotage: config.sabotages(),
        }
    }

    /// The configured client of this name (a stored request names its client).
    pub fn client(&self, name: &str) -> Option<Arc<Client>> {
        self.catalog.clients_by_name.get(name).cloned()
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
    fn check_breaker(&self, profile: &Profile) -> Result<(), EngineError> {
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
    fn check_capacity(&self, profile: &Profile, deadline: Instant) -> Result<(), EngineError> {
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
        let digest = crate::pki::sha256(api_key.as_bytes());
        self.catalog.clients_by_key.get(&digest).cloned().ok_or(EngineError::Unauthorized)
    }

    /// The client a verified TLS client certificate with these names authenticates. Names are
    /// unique across clients (`check-config`); a certificate whose names reach two clients
    /// authenticates neither (the order of its names is the requester's choice).
    pub fn authenticate_certificate(&self, names: &[String]) -> Result<Arc<Client>, EngineError> {
        let mut found: Option<&Arc<Client>> = None;
        for client in names.iter().filter_map(|n| self.catalog.clients_by_certificate_name.get(&certificate_name(n))) {
            match found {
                Some(f) if !Arc::ptr_eq(f, client) => return Err(EngineError::Unauthorized),
                _ => found = Some(client),
            }
        }
        found.cloned().ok_or(EngineError::Unauthorized)
    }

    /// Which profile, may this client use it, are it and its CA taking this kind of work.
    /// Returns the profile and whether the work must be held (the CA is parked: asynchronous
    /// work is accepted and stored as parked).
    fn profile_for(
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
            Some(CaState::Enabled) => false,
            Some(CaState::Parked) if self.sabotage.has(Sabotage::IgnorePark) => false,
            Some(CaState::Parked) if is_async => true,
            Some(CaState::Parked) => return Err(unavailable("the CA is parked; asynchronous requests are accepted")),
            Some(CaState::Draining) => return Err(unavailable("the CA is draining")),
            Some(CaState::Disabled | CaState::Retired) | None => {
                return Err(EngineError::CaDisabled(profile.ca.clone()))
            }
        };
        Ok((profile, hold))
    }

    /// The one way into the engine: everything that can be decided without the CA (rate,
    /// profile, permission, states, breaker, the CSR or subject against the profile's policy,
    /// capacity within the deadline), in that order, cheapest first. What it returns carries the
    /// request's deadline and where it goes next.
    pub fn admit<B: Body>(
        &self,
        client: &Client,
        profile_id: &str,
        body: B,
        route: Route,
    ) -> Result<Admitted<B::Key>, EngineError> {
        // A stored request being resumed was admitted, rate and breaker included, when it came.
        if !matches!(route, Route::Resume { .. }) {
            self.check_rate(client)?;
        }
        // Sabotage csr-before-state: the CSR's work is done before anything that could refuse
        // the request cheaply.
        let approve_first =
            if self.sabotage.has(Sabotage::CsrBeforeState) { self.catalog.profiles.get(profile_id) } else { None };
        let early = match approve_first {
            Some(profile) => Approval::Done(body.approve(profile)?),
            None => Approval::Pending(body),
        };
        // A client retrying a refusing CA is told to back off (the resumer is not a client).
        let back_off = |e| match route {
            Route::Resume { .. } => e,
            Route::Sync { .. } | Route::Async => self.retry_budget.judge(&client.name, e, crate::pki::now_ms()),
        };
        let (profile, hold) =
            self.profile_for(client, profile_id, !matches!(route, Route::Sync { .. })).map_err(back_off)?;
        let (dispatch, checks_breaker) = match route {
            Route::Async if hold => (Dispatch::Park, false),
            Route::Sync { .. } | Route::Async => (Dispatch::Queue, true),
            Route::Resume { .. } => (Dispatch::Queue, false),
        };
        if checks_breaker {
            self.check_breaker(&profile).map_err(back_off)?;
        }
        let (names, key) = match early {
            Approval::Pending(body) => body.approve(&profile)?,
            Approval::Done(approved) => approved,
        };
        client.names.check(&client.name, &names.sans)?;
        let deadline = match route {
            Route::Sync { wait } => self.deadline(&profile, wait),
            // Never signed past its max age (when the resumer marks it expired).
            Route::Async => Instant::now() + self.async_max_age.min(self.lanes.get(profile.lane).max_deadline),
            Route::Resume { expires_at_ms } => {
                let left = Duration::from_millis((expires_at_ms - crate::pki::now_ms()).max(0) as u64);
                Instant::now() + self.lanes.get(profile.lane).max_deadline.min(left)
            }
        };
        if let Route::Sync { .. } = route {
            self.check_capacity(&profile, deadline)?;
        }
        Ok(Admitted { profile, names: Arc::new(names), deadline, dispatch, key })
    }

    /// The request's absolute deadline: its lane's default, shortened (never lengthened past
    /// the lane's maximum) by the client's own wait.
    fn deadline(&self, profile: &Profile, wait: Option<Duration>) -> Instant {
        let lane = self.lanes.get(profile.lane);
        let budget = match wait {
            Some(w) => w.min(lane.max_deadline),
            None => lane.default_deadline,
        };
        Instant::now() + budget
    }

    /// Hand a job to its CA's cell. A full mailbox is an immediate `503`, never a wait.
    pub fn hand_to_cell(&self, job: Job) -> Result<(), EngineError> {
        let ca = job.profile.ca.clone();
        let Some(slot) = self.cells.get(&ca) else {
            return Err(EngineError::CaDisabled(ca));
        };
        match slot.addr.load().try_send(Enqueue(job)) {
            Ok(()) => Ok(()),
            // The job comes back and is dropped here: its caller gets this error, not its reply.
            Err(SendError::Full(_)) => Err(EngineError::CaOverloaded {
                ca,
                reason: "mailbox full".into(),
                retry_after: Duration::from_secs(1),
            }),
            Err(SendError::Closed(_)) => Err(EngineError::CaUnavailable {
                ca,
                reason: "the CA's cell is down (restarted at most 5 times a minute, then left down)".into(),
                retry_after: Duration::from_secs(1),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use actix::dev::channel;
    use arc_swap::ArcSwap;

    use super::*;
    use crate::actors::cell::CaCell;
    use crate::actors::gauges::CellGauges;
    use crate::actors::registry::Snapshot;
    use crate::config::RateConfig;
    use crate::states::ProfileState;

    /// Intake over the dev configuration, every CA and profile enabled, each CA's cell a mailbox
    /// of two that nobody reads (kept in `_mailboxes` so the cells count as running).
    struct Fixture {
        intake: Intake,
        _mailboxes: Vec<actix::dev::channel::AddressReceiver<CaCell>>,
    }

    fn fixture(edit: impl FnOnce(&mut Config)) -> Fixture {
        let mut config = Config::load(Some(&Path::new(env!("CARGO_MANIFEST_DIR")).join("keys-dev/castellum.toml")))
            .expect("the dev configuration");
        edit(&mut config);
        let (_, materials) = crate::check::check_config(&config);
        let catalog = Arc::new(Catalog::build(&config, materials));
        let snapshot = Snapshot {
            version: 1,
            cas: config.cas.iter().map(|c| (c.id.clone(), CaState::Enabled)).collect(),
            profiles: config.profiles.iter().map(|p| (p.id.clone(), ProfileState::Enabled)).collect(),
        };
        let mut mailboxes = Vec::new();
        let cells = config
            .cas
            .iter()
            .map(|c| {
                let (sender, receiver) = channel::channel::<CaCell>(2);
                mailboxes.push(receiver);
                let slot = CellSlot { addr: ArcSwap::from_pointee(Addr::new(sender)), gauges: Arc::default() };
                (c.id.clone(), slot)
            })
            .collect();
        let intake = Intake::new(&config, catalog, Arc::new(ArcSwap::from_pointee(snapshot)), Arc::new(cells));
        Fixture { intake, _mailboxes: mailboxes }
    }

    impl Fixture {
        fn set_ca(&self, ca: &str, state: CaState) {
            let mut s = (**self.intake.snapshot.load()).clone();
            s.cas.insert(ca.into(), state);
            self.intake.snapshot.store(Arc::new(s));
        }
        fn gauges(&self, ca: &str) -> &CellGauges {
            &self.intake.cells[ca].gauges
        }
        fn profile(&self, id: &str) -> Arc<Profile> {
            self.intake.catalog.profiles[id].clone()
        }
        fn demo(&self) -> Arc<Client> {
            self.intake.catalog.clients_by_name["demo"].clone()
        }
        fn open_breaker(&self, ca: &str, for_ms: i64) {
            self.gauges(ca).breaker_open_until_ms.store(crate::pki::now_ms() + for_ms, Ordering::Relaxed);
        }
        fn job(&self, profile: &str) -> Job {
            let profile = self.profile(profile);
            Job {
                csr: Arc::new(csr::check_csr_pem(&test_csr()).unwrap()),
                names: Arc::new(crate::pki::profile::ApprovedNames {
                    common_name: None,
                    organization: None,
                    sans: Vec::new(),
                }),
                client: "demo".into(),
                caller: crate::actors::job::Caller::Stored { request_id: "r".into() },
                deadline: Instant::now() + Duration::from_secs(6),
                enqueued_at: Instant::now(),
                span: tracing::Span::none(),
                identity: None,
                profile,
            }
        }
    }

    /// A fresh P-256 key's CSR for www.example.test (common name only), as PEM.
    fn test_csr() -> String {
        let key = crate::pki::devpki::generate_key(crate::pki::KeyType::EcdsaP256).unwrap();
        let der =
            crate::pki::csr::tests::request(&key, &["www.example.test"], &[], openssl::hash::MessageDigest::sha256());
        openssl::x509::X509Req::from_der(&der).unwrap().to_pem().map(|p| String::from_utf8(p).unwrap()).unwrap()
    }

    fn slug<T>(r: Result<T, EngineError>) -> &'static str {
        r.map(|_| "ok").unwrap_or_else(|e| e.slug())
    }

    #[test]
    fn an_idempotent_retry_is_recognised_by_profile_and_csr() {
        let f = fixture(|_| {});
        let csr = test_csr();
        let admit = |profile: &str, csr: &str| {
            f.intake.admit(&f.demo(), profile, CsrPem(csr), Route::Sync { wait: None }).unwrap().body_sha256()
        };
        let first = admit("tls-server-p256", &csr);
        assert_eq!(first.len(), 64);
        assert_eq!(first, admit("tls-server-p256", &csr));
        assert_ne!(first, admit("tls-server-p256", &test_csr()), "another CSR");
        assert_ne!(first, admit("tls-server-p384", &csr), "another profile");
    }

    #[test]
    fn clients_are_known_by_their_api_key_only() {
        let f = fixture(|_| {});
        assert_eq!(f.intake.authenticate("dev-key-demo").unwrap().name, "demo");
        assert_eq!(f.intake.authenticate("dev-key-other").unwrap().name, "other");
        assert_eq!(f.intake.authenticate("dev-key-nobody").unwrap_err(), EngineError::Unauthorized);
    }

    #[test]
    fn the_profile_its_permission_and_its_cas_state_are_checked() {
        let f = fixture(|_| {});
        let demo = f.demo();
        let other = f.intake.catalog.clients_by_name["other"].clone();
        assert_eq!(slug(f.intake.profile_for(&demo, "no-such", false)), "unknown-profile");
        assert_eq!(slug(f.intake.profile_for(&other, "tls-server-p384", false)), "forbidden-profile");
        let (_, hold) = f.intake.profile_for(&demo, "tls-server-p256", false).unwrap();
        assert!(!hold);
        f.set_ca("ica-p256", CaState::Parked);
        assert!(f.intake.profile_for(&demo, "tls-server-p256", true).unwrap().1, "async work is held");
        assert_eq!(slug(f.intake.profile_for(&demo, "tls-server-p256", false)), "ca-unavailable");
        f.set_ca("ica-p256", CaState::Draining);
        assert_eq!(slug(f.intake.profile_for(&demo, "tls-server-p256", true)), "ca-unavailable");
        for state in [CaState::Disabled, CaState::Retired] {
            f.set_ca("ica-p256", state);
            assert_eq!(slug(f.intake.profile_for(&demo, "tls-server-p256", true)), "ca-disabled", "{state}");
        }
        let mut s = (**f.intake.snapshot.load()).clone();
        s.profiles.insert("tls-server-p384".into(), ProfileState::Disabled);
        f.intake.snapshot.store(Arc::new(s));
        assert_eq!(slug(f.intake.profile_for(&demo, "tls-server-p384", false)), "profile-disabled");
    }

    #[test]
    fn a_ca_without_material_is_disabled() {
        let f = fixture(|c| c.cas.retain(|ca| ca.id != "ica-p384"));
        assert_eq!(slug(f.intake.profile_for(&f.demo(), "tls-server-p384", false)), "ca-disabled");
    }

    #[test]
    fn an_open_breaker_refuses_its_own_ca_only_and_says_for_how_long() {
        let f = fixture(|_| {});
        let p256 = f.profile("tls-server-p256");
        assert!(f.intake.check_breaker(&p256).is_ok());
        f.open_breaker("ica-p384", 5_000);
        assert!(f.intake.check_breaker(&p256).is_ok(), "another CA's breaker");
        f.open_breaker("ica-p256", 3_000);
        match f.intake.check_breaker(&p256) {
            Err(EngineError::CaUnavailable { retry_after, .. }) => {
                assert!((Duration::from_millis(2_500)..=Duration::from_millis(3_000)).contains(&retry_after))
            }
            other => panic!("{other:?}"),
        }
        f.open_breaker("ica-p256", -1);
        assert!(f.intake.check_breaker(&p256).is_ok(), "a breaker whose time has passed");
    }

    #[test]
    fn held_work_is_admitted_while_the_breaker_is_open() {
        let f = fixture(|_| {});
        f.open_breaker("ica-p256", 5_000);
        assert_eq!(
            slug(f.intake.admit(&f.demo(), "tls-server-p256", CsrPem(&test_csr()), Route::Async)),
            "ca-unavailable"
        );
        f.set_ca("ica-p256", CaState::Parked);
        let admitted = f.intake.admit(&f.demo(), "tls-server-p256", CsrPem(&test_csr()), Route::Async).unwrap();
        assert_eq!(admitted.dispatch, Dispatch::Park);
        assert_eq!(admitted.names.sans.len(), 1);
        assert_eq!(
            slug(f.intake.admit(&f.demo(), "tls-server-p256", CsrPem("not a csr"), Route::Async)),
            "malformed-csr"
        );
    }

    #[test]
    fn work_that_cannot_finish_in_time_is_refused_now() {
        let f = fixture(|_| {});
        let (interactive, background) = (f.profile("tls-server-p256"), f.profile("ocsp-renewal"));
        let g = f.gauges("ica-p256");
        g.completion_spacing_us.store(100_000, Ordering::Relaxed); // 100 ms a job
        g.interactive_depth.store(10, Ordering::Relaxed); // 1 s of interactive work queued
        let in_2s = Instant::now() + Duration::from_secs(2);
        assert!(f.intake.check_capacity(&interactive, in_2s).is_ok());
        let in_half_s = Instant::now() + Duration::from_millis(500);
        match f.intake.check_capacity(&interactive, in_half_s) {
            Err(EngineError::CaOverloaded { retry_after, .. }) => assert_eq!(retry_after, Duration::from_secs(1)),
            other => panic!("{other:?}"),
        }
        // Background work waits behind both lanes.
        g.background_depth.store(20, Ordering::Relaxed);
        assert!(f.intake.check_capacity(&interactive, in_2s).is_ok());
        assert_eq!(slug(f.intake.check_capacity(&background, in_2s)), "ca-overloaded");
        match f.intake.check_capacity(&background, Instant::now()) {
            Err(EngineError::CaOverloaded { retry_after, .. }) => assert_eq!(retry_after, Duration::from_secs(3)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_deadline_is_the_lanes_default_shortened_never_lengthened() {
        let f = fixture(|_| {});
        let (interactive, background) = (f.profile("tls-server-p256"), f.profile("ocsp-renewal"));
        let left = |p: &Profile, wait| f.intake.deadline(p, wait).saturating_duration_since(Instant::now());
        let near = |d: Duration, want: u64| {
            d <= Duration::from_secs(want) && d > Duration::from_secs(want) - Duration::from_millis(100)
        };
        assert!(near(left(&interactive, None), 6));
        assert!(near(left(&interactive, Some(Duration::from_secs(2))), 2));
        assert!(near(left(&interactive, Some(Duration::from_secs(60))), 6));
        assert!(near(left(&background, None), 60));
        assert!(near(left(&background, Some(Duration::from_secs(3600))), 300));
    }

    #[test]
    fn a_full_mailbox_is_refused_at_once_and_a_stopped_cell_is_unavailable() {
        let mut f = fixture(|_| {});
        // actix lets a mailbox of 2 take one more message per sender before it is full.
        let mut taken = 0;
        while f.intake.hand_to_cell(f.job("tls-server-p256")).is_ok() {
            taken += 1;
            assert!(taken < 10, "the mailbox never fills");
        }
        assert!(taken >= 2, "{taken}");
        match f.intake.hand_to_cell(f.job("tls-server-p256")) {
            Err(EngineError::CaOverloaded { reason, .. }) => assert_eq!(reason, "mailbox full"),
            other => panic!("{other:?}"),
        }
        assert!(f.intake.hand_to_cell(f.job("tls-server-p384")).is_ok(), "another CA's mailbox");
        f._mailboxes.clear();
        assert_eq!(slug(f.intake.hand_to_cell(f.job("tls-server-p384"))), "ca-unavailable");
        assert!(f.intake.serving_cas().is_empty(), "no cell is running");
    }

    #[test]
    fn serving_cas_are_enabled_with_a_running_cell_and_a_closed_breaker() {
        let f = fixture(|_| {});
        let all: std::collections::HashSet<String> =
            ["ica-p256", "ica-p384", "ica-rsa3072", "ica-ed25519"].map(String::from).into();
        assert_eq!(f.intake.serving_cas(), all);
        f.set_ca("ica-p384", CaState::Parked);
        f.open_breaker("ica-rsa3072", 5_000);
        f.open_breaker("ica-ed25519", -1);
        let serving = f.intake.serving_cas();
        assert_eq!(serving, ["ica-p256", "ica-ed25519"].map(String::from).into());
    }

    #[test]
    fn a_client_over_its_rate_is_refused_with_a_retry_after() {
        let f = fixture(|c| c.clients[0].rate = Some(RateConfig { per_second: 1, burst: 2 }));
        let demo = f.demo();
        assert!(f.intake.check_rate(&demo).is_ok());
        assert!(f.intake.check_rate(&demo).is_ok());
        match f.intake.check_rate(&demo) {
            Err(EngineError::RateLimited { retry_after }) => assert!(retry_after >= Duration::from_millis(900)),
            other => panic!("{other:?}"),
        }
        let other = f.intake.catalog.clients_by_name["other"].clone();
        for _ in 0..10 {
            assert!(f.intake.check_rate(&other).is_ok(), "a client without a rate");
        }
    }

    #[test]
    fn each_intake_defect_does_what_it_says_and_only_in_dev_mode() {
        let defects = [
            Sabotage::GlobalBackOff,
            Sabotage::BackgroundBackOff,
            Sabotage::IgnoreDeadlines,
            Sabotage::IgnorePark,
            Sabotage::IgnoreCaState,
        ];
        let only = |what: Sabotage| fixture(move |c| c.sabotage = vec![what]);
        let (interactive, background) = ("tls-server-p256", "ocsp-renewal");
        let f = only(Sabotage::GlobalBackOff);
        f.open_breaker("ica-p384", 5_000);
        assert_eq!(slug(f.intake.check_breaker(&f.profile(interactive))), "ca-unavailable");
        let f = only(Sabotage::BackgroundBackOff);
        f.open_breaker("ica-p384", 5_000);
        assert!(f.intake.check_breaker(&f.profile(interactive)).is_ok());
        assert_eq!(slug(f.intake.check_breaker(&f.profile(background))), "ca-unavailable");
        let f = only(Sabotage::IgnoreDeadlines);
        f.gauges("ica-p256").completion_spacing_us.store(1_000_000, Ordering::Relaxed);
        f.gauges("ica-p256").interactive_depth.store(100, Ordering::Relaxed);
        assert!(f.intake.check_capacity(&f.profile(interactive), Instant::now()).is_ok());
        let f = only(Sabotage::IgnorePark);
        f.set_ca("ica-p256", CaState::Parked);
        assert!(!f.intake.profile_for(&f.demo(), interactive, true).unwrap().1);
        let f = only(Sabotage::IgnoreCaState);
        f.set_ca("ica-p256", CaState::Disabled);
        assert!(f.intake.profile_for(&f.demo(), interactive, false).is_ok());
        // The dev configuration with every defect, in production mode: none is built in.
        let f = fixture(|c| {
            c.sabotage = defects.to_vec();
            c.mode = crate::config::Mode::Production;
        });
        f.open_breaker("ica-p384", 5_000);
        f.set_ca("ica-p256", CaState::Disabled);
        assert!(f.intake.check_breaker(&f.profile(interactive)).is_ok());
        assert_eq!(slug(f.intake.profile_for(&f.demo(), interactive, false)), "ca-disabled");
    }
}
