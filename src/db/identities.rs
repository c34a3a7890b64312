//! Queries on disposable identities. Counting a use, destroying after the last one, and the
//! audit events for both happen in one transaction, so an identity can never sign more often
//! than its profile allows, whichever instance serves the request.

use diesel::prelude::*;

use super::models::{identity_state, IdentityRow, NewAuditEvent};
use super::queries::WriteOutcome;
use super::schema::{audit_log, identities};
use super::DbConn;
use crate::error::DbError;
use crate::with_conn;

/// A use granted: the identity as it was when the use was counted (with its sealed key, which
/// the caller opens to sign), and whether that was its last use.
#[derive(Debug, Clone)]
pub struct IdentityUse {
    pub row: IdentityRow,
    pub destroyed: bool,
}

/// Why an identity was destroyed, as stored and audited.
pub mod destroy_reason {
    pub const USED: &str = "used";
    pub const EXPIRED: &str = "expired";
}

fn audit_event(
    at: i64,
    instance: &str,
    actor: &str,
    action: &str,
    id: &str,
    outcome: &str,
    detail: String,
) -> NewAuditEvent {
    NewAuditEvent {
        at,
        instance: instance.to_string(),
        actor: actor.to_string(),
        action: action.to_string(),
        target: id.to_string(),
        outcome: outcome.to_string(),
        detail,
    }
}

/// Written once per backend (diesel compiles each query for one connection type).
pub(super) trait IdentityOps {
    /// Inside the Store's transaction: count a use of `id` by `client`, destroy it after its
    /// last use (or when found expired), and push the audit events.
    fn use_identity(
        &mut self,
        id: &str,
        client: &str,
        at: i64,
        instance: &str,
        digest_algorithm: &str,
        audit: &mut Vec<NewAuditEvent>,
    ) -> QueryResult<WriteOutcome>;

    fn destroy_identities(&mut self, ids: &[String], at: i64, reason: &str) -> QueryResult<usize>;
}

macro_rules! identity_ops {
    ($conn:ty) => {
        impl IdentityOps for $conn {
            fn use_identity(
                &mut self,
                id: &str,
                client: &str,
                at: i64,
                instance: &str,
                digest_algorithm: &str,
                audit: &mut Vec<NewAuditEvent>,
            ) -> QueryResult<WriteOutcome> {
                let counted = diesel::update(
                    identities::table
                        .filter(identities::id.eq(id))
                        .filter(identities::client.eq(client))
                        .filter(identities::state.eq(identity_state::ACTIVE))
                        .filter(identities::uses.lt(identities::max_uses))
                        .filter(identities::expires_at.gt(at)),
                )
                .set(identities::uses.eq(identities::uses + 1i64))
                .execute(self)?;
                if counted == 1 {
                    let row = identities::table.find(id).select(IdentityRow::as_select()).first(self)?;
                    audit.push(audit_event(
                        at,
                        instance,
                        client,
                        "identity.sign",
                        id,
                        "authorized",
                        format!("use {} of {}, {digest_algorithm}", row.uses, row.max_uses),
                    ));
                    let destroyed = row.uses >= row.max_uses;
                    if destroyed {
                        self.destroy_identities(&[id.to_string()], at, destroy_reason::USED)?;
                        audit.push(audit_event(
                            at,
                            instance,
                            client,
                            "identity.destroy",
                            id,
                            destroy_reason::USED,
                            String::new(),
                        ));
                    }
                    return Ok(WriteOutcome::IdentityUsed(Box::new(IdentityUse { row, destroyed })));
                }
                let found = identities::table
                    .find(id)
                    .select((identities::client, identities::state, identities::expires_at, identities::destroy_reason))
                    .first::<(String, String, i64, Option<String>)>(self)
                    .optional()?;
                let Some((owner, state, expires_at, reason)) = found else { return Ok(WriteOutcome::IdentityNotFound) };
                if owner != client {
                    return Ok(WriteOutcome::IdentityNotFound);
                }
                let reason = if state == identity_state::ACTIVE && expires_at <= at {
                    // Found expired before the sweep: destroyed now.
                    self.destroy_identities(&[id.to_string()], at, destroy_reason::EXPIRED)?;
                    audit.push(audit_event(
                        at,
                        instance,
                        client,
                        "identity.destroy",
                        id,
                        destroy_reason::EXPIRED,
                        String::new(),
                    ));
                    destroy_reason::EXPIRED.to_string()
                } else {
                    reason.unwrap_or_else(|| destroy_reason::USED.to_string())
                };
                audit.push(audit_event(at, instance, client, "identity.sign", id, "gone", reason.clone()));
                Ok(WriteOutcome::IdentityGone(match reason.as_str() {
                    destroy_reason::EXPIRED => "the identity has expired and its key is destroyed".into(),
                    _ => "the identity has made all its signatures and its key is destroyed".into(),
                }))
            }

            fn destroy_identities(&mut self, ids: &[String], at: i64, reason: &str) -> QueryResult<usize> {
                diesel::update(
                    identities::table
                        .filter(identities::id.eq_any(ids))
                        .filter(identities::state.eq(identity_state::ACTIVE)),
                )
                .set((
                    identities::state.eq(identity_state::DESTROYED),
                    identities::sealed_key.eq(None::<Vec<u8>>),
                    identities::destroyed_at.eq(Some(at)),
                    identities::destroy_reason.eq(Some(reason)),
                ))
                .execute(self)
            }
        }
    };
}

identity_ops!(diesel::SqliteConnection);
identity_ops!(diesel::PgConnection);

pub fn load_identity(conn: &mut DbConn, id: &str) -> Result<Option<IdentityRow>, DbError> {
    Ok(with_conn!(conn, |c| identities::table.find(id).select(IdentityRow::as_select()).first(c).optional())?)
}

pub fn load_identity_by_serial(conn: &mut DbConn, serial: &str) -> Result<Option<IdentityRow>, DbError> {
    Ok(with_conn!(conn, |c| identities::table
        .filter(identities::serial.eq(serial))
        .select(IdentityRow::as_select())
        .first(c)
        .optional())?)
}

/// The sweep: destroy up to `limit` identities past their expiry, each audited, in one
/// transaction. Returns how many were destroyed.
pub fn destroy_expired(conn: &mut DbConn, now: i64, instance: &str, limit: i64) -> Result<usize, DbError> {
    Ok(with_conn!(conn, |c| c.transaction(|c| {
        let expired: Vec<(String, String)> = identities::table
            .filter(identities::state.eq(identity_state::ACTIVE))
            .filter(identities::expires_at.le(now))
            .order(identities::expires_at.asc())
            .limit(limit)
            .select((identities::id, identities::client))
            .load(c)?;
        if expired.is_empty() {
            return Ok(0);
        }
        let ids: Vec<String> = expired.iter().map(|(id, _)| id.clone()).collect();
        let n = c.destroy_identities(&ids, now, destroy_reason::EXPIRED)?;
        let events: Vec<NewAuditEvent> = expired
            .iter()
            .map(|(id, client)| {
                audit_event(
                    now,
                    instance,
                    "castellum",
                    "identity.destroy",
                    id,
                    destroy_reason::EXPIRED,
                    format!("client={client}"),
                )
            })
            .collect();
        diesel::insert_into(audit_log::table).values(&events).execute(c)?;
        diesel::QueryResult::Ok(n)
    }))?)
}
