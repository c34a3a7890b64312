//! The four drills: what load, which fault at which moment, and which promises are judged.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::stack::Stack;
use openssl::x509::extension::SubjectAlternativeName;
use openssl::x509::{X509NameBuilder, X509ReqBuilder};

use super::load::{Kind, Stream};
use super::target::{ca_entry, set, DrillDb, Target};
use super::{stream_stats, DrillError, DrillOptions, Outcome, Promise, Session};
use crate::config::KeyType;
use crate::pki::devpki::generate_key;

fn s(secs: f64) -> Duration {
    Duration::from_secs_f64(secs)
}

fn csr(kind: KeyType, name: &str) -> Result<Arc<String>, DrillError> {
    let key: PKey<Private> = generate_key(kind).map_err(|e| DrillError::Setup(e.to_string()))?;
    let build = || -> Result<String, openssl::error::ErrorStack> {
        let mut req = X509ReqBuilder::new()?;
        let mut subject = X509NameBuilder::new()?;
        subject.append_entry_by_text("CN", name)?;
        req.set_subject_name(&subject.build())?;
        req.set_pubkey(&key)?;
        let mut exts = Stack::new()?;
        exts.push(SubjectAlternativeName::new().dns(name).build(&req.x509v3_context(None))?)?;
        req.add_extensions(&exts)?;
        let digest = if kind == KeyType::Ed25519 { MessageDigest::null() } else { MessageDigest::sha256() };
        req.sign(&key, digest)?;
        Ok(String::from_utf8_lossy(&req.build().to_pem()?).into_owned())
    };
    build().map(Arc::new).map_err(|e| DrillError::Setup(e.to_string()))
}

fn database(opts: &DrillOptions, dir: &Path, connection_limit: Option<u32>) -> Result<DrillDb, DrillError> {
    match &opts.postgres {
        Some(url) => DrillDb::postgres(url, connection_limit),
        None => Ok(DrillDb::Sqlite(dir.join("castellum.db"))),
    }
}

async fn target(
    opts: &DrillOptions,
    dir: &Path,
    db: DrillDb,
    edit: impl FnOnce(&mut toml::Table),
) -> Result<Target, DrillError> {
    match &opts.url {
        Some(url) => {
            let admin = opts.admin_url.clone().unwrap_or_else(|| url.replace(":8080", ":8081"));
            Target::existing(url, &admin, &opts.admin_token, &opts.api_key).await
        }
        None => Target::start(&opts.keys_dev, &dir.join("engine"), db, edit).await,
    }
}

/// A background renewal profile on `ca` for keys of `key`, usable by the demo client.
fn add_renewal_profile(config: &mut toml::Table, id: &str, ca: &str, key: &str) {
    let mut profile = toml::Table::new();
    profile.insert("id".into(), id.into());
    profile.insert("ca".into(), ca.into());
    profile.insert("lane".into(), "background".into());
    profile.insert("validity".into(), "7d".into());
    profile.insert("key_usage".into(), toml::Value::Array(vec!["digital_signature".into()]));
    profile.insert("extended_key_usage".into(), toml::Value::Array(vec!["ocsp_signing".into()]));
    profile.insert("allowed_keys".into(), toml::Value::Array(vec![key.into()]));
    let mut names = toml::Table::new();
    names.insert("dns_suffixes".into(), toml::Value::Array(vec!["example.test".into()]));
    profile.insert("names".into(), toml::Value::Table(names));
    config["profiles"].as_array_mut().expect("profiles").push(toml::Value::Table(profile));
    let demo = config["clients"]
        .as_array_mut()
        .expect("clients")
        .iter_mut()
        .filter_map(|c| c.as_table_mut())
        .find(|c| c["name"].as_str() == Some("demo"));
    if let Some(demo) = demo {
        demo["profiles"].as_array_mut().expect("client profiles").push(id.into());
    }
}

