//! The write-ahead issuance pipeline for one job, run by its CA's cell:
//! prepare (build and lint the TBS, on the cell's thread) → record the serial and TBS (store) →
//! sign (the store's worker hands the job to the signer once the record is committed; deadline
//! re-checked) → record the certificate, its request and the audit event (the signer hands it to
//! the store) → reply. No certificate can exist that the database does not know.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::oneshot;

use super::job::{Caller, Job};
use super::signer::{NotIssued, Sign, SignerHandle};
use super::store::StoreHandle;
use crate::config::{Sabotage, Sabotages};
use crate::db::models::{CertificateRow, IdentityRow, NewAuditEvent};
use crate::db::writes::WriteOp;
use crate::error::EngineError;
use crate::metrics::Metrics;
use crate::pki::identity::IdentityDraft;
use crate::pki::Lane;
use crate::pki::{cert_pem, now_ms, tbs, CaMaterial};
use crate::states::{CertState, IdentityState, RequestMode, RequestState};
use crate::types::IssuedCertificate;

/// What the pipeline needs, cloned once per job.
#[derive(Clone)]
pub struct Pipeline {
    pub ca: Arc<CaMaterial>,
    pub signer: SignerHandle,
    pub store: StoreHandle,
    pub metrics: Arc<Metrics>,
    pub instance: Arc<str>,
    /// Dev-only deliberate defects (see [`Sabotage`]).
    pub sabotage: Sabotages,
    /// A signature not back within this time counts as this CA's signer failing (a hung token):
    /// `cas[].sign_timeout`.
    pub sign_timeout: std::time::Duration,
}

