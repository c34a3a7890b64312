//! PostgreSQL's batch statements: a batch's rows bound as one array per column and unnested by a
//! statement whose text does not depend on the batch's size. diesel keeps such a statement
//! prepared (each is a type with a static `QueryId`, its cache key) and the server parses it once
//! per connection. diesel's own many-row `INSERT … VALUES` has a text for every batch size, and
//! `sql_query` is never kept: the server parsed and planned each of those on every run.

use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::sql_types::{Array, BigInt, Binary, Integer, Nullable, Text};

use super::audit::AuditFields;
use super::models::CertificateRow;
use crate::states::CertState;

/// Write `prefix`, then each array as `$n::type[]` separated by commas, then `suffix`.
macro_rules! walk_arrays {
    ($out:ident, $prefix:expr, [$(($values:expr, $sql_type:ty, $cast:literal)),+ $(,)?], $suffix:expr) => {{
        $out.push_sql($prefix);
        let mut first = true;
        $(
            if !std::mem::take(&mut first) {
                $out.push_sql(", ");
            }
            $out.push_bind_param::<Array<$sql_type>, _>($values)?;
            $out.push_sql($cast);
        )+
        $out.push_sql($suffix);
        Ok(())
    }};
}

/// A query diesel keeps prepared: its type, whatever its lifetimes, is its cache key.
macro_rules! kept_prepared {
    ($name:ident) => {
        impl QueryId for $name<'_> {
            type QueryId = $name<'static>;
            const HAS_STATIC_QUERY_ID: bool = true;
        }

        impl<Conn> RunQueryDsl<Conn> for $name<'_> {}
    };
}

/// Write-ahead records: `INSERT INTO certificates (…) SELECT … FROM unnest(…)`, in the batch's order.
pub struct InsertCertificates<'a> {
    serial: Vec<&'a str>,
    ca_id: Vec<&'a str>,
    profile: Vec<&'a str>,
    client: Vec<&'a str>,
    request_id: Vec<Option<&'a str>>,
    state: Vec<&'a str>,
    tbs_der: Vec<&'a [u8]>,
    cert_der: Vec<Option<&'a [u8]>>,
    not_before: Vec<i64>,
    not_after: Vec<i64>,
    created_at: Vec<i64>,
    issued_at: Vec<Option<i64>>,
    revoked_at: Vec<Option<i64>>,
    revocation_reason: Vec<Option<i32>>,
    crl_shard: Vec<Option<i32>>,
}

impl<'a> InsertCertificates<'a> {
    pub fn new(rows: &'a [CertificateRow]) -> InsertCertificates<'a> {
        InsertCertificates {
            serial: rows.iter().map(|r| r.serial.as_str()).collect(),
            ca_id: rows.iter().map(|r| r.ca_id.as_str()).collect(),
            profile: rows.iter().map(|r| r.profile.as_str()).collect(),
            client: rows.iter().map(|r| r.client.as_str()).collect(),
            request_id: rows.iter().map(|r| r.request_id.as_deref()).collect(),
            state: rows.iter().map(|r| r.state.as_str()).collect(),
            tbs_der: rows.iter().map(|r| r.tbs_der.as_slice()).collect(),
            cert_der: rows.iter().map(|r| r.cert_der.as_deref()).collect(),
            not_before: rows.iter().map(|r| r.not_before).collect(),
            not_after: rows.iter().map(|r| r.not_after).collect(),
            created_at: rows.iter().map(|r| r.created_at).collect(),
            issued_at: rows.iter().map(|r| r.issued_at).collect(),
            revoked_at: rows.iter().map(|r| r.revoked_at).collect(),
            revocation_reason: rows.iter().map(|r| r.revocation_reason).collect(),
            crl_shard: rows.iter().map(|r| r.crl_shard).collect(),
        }
    }
}

kept_prepared!(InsertCertificates);

impl QueryFragment<Pg> for InsertCertificates<'_> {
    fn walk_ast<'q>(&'q self, mut out: AstPass<'_, 'q, Pg>) -> QueryResult<()> {
        walk_arrays!(
            out,
            "INSERT INTO certificates (serial, ca_id, profile, client, request_id, state, tbs_der, cert_der, \
             not_before, not_after, created_at, issued_at, revoked_at, revocation_reason, crl_shard) \
             SELECT serial, ca_id, profile, client, request_id, state, tbs_der, cert_der, not_before, not_after, \
             created_at, issued_at, revoked_at, revocation_reason, crl_shard FROM unnest(",
            [
                (&self.serial, Text, "::text[]"),
                (&self.ca_id, Text, "::text[]"),
                (&self.profile, Text, "::text[]"),
                (&self.client, Text, "::text[]"),
                (&self.request_id, Nullable<Text>, "::text[]"),
                (&self.state, Text, "::text[]"),
                (&self.tbs_der, Binary, "::bytea[]"),
                (&self.cert_der, Nullable<Binary>, "::bytea[]"),
                (&self.not_before, BigInt, "::int8[]"),
                (&self.not_after, BigInt, "::int8[]"),
                (&self.created_at, BigInt, "::int8[]"),
                (&self.issued_at, Nullable<BigInt>, "::int8[]"),
                (&self.revoked_at, Nullable<BigInt>, "::int8[]"),
                (&self.revocation_reason, Nullable<Integer>, "::int4[]"),
                (&self.crl_shard, Nullable<Integer>, "::int4[]"),
            ],
            ") WITH ORDINALITY AS u(serial, ca_id, profile, client, request_id, state, tbs_der, cert_der, not_before, \
             not_after, created_at, issued_at, revoked_at, revocation_reason, crl_shard, ord) ORDER BY ord"
        )
    }
}

