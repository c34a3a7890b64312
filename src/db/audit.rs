//! Audit rows as every writer inserts them, and the link that seals one onto its instance's hash
//! chain (`audit::chain` verifies the chain and seals what is left unsealed).
//!
//! On SQLite a row is sealed as it is inserted: every write transaction holds the database's one
//! write lock (`BEGIN IMMEDIATE`), so the chain's head cannot move between reading it and
//! writing the next link. Sealing later instead cost a second write of every row — read back,
//! hashed, updated, in a transaction of its own that held the write lock while issuance waited.
//! On PostgreSQL the Store's workers and the registry of several instances commit concurrently,
//! and sealing in their transactions would make them queue on the head: rows are inserted
//! unsealed, in one statement, and the audit writer seals them a moment later.

use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment};
use diesel::sql_types::{BigInt, Nullable, Text};

pub use super::models::{AuditEntry, AuditFields};
use super::schema::audit_log;
use super::unnest::{kept_prepared, walk_arrays};

/// The `prev_hash` of a chain's first row.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hash of the row at `seq` after `prev_hash`: every field length-prefixed, so no two
/// different rows encode alike.
pub fn link_hash(prev_hash: &str, seq: i64, row: &AuditFields<'_>) -> String {
    let mut h = openssl::sha::Sha256::new();
    let first_at = row.first_at.map(|t| t.to_string()).unwrap_or_default();
    let (seq, at, counted) = (seq.to_string(), row.at.to_string(), format!("{}|{first_at}", row.count));
    let fields: [&[u8]; 11] = [
        b"castellum-audit-v1",
        prev_hash.as_bytes(),
        seq.as_bytes(),
        row.instance.as_bytes(),
        at.as_bytes(),
        row.actor.as_bytes(),
        row.action.as_bytes(),
        row.target.as_bytes(),
        row.outcome.as_bytes(),
        row.detail.as_bytes(),
        counted.as_bytes(),
    ];
    for field in fields {
        h.update(&(field.len() as u64).to_be_bytes());
        h.update(field);
    }
    hex::encode(h.finish())
}

/// Whether a head's hash can be extended: a link must carry what a seal writes (64 hex digits).
fn is_link_hash(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A row's place on the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Link {
    seq: i64,
    prev_hash: String,
    hash: String,
}

/// One row as inserted: sealed (`link`) or not.
#[derive(Insertable)]
#[diesel(table_name = audit_log)]
#[diesel(treat_none_as_default_value = false)]
struct AuditInsert<'a> {
    at: i64,
    instance: &'a str,
    actor: &'a str,
    action: &'a str,
    target: &'a str,
    outcome: &'a str,
    detail: &'a str,
    count: i64,
    first_at: Option<i64>,
    seq: Option<i64>,
    prev_hash: Option<String>,
    hash: Option<String>,
}

impl<'a> AuditInsert<'a> {
    fn new(row: AuditFields<'a>, link: Option<Link>) -> AuditInsert<'a> {
        let (seq, prev_hash, hash) = match link {
            Some(Link { seq, prev_hash, hash }) => (Some(seq), Some(prev_hash), Some(hash)),
            None => (None, None, None),
        };
        AuditInsert {
            at: row.at,
            instance: row.instance,
            actor: row.actor,
            action: row.action,
            target: row.target,
            outcome: row.outcome,
            detail: row.detail,
            count: row.count,
            first_at: row.first_at,
            seq,
            prev_hash,
            hash,
        }
    }
}

/// Inserting audit rows, inside the caller's write transaction: sealed onto the chain on
/// SQLite, unsealed on PostgreSQL (see the module's comment).
pub trait AppendAudit {
    fn append_audit<R: AuditEntry>(&mut self, rows: &[R]) -> QueryResult<()>;
}

impl AppendAudit for diesel::SqliteConnection {
    fn append_audit<R: AuditEntry>(&mut self, rows: &[R]) -> QueryResult<()> {
        // The head of the instance the last row belonged to (a transaction's rows are nearly
        // always one instance's); `None` inside: a head that cannot be extended.
        let mut head: Option<(&str, Option<(i64, String)>)> = None;
        for row in rows {
            let fields = row.fields();
            if head.as_ref().map(|(instance, _)| *instance) != Some(fields.instance) {
                head = Some((fields.instance, self.extendable_head(fields.instance)?.ok()));
            }
            let chain = head.as_mut().and_then(|(_, chain)| chain.as_mut());
            // A head without a valid hash is not extended: the rows stay unsealed, and the audit
            // writer's seal (which refuses the same head) and the verification report it.
            let link = chain.map(|(seq, prev)| {
                *seq += 1;
                let hash = link_hash(prev, *seq, &fields);
                Link { seq: *seq, prev_hash: std::mem::replace(prev, hash.clone()), hash }
            });
            // One statement per row, prepared once and kept by diesel.
            diesel::insert_into(audit_log::table).values(AuditInsert::new(fields, link)).execute(self)?;
        }
        Ok(())
    }
}

impl AppendAudit for diesel::PgConnection {
    fn append_audit<R: AuditEntry>(&mut self, rows: &[R]) -> QueryResult<()> {
        // One statement (one round trip), its rows bound as arrays and kept prepared.
        if !rows.is_empty() {
            InsertAudit::new(rows.iter().map(AuditEntry::fields)).execute(self)?;
        }
        Ok(())
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

/// The newest link of an instance's chain — `(0, GENESIS)` for an empty chain — or, as `Err`,
/// the seq of a head whose hash is not one a seal writes: neither the append nor the writer's
/// seal extends such a head.
pub trait ChainHead {
    fn extendable_head(&mut self, instance: &str) -> QueryResult<Result<(i64, String), i64>>;
}

macro_rules! chain_head {
    ($conn:ty) => {
        impl ChainHead for $conn {
            fn extendable_head(&mut self, instance: &str) -> QueryResult<Result<(i64, String), i64>> {
                let last: Option<(Option<i64>, Option<String>)> = audit_log::table
                    .filter(audit_log::instance.eq(instance).and(audit_log::seq.is_not_null()))
                    .order(audit_log::seq.desc())
                    .select((audit_log::seq, audit_log::hash))
                    .first(self)
                    .optional()?;
                Ok(match last {
                    None => Ok((0, GENESIS.to_string())),
                    Some((Some(seq), Some(hash))) if is_link_hash(&hash) => Ok((seq, hash)),
                    Some((seq, _)) => Err(seq.unwrap_or_default()),
                })
            }
        }
    };
}

chain_head!(diesel::SqliteConnection);
chain_head!(diesel::PgConnection);

#[cfg(test)]
mod tests {
    use diesel::prelude::*;
    use diesel::sql_types::BigInt;

    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }

    /// The chain's head is read with `.first()` on every append; the bundled SQLite must be built
    /// with its query planner stability guarantee (`.cargo/config.toml`), or a bound `LIMIT` has
    /// the statement prepared again on every run.
    #[test]
    fn the_bundled_sqlite_keeps_its_plans_whatever_is_bound() {
        let mut conn = diesel::SqliteConnection::establish(":memory:").unwrap();
        let found: Vec<Count> =
            diesel::sql_query("SELECT count(*) AS n FROM pragma_compile_options WHERE compile_options = 'ENABLE_QPSG'")
                .load(&mut conn)
                .unwrap();
        assert_eq!(found[0].n, 1, "built without SQLITE_ENABLE_QPSG");
    }
}