impl Pipeline {
    pub async fn run(&self, job: &Job) -> Result<IssuedCertificate, EngineError> {
        let p = self;
        // A key known to be gone fails here, before any database write: a broken CA must not
        // load the store that every other CA shares (its breaker still counts the failure).
        if let Some(reason) = p.ca.key.unavailable_reason() {
            return Err(EngineError::SignerFailure {
                ca: p.ca.id.clone(),
                reason: format!("key unavailable: {reason}"),
            });
        }
        // 6 µs of CPU: cheaper here than a round trip to the signer's thread.
        let prepared = super::catch_panic("cell", || {
            tbs::prepare(&p.ca, &job.profile, &job.csr, &job.names, SystemTime::now())
        })
        .unwrap_or_else(|panic| Err(EngineError::Internal(format!("certificate preparation panicked: {panic}"))))?;
        let serial = prepared.serial_hex.clone();
        let write_ahead = WriteOp::WriteAhead(Box::new(CertificateRow {
            serial: serial.clone(),
            ca_id: p.ca.id.clone(),
            profile: job.profile.id.clone(),
            client: job.client.clone(),
            request_id: job.caller.request_id().map(String::from),
            state: CertState::Signing,
            tbs_der: prepared.tbs.der().to_vec(),
            cert_der: None,
            not_before: prepared.not_before_ms,
            not_after: prepared.not_after_ms,
            created_at: now_ms(),
            issued_at: None,
            revoked_at: None,
            revocation_reason: None,
            crl_shard: Some(prepared.crl_shard as i32),
        }));

        // Without deadlines (a defect on purpose) the signer's last check never refuses.
        let deadline = match p.sabotage.has(Sabotage::IgnoreDeadlines) {
            true => job.deadline + Duration::from_secs(3600),
            false => job.deadline,
        };
        let identity =
            job.identity.as_ref().map(|draft| Box::new(identity_row(job, draft, &serial, prepared.not_after_ms)));
        let mut audit = Box::new(issue_event(p, job, &serial, identity.as_deref()));
        let request_id = job.caller.request_id().map(String::from);
        let record_serial = serial.clone();
        // Made on the signer's thread, the moment the certificate exists.
        let record = Box::new(move |cert_der: &[u8]| {
            let at = now_ms();
            audit.at = at;
            WriteOp::CertificateIssued {
                serial: record_serial,
                cert_der: cert_der.to_vec(),
                at,
                request_id,
                audit,
                identity,
            }
        });
        let (reply, signed) = oneshot::channel();
        let started = Arc::new(OnceLock::new());
        let sign =
            Sign { tbs: prepared.tbs, deadline, store: p.store.clone(), record, started: started.clone(), reply };
        tracing::debug!(serial = %serial, "recording the certificate before signing");
        if p.sabotage.has(Sabotage::SlowInteractiveSigning) && job.profile.lane == Lane::Interactive {
            p.store.write(write_ahead).await?;
            actix_rt::time::sleep(Duration::from_secs(7)).await;
            p.signer.send(sign);
        } else {
            // The Store's worker hands the job to the signer the moment its record is committed:
            // the cell's thread is not woken in between.
            let (signer, abandoned) = (p.signer.clone(), serial.clone());
            p.store.write_then(write_ahead, move |committed| match committed {
                // Its caller gave up while the record was committing (see below).
                Ok(_) if sign.reply.is_closed() => {
                    sign.store.write_detached(WriteOp::CertificateAbandoned { serial: abandoned })
                }
                Ok(_) => signer.send(sign),
                Err(e) => {
                    let _ = sign.reply.send(Err(NotIssued::Unwritten(e)));
                }
            });
        }
        let answered = match wait_for_signature(signed, &started, deadline, p.sign_timeout).await {
            Ok(answered) => answered,
            Err(Unanswered::NotStarted) => {
                // Not recorded, or no signer thread free, before the deadline (they may all be
                // hung on the token). Nobody waits for the reply now, so the signer will not sign
                // it (and a record committed after this is abandoned again once it is).
                p.store.write_detached(WriteOp::CertificateAbandoned { serial });
                return Err(super::job::deadline_exceeded());
            }
            Err(Unanswered::Hung) => {
                // A key operation that does not end (a hung token) fails this signature, so that
                // the CA's breaker sees it; its thread is one of this CA's own, and whatever it
                // signs later is dropped unrecorded (nobody waits for it any more).
                p.store.write_detached(WriteOp::CertificateAbandoned { serial });
                return Err(EngineError::SignerFailure {
                    ca: p.ca.id.clone(),
                    reason: format!("no signature within {} ms", p.sign_timeout.as_millis()),
                });
            }
            Err(Unanswered::SignerGone) => return Err(EngineError::ShuttingDown),
        };
        let cert_der = match answered {
            Ok(der) => der,
            Err(NotIssued::Unsigned(e)) => {
                p.store.write_detached(WriteOp::CertificateAbandoned { serial });
                return Err(e);
            }
            Err(NotIssued::Unwritten(e) | NotIssued::Unrecorded(e)) => return Err(e),
        };
        Ok(IssuedCertificate {
            serial,
            ca: p.ca.id.clone(),
            profile: job.profile.id.clone(),
            certificate: cert_pem(&cert_der),
            chain: p.ca.chain_pem.clone(),
            not_before: prepared.not_before_ms,
            not_before_rfc3339: crate::types::rfc3339(prepared.not_before_ms),
            not_after: prepared.not_after_ms,
            not_after_rfc3339: crate::types::rfc3339(prepared.not_after_ms),
            request_id: job.caller.request_id().map(String::from),
        })
    }

    /// Record a stored request's failure (issued requests were recorded with their certificate).
    /// `retry_at`: when a request that failed for a passing reason may be taken up again.
    pub fn request_failed(&self, caller: &Caller, err: &EngineError, retry_at: Option<i64>) {
        let Some(id) = caller.request_id() else { return };
        self.store.write_detached(request_failure(id, caller.mode(), err, retry_at));
    }

    /// A coalesced request shares its leader's certificate.
    pub fn request_issued(&self, request_id: &str, serial: &str) {
        self.store.write_detached(WriteOp::RequestIssued {
            id: request_id.to_string(),
            serial: serial.to_string(),
            at: now_ms(),
        });
    }

    /// Hold an asynchronous request durably until an operator resubmits it.
    pub fn park_request(&self, id: &str) {
        self.store.write_detached(WriteOp::RequestFinished {
            id: id.to_string(),
            state: RequestState::Parked,
            error_type: None,
            error_detail: None,
            at: now_ms(),
            claimed_until: None,
        });
    }
}

