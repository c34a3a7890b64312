//! Rows as the engine reads and writes them.

use diesel::prelude::*;

use super::schema::{audit_log, certificates, crl_shards, identities, requests};
use crate::states::{CertState, IdentityState, RequestMode, RequestState};

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(treat_none_as_default_value = false)]
#[diesel(table_name = requests)]
pub struct RequestRow {
    pub id: String,
    pub client: String,
    pub profile: String,
    pub ca_id: String,
    pub mode: RequestMode,
    pub state: RequestState,
    pub idempotency_key: Option<String>,
    pub body_sha256: String,
    pub csr_der: Vec<u8>,
    pub serial: Option<String>,
    pub error_type: Option<String>,
    pub error_detail: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub expires_at: i64,
    pub claimed_by: Option<String>,
    pub claimed_until: Option<i64>,
}

/// What a record's `tbs_der` holds once its certificate is stored: nothing. The certificate
/// contains its TBS byte for byte, so keeping both stored every certificate's ~560 B twice (28%
/// of a stored certificate); the write-ahead record needs its TBS only while it is `signing`.
/// Rows stored before this rule keep theirs.
pub const TBS_ONCE_ISSUED: &[u8] = &[];

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(treat_none_as_default_value = false)]
#[diesel(table_name = certificates)]
pub struct CertificateRow {
    pub serial: String,
    pub ca_id: String,
    pub profile: String,
    pub client: String,
    pub request_id: Option<String>,
    pub state: CertState,
    /// The write-ahead record's to-be-signed certificate, until the certificate is stored; then
    /// empty ([`TBS_ONCE_ISSUED`]), since the certificate holds the same bytes.
    pub tbs_der: Vec<u8>,
    pub cert_der: Option<Vec<u8>>,
    pub not_before: i64,
    pub not_after: i64,
    pub created_at: i64,
    pub issued_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub revocation_reason: Option<i32>,
    /// The CRL shard its distribution point names (none before revocation existed: shard 0).
    pub crl_shard: Option<i32>,
}

/// A disposable identity. `sealed_key` is the private key sealed under the KEK (never plaintext);
/// it is `None` once the identity is destroyed.
#[derive(Clone, Queryable, Selectable, Insertable)]
#[diesel(treat_none_as_default_value = false)]
#[diesel(table_name = identities)]
pub struct IdentityRow {
    pub id: String,
    pub client: String,
    pub profile: String,
    pub ca_id: String,
    pub serial: String,
    pub key_type: String,
    pub signature_scheme: String,
    pub state: IdentityState,
    pub sealed_key: Option<Vec<u8>>,
    pub kek_id: String,
    pub uses: i64,
    pub max_uses: i64,
    pub created_at: i64,
    pub expires_at: i64,
    pub destroyed_at: Option<i64>,
    pub destroy_reason: Option<String>,
}

impl std::fmt::Debug for IdentityRow {
    // Even sealed, key bytes have no business in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityRow")
            .field("id", &self.id)
            .field("client", &self.client)
            .field("state", &self.state)
            .field("uses", &self.uses)
            .field("max_uses", &self.max_uses)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Insertable)]
#[diesel(treat_none_as_default_value = false)]
#[diesel(table_name = audit_log)]
pub struct NewAuditEvent {
    pub at: i64,
    pub instance: String,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub detail: String,
}

/// An audit row as the audit writer inserts it: a single event (`count` 1, no `first_at`), or
/// `count` refusals of one kind seen from `first_at` to `at`.
#[derive(Debug, Clone, Insertable)]
#[diesel(treat_none_as_default_value = false)]
#[diesel(table_name = audit_log)]
pub struct NewAuditRow {
    pub at: i64,
    pub instance: String,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub detail: String,
    pub count: i64,
    pub first_at: Option<i64>,
}

impl From<NewAuditEvent> for NewAuditRow {
    fn from(e: NewAuditEvent) -> NewAuditRow {
        let NewAuditEvent { at, instance, actor, action, target, outcome, detail } = e;
        NewAuditRow { at, instance, actor, action, target, outcome, detail, count: 1, first_at: None }
    }
}

#[derive(Debug, Clone, Queryable, Selectable, serde::Serialize)]
#[diesel(table_name = audit_log)]
pub struct AuditEvent {
    pub id: i64,
    pub at: i64,
    pub instance: String,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub detail: String,
    /// How many refusals this row stands for (1 for a single event).
    pub count: i64,
    pub first_at: Option<i64>,
}

/// One CRL shard of a CA: its latest CRL and the bookkeeping of who makes the next one.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = crl_shards)]
pub struct CrlShardRow {
    pub ca_id: String,
    pub shard: i32,
    pub crl_number: i64,
    pub this_update: Option<i64>,
    pub next_update: Option<i64>,
    #[diesel(select_expression = crl_shards::der.is_not_null())]
    #[diesel(select_expression_type = diesel::dsl::IsNotNull<crl_shards::der>)]
    pub has_crl: bool,
    /// When a revocation on this shard made its CRL stale (cleared when a CRL is stored).
    pub stale_since: Option<i64>,
    /// Bumped by every revocation on the shard: a CRL made from entries read after revision R
    /// clears `stale_since` only if the revision is still R.
    pub revision: i64,
    pub lease_owner: Option<String>,
    pub lease_until: Option<i64>,
}

/// What the chain covers of a row (its database `id` is not covered: it is not the chain's
/// order, and a restore may renumber it).
#[derive(Debug, Clone, Copy)]
pub struct AuditFields<'a> {
    pub at: i64,
    pub instance: &'a str,
    pub actor: &'a str,
    pub action: &'a str,
    pub target: &'a str,
    pub outcome: &'a str,
    pub detail: &'a str,
    pub count: i64,
    pub first_at: Option<i64>,
}

/// A row the chain can cover, as written or as read back.
pub trait AuditEntry {
    fn fields(&self) -> AuditFields<'_>;
}

/// A row's fields as the chain covers them, with its count and first time.
macro_rules! audit_fields {
    ($row:expr, $count:expr, $first_at:expr) => {
        AuditFields {
            at: $row.at,
            instance: &$row.instance,
            actor: &$row.actor,
            action: &$row.action,
            target: &$row.target,
            outcome: &$row.outcome,
            detail: &$row.detail,
            count: $count,
            first_at: $first_at,
        }
    };
}

impl AuditEntry for NewAuditEvent {
    fn fields(&self) -> AuditFields<'_> {
        // The columns' defaults: a single event.
        audit_fields!(self, 1, None)
    }
}

impl AuditEntry for NewAuditRow {
    fn fields(&self) -> AuditFields<'_> {
        audit_fields!(self, self.count, self.first_at)
    }
}