/// Audit rows, unsealed (the audit writer seals them on PostgreSQL).
pub struct InsertAudit<'a> {
    at: Vec<i64>,
    instance: Vec<&'a str>,
    actor: Vec<&'a str>,
    action: Vec<&'a str>,
    target: Vec<&'a str>,
    outcome: Vec<&'a str>,
    detail: Vec<&'a str>,
    count: Vec<i64>,
    first_at: Vec<Option<i64>>,
}

impl<'a> InsertAudit<'a> {
    pub fn new(rows: impl Iterator<Item = AuditFields<'a>>) -> InsertAudit<'a> {
        let mut batch = InsertAudit {
            at: Vec::new(),
            instance: Vec::new(),
            actor: Vec::new(),
            action: Vec::new(),
            target: Vec::new(),
            outcome: Vec::new(),
            detail: Vec::new(),
            count: Vec::new(),
            first_at: Vec::new(),
        };
        for row in rows {
            batch.at.push(row.at);
            batch.instance.push(row.instance);
            batch.actor.push(row.actor);
            batch.action.push(row.action);
            batch.target.push(row.target);
            batch.outcome.push(row.outcome);
            batch.detail.push(row.detail);
            batch.count.push(row.count);
            batch.first_at.push(row.first_at);
        }
        batch
    }
}

kept_prepared!(InsertAudit);

impl QueryFragment<Pg> for InsertAudit<'_> {
    fn walk_ast<'q>(&'q self, mut out: AstPass<'_, 'q, Pg>) -> QueryResult<()> {
        walk_arrays!(
            out,
            "INSERT INTO audit_log (at, instance, actor, action, target, outcome, detail, count, first_at) \
             SELECT at, instance, actor, action, target, outcome, detail, count, first_at FROM unnest(",
            [
                (&self.at, BigInt, "::int8[]"),
                (&self.instance, Text, "::text[]"),
                (&self.actor, Text, "::text[]"),
                (&self.action, Text, "::text[]"),
                (&self.target, Text, "::text[]"),
                (&self.outcome, Text, "::text[]"),
                (&self.detail, Text, "::text[]"),
                (&self.count, BigInt, "::int8[]"),
                (&self.first_at, Nullable<BigInt>, "::int8[]"),
            ],
            // Ids (the order the audit writer seals in) follow the batch's order: SQL promises
            // the order of an ORDER BY, not of a bare unnest.
            ") WITH ORDINALITY AS u(at, instance, actor, action, target, outcome, detail, count, first_at, ord) \
             ORDER BY ord"
        )
    }
}

/// Signed certificates: `UPDATE certificates … FROM unnest(…)`, their record leaving `signing`.
pub struct MarkIssued<'a> {
    pub serial: Vec<&'a str>,
    pub cert_der: Vec<&'a [u8]>,
    pub issued_at: Vec<i64>,
}

kept_prepared!(MarkIssued);

impl QueryFragment<Pg> for MarkIssued<'_> {
    fn walk_ast<'q>(&'q self, mut out: AstPass<'_, 'q, Pg>) -> QueryResult<()> {
        out.push_sql("UPDATE certificates SET state = ");
        out.push_bind_param::<Text, str>(CertState::Issued.as_str())?;
        walk_arrays!(
            out,
            ", cert_der = u.cert_der, issued_at = u.issued_at FROM unnest(",
            [
                (&self.serial, Text, "::text[]"),
                (&self.cert_der, Binary, "::bytea[]"),
                (&self.issued_at, BigInt, "::int8[]"),
            ],
            ") AS u(serial, cert_der, issued_at) WHERE certificates.serial = u.serial"
        )
    }
}

/// Links of the audit chain written onto their rows: `UPDATE audit_log … FROM unnest(…)`.
pub struct SealLinks<'a> {
    pub id: Vec<i64>,
    pub seq: Vec<i64>,
    pub prev_hash: Vec<&'a str>,
    pub hash: Vec<&'a str>,
}

kept_prepared!(SealLinks);

impl QueryFragment<Pg> for SealLinks<'_> {
    fn walk_ast<'q>(&'q self, mut out: AstPass<'_, 'q, Pg>) -> QueryResult<()> {
        walk_arrays!(
            out,
            "UPDATE audit_log SET seq = v.seq, prev_hash = v.prev, hash = v.hash FROM unnest(",
            [
                (&self.id, BigInt, "::int8[]"),
                (&self.seq, BigInt, "::int8[]"),
                (&self.prev_hash, Text, "::text[]"),
                (&self.hash, Text, "::text[]"),
            ],
            ") AS v(id, seq, prev, hash) WHERE audit_log.id = v.id"
        )
    }
}