/// Why waiting for a signature ended without an answer.
enum Unanswered {
    /// The key operation had not started by the deadline: the record's commit or a free signer
    /// thread took too long.
    NotStarted,
    /// The key operation started and did not end within `sign_timeout` (a hung token).
    Hung,
    /// The job was dropped unanswered: the engine is stopping (its signer or Store threads are gone).
    SignerGone,
}

/// The signer's answer, waited for until the deadline while the job waits for its record's
/// commit and a signer thread (the queues' business, which deadlines bound), and then for
/// `sign_timeout` from the moment the key operation started. The timeout also covers the commit
/// that follows the signature, which the Store bounds far below it.
///
/// The signer marks that moment in `started` without waking this thread (a message would wake
/// the cell once more per issuance); the timer reads it. While the operation has not started the
/// timer fires at least every half `sign_timeout`, so a hung operation is judged
/// `sign_timeout` after it started, as if it had been told.
async fn wait_for_signature(
    mut signed: oneshot::Receiver<Result<Vec<u8>, NotIssued>>,
    started: &OnceLock<Instant>,
    deadline: Instant,
    sign_timeout: Duration,
) -> Result<Result<Vec<u8>, NotIssued>, Unanswered> {
    let recheck = (sign_timeout / 2).max(Duration::from_millis(10));
    loop {
        let now = Instant::now();
        let until = match started.get() {
            Some(&at) if now >= at + sign_timeout => return Err(Unanswered::Hung),
            Some(&at) => at + sign_timeout,
            None if now >= deadline => return Err(Unanswered::NotStarted),
            None => deadline.min(now + recheck),
        };
        if let Ok(answered) = tokio::time::timeout_at(until.into(), &mut signed).await {
            return answered.map_err(|_| Unanswered::SignerGone);
        }
    }
}

/// The audit event of an issuance: a certificate, or an identity with its certificate.
/// Its time is set when the certificate is signed.
fn issue_event(p: &Pipeline, job: &Job, serial: &str, identity: Option<&IdentityRow>) -> NewAuditEvent {
    let at = 0;
    match identity {
        Some(row) => NewAuditEvent {
            at,
            instance: p.instance.to_string(),
            actor: job.client.clone(),
            action: "identity.create".into(),
            target: row.id.clone(),
            outcome: "issued".into(),
            detail: format!(
                "ca={} profile={} serial={serial} key={} max_uses={}",
                p.ca.id, job.profile.id, row.key_type, row.max_uses
            ),
        },
        None => NewAuditEvent {
            at,
            instance: p.instance.to_string(),
            actor: job.client.clone(),
            action: "certificate.issue".into(),
            target: serial.to_string(),
            outcome: "issued".into(),
            detail: format!("ca={} profile={}", p.ca.id, job.profile.id),
        },
    }
}

/// The write that records a failed attempt of a stored request: its next state by
/// [`RequestState::after_failure`], and, when it goes back to pending, when another attempt (by
/// any instance) may take it up: `retry_at`, or a second from now.
pub fn request_failure(id: &str, mode: RequestMode, err: &EngineError, retry_at: Option<i64>) -> WriteOp {
    let now = now_ms();
    let state = RequestState::after_failure(err.is_permanent(), mode);
    let claimed_until = match state {
        RequestState::Pending => Some(retry_at.unwrap_or(now + 1_000)),
        _ => None,
    };
    WriteOp::RequestFinished {
        id: id.to_string(),
        state,
        error_type: Some(err.slug().to_string()),
        error_detail: Some(err.to_string()),
        at: now,
        claimed_until,
    }
}

