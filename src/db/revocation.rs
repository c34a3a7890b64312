//! Revocation's reads and writes: revoking (one certificate, or a CA's whole population in
//! chunks), and the CRL shards' bookkeeping (stale marks, the generation lease, the latest CRL).
//!
//! A revocation and the stale mark on its shard commit together, so a CRL made afterwards
//! either lists the certificate or is made again.

use diesel::prelude::*;

use super::audit::AppendAudit;
use super::models::{CrlShardRow, NewAuditEvent};
use super::schema::{certificates, crl_shards};
use super::DbConn;
use crate::error::DbError;
use crate::states::CertState;
use crate::{with_conn, write_transaction};

/// A certificate's revocation as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revocation {
    pub at: i64,
    /// RFC 5280 CRLReason code.
    pub reason: i32,
}

/// What revoking a certificate did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeOutcome {
    /// Revoked now.
    Revoked(Revocation),
    /// It was already revoked: the first time and reason stand; nothing was written.
    AlreadyRevoked(Revocation),
}

/// Who asks: a client may revoke only its own certificates.
#[derive(Debug, Clone, Copy)]
pub enum Revoker<'a> {
    Owner(&'a str),
    Admin,
}

/// Mark a shard's CRL stale (creating its row if this is its first revocation) and bump its
/// revision. A macro: one body for each backend's connection type (see `with_conn!`).
macro_rules! mark_stale {
    ($c:expr, $ca:expr, $shard:expr, $now:expr) => {{
        diesel::insert_into(crl_shards::table)
            .values((crl_shards::ca_id.eq($ca), crl_shards::shard.eq($shard)))
            .on_conflict_do_nothing()
            .execute($c)?;
        diesel::update(crl_shards::table.find(($ca, $shard)))
            .set(crl_shards::revision.eq(crl_shards::revision + 1i64))
            .execute($c)?;
        diesel::update(crl_shards::table.find(($ca, $shard)).filter(crl_shards::stale_since.is_null()))
            .set(crl_shards::stale_since.eq($now))
            .execute($c)?;
    }};
}

/// Revoke one issued certificate, mark its shard stale and audit it, in one transaction.
/// `None`: no such issued certificate (or, for an owner, not theirs).
pub fn revoke(
    conn: &mut DbConn,
    serial: &str,
    by: Revoker<'_>,
    revocation: Revocation,
    audit: &NewAuditEvent,
) -> Result<Option<RevokeOutcome>, DbError> {
    // A plain read first: a refusal (no such serial, another client's) takes no write lock, so a
    // flood of them cannot hold up the Store on SQLite.
    let owner = with_conn!(conn, |c| certificates::table
        .find(serial)
        .select(certificates::client)
        .first::<String>(c)
        .optional())?;
    match (owner, by) {
        (None, _) => return Ok(None),
        (Some(owner), Revoker::Owner(asker)) if owner != asker => return Ok(None),
        _ => {}
    }
    Ok(write_transaction!(conn, |c| {
        // The change first, conditional on `issued` (and the owner): of two concurrent
        // revocations exactly one changes the row, and the other reads the first one's.
        let target = certificates::table.find(serial).filter(certificates::state.eq(CertState::Issued));
        let update = diesel::update(target).set((
            certificates::state.eq(CertState::Revoked),
            certificates::revoked_at.eq(revocation.at),
            certificates::revocation_reason.eq(revocation.reason),
        ));
        let changed = match by {
            Revoker::Owner(owner) => update.filter(certificates::client.eq(owner)).execute(c)?,
            Revoker::Admin => update.execute(c)?,
        };
        let row = certificates::table
            .find(serial)
            .select((
                certificates::ca_id,
                certificates::client,
                certificates::state,
                certificates::crl_shard,
                certificates::revoked_at,
                certificates::revocation_reason,
            ))
            .first::<(String, String, CertState, Option<i32>, Option<i64>, Option<i32>)>(c)
            .optional()?;
        let Some((ca, client, state, shard, revoked_at, reason)) = row else { return Ok(None) };
        if matches!(by, Revoker::Owner(owner) if owner != client) {
            return Ok(None);
        }
        if changed == 1 {
            mark_stale!(c, &ca, shard.unwrap_or(0), revocation.at);
            c.append_audit(std::slice::from_ref(audit))?;
            return Ok(Some(RevokeOutcome::Revoked(revocation)));
        }
        diesel::result::QueryResult::Ok(match state {
            CertState::Signing | CertState::Abandoned | CertState::Issued => None,
            CertState::Revoked => Some(RevokeOutcome::AlreadyRevoked(Revocation {
                at: revoked_at.unwrap_or_default(),
                reason: reason.unwrap_or_default(),
            })),
        })
    })?)
}