pub async fn run(opts: &DrillOptions, dir: &Path) -> Result<Outcome, DrillError> {
    match opts.name.as_str() {
        "issuance-queues-2020" => issuance_queues(opts, dir).await,
        "connection-surge-2024" => connection_surge(opts, dir).await,
        "pool-leak-2023" => pool_leak(opts, dir).await,
        "pool-too-small-2024" => pool_too_small(opts, dir).await,
        other => Err(DrillError::Unknown { name: other.to_string() }),
    }
}

fn finish(session: Session, promises: Vec<Promise>) -> Outcome {
    let marks = session.marks();
    let length = session.length;
    let recording = std::mem::take(&mut *session.recording());
    Outcome { promises, recording, marks, length }
}

/// Incident 003: two CAs lose their keys while their renewals keep coming (with retries), then
/// are disabled; an operator parks a renewal queue and resubmits it later.
/// What the incident-003 drill reads from its recording, before judging its promises.
struct QueuesFigures {
    /// Healthy CA (stream 0): requests, success share and p99, at baseline and under the fault.
    n_base: usize,
    ok_base: f64,
    p99_base: Duration,
    n_fault: usize,
    ok_fault: f64,
    p99_fault: Duration,
    n_all: usize,
    ok_all: f64,
    /// The healthy CA's signatures per second, at baseline and under the fault.
    rate_base: f64,
    rate_fault: f64,
    /// Background renewals (stream 1) completed per second, and how many ran under the fault.
    bg_base_rate: f64,
    bg_fault_rate: f64,
    bg_fault_n: usize,
    /// Answers to requests for the disabled CAs after the disable: how many, how many were 409,
    /// the statuses of the rest, and how many got no answer.
    after_disable: usize,
    refused: usize,
    others: Vec<u16>,
    unanswered_after_disable: usize,
    max_depth_disabled: i64,
    signed_after_disable: i64,
    sync_created: i64,
    /// Synchronous 201s answered after the 6 s deadline.
    late_201: usize,
}

