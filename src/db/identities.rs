//! Queries on disposable identities. Counting a use, destroying after the last one, and the
//! audit events for both happen in one transaction, so an identity can never sign more often
//! than its profile allows, whichever instance serves the request.

use diesel::prelude::*;

use super::audit::AppendAudit;
use super::models::{IdentityRow, NewAuditEvent};
use super::schema::identities;
use super::writes::{IdentityUse, WriteOutcome};
use super::DbConn;
use crate::error::DbError;
use crate::states::IdentityState;
use crate::{with_conn, write_transaction};

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

    /// Destroy one active identity; 1 if this call destroyed it, 0 if it was not active.
    fn destroy_identity(&mut self, id: &str, at: i64, reason: &str) -> QueryResult<usize>;

    /// The sweep, inside the caller's write transaction: destroy up to `limit` expired
    /// identities, in id order, auditing each one this call destroyed.
    fn destroy_expired(&mut self, now: i64, instance: &str, limit: i64) -> QueryResult<usize>;
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
                        .filter(identities::state.eq(IdentityState::Active))
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
                        self.destroy_identity(id, at, destroy_reason::USED)?;
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
                    .first::<(String, IdentityState, i64, Option<String>)>(self)
                    .optional()?;
                let Some((owner, state, expires_at, reason)) = found else { return Ok(WriteOutcome::IdentityNotFound) };
                if owner != client {
                    return Ok(WriteOutcome::IdentityNotFound);
                }
                // Found expired before the sweep: destroyed now (and audited by whoever did).
                let mut reason = reason;
                let mut expired_now = false;
                if state == IdentityState::Active && expires_at <= at {
                    expired_now = self.destroy_identity(id, at, destroy_reason::EXPIRED)? == 1;
                    if expired_now {
                        audit.push(audit_event(
                            at,
                            instance,
                            client,
                            "identity.destroy",
                            id,
                            destroy_reason::EXPIRED,
                            String::new(),
                        ));
                        reason = Some(destroy_reason::EXPIRED.to_string());
                    } else {
                        // Destroyed meanwhile by another instance: say what it recorded.
                        reason = identities::table.find(id).select(identities::destroy_reason).first(self)?;
                    }
                }
                let reason = reason.unwrap_or_else(|| {
                    if expires_at <= at { destroy_reason::EXPIRED } else { destroy_reason::USED }.to_string()
                });
                audit.push(audit_event(at, instance, client, "identity.sign", id, "gone", reason.clone()));
                let why = match reason.as_str() {
                    destroy_reason::EXPIRED => "the identity has expired and its key is destroyed".into(),
                    _ => "the identity has made all its signatures and its key is destroyed".into(),
                };
                Ok(WriteOutcome::IdentityGone { why, expired_now })
            }

            fn destroy_identity(&mut self, id: &str, at: i64, reason: &str) -> QueryResult<usize> {
                diesel::update(identities::table.find(id).filter(identities::state.eq(IdentityState::Active)))
                    .set((
                        identities::state.eq(IdentityState::Destroyed),
                        identities::sealed_key.eq(None::<Vec<u8>>),
                        identities::destroyed_at.eq(Some(at)),
                        identities::destroy_reason.eq(Some(reason)),
                    ))
                    .execute(self)
            }

            fn destroy_expired(&mut self, now: i64, instance: &str, limit: i64) -> QueryResult<usize> {
                let c = self;
                let expired: Vec<(String, String)> = identities::table
                    .filter(identities::state.eq(IdentityState::Active))
                    .filter(identities::expires_at.le(now))
                    .order(identities::id.asc())
                    .limit(limit)
                    .select((identities::id, identities::client))
                    .load(c)?;
                let mut events = Vec::new();
                for (id, client) in &expired {
                    // Another instance's sweep, or a last use, may have got there first.
                    if c.destroy_identity(id, now, destroy_reason::EXPIRED)? == 1 {
                        events.push(audit_event(
                            now,
                            instance,
                            "castellum",
                            "identity.destroy",
                            id,
                            destroy_reason::EXPIRED,
                            format!("client={client}"),
                        ));
                    }
                }
                if !events.is_empty() {
                    c.append_audit(&events)?;
                }
                Ok(events.len())
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
/// transaction. Returns how many this call destroyed.
pub fn destroy_expired(conn: &mut DbConn, now: i64, instance: &str, limit: i64) -> Result<usize, DbError> {
    Ok(write_transaction!(conn, |c| c.destroy_expired(now, instance, limit))?)
}
