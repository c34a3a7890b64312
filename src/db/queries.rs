//! Every query the engine runs, written once for both backends with [`with_conn!`].

use diesel::prelude::*;

use super::audit::AppendAudit;
use super::identities::IdentityOps;
use super::models::{AuditEvent, CertificateRow, NewAuditEvent, RequestRow, TBS_ONCE_ISSUED};
use super::one_statement::OneStatement;
use super::schema::{audit_log, cas, certificates, identities, instances, profiles, registry, requests};
use super::writes::{WriteOp, WriteOutcome};
use super::DbConn;
use crate::error::DbError;
use crate::states::{CaState, CertState, ProfileState, RequestMode, RequestState};
use crate::{with_conn, write_transaction};

/// Apply a batch in one transaction (one commit, one fsync on SQLite). On PostgreSQL a batch of
/// write-ahead records alone, or of one signed certificate with no stored request or identity,
/// is one statement instead, without `BEGIN` and `COMMIT` around it (`one_statement.rs`).
pub fn apply_batch(conn: &mut DbConn, ops: &[WriteOp]) -> Result<Vec<WriteOutcome>, DbError> {
    if let DbConn::Postgres(pg) = conn {
        if let Some(statement) = OneStatement::of(ops) {
            statement.execute(pg)?;
            return Ok(vec![WriteOutcome::Done; ops.len()]);
        }
    }
    write_transaction!(conn, |c| {
        let mut outcomes = vec![WriteOutcome::Done; ops.len()];
        let mut ahead = Vec::new();
        let mut audit = Vec::new();
        let mut new_identities = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            match op {
                WriteOp::InsertRequest(row) => {
                    let n = diesel::insert_into(requests::table)
                        .values(row.as_ref())
                        .on_conflict_do_nothing()
                        .execute(c)?;
                    if n == 0 {
                        outcomes[i] = WriteOutcome::Conflict;
                    }
                }
                WriteOp::WriteAhead(row) => ahead.push(row.as_ref()),
                WriteOp::Audit(event) => audit.push(event.clone()),
                WriteOp::CertificateIssued { audit: event, identity, .. } => {
                    audit.push(event.as_ref().clone());
                    if let Some(row) = identity {
                        new_identities.push(row.as_ref().clone());
                    }
                }
                // Updates of rows that exist: the second pass, once the inserts are in.
                WriteOp::CertificateAbandoned { .. }
                | WriteOp::RequestIssued { .. }
                | WriteOp::RequestFinished { .. }
                | WriteOp::UseIdentity { .. } => {}
            }
        }
        c.insert_write_ahead(&ahead)?;
        if !new_identities.is_empty() {
            diesel::insert_into(identities::table).values(&new_identities).execute(c)?;
        }
        // A request answered with a certificate, its own or (coalesced) another request's.
        let mut issued_requests: Vec<(&String, &String, i64)> = Vec::new();
        let mut identity_uses = Vec::new();
        let mut issued = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            match op {
                WriteOp::CertificateIssued { serial, cert_der, at, request_id, .. } => {
                    issued.push(Issued { serial, cert_der, at: *at });
                    if let Some(id) = request_id {
                        issued_requests.push((id, serial, *at));
                    }
                }
                WriteOp::RequestIssued { id, serial, at } => issued_requests.push((id, serial, *at)),
                WriteOp::UseIdentity { id, client, at, instance, digest_algorithm } => {
                    identity_uses.push((i, id, client, *at, instance, *digest_algorithm))
                }
                WriteOp::CertificateAbandoned { serial } => {
                    diesel::update(certificates::table.find(serial))
                        .set(certificates::state.eq(CertState::Abandoned))
                        .execute(c)?;
                }
                WriteOp::RequestFinished { id, state, error_type, error_detail, at, claimed_until } => {
                    // An asynchronous request past its max age stays expired: a late failure
                    // report (its signer refused it) must not make it pending again.
                    diesel::update(
                        requests::table.find(id).filter(
                            requests::state.ne(RequestState::Expired).or(requests::mode.ne(RequestMode::Async)),
                        ),
                    )
                    .set((
                        requests::state.eq(*state),
                        requests::error_type.eq(error_type),
                        requests::error_detail.eq(error_detail),
                        requests::updated_at.eq(*at),
                        requests::claimed_by.eq(None::<String>),
                        requests::claimed_until.eq(claimed_until),
                    ))
                    .execute(c)?;
                }
                // Inserts: done in the first pass.
                WriteOp::InsertRequest(_) | WriteOp::WriteAhead(_) | WriteOp::Audit(_) => {}
            }
        }
        c.mark_issued(&issued)?;
        // In identity order: two instances' batches lock the same rows in the same order, so
        // they can wait for each other but never deadlock.
        identity_uses.sort_by_key(|(_, id, ..)| id.as_str());
        for (i, id, client, at, instance, digest_algorithm) in identity_uses {
            outcomes[i] = c.use_identity(id, client, at, instance, digest_algorithm, &mut audit)?;
        }
        for (id, serial, at) in issued_requests {
            diesel::update(requests::table.find(id))
                .set((
                    requests::state.eq(RequestState::Issued),
                    requests::serial.eq(Some(serial)),
                    requests::updated_at.eq(at),
                    requests::claimed_by.eq(None::<String>),
                    requests::claimed_until.eq(None::<i64>),
                ))
                .execute(c)?;
        }
        c.append_audit(&audit)?;
        Ok(outcomes)
    })
}