/// The stored form of an identity created with the certificate `serial`.
fn identity_row(job: &Job, draft: &IdentityDraft, serial: &str, not_after_ms: i64) -> IdentityRow {
    IdentityRow {
        id: draft.key.id.clone(),
        client: job.client.clone(),
        profile: job.profile.id.clone(),
        ca_id: job.profile.ca.clone(),
        serial: serial.to_string(),
        key_type: draft.key.key_type.as_str().to_string(),
        signature_scheme: draft.signature_scheme.to_string(),
        state: IdentityState::Active,
        sealed_key: Some(draft.key.sealed.clone()),
        kek_id: draft.key.kek_id.clone(),
        uses: 0,
        max_uses: i64::from(draft.max_uses),
        created_at: draft.created_at,
        // The key never outlives its certificate.
        expires_at: draft.expires_at.min(not_after_ms),
        destroyed_at: None,
        destroy_reason: None,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Instant;

    use super::*;
    use crate::actors::gauges::CellGauges;
    use crate::actors::job::deadline_exceeded;
    use crate::actors::signer::{Faults, Signer};
    use crate::actors::store::tests::{certificates, store, text, write_ahead};
    use crate::config::{Config, ProfileConfig};
    use crate::db::models::RequestRow;
    use crate::pki::{csr, Profile};

    struct Fixture {
        pipeline: Pipeline,
        path: String,
        _dir: tempfile::TempDir,
    }

    fn fixture(faults: Faults, sabotage: &[Sabotage]) -> Fixture {
        let config = Config::load(Some(&Path::new(env!("CARGO_MANIFEST_DIR")).join("keys-dev/castellum.toml")))
            .expect("the dev configuration");
        let ca = Arc::new(CaMaterial::load(&config.cas[0]).expect("ica-p256"));
        let metrics = Arc::new(Metrics::new());
        let (signer_ca, signer_metrics) = (ca.clone(), metrics.clone());
        let signer = SignerHandle::start(
            Signer { ca: signer_ca, metrics: signer_metrics, faults, gauges: Arc::new(CellGauges::default()) },
            1,
            8,
        );
        let dir = tempfile::tempdir().unwrap();
        let (store, path, _) = store(&dir, 1, 8, 1000);
        let sabotage = Config { mode: crate::config::Mode::Dev, sabotage: sabotage.to_vec(), ..Config::default() };
        let pipeline = Pipeline {
            ca,
            signer,
            store,
            metrics,
            instance: "test-1".into(),
            sabotage: sabotage.sabotages(),
            sign_timeout: std::time::Duration::from_secs(2),
        };
        Fixture { pipeline, path, _dir: dir }
    }

    fn job(lane: &str, deadline: Instant, request_id: Option<&str>) -> Job {
        let cfg: ProfileConfig = toml::from_str(&format!(
            "id = \"p\"\nca = \"ica-p256\"\nlane = \"{lane}\"\nvalidity = \"1d\"\nkey_usage = [\"digital_signature\"]\nallowed_keys = [\"ecdsa-p256\"]"
        ))
        .unwrap();
        let profile = Arc::new(Profile::from_config(&cfg));
        let key = crate::pki::devpki::generate_key(crate::pki::KeyType::EcdsaP256).unwrap();
        let der = csr::tests::request(&key, &["a.example.test"], &[], openssl::hash::MessageDigest::sha256());
        let csr = csr::check_csr_der(der).unwrap();
        let names = profile.approve(&csr).unwrap();
        Job {
            profile,
            csr: Arc::new(csr),
            names: Arc::new(names),
            client: "demo".into(),
            caller: match request_id {
                Some(id) => Caller::Stored { request_id: id.into() },
                None => Caller::Waiting(tokio::sync::oneshot::channel().0),
            },
            deadline,
            enqueued_at: Instant::now(),
            span: tracing::Span::none(),
            identity: None,
        }
    }

    fn in_secs(s: u64) -> Instant {
        Instant::now() + Duration::from_secs(s)
    }

    async fn insert_request(f: &Fixture, id: &str) {
        let row = RequestRow {
            id: id.into(),
            client: "demo".into(),
            profile: "p".into(),
            ca_id: "ica-p256".into(),
            mode: RequestMode::Async,
            state: RequestState::Pending,
            idempotency_key: None,
            body_sha256: "00".into(),
            csr_der: Vec::new(),
            serial: None,
            error_type: None,
            error_detail: None,
            created_at: 0,
            updated_at: 0,
            expires_at: i64::MAX,
            claimed_by: None,
            claimed_until: None,
        };
        f.pipeline.store.write(WriteOp::InsertRequest(Box::new(row))).await.unwrap();
    }

    /// The store applies writes in order: once this one is committed, every earlier one is.
    async fn settle(f: &Fixture) {
        f.pipeline.store.write(write_ahead(SETTLE_SERIAL)).await.unwrap();
    }

    /// The serial of [`settle`]'s own record, left out where a test reads certificates.
    const SETTLE_SERIAL: &str = "ffffffffffffffffffffffffffffffffffffffff";

    fn certificate_field(f: &Fixture, serial: &str, column: &str) -> Option<String> {
        text(&f.path, &format!("SELECT CAST({column} AS TEXT) AS v FROM certificates WHERE serial = '{serial}'"))
    }

    fn request_field(f: &Fixture, id: &str, column: &str) -> Option<String> {
        text(&f.path, &format!("SELECT CAST({column} AS TEXT) AS v FROM requests WHERE id = '{id}'"))
    }

    #[actix_rt::test]
    async fn a_certificate_is_recorded_before_and_after_it_is_signed() {
        let f = fixture(Faults::default(), &[]);
        insert_request(&f, "r1").await;
        let issued = f.pipeline.run(&job("interactive", in_secs(6), Some("r1"))).await.unwrap();
        let cert = openssl::x509::X509::from_pem(issued.certificate.as_bytes()).unwrap();
        assert!(cert.verify(&f.pipeline.ca.cert.public_key().unwrap()).unwrap());
        assert_eq!(hex::encode(cert.serial_number().to_bn().unwrap().to_vec()), issued.serial);
        assert_eq!(
            (issued.ca.as_str(), issued.profile.as_str(), issued.request_id.as_deref()),
            ("ica-p256", "p", Some("r1"))
        );
        assert_eq!(issued.not_after - issued.not_before, 86_400_000);
        assert_eq!(certificate_field(&f, &issued.serial, "state").as_deref(), Some(CertState::Issued.as_str()));
        let stored =
            text(&f.path, &format!("SELECT hex(cert_der) AS v FROM certificates WHERE serial = '{}'", issued.serial));
        assert_eq!(stored, Some(hex::encode_upper(cert.to_der().unwrap())));
        assert_eq!(request_field(&f, "r1", "state").as_deref(), Some(RequestState::Issued.as_str()));
        assert_eq!(request_field(&f, "r1", "serial"), Some(issued.serial.clone()));
        let audit =
            text(&f.path, "SELECT action || ' ' || target || ' ' || outcome || ' ' || detail AS v FROM audit_log");
        assert_eq!(audit, Some(format!("certificate.issue {} issued ca=ica-p256 profile=p", issued.serial)));
    }

    #[actix_rt::test]
    async fn a_ca_without_its_key_fails_before_any_write() {
        let f = fixture(Faults::default(), &[]);
        f.pipeline.ca.key.destroy();
        match f.pipeline.run(&job("interactive", in_secs(6), None)).await {
            Err(EngineError::SignerFailure { reason, .. }) => assert!(reason.contains("key unavailable"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(certificates(&f.path), 0);
    }

    #[actix_rt::test]
    async fn a_failed_signature_leaves_its_record_abandoned() {
        let f = fixture(Faults { failure_rate: 1.0, ..Faults::default() }, &[]);
        assert!(matches!(
            f.pipeline.run(&job("interactive", in_secs(6), None)).await,
            Err(EngineError::SignerFailure { .. })
        ));
        settle(&f).await;
        let abandoned =
            text(&f.path, &format!("SELECT state AS v FROM certificates WHERE serial <> '{SETTLE_SERIAL}'"));
        assert_eq!(abandoned.as_deref(), Some(CertState::Abandoned.as_str()));
    }

    #[actix_rt::test]
    async fn nothing_is_signed_after_the_deadline_unless_deadlines_are_sabotaged() {
        let f = fixture(Faults { sign_latency: Some(Duration::from_millis(300)), ..Faults::default() }, &[]);
        let soon = Instant::now() + Duration::from_millis(200);
        assert_eq!(f.pipeline.run(&job("interactive", soon, None)).await.unwrap_err().slug(), "deadline-exceeded");
        let f = fixture(
            Faults { sign_latency: Some(Duration::from_millis(300)), ..Faults::default() },
            &[Sabotage::IgnoreDeadlines],
        );
        let soon = Instant::now() + Duration::from_millis(200);
        assert!(f.pipeline.run(&job("interactive", soon, None)).await.is_ok(), "signed late, as the defect says");
    }

    /// A key operation that does not end fails `sign_timeout` after it started: the time the job
    /// waited for a signer thread is not held against the key, and the failure does not wait for
    /// the operation (or the deadline) to end.
    #[actix_rt::test]
    async fn a_hung_key_operation_fails_sign_timeout_after_it_started() {
        let faults = Faults {
            sign_latency: Some(Duration::from_millis(300)),
            key_stall: Some(Duration::from_secs(3)),
            ..Faults::default()
        };
        let mut f = fixture(faults, &[]);
        f.pipeline.sign_timeout = Duration::from_millis(200);
        let started = Instant::now();
        match f.pipeline.run(&job("interactive", in_secs(6), None)).await {
            Err(EngineError::SignerFailure { reason, .. }) => {
                assert!(reason.contains("no signature within 200 ms"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let took = started.elapsed();
        // 300 ms before the operation starts, then 200 ms of it.
        assert!(took >= Duration::from_millis(490), "counted from before the operation started: {took:?}");
        assert!(took < Duration::from_millis(1500), "judged late: {took:?}");
    }

    #[actix_rt::test]
    async fn slow_interactive_signing_slows_the_interactive_lane_only() {
        let f = fixture(Faults::default(), &[Sabotage::SlowInteractiveSigning]);
        let started = Instant::now();
        f.pipeline.run(&job("background", in_secs(60), None)).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        let soon = in_secs(2);
        assert_eq!(f.pipeline.run(&job("interactive", soon, None)).await.unwrap_err().slug(), "deadline-exceeded");
        assert!(Instant::now() >= started + Duration::from_secs(7));
    }

    #[actix_rt::test]
    async fn a_failed_request_is_recorded_by_kind_of_failure() {
        let f = fixture(Faults::default(), &[]);
        for id in ["permanent", "async", "async-later", "sync", "parked", "issued"] {
            insert_request(&f, id).await;
        }
        let before = now_ms();
        let stored = |id: &str| Caller::Stored { request_id: id.into() };
        let waiting =
            |id: &str| Caller::WaitingRecorded { request_id: id.into(), reply: tokio::sync::oneshot::channel().0 };
        f.pipeline.request_failed(&stored("permanent"), &EngineError::PolicyViolation("no".into()), None);
        f.pipeline.request_failed(&stored("async"), &deadline_exceeded(), None);
        f.pipeline.request_failed(&stored("async-later"), &deadline_exceeded(), Some(before + 30_000));
        f.pipeline.request_failed(&waiting("sync"), &deadline_exceeded(), None);
        f.pipeline.request_failed(&Caller::Waiting(tokio::sync::oneshot::channel().0), &deadline_exceeded(), None);
        f.pipeline.park_request("parked");
        f.pipeline.request_issued("issued", &"ab".repeat(20));
        settle(&f).await;
        let field = |id, column| request_field(&f, id, column);
        assert_eq!(field("permanent", "state").as_deref(), Some(RequestState::Failed.as_str()));
        assert_eq!(field("permanent", "error_type").as_deref(), Some("policy-violation"));
        assert_eq!(field("async", "state").as_deref(), Some(RequestState::Pending.as_str()));
        let retry: i64 = field("async", "claimed_until").unwrap().parse().unwrap();
        assert!((before + 1_000..before + 2_000).contains(&retry), "taken up again a second later: {}", retry - before);
        assert_eq!(field("async-later", "claimed_until"), Some((before + 30_000).to_string()));
        assert_eq!(field("sync", "state").as_deref(), Some(RequestState::Retryable.as_str()));
        assert_eq!(field("sync", "error_type").as_deref(), Some("deadline-exceeded"));
        assert_eq!(field("parked", "state").as_deref(), Some(RequestState::Parked.as_str()));
        assert_eq!(field("issued", "state").as_deref(), Some(RequestState::Issued.as_str()));
        assert_eq!(field("issued", "serial"), Some("ab".repeat(20)));
    }

    #[test]
    fn a_deadline_retries_after_a_second() {
        match deadline_exceeded() {
            EngineError::DeadlineExceeded { retry_after } => assert_eq!(retry_after, Duration::from_secs(1)),
            other => panic!("{other:?}"),
        }
    }
}