async fn issuance_queues(opts: &DrillOptions, dir: &Path) -> Result<Outcome, DrillError> {
    if opts.url.is_some() {
        return Err(DrillError::Unsupported(
            "issuance-queues-2020 destroys CA key files: it needs an engine it starts".into(),
        ));
    }
    // On PostgreSQL even the short form uses longer windows: a checkpoint of a shared server can
    // stall commits for ~100 ms, and a p99 over a few seconds would measure that, not the engine.
    let k = match (opts.short, opts.postgres.is_some()) {
        (true, false) => 1.0,
        (true, true) => 2.0,
        (false, _) => 3.0,
    };
    let (fault, disabled, resubmitted, end) = (s(4.0 * k), s(8.0 * k), s(10.0 * k), s(12.0 * k));
    let db = database(opts, dir, None)?;
    let postgres = opts.postgres.is_some();
    let target = target(opts, dir, db, |c| {
        if postgres {
            // Two store workers, as a PostgreSQL deployment runs: one slow commit (a checkpoint
            // of the shared server) must not hold every write behind it.
            set(c, &["database", "pools", "issuance", "max_size"], 2.into());
        }
        add_renewal_profile(c, "renewal-p384", "ica-p384", "ecdsa-p384");
        add_renewal_profile(c, "renewal-rsa3072", "ica-rsa3072", "rsa");
        add_renewal_profile(c, "renewal-ed25519", "ica-ed25519", "ed25519");
        for ca in ["ica-p384", "ica-rsa3072"] {
            set(ca_entry(c, ca), &["breaker", "open_for"], "1s".into());
        }
    })
    .await?;
    let rsa_key_csr = csr(KeyType::Rsa, "rsa-renewal.example.test")?;
    let streams = vec![
        // 0: synchronous identities on a healthy CA (the DSS traffic of the incident).
        Stream::issue(
            "dss-identities",
            "tls-server-p256",
            csr(KeyType::EcdsaP256, "dss.example.test")?,
            3,
            s(0.0),
            end,
        ),
        // 1: renewals for a valid CA, background lane, on the same CA as the identities.
        Stream {
            pause: s(0.05),
            ..Stream::issue(
                "renewals-valid",
                "ocsp-renewal",
                csr(KeyType::EcdsaP256, "ocsp.example.test")?,
                1,
                s(0.0),
                end,
            )
        },
        // 2, 3: renewals for the two CAs that will lose their keys, asynchronous, with retries.
        Stream {
            respond_async: true,
            retries: 3,
            pause: s(0.02),
            ..Stream::issue(
                "renewals-p384",
                "renewal-p384",
                csr(KeyType::EcdsaP384, "r384.example.test")?,
                2,
                s(0.0),
                end,
            )
        },
        Stream {
            respond_async: true,
            retries: 3,
            pause: s(0.02),
            ..Stream::issue("renewals-rsa3072", "renewal-rsa3072", rsa_key_csr, 2, s(0.0), end)
        },
        // 4: renewals for a valid CA whose queue the operators park, then resubmit.
        Stream {
            respond_async: true,
            pause: s(0.1),
            ..Stream::issue(
                "renewals-ed25519",
                "renewal-ed25519",
                csr(KeyType::Ed25519, "red.example.test")?,
                1,
                s(0.0),
                end,
            )
        },
    ];
    let session = Session::new(target, end);
    let load = session.drive(streams, 2_000_000);
    let faults = async {
        session.at(fault).await;
        session.target.destroy_key("ica-p384")?;
        session.target.destroy_key("ica-rsa3072")?;
        session.mark("fault: keys of ica-p384 and ica-rsa3072 destroyed");
        session.at(fault + s(0.5 * k)).await;
        session.target.admin_post("/admin/v1/cas/ica-ed25519/state", serde_json::json!({"state": "parked"})).await?;
        session.mark("operator parks ica-ed25519");
        session.at(disabled).await;
        for ca in ["ica-p384", "ica-rsa3072"] {
            session
                .target
                .admin_post(&format!("/admin/v1/cas/{ca}/state"), serde_json::json!({"state": "disabled"}))
                .await?;
        }
        session.mark("fault ends: ica-p384 and ica-rsa3072 disabled");
        let disabled_at = session.start.elapsed();
        session.at(resubmitted).await;
        session.target.admin_post("/admin/v1/cas/ica-ed25519/state", serde_json::json!({"state": "enabled"})).await?;
        session.target.admin_post("/admin/v1/cas/ica-ed25519/resubmit", serde_json::json!({})).await?;
        session.mark("operator unparks ica-ed25519 and resubmits");
        Ok::<Duration, DrillError>(disabled_at)
    };
    let (_, faults) = tokio::join!(load, faults);
    // Judged from when both disables had been applied, not from when they were scheduled.
    let disabled_at = faults?;

    // Parked work: every 202 the parked CA accepted must end issued.
    let parked_ids: Vec<String> = session
        .recording()
        .samples_of(4, fault + s(0.5 * k), resubmitted)
        .filter_map(|s| s.request_id.clone())
        .collect();
    let issued_parked = wait_issued(&session.target, &parked_ids, s(30.0)).await;

    let QueuesFigures {
        n_base,
        ok_base,
        p99_base,
        n_fault,
        ok_fault,
        p99_fault,
        n_all,
        ok_all,
        rate_base,
        rate_fault,
        bg_base_rate,
        bg_fault_rate,
        bg_fault_n,
        after_disable,
        refused,
        others,
        unanswered_after_disable,
        max_depth_disabled,
        signed_after_disable,
        sync_created,
        late_201,
    } = {
        let rec = session.recording();
        let warm = s(0.5 * k);
        let (n_base, ok_base, p99_base) = stream_stats(&rec, 0, warm, fault);
        let (n_fault, ok_fault, p99_fault) = stream_stats(&rec, 0, fault, disabled);
        let (n_all, ok_all, _) = stream_stats(&rec, 0, s(0.0), end);
        let rate = |from: Duration, until: Duration| {
            rec.signatures_between("ica-p256", from, until) as f64 / (until - from).as_secs_f64()
        };
        let (rate_base, rate_fault) = (rate(warm, fault), rate(fault, disabled));
        let (bg_base, bg_fault) = (stream_stats(&rec, 1, warm, fault), stream_stats(&rec, 1, fault, disabled));
        let after_disable: Vec<(Kind, u16)> = rec
            .samples
            .iter()
            .filter(|x| (x.stream == 2 || x.stream == 3) && x.at > disabled_at && x.kind != Kind::NoAnswer)
            .map(|x| (x.kind, x.status))
            .collect();
        let refused = after_disable.iter().filter(|(kind, _)| *kind == Kind::Refused409).count();
        let unanswered_after_disable = rec
            .samples
            .iter()
            .filter(|x| (x.stream == 2 || x.stream == 3) && x.at > disabled_at && x.kind == Kind::NoAnswer)
            .count();
        let mut others: Vec<u16> =
            after_disable.iter().filter(|(kind, _)| *kind != Kind::Refused409).map(|(_, status)| *status).collect();
        others.sort_unstable();
        let max_depth_disabled = rec
            .gauges
            .iter()
            .filter(|g| g.at > disabled_at + s(0.5))
            .map(|g| {
                g.queue_depth_by_ca.get("ica-p384").copied().unwrap_or(0)
                    + g.queue_depth_by_ca.get("ica-rsa3072").copied().unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let signed_after_disable = rec.signatures_between("ica-p384", disabled_at + s(0.5), end)
            + rec.signatures_between("ica-rsa3072", disabled_at + s(0.5), end);
        let sync_created = rec.samples.iter().filter(|s| s.status == 201).count() as i64;
        let late_201 = rec.samples.iter().filter(|x| x.status == 201 && x.stream == 0 && x.latency > s(6.0)).count();
        let bg_rate = |n: usize, share: f64, len: Duration| n as f64 * share / len.as_secs_f64();
        QueuesFigures {
            n_base,
            ok_base,
            p99_base,
            n_fault,
            ok_fault,
            p99_fault,
            n_all,
            ok_all,
            rate_base,
            rate_fault,
            bg_base_rate: bg_rate(bg_base.0, bg_base.1, fault - warm),
            bg_fault_rate: bg_rate(bg_fault.0, bg_fault.1, disabled - fault),
            bg_fault_n: bg_fault.0,
            after_disable: after_disable.len(),
            refused,
            others,
            unanswered_after_disable,
            max_depth_disabled,
            signed_after_disable,
            sync_created,
            late_201,
        }
    };
    // Counted after everything settled (resubmitted work signs after the load ends).
    let final_metrics = session.target.metrics().await.unwrap_or_default();
    let final_signatures: i64 = super::series::Gauges::parse(end, &final_metrics, None).signatures.values().sum();
    let db_counts = count_db(&session.target).await;
    let opened = |ca: &str| {
        final_metrics
            .lines()
            .any(|l| l.starts_with(&format!("castellum_breaker_transitions_total{{ca=\"{ca}\",to=\"open\"}}")))
    };

    let mut promises = vec![
        Promise::new(
            "healthy CA keeps 100% success and p99 within 2x of the pre-fault baseline",
            ok_all == 1.0 && ok_base == 1.0 && ok_fault == 1.0 && n_fault > 0 && p99_fault <= p99_base * 2,
            format!(
                "identities on ica-p256: {n_all} requests, {:.2}% success; p99 {:.1} ms before the fault ({n_base} req), {:.1} ms during it ({n_fault} req)",
                ok_all * 100.0,
                p99_base.as_secs_f64() * 1e3,
                p99_fault.as_secs_f64() * 1e3
            ),
        ),
        Promise::new(
            "only the failing CAs' breakers open",
            opened("ica-p384") && opened("ica-rsa3072") && !opened("ica-p256") && !opened("ica-ed25519"),
            format!(
                "opened: ica-p384 {}, ica-rsa3072 {}, ica-p256 {}, ica-ed25519 {}",
                opened("ica-p384"),
                opened("ica-rsa3072"),
                opened("ica-p256"),
                opened("ica-ed25519")
            ),
        ),
        Promise::new(
            "no global back-off: the healthy CA's signing rate is unchanged",
            rate_fault >= 0.75 * rate_base,
            format!("ica-p256 signed {rate_base:.0}/s before the fault, {rate_fault:.0}/s during it"),
        ),
        Promise::new(
            "background work for valid CAs is not starved",
            bg_fault_n > 0 && bg_fault_rate >= 0.5 * bg_base_rate,
            format!("renewals on ica-p256 (background lane): {bg_base_rate:.1}/s issued before the fault, {bg_fault_rate:.1}/s during it"),
        ),
        Promise::new(
            "requests for disabled CAs are refused at intake, never queued or signed",
            after_disable > 0 && refused == after_disable && max_depth_disabled == 0 && signed_after_disable == 0,
            format!(
                "after the disable: {refused} of {after_disable} answered requests were 409 (others: {others:?}; unanswered by the connection: {unanswered_after_disable}); their queue depth peaked at {max_depth_disabled}; {signed_after_disable} signatures"
            ),
        ),
        Promise::new(
            "parked work is all issued after resubmit",
            !parked_ids.is_empty() && issued_parked == parked_ids.len(),
            format!("{issued_parked} of {} requests accepted while ica-ed25519 was parked were issued", parked_ids.len()),
        ),
    ];
    match db_counts {
        Some((issued, async_serials)) => promises.push(Promise::new(
            "nothing is signed after its deadline",
            issued == sync_created + async_serials && final_signatures == issued && late_201 == 0,
            format!(
                "{issued} certificates stored = {sync_created} answered 201 + {async_serials} delivered to async requests; {final_signatures} signatures; {late_201} answers after 6 s"
            ),
        )),
        None => promises.push(Promise::new("nothing is signed after its deadline", false, "could not read the database".into())),
    }
    Ok(finish(session, promises))
}

/// Poll asynchronous requests until issued (or `limit`); returns how many were.
async fn wait_issued(target: &Target, ids: &[String], limit: Duration) -> usize {
    let started = Instant::now();
    let mut issued = std::collections::HashSet::new();
    while issued.len() < ids.len() && started.elapsed() < limit {
        let waiting: Vec<&String> = ids.iter().filter(|id| !issued.contains(*id)).collect();
        for id in waiting {
            let body =
                target.http.get(format!("{}/v1/requests/{id}", target.base)).bearer_auth(&target.api_key).send().await;
            if let Ok(resp) = body {
                if let Ok(v) = resp.json::<serde_json::Value>().await {
                    if v["state"] == "issued" {
                        issued.insert(id.clone());
                    }
                }
            }
        }
        tokio::time::sleep(s(0.2)).await;
    }
    issued.len()
}

/// (certificates issued, distinct certificates delivered to async requests), from the database.
async fn count_db(target: &Target) -> Option<(i64, i64)> {
    let url = target.db.as_ref()?.url();
    tokio::task::spawn_blocking(move || {
        let mut config = crate::config::Config::default();
        config.database.url = url;
        let pool =
            crate::db::DbPool::build(&config.database, &config.database.pools.status, "drill", Arc::default()).ok()?;
        let mut conn = pool.get().ok()?;
        Some((
            crate::db::queries::count_certificates_in_state(&mut conn, "issued").ok()?,
            crate::db::queries::count_async_issued_serials(&mut conn).ok()?,
        ))
    })
    .await
    .ok()
    .flatten()
}

/// Incident 000: a 20x surge of clients against a PostgreSQL role limited to the engine's budget.
async fn connection_surge(opts: &DrillOptions, dir: &Path) -> Result<Outcome, DrillError> {
    if opts.postgres.is_none() {
        return Err(DrillError::Unsupported(
            "connection-surge-2024 needs PostgreSQL: pass --postgres postgres://postgres@127.0.0.1:5432".into(),
        ));
    }
    let k = if opts.short { 1.0 } else { 3.0 };
    let (surge, calm, end) = (s(3.0 * k), s(7.0 * k), s(10.0 * k));
    let budget = 7;
    let db = database(opts, dir, Some(budget))?;
    let target = target(opts, dir, db, |c| {
        set(c, &["database", "server_max_connections"], i64::from(budget).into());
        set(c, &["database", "reserved_connections"], 0.into());
        // A queue sized for normal load, so the surge really is excess and must be shed.
        set(ca_entry(c, "ica-p256"), &["queue", "interactive_capacity"], 24.into());
        set(ca_entry(c, "ica-p256"), &["queue", "in_flight"], 8.into());
    })
    .await?;
    let identity = csr(KeyType::EcdsaP256, "surge.example.test")?;
    let streams = vec![
        Stream::issue("normal", "tls-server-p256", identity.clone(), 4, s(0.0), end),
        Stream::issue("surge", "tls-server-p256", identity, 76, surge, calm),
    ];
    let session = Session::new(target, end);
    let load = session.drive(streams, 2_000_000);
    let marks = async {
        session.at(surge).await;
        session.mark("fault: 20x clients");
        session.at(calm).await;
        session.mark("fault ends: back to normal load");
    };
    tokio::join!(load, marks);
    let rec = session.recording();
    let peak = rec.gauges.iter().map(|g| g.db_connections).max().unwrap_or(0);
    let refusals: Vec<_> =
        rec.samples.iter().filter(|s| matches!(s.kind, Kind::Unavailable503 | Kind::Limited429)).collect();
    let mut refusal_latency: Vec<Duration> = refusals.iter().map(|s| s.latency).collect();
    let unanswered = rec.samples.iter().filter(|s| matches!(s.kind, Kind::NoAnswer | Kind::Other)).count();
    let mut admitted: Vec<Duration> =
        rec.samples.iter().filter(|s| s.kind == Kind::Success).map(|s| s.latency).collect();
    let p99_admitted = super::load::percentile(&mut admitted, 0.99);
    let recovery_from = calm + s(1.0 * k);
    let (n_rec, ok_rec, _) = stream_stats(&rec, 0, recovery_from, end);
    let p99_refusal = super::load::percentile(&mut refusal_latency, 0.99);
    let promises = vec![
        Promise::new(
            "database connections never exceed the configured budget",
            peak > 0 && peak <= i64::from(budget),
            format!("peak {peak} connections in pg_stat_activity; role CONNECTION LIMIT and pools: {budget}"),
        ),
        Promise::new(
            "excess load gets fast 503/429, not timeouts",
            !refusals.is_empty() && unanswered == 0 && p99_refusal < s(1.0),
            format!(
                "{} refused with 503/429, p99 {:.0} ms; {unanswered} unanswered or other",
                refusals.len(),
                p99_refusal.as_secs_f64() * 1e3
            ),
        ),
        Promise::new(
            "p99 of admitted requests stays inside the deadline",
            p99_admitted < s(6.0),
            format!("{} issued, p99 {:.0} ms (deadline 6000 ms)", admitted.len(), p99_admitted.as_secs_f64() * 1e3),
        ),
        Promise::new(
            "full recovery after the surge without a restart",
            n_rec > 0 && ok_rec == 1.0,
            format!("after the surge: {n_rec} requests, {:.1}% issued", ok_rec * 100.0),
        ),
    ];
    drop(rec);
    Ok(finish(session, promises))
}

/// Incident 001: a component takes connections and does not give them back.
async fn pool_leak(opts: &DrillOptions, dir: &Path) -> Result<Outcome, DrillError> {
    let k = if opts.short { 1.0 } else { 3.0 };
    let (leak, end) = (s(3.0 * k), s(10.0 * k));
    let every = s(1.5 * k);
    let hold = s(6.0 * k);
    let db = database(opts, dir, None)?;
    let threshold = s(0.75 * k);
    let target = target(opts, dir, db, |c| {
        set(c, &["database", "slow_hold_threshold"], format!("{}ms", threshold.as_millis()).into());
    })
    .await?;
    let streams = vec![
        Stream::issue("identities", "tls-server-p256", csr(KeyType::EcdsaP256, "leak.example.test")?, 3, s(0.0), end),
        Stream {
            get: Some("/readyz".into()),
            pause: s(0.2),
            ..Stream::issue("health", "", Arc::default(), 1, s(0.0), end)
        },
    ];
    let session = Session::new(target, end);
    let load = session.drive(streams, 2_000_000);
    let exhausted_at = leak + every; // the control pool has 2 connections: the second take exhausts it
    let mut reported_before_exhaustion = false;
    let mut admin_codes = Vec::new();
    let faults = async {
        session.at(leak).await;
        let body = serde_json::json!({"pool": "control", "connections": 2, "every_ms": every.as_millis() as u64, "hold_ms": hold.as_millis() as u64});
        session.target.admin_post("/admin/v1/faults/leak", body).await?;
        session.mark("fault: a component starts leaking control connections");
        session.at(exhausted_at - s(0.1)).await;
        let metrics = session.target.metrics().await.unwrap_or_default();
        reported_before_exhaustion = metrics
            .lines()
            .any(|l| l.starts_with("castellum_db_pool_long_holds_total{pool=\"control\"}") && !l.ends_with(" 0"));
        session.mark("control pool exhausted");
        // The admin console keeps answering while the pool is exhausted.
        while session.start.elapsed() < leak + hold {
            let status = session
                .target
                .http
                .get(format!("{}/admin/v1/status", session.target.admin))
                .bearer_auth(&session.target.admin_token)
                .send()
                .await;
            admin_codes.push(status.map(|r| r.status().as_u16()).unwrap_or(0));
            tokio::time::sleep(s(0.25)).await;
        }
        session.mark("fault ends: the leaked connections are returned");
        Ok::<(), DrillError>(())
    };
    let (_, faults) = tokio::join!(load, faults);
    faults?;
    let log = session.target.engine_log();
    let named = log.lines().any(|l| l.contains("held longer than the threshold") && l.contains("leaky_component"));
    let rec = session.recording();
    let (n_issue, ok_issue, p99_issue) = stream_stats(&rec, 0, leak, leak + hold);
    let (n_health, ok_health, _) = stream_stats(&rec, 1, leak, leak + hold);
    let admin_ok = admin_codes.iter().filter(|c| **c == 200).count();
    let promises = vec![
        Promise::new(
            "the leak is reported (metric and log naming the holder) before exhaustion",
            reported_before_exhaustion && (named || session.target.log.is_none()),
            format!(
                "long-hold metric raised before the pool ran out: {reported_before_exhaustion}; log line naming leaky_component: {named} (threshold {} ms)",
                threshold.as_millis()
            ),
        ),
        Promise::new(
            "the issuance path keeps serving from its own bulkhead",
            n_issue > 0 && ok_issue == 1.0,
            format!("during the leak: {n_issue} issuance requests, {:.1}% issued, p99 {:.1} ms", ok_issue * 100.0, p99_issue.as_secs_f64() * 1e3),
        ),
        Promise::new(
            "the admin and health endpoints keep answering",
            n_health > 0 && ok_health == 1.0 && !admin_codes.is_empty() && admin_ok == admin_codes.len(),
            format!("/readyz: {n_health} checks, {:.0}% 200; admin status: {admin_ok} of {} answered 200", ok_health * 100.0, admin_codes.len()),
        ),
    ];
    drop(rec);
    Ok(finish(session, promises))
}

/// Incident 002: the status pool is too small for the offered read load.
async fn pool_too_small(opts: &DrillOptions, dir: &Path) -> Result<Outcome, DrillError> {
    let k = if opts.short { 1.0 } else { 3.0 };
    let (surge, end) = (s(2.0 * k), s(8.0 * k));
    let db = database(opts, dir, None)?;
    let target = target(opts, dir, db, |c| {
        set(c, &["database", "pools", "status", "max_size"], 1.into());
        set(c, &["database", "pools", "status", "min_idle"], 1.into());
        set(c, &["database", "pools", "status", "connection_timeout"], "250ms".into());
    })
    .await?;
    // Would check-config have caught it, given the rate the operators expected?
    let config_path = target.key_dir.as_ref().map(|d| d.join("castellum.toml"));
    let flagged = match &config_path {
        Some(path) => {
            let out = std::process::Command::new(std::env::current_exe()?)
                .args(["check-config", "--expected-rate", "400", "--config"])
                .arg(path)
                .output()?;
            let text = String::from_utf8_lossy(&out.stderr).to_string();
            (
                !out.status.success() && text.contains("database.pools.status.max_size"),
                text.lines().find(|l| l.contains("status.max_size")).unwrap_or("").trim().to_string(),
            )
        }
        None => (false, "needs an engine the drill started".to_string()),
    };
    // A certificate to read back, many times at once.
    let identity = csr(KeyType::EcdsaP256, "reads.example.test")?;
    let first: serde_json::Value = target
        .http
        .post(format!("{}/v1/certificates", target.base))
        .bearer_auth(&target.api_key)
        .json(&serde_json::json!({"profile": "tls-server-p256", "csr": identity.as_str()}))
        .send()
        .await?
        .json()
        .await?;
    let serial = first["serial"].as_str().unwrap_or_default().to_string();
    let streams = vec![
        Stream::issue("identities", "tls-server-p256", identity, 2, s(0.0), end),
        Stream {
            get: Some(format!("/v1/certificates/{serial}")),
            ..Stream::issue("reads", "", Arc::default(), 16, surge, end)
        },
    ];
    let session = Session::new(target, end);
    let load = session.drive(streams, 2_000_000);
    let mut obvious_after = None;
    let mut warning = String::new();
    let watch = async {
        session.at(surge).await;
        session.mark("fault: read load beyond the status pool");
        while session.start.elapsed() < end {
            tokio::time::sleep(s(0.5)).await;
            let ready = session.target.http.get(format!("{}/readyz", session.target.base)).send().await;
            if let Ok(v) = match ready {
                Ok(r) => r.json::<serde_json::Value>().await,
                Err(e) => Err(e),
            } {
                if let Some(w) = v["warnings"]
                    .as_array()
                    .and_then(|w| w.iter().find_map(|w| w.as_str().filter(|w| w.contains("pool status"))))
                {
                    if obvious_after.is_none() {
                        obvious_after = Some(session.start.elapsed() - surge);
                        warning = w.to_string();
                    }
                }
            }
        }
    };
    tokio::join!(load, watch);
    let metrics = session.target.metrics().await.unwrap_or_default();
    let (errors, errors_503_retry) = {
        let rec = session.recording();
        let errors: Vec<_> = rec.samples.iter().filter(|s| s.kind != Kind::Success).collect();
        (errors.len(), errors.iter().filter(|s| s.kind == Kind::Unavailable503 && s.retry_after).count())
    };
    let waited = metrics.lines().any(|l| l.starts_with("castellum_db_pool_wait_seconds_count{pool=\"status\"}"));
    let promises = vec![
        Promise::new("check-config flags the pool given the expected rate", flagged.0, flagged.1.clone()),
        Promise::new(
            "the pool-wait metric and /readyz make the cause obvious within seconds",
            obvious_after.is_some_and(|t| t <= s(3.0)) && waited,
            format!(
                "/readyz named the status pool {} after the load began: {warning:?}",
                obvious_after.map(|t| format!("{:.1} s", t.as_secs_f64())).unwrap_or_else(|| "never".into())
            ),
        ),
        Promise::new(
            "errors are 503 with Retry-After",
            errors > 0 && errors_503_retry == errors,
            format!("{errors_503_retry} of {errors} errors were 503 with Retry-After"),
        ),
    ];
    Ok(finish(session, promises))
}
