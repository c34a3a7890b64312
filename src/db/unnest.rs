//! PostgreSQL's batch statements: a batch's rows bound as one array per column and unnested by a
//! statement whose text does not depend on the batch's size. diesel keeps an insert of that kind
//! prepared (a type with a static `QueryId`, its cache key) and the server parses it once per
//! connection; a join against a table is planned on every run instead (`planned_each_run!`). diesel's own many-row `INSERT … VALUES` has a text for every batch size, and
//! `sql_query` is never kept: the server parsed and planned each of those on every run. The audit
//! rows' statement is `db::audit`'s, written with the same two macros.

use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment};
use diesel::sql_types::{BigInt, Binary, Integer, Nullable, Text};

use super::models::{CertificateRow, TBS_ONCE_ISSUED};
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
            $out.push_bind_param::<diesel::sql_types::Array<$sql_type>, _>($values)?;
            $out.push_sql($cast);
        )+
        $out.push_sql($suffix);
        Ok(())
    }};
}

/// A query diesel keeps prepared: its type, whatever its lifetimes, is its cache key.
macro_rules! kept_prepared {
    ($name:ident) => {
        impl diesel::query_builder::QueryId for $name<'_> {
            type QueryId = $name<'static>;
            const HAS_STATIC_QUERY_ID: bool = true;
        }

        impl<Conn> diesel::RunQueryDsl<Conn> for $name<'_> {}
    };
}

/// A query planned on every run, with the batch's arrays in view: a join of a batch against a
/// large table. Kept prepared, PostgreSQL would plan it once generically, from the table's size
/// when the connection first ran it; a plan made while the table was small (a hash join over a
/// sequential scan) stays with the connection as the table grows, until statistics change —
/// never, without autovacuum. Measured: PostgreSQL's CPU per issuance went from ~105 µs to
/// 640–770 µs within a run that started on an empty database.
macro_rules! planned_each_run {
    ($name:ident) => {
        impl diesel::query_builder::QueryId for $name<'_> {
            type QueryId = ();
            const HAS_STATIC_QUERY_ID: bool = false;
        }

        impl<Conn> diesel::RunQueryDsl<Conn> for $name<'_> {}
    };
}

pub(super) use {kept_prepared, walk_arrays};

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
    pub fn new(rows: impl Iterator<Item = &'a CertificateRow> + Clone) -> InsertCertificates<'a> {
        let rows = || rows.clone();
        InsertCertificates {
            serial: rows().map(|r| r.serial.as_str()).collect(),
            ca_id: rows().map(|r| r.ca_id.as_str()).collect(),
            profile: rows().map(|r| r.profile.as_str()).collect(),
            client: rows().map(|r| r.client.as_str()).collect(),
            request_id: rows().map(|r| r.request_id.as_deref()).collect(),
            state: rows().map(|r| r.state.as_str()).collect(),
            tbs_der: rows().map(|r| r.tbs_der.as_slice()).collect(),
            cert_der: rows().map(|r| r.cert_der.as_deref()).collect(),
            not_before: rows().map(|r| r.not_before).collect(),
            not_after: rows().map(|r| r.not_after).collect(),
            created_at: rows().map(|r| r.created_at).collect(),
            issued_at: rows().map(|r| r.issued_at).collect(),
            revoked_at: rows().map(|r| r.revoked_at).collect(),
            revocation_reason: rows().map(|r| r.revocation_reason).collect(),
            crl_shard: rows().map(|r| r.crl_shard).collect(),
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

/// Signed certificates: `UPDATE certificates … FROM unnest(…)`, their record leaving `signing`
/// (planned on every run: a join).
pub struct MarkIssued<'a> {
    pub serial: Vec<&'a str>,
    pub cert_der: Vec<&'a [u8]>,
    pub issued_at: Vec<i64>,
}

planned_each_run!(MarkIssued);

impl QueryFragment<Pg> for MarkIssued<'_> {
    fn walk_ast<'q>(&'q self, mut out: AstPass<'_, 'q, Pg>) -> QueryResult<()> {
        out.unsafe_to_cache_prepared();
        out.push_sql("UPDATE certificates SET state = ");
        out.push_bind_param::<Text, str>(CertState::Issued.as_str())?;
        out.push_sql(", tbs_der = ");
        out.push_bind_param::<Binary, [u8]>(TBS_ONCE_ISSUED)?;
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

/// Links of the audit chain written onto their rows: `UPDATE audit_log … FROM unnest(…)` (planned
/// on every run: a join).
pub struct SealLinks<'a> {
    pub id: Vec<i64>,
    pub seq: Vec<i64>,
    pub prev_hash: Vec<&'a str>,
    pub hash: Vec<&'a str>,
}

planned_each_run!(SealLinks);

impl QueryFragment<Pg> for SealLinks<'_> {
    fn walk_ast<'q>(&'q self, mut out: AstPass<'_, 'q, Pg>) -> QueryResult<()> {
        out.unsafe_to_cache_prepared();
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