/// Insert a batch's write-ahead records. SQLite: a statement per row, prepared once and kept by
/// diesel (a many-row statement has a different text for every batch size, so it is parsed again
/// each time: 3% of the engine's CPU at c=64). PostgreSQL: one statement, one round trip, its
/// rows bound as arrays (`unnest.rs`), prepared once.
trait InsertWriteAhead {
    fn insert_write_ahead(&mut self, rows: &[&CertificateRow]) -> QueryResult<()>;
}

impl InsertWriteAhead for diesel::SqliteConnection {
    fn insert_write_ahead(&mut self, rows: &[&CertificateRow]) -> QueryResult<()> {
        for &row in rows {
            diesel::insert_into(certificates::table).values(row).execute(self)?;
        }
        Ok(())
    }
}

impl InsertWriteAhead for diesel::PgConnection {
    fn insert_write_ahead(&mut self, rows: &[&CertificateRow]) -> QueryResult<()> {
        if !rows.is_empty() {
            super::unnest::InsertCertificates::new(rows.iter().copied()).execute(self)?;
        }
        Ok(())
    }
}

/// A certificate signed: its record leaves `signing`.
struct Issued<'a> {
    serial: &'a str,
    cert_der: &'a [u8],
    at: i64,
}

/// Record a batch's signed certificates. SQLite runs in-process: a statement per certificate,
/// prepared once, costs no round trip. On PostgreSQL a statement per certificate is a round
/// trip and an executor start each (a third of the server's CPU per issuance at c=64): from
/// [`JOIN_FROM`] certificates on, one statement joins the batch's arrays instead
/// (`unnest::MarkIssued`, planned on every run); a batch of one or two keeps the single-row statement,
/// whose plan is an index lookup whatever the server estimates of an array.
trait MarkIssued {
    fn mark_issued(&mut self, issued: &[Issued<'_>]) -> QueryResult<()>;
}

/// Certificates from which PostgreSQL records a batch in one statement.
const JOIN_FROM: usize = 3;

/// A statement per certificate, prepared once (written for each backend's connection type).
macro_rules! mark_each_issued {
    ($conn:expr, $issued:expr) => {{
        for cert in $issued {
            MarkOneIssued(cert).execute($conn)?;
        }
        Ok(())
    }};
}

/// `UPDATE certificates SET state = 'issued', cert_der = ?, tbs_der = ?, issued_at = ?
/// WHERE serial = ?` (the TBS emptied: [`TBS_ONCE_ISSUED`]), as a query diesel keeps prepared
/// (its type is its cache key). diesel never caches its own `update(…).set(…)` (a changeset may
/// leave columns out, so the text can differ), and SQLite parsed that statement again for every
/// certificate: 1.9% of the engine's CPU at c=64.
struct MarkOneIssued<'a, 'b>(&'b Issued<'a>);

impl diesel::query_builder::QueryId for MarkOneIssued<'_, '_> {
    type QueryId = MarkOneIssued<'static, 'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<DB> diesel::query_builder::QueryFragment<DB> for MarkOneIssued<'_, '_>
where
    DB: diesel::backend::Backend,
    str: diesel::serialize::ToSql<diesel::sql_types::Text, DB>,
    [u8]: diesel::serialize::ToSql<diesel::sql_types::Binary, DB>,
    i64: diesel::serialize::ToSql<diesel::sql_types::BigInt, DB>,
{
    fn walk_ast<'q>(&'q self, mut out: diesel::query_builder::AstPass<'_, 'q, DB>) -> QueryResult<()> {
        use diesel::sql_types::{BigInt, Binary, Text};
        out.push_sql("UPDATE certificates SET state = ");
        out.push_bind_param::<Text, str>(CertState::Issued.as_str())?;
        out.push_sql(", cert_der = ");
        out.push_bind_param::<Binary, [u8]>(self.0.cert_der)?;
        out.push_sql(", tbs_der = ");
        out.push_bind_param::<Binary, [u8]>(TBS_ONCE_ISSUED)?;
        out.push_sql(", issued_at = ");
        out.push_bind_param::<BigInt, i64>(&self.0.at)?;
        out.push_sql(" WHERE serial = ");
        out.push_bind_param::<Text, str>(self.0.serial)?;
        Ok(())
    }
}

impl<Conn> RunQueryDsl<Conn> for MarkOneIssued<'_, '_> {}

impl MarkIssued for diesel::SqliteConnection {
    fn mark_issued(&mut self, issued: &[Issued<'_>]) -> QueryResult<()> {
        mark_each_issued!(self, issued)
    }
}

impl MarkIssued for diesel::PgConnection {
    fn mark_issued(&mut self, issued: &[Issued<'_>]) -> QueryResult<()> {
        if issued.len() < JOIN_FROM {
            return mark_each_issued!(self, issued);
        }
        super::unnest::MarkIssued {
            serial: issued.iter().map(|c| c.serial).collect(),
            cert_der: issued.iter().map(|c| c.cert_der).collect(),
            issued_at: issued.iter().map(|c| c.at).collect(),
        }
        .execute(self)
        .map(|_| ())
    }
}

pub fn load_certificate(conn: &mut DbConn, serial: &str) -> Result<Option<CertificateRow>, DbError> {
    Ok(with_conn!(conn, |c| certificates::table.find(serial).select(CertificateRow::as_select()).first(c).optional())?)
}

pub fn load_request(conn: &mut DbConn, id: &str) -> Result<Option<RequestRow>, DbError> {
    Ok(with_conn!(conn, |c| requests::table.find(id).select(RequestRow::as_select()).first(c).optional())?)
}

pub fn find_request_by_key(conn: &mut DbConn, client: &str, key: &str) -> Result<Option<RequestRow>, DbError> {
    Ok(with_conn!(conn, |c| requests::table
        .filter(requests::client.eq(client))
        .filter(requests::idempotency_key.eq(key))
        .select(RequestRow::as_select())
        .first(c)
        .optional())?)
}

/// Take a request nobody owns (compare-and-set on the claim, so two instances never both win).
pub fn claim_request(
    conn: &mut DbConn,
    id: &str,
    instance: &str,
    now: i64,
    until: i64,
    from_states: &[RequestState],
) -> Result<bool, DbError> {
    let states: Vec<String> = from_states.iter().map(|s| s.to_string()).collect();
    let n = write_transaction!(conn, |c| diesel::update(
        requests::table
            .filter(requests::id.eq(id))
            .filter(requests::state.eq_any(&states))
            .filter(requests::claimed_until.is_null().or(requests::claimed_until.lt(now)))
    )
    .set((
        requests::state.eq(RequestState::Pending),
        requests::claimed_by.eq(Some(instance)),
        requests::claimed_until.eq(Some(until)),
        requests::updated_at.eq(now),
    ))
    .execute(c))?;
    Ok(n == 1)
}

/// Take over a synchronous request whose last attempt is over: recorded retryable, or still
/// pending (its instance died) or expired and past its expiry before `expired_before`. It becomes
/// pending again, claimed by `instance`, with `until` as its new expiry, so the one retry that
/// wins is the only one (the others no longer match) and the next takeover waits for this attempt
/// to be past `until` too. `false`: not such a request now.
pub fn retake_request(
    conn: &mut DbConn,
    id: &str,
    instance: &str,
    now: i64,
    until: i64,
    expired_before: i64,
) -> Result<bool, DbError> {
    let over = requests::state.eq(RequestState::Retryable).or(requests::state
        .eq_any([RequestState::Pending, RequestState::Expired])
        .and(requests::expires_at.lt(expired_before)));
    let n = write_transaction!(conn, |c| diesel::update(
        requests::table.filter(requests::id.eq(id)).filter(requests::mode.eq(RequestMode::Sync)).filter(over)
    )
    .set((
        requests::state.eq(RequestState::Pending),
        requests::claimed_by.eq(Some(instance)),
        requests::claimed_until.eq(Some(until)),
        requests::expires_at.eq(until),
        requests::error_type.eq(None::<String>),
        requests::error_detail.eq(None::<String>),
        requests::updated_at.eq(now),
    ))
    .execute(c))?;
    Ok(n == 1)
}

/// Claim several pending requests in one transaction (one commit); returns those won.
pub fn claim_requests(
    conn: &mut DbConn,
    rows: Vec<RequestRow>,
    instance: &str,
    now: i64,
    until: i64,
) -> Result<Vec<RequestRow>, DbError> {
    if rows.is_empty() {
        return Ok(rows);
    }
    Ok(write_transaction!(conn, |c| {
        let mut won = Vec::new();
        for row in rows {
            let n = diesel::update(
                requests::table
                    .filter(requests::id.eq(&row.id))
                    .filter(requests::state.eq(RequestState::Pending))
                    .filter(requests::claimed_until.is_null().or(requests::claimed_until.lt(now))),
            )
            .set((
                requests::claimed_by.eq(Some(instance)),
                requests::claimed_until.eq(Some(until)),
                requests::updated_at.eq(now),
            ))
            .execute(c)?;
            if n == 1 {
                won.push(row);
            }
        }
        diesel::QueryResult::Ok(won)
    })?)
}

/// Pending asynchronous requests whose claim has lapsed (oldest first).
pub fn claimable_requests(conn: &mut DbConn, now: i64, limit: i64) -> Result<Vec<RequestRow>, DbError> {
    Ok(with_conn!(conn, |c| requests::table
        .filter(requests::state.eq(RequestState::Pending))
        .filter(requests::mode.eq(RequestMode::Async))
        .filter(requests::claimed_until.is_null().or(requests::claimed_until.lt(now)))
        .order(requests::created_at.asc())
        .limit(limit)
        .select(RequestRow::as_select())
        .load(c))?)
}

/// Mark pending requests past their expiry as expired; they are never signed.
pub fn expire_requests(conn: &mut DbConn, now: i64) -> Result<usize, DbError> {
    Ok(write_transaction!(conn, |c| diesel::update(
        requests::table
            .filter(requests::state.eq_any([RequestState::Pending, RequestState::Parked]))
            .filter(requests::expires_at.lt(now))
    )
    .set((requests::state.eq(RequestState::Expired), requests::updated_at.eq(now)))
    .execute(c))?)
}

/// Write-ahead records a crash left in `signing` that can no longer be signed (older than the
/// longest deadline: the signer refuses anything past its deadline) are marked abandoned.
pub fn abandon_stale_signing(conn: &mut DbConn, created_before: i64) -> Result<usize, DbError> {
    Ok(write_transaction!(conn, |c| diesel::update(
        certificates::table
            .filter(certificates::state.eq(CertState::Signing))
            .filter(certificates::created_at.lt(created_before))
    )
    .set(certificates::state.eq(CertState::Abandoned))
    .execute(c))?)
}

/// On a clean shutdown: give back the claims this instance holds so others need not wait.
pub fn release_claims(conn: &mut DbConn, instance: &str) -> Result<usize, DbError> {
    Ok(write_transaction!(conn, |c| diesel::update(
        requests::table.filter(requests::claimed_by.eq(instance)).filter(requests::state.eq(RequestState::Pending))
    )
    .set((requests::claimed_by.eq(None::<String>), requests::claimed_until.eq(None::<i64>)))
    .execute(c))?)
}

/// Insert CA and profile rows the database has not seen yet, in their configured initial state.
pub fn ensure_registry_rows(
    conn: &mut DbConn,
    ca_rows: &[(String, CaState)],
    profile_rows: &[(String, String, ProfileState)],
    now: i64,
) -> Result<(), DbError> {
    write_transaction!(conn, |c| {
        let mut added = 0;
        for (id, state) in ca_rows {
            added += diesel::insert_into(cas::table)
                .values((cas::id.eq(id), cas::state.eq(*state), cas::updated_at.eq(now)))
                .on_conflict(cas::id)
                .do_nothing()
                .execute(c)?;
        }
        for (id, ca, state) in profile_rows {
            added += diesel::insert_into(profiles::table)
                .values((
                    profiles::id.eq(id),
                    profiles::ca_id.eq(ca),
                    profiles::state.eq(*state),
                    profiles::updated_at.eq(now),
                ))
                .on_conflict(profiles::id)
                .do_nothing()
                .execute(c)?;
        }
        if added > 0 {
            diesel::update(registry::table.filter(registry::id.eq(1)))
                .set(registry::version.eq(registry::version + 1i64))
                .execute(c)?;
        }
        diesel::QueryResult::Ok(())
    })?;
    Ok(())
}

/// The live registry state: version, CA states, profile states.
pub struct RegistryState {
    pub version: i64,
    pub cas: Vec<(String, CaState)>,
    pub profiles: Vec<(String, ProfileState)>,
}

pub fn load_registry(conn: &mut DbConn) -> Result<RegistryState, DbError> {
    Ok(with_conn!(conn, |c| c.transaction(|c| {
        let version = registry::table.select(registry::version).first::<i64>(c)?;
        let cas = cas::table.select((cas::id, cas::state)).load::<(String, CaState)>(c)?;
        let profiles = profiles::table.select((profiles::id, profiles::state)).load::<(String, ProfileState)>(c)?;
        diesel::QueryResult::Ok(RegistryState { version, cas, profiles })
    }))?)
}

pub fn registry_version(conn: &mut DbConn) -> Result<i64, DbError> {
    Ok(with_conn!(conn, |c| registry::table.select(registry::version).first::<i64>(c))?)
}

/// Record this instance's heartbeat and the registry version it serves.
pub fn heartbeat(
    conn: &mut DbConn,
    instance: &str,
    address: &str,
    started_at: i64,
    version: i64,
    now: i64,
) -> Result<(), DbError> {
    write_transaction!(conn, |c| diesel::insert_into(instances::table)
        .values((
            instances::id.eq(instance),
            instances::started_at.eq(started_at),
            instances::heartbeat_at.eq(now),
            instances::registry_version.eq(version),
            instances::address.eq(address),
        ))
        .on_conflict(instances::id)
        .do_update()
        .set((instances::heartbeat_at.eq(now), instances::registry_version.eq(version), instances::address.eq(address)))
        .execute(c))?;
    Ok(())
}

/// Publish this instance's actor tree for every console of the cluster.
pub fn publish_tree(conn: &mut DbConn, instance: &str, tree: &str) -> Result<(), DbError> {
    write_transaction!(conn, |c| diesel::update(instances::table.find(instance))
        .set(instances::tree.eq(tree))
        .execute(c))?;
    Ok(())
}

pub fn ping(conn: &mut DbConn) -> Result<(), DbError> {
    with_conn!(conn, |c| diesel::sql_query("SELECT 1").execute(c))?;
    Ok(())
}

pub fn recent_audit(conn: &mut DbConn, limit: i64) -> Result<Vec<AuditEvent>, DbError> {
    Ok(with_conn!(conn, |c| audit_log::table
        .order(audit_log::id.desc())
        .limit(limit)
        .select(AuditEvent::as_select())
        .load(c))?)
}

pub fn count_certificates(conn: &mut DbConn) -> Result<i64, DbError> {
    Ok(with_conn!(conn, |c| certificates::table.count().get_result(c))?)
}

pub fn count_certificates_in_state(conn: &mut DbConn, state: &str) -> Result<i64, DbError> {
    Ok(with_conn!(conn, |c| certificates::table.filter(certificates::state.eq(state)).count().get_result(c))?)
}

/// Distinct certificates delivered to asynchronous requests (coalesced ones share one).
pub fn count_async_issued_serials(conn: &mut DbConn) -> Result<i64, DbError> {
    Ok(with_conn!(conn, |c| requests::table
        .filter(requests::mode.eq(RequestMode::Async))
        .filter(requests::state.eq(RequestState::Issued))
        .select(diesel::dsl::count(requests::serial).aggregate_distinct())
        .get_result(c))?)
}

pub fn count_requests(conn: &mut DbConn) -> Result<i64, DbError> {
    Ok(with_conn!(conn, |c| requests::table.count().get_result(c))?)
}

/// What a state change is, for the audit log.
pub struct StateChange<'a> {
    pub actor: &'a str,
    pub instance: &'a str,
    pub now: i64,
}

impl StateChange<'_> {
    fn audit(&self, action: &str, target: &str, outcome: &str) -> NewAuditEvent {
        NewAuditEvent {
            at: self.now,
            instance: self.instance.to_string(),
            actor: self.actor.to_string(),
            action: action.to_string(),
            target: target.to_string(),
            outcome: outcome.to_string(),
            detail: String::new(),
        }
    }
}

/// The channel every instance LISTENs on; the payload is the new registry version.
pub const REGISTRY_CHANNEL: &str = "castellum_registry";

/// Tell other instances the registry changed: NOTIFY on PostgreSQL (delivered when, and only
/// if, the transaction commits); SQLite serves one instance, which reloads directly.
trait NotifyRegistry {
    fn notify_registry(&mut self, version: i64) -> QueryResult<()>;
}

impl NotifyRegistry for diesel::SqliteConnection {
    fn notify_registry(&mut self, _version: i64) -> QueryResult<()> {
        Ok(())
    }
}

impl NotifyRegistry for diesel::PgConnection {
    fn notify_registry(&mut self, version: i64) -> QueryResult<()> {
        diesel::sql_query(format!("NOTIFY {REGISTRY_CHANNEL}, '{version}'")).execute(self).map(|_| ())
    }
}

/// The state nothing leaves (a retired CA's key is destroyed; no profile is ever in it).
const FINAL_STATE: &str = CaState::Retired.as_str();

macro_rules! set_state_fn {
    ($(#[$doc:meta])* $name:ident, $state:ty, $table:ident, $kind:literal) => {
        $(#[$doc])*
        pub fn $name(conn: &mut DbConn, id: &str, state: $state, change: &StateChange) -> Result<Option<i64>, DbError> {
            let state = state.as_str();
            let audit = change.audit(concat!($kind, ".state"), id, state);
            let outcome = write_transaction!(conn, |c| {
                // Conditional in the database itself, so no instance (one that has not heard of the
                // change yet, or a concurrent call) can take a row out of its final state.
                let changed = diesel::update(
                    $table::table.find(id).filter($table::state.ne(FINAL_STATE).or($table::state.eq(state))),
                )
                .set(($table::state.eq(state), $table::updated_at.eq(change.now)))
                .execute(c)?;
                if changed == 0 {
                    let exists = $table::table.find(id).count().get_result::<i64>(c)? > 0;
                    return diesel::QueryResult::Ok(if exists { Err(()) } else { Ok(None) });
                }
                diesel::update(registry::table.filter(registry::id.eq(1)))
                    .set(registry::version.eq(registry::version + 1i64))
                    .execute(c)?;
                let version = registry::table.select(registry::version).first::<i64>(c)?;
                c.append_audit(std::slice::from_ref(&audit))?;
                c.notify_registry(version)?;
                diesel::QueryResult::Ok(Ok(Some(version)))
            })?;
            outcome.map_err(|()| DbError::FinalState(format!("{} {id:?} is {FINAL_STATE}: that state is final", $kind)))
        }
    };
}

set_state_fn!(
    /// Change a CA's state, bump the registry version, audit, and notify, in one transaction.
    /// `None` if there is no such CA.
    set_ca_state, CaState, cas, "ca"
);
set_state_fn!(
    /// Change a profile's state (same guarantees as [`set_ca_state`]).
    set_profile_state, ProfileState, profiles, "profile"
);

/// Take up to `limit` parked requests of a CA (oldest first) for resubmission.
pub fn claim_parked(
    conn: &mut DbConn,
    ca: &str,
    limit: i64,
    instance: &str,
    now: i64,
    until: i64,
) -> Result<Vec<RequestRow>, DbError> {
    let candidates: Vec<RequestRow> = with_conn!(conn, |c| requests::table
        .filter(requests::ca_id.eq(ca))
        .filter(requests::state.eq(RequestState::Parked))
        .order(requests::created_at.asc())
        .limit(limit)
        .select(RequestRow::as_select())
        .load(c))?;
    let mut claimed = Vec::new();
    for row in candidates {
        if claim_request(conn, &row.id, instance, now, until, &[RequestState::Parked])? {
            claimed.push(row);
        }
    }
    Ok(claimed)
}

pub fn count_parked(conn: &mut DbConn, ca: &str) -> Result<i64, DbError> {
    Ok(with_conn!(conn, |c| requests::table
        .filter(requests::ca_id.eq(ca))
        .filter(requests::state.eq(RequestState::Parked))
        .count()
        .get_result(c))?)
}

/// One instance's heartbeat row: id, started at, last heartbeat, registry version, address,
/// and the actor tree it last published (JSON).
pub type InstanceRow = (String, i64, i64, i64, String, String);

/// Heartbeats of every instance sharing this database.
pub fn instances(conn: &mut DbConn) -> Result<Vec<InstanceRow>, DbError> {
    Ok(with_conn!(conn, |c| instances::table
        .select((
            instances::id,
            instances::started_at,
            instances::heartbeat_at,
            instances::registry_version,
            instances::address,
            instances::tree,
        ))
        .order(instances::id.asc())
        .load(c))?)
}