/// Revoke up to `limit` issued certificates of `ca` in one transaction (a CA's whole population
/// is revoked by calling this until it returns 0, so no transaction holds the database long).
/// Marks every one of the CA's `shards` stale; returns how many were revoked; audits the chunk
/// as one event. The UPDATE comes first, so on SQLite the transaction takes the write lock at
/// once (waiting its turn) rather than upgrading a read and failing if a commit came between.
pub fn revoke_chunk_of_ca(
    conn: &mut DbConn,
    ca: &str,
    shards: u32,
    revocation: Revocation,
    limit: i64,
    audit: impl Fn(usize) -> NewAuditEvent,
) -> Result<usize, DbError> {
    Ok(write_transaction!(conn, |c| {
        let issued = diesel::alias!(certificates as issued);
        let chunk = issued
            .filter(issued.field(certificates::ca_id).eq(ca))
            .filter(issued.field(certificates::state).eq(CertState::Issued))
            .select(issued.field(certificates::serial))
            .limit(limit);
        let changed = diesel::update(certificates::table.filter(certificates::serial.eq_any(chunk)))
            .set((
                certificates::state.eq(CertState::Revoked),
                certificates::revoked_at.eq(revocation.at),
                certificates::revocation_reason.eq(revocation.reason),
            ))
            .execute(c)?;
        if changed == 0 {
            return diesel::result::QueryResult::Ok(0);
        }
        for shard in 0..shards as i32 {
            mark_stale!(c, ca, shard, revocation.at);
        }
        c.append_audit(&[audit(changed)])?;
        Ok(changed)
    })?)
}

/// Make sure every shard of `ca` below `shards` has a row (so the generator makes its CRL,
/// revoked or not).
pub fn ensure_shards(conn: &mut DbConn, ca: &str, shards: u32) -> Result<(), DbError> {
    let rows: Vec<_> =
        (0..shards as i32).map(|shard| (crl_shards::ca_id.eq(ca), crl_shards::shard.eq(shard))).collect();
    write_transaction!(conn, |c| diesel::insert_into(crl_shards::table)
        .values(&rows)
        .on_conflict_do_nothing()
        .execute(c))?;
    Ok(())
}

/// Every shard's bookkeeping, without the CRLs themselves.
pub fn shards(conn: &mut DbConn) -> Result<Vec<CrlShardRow>, DbError> {
    Ok(with_conn!(conn, |c| crl_shards::table.select(CrlShardRow::as_select()).load(c))?)
}

/// How many revoked certificates each CA's CRLs list (not expired before `now`).
pub fn revoked_counts(conn: &mut DbConn, now: i64) -> Result<Vec<(String, i64)>, DbError> {
    Ok(with_conn!(conn, |c| certificates::table
        .filter(certificates::revoked_at.is_not_null())
        .filter(certificates::not_after.ge(now))
        .group_by(certificates::ca_id)
        .select((certificates::ca_id, diesel::dsl::count_star()))
        .load(c))?)
}

/// Take the lease to generate a shard's CRL: free, expired, or already ours. True if taken.
pub fn take_lease(conn: &mut DbConn, ca: &str, shard: i32, me: &str, now: i64, until: i64) -> Result<bool, DbError> {
    let taken = write_transaction!(conn, |c| diesel::update(crl_shards::table.find((ca, shard)).filter(
        crl_shards::lease_owner.is_null().or(crl_shards::lease_owner.eq(me)).or(crl_shards::lease_until.lt(now))
    ))
    .set((crl_shards::lease_owner.eq(me), crl_shards::lease_until.eq(until)))
    .execute(c))?;
    Ok(taken == 1)
}

/// The revoked certificates a shard's CRL lists: those not expired before `expired_before`
/// (serial, revoked at, reason). Certificates from before shards existed are on shard 0.
pub fn revoked_on_shard(
    conn: &mut DbConn,
    ca: &str,
    shard: i32,
    expired_before: i64,
) -> Result<Vec<(String, i64, i32)>, DbError> {
    let rows = with_conn!(conn, |c| {
        let on_shard = certificates::crl_shard.eq(shard);
        let base = certificates::table
            .filter(certificates::ca_id.eq(ca))
            .filter(certificates::revoked_at.is_not_null())
            .filter(certificates::not_after.ge(expired_before));
        let query = base
            .select((
                certificates::serial,
                certificates::revoked_at.assume_not_null(),
                certificates::revocation_reason.assume_not_null(),
            ))
            .into_boxed();
        if shard == 0 {
            query.filter(on_shard.or(certificates::crl_shard.is_null())).load::<(String, i64, i32)>(c)
        } else {
            query.filter(on_shard).load::<(String, i64, i32)>(c)
        }
    })?;
    Ok(rows)
}

/// A newly made CRL, to store if this instance still holds the lease and nobody stored a later
/// number meanwhile.
pub struct NewCrl<'a> {
    pub ca: &'a str,
    pub shard: i32,
    /// The number of the CRL this one replaces; the new one is `previous_number + 1`.
    pub previous_number: i64,
    pub this_update: i64,
    pub next_update: i64,
    pub der: &'a [u8],
    /// The shard's revision read before its entries: the stale mark is cleared only if no
    /// revocation came since.
    pub revision: i64,
    pub me: &'a str,
}

/// Store a CRL and release the lease. False if it was not stored (lease lost, or a later CRL).
pub fn store_crl(conn: &mut DbConn, crl: &NewCrl<'_>) -> Result<bool, DbError> {
    let stored = write_transaction!(conn, |c| {
        let stored = diesel::update(
            crl_shards::table
                .find((crl.ca, crl.shard))
                .filter(crl_shards::lease_owner.eq(crl.me))
                .filter(crl_shards::crl_number.eq(crl.previous_number)),
        )
        .set((
            crl_shards::crl_number.eq(crl.previous_number + 1),
            crl_shards::this_update.eq(crl.this_update),
            crl_shards::next_update.eq(crl.next_update),
            crl_shards::der.eq(crl.der),
            crl_shards::lease_owner.eq(None::<String>),
            crl_shards::lease_until.eq(None::<i64>),
        ))
        .execute(c)?;
        if stored == 1 {
            diesel::update(crl_shards::table.find((crl.ca, crl.shard)).filter(crl_shards::revision.eq(crl.revision)))
                .set(crl_shards::stale_since.eq(None::<i64>))
                .execute(c)?;
        }
        diesel::result::QueryResult::Ok(stored == 1)
    })?;
    Ok(stored)
}

/// The latest CRL of a shard: (number, nextUpdate, DER).
pub fn latest_crl(conn: &mut DbConn, ca: &str, shard: i32) -> Result<Option<(i64, i64, Vec<u8>)>, DbError> {
    let row = with_conn!(conn, |c| crl_shards::table
        .find((ca, shard))
        .filter(crl_shards::der.is_not_null())
        .select((crl_shards::crl_number, crl_shards::next_update.assume_not_null(), crl_shards::der.assume_not_null()))
        .first::<(i64, i64, Vec<u8>)>(c)
        .optional())?;
    Ok(row)
}
