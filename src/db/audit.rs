//! Audit rows as every writer inserts them, and the link that seals one onto its instance's hash
//! chain (`audit::chain` verifies the chain and seals what is left unsealed).
//!
//! A row is sealed as it is inserted, in the writer's own transaction: the chain's head is read
//! under the chain's lock, held until that transaction ends, so the head cannot move between
//! reading it and committing the next links. On SQLite the lock is the database's one write lock
//! (`BEGIN IMMEDIATE`); on PostgreSQL, where the Store's workers and the registry commit
//! concurrently, an advisory lock per instance taken just before the head is read (waiting for
//! it counts against `statement_timeout`, like any statement).
//!
//! No writer does anything that waits on a lock after its append (the rows go last; at most a
//! `NOTIFY` follows), so only the append and the commit wait on each other. A connection stuck
//! between its append and its commit holds the instance's chain, and so its other write batches,
//! until `statement_timeout` or the server ends it.
//!
//! Sealing later instead cost a second write of every row — read back, hashed, updated — on
//! SQLite while issuance waited for the write lock, on PostgreSQL ~12% of the server's CPU at
//! c=64. (An append that found the lock taken could leave its rows for the writer instead of
//! waiting: measured, a third of the rows at c=64 were left so, and the server's CPU fell no
//! lower than without sealing at insert.) Only the single certificate's statement
//! (`one_statement.rs`: no transaction to hold a lock in) inserts its row unsealed, and the audit
//! writer seals it a moment later.

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

impl Link {
    /// The `seq`, `prev_hash` and `hash` columns of a row with this link, all null without one.
    fn columns(link: Option<Link>) -> (Option<i64>, Option<String>, Option<String>) {
        match link {
            Some(Link { seq, prev_hash, hash }) => (Some(seq), Some(prev_hash), Some(hash)),
            None => (None, None, None),
        }
    }
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
        let (seq, prev_hash, hash) = Link::columns(link);
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

/// Inserting audit rows, inside the caller's write transaction, sealed onto their instances'
/// chains (see the module's comment).
pub trait AppendAudit {
    fn append_audit<R: AuditEntry>(&mut self, rows: &[R]) -> QueryResult<()>;
}

/// The links of `rows` onto their instances' chains as they stand, each instance's head read
/// (and on PostgreSQL locked) once, in name order: `None` for a row whose instance's head cannot
/// be extended. Its rows then stay unsealed, and the audit writer's seal (which refuses the same
/// head) and the verification report it.
fn links_of<'a, C: ChainHead>(conn: &mut C, rows: &[AuditFields<'a>]) -> QueryResult<Vec<Option<Link>>> {
    let mut instances: Vec<&str> = rows.iter().map(|row| row.instance).collect();
    instances.sort_unstable();
    instances.dedup();
    let mut heads = Vec::with_capacity(instances.len());
    for instance in instances {
        heads.push((instance, conn.locked_head(instance)?.ok()));
    }
    Ok(rows
        .iter()
        .map(|row| {
            let (_, head) = heads.iter_mut().find(|(instance, _)| *instance == row.instance)?;
            let (seq, prev) = head.as_mut()?;
            *seq += 1;
            let hash = link_hash(prev, *seq, row);
            Some(Link { seq: *seq, prev_hash: std::mem::replace(prev, hash.clone()), hash })
        })
        .collect())
}

impl AppendAudit for diesel::SqliteConnection {
    fn append_audit<R: AuditEntry>(&mut self, rows: &[R]) -> QueryResult<()> {
        let fields: Vec<AuditFields<'_>> = rows.iter().map(AuditEntry::fields).collect();
        let links = links_of(self, &fields)?;
        for (row, link) in fields.into_iter().zip(links) {
            // One statement per row, prepared once and kept by diesel.
            diesel::insert_into(audit_log::table).values(AuditInsert::new(row, link)).execute(self)?;
        }
        Ok(())
    }
}

impl AppendAudit for diesel::PgConnection {
    fn append_audit<R: AuditEntry>(&mut self, rows: &[R]) -> QueryResult<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let fields: Vec<AuditFields<'_>> = rows.iter().map(AuditEntry::fields).collect();
        let links = links_of(self, &fields)?;
        // One statement (one round trip), its rows bound as arrays and kept prepared.
        InsertAudit::with_links(fields.into_iter().zip(links)).execute(self)?;
        Ok(())
    }
}

/// Audit rows in one statement: sealed (`append_audit`), or unsealed for the audit writer to seal
/// (the single certificate's statement, `one_statement.rs`, which takes no chain lock).
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
    seq: Vec<Option<i64>>,
    prev_hash: Vec<Option<String>>,
    hash: Vec<Option<String>>,
}

impl<'a> InsertAudit<'a> {
    /// Rows left unsealed.
    pub fn new(rows: impl Iterator<Item = AuditFields<'a>>) -> InsertAudit<'a> {
        InsertAudit::with_links(rows.map(|row| (row, None)))
    }

    /// Rows with their links (`None`: left unsealed).
    fn with_links(rows: impl Iterator<Item = (AuditFields<'a>, Option<Link>)>) -> InsertAudit<'a> {
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
            seq: Vec::new(),
            prev_hash: Vec::new(),
            hash: Vec::new(),
        };
        for (row, link) in rows {
            batch.at.push(row.at);
            batch.instance.push(row.instance);
            batch.actor.push(row.actor);
            batch.action.push(row.action);
            batch.target.push(row.target);
            batch.outcome.push(row.outcome);
            batch.detail.push(row.detail);
            batch.count.push(row.count);
            batch.first_at.push(row.first_at);
            let (seq, prev_hash, hash) = Link::columns(link);
            batch.seq.push(seq);
            batch.prev_hash.push(prev_hash);
            batch.hash.push(hash);
        }
        batch
    }
}

kept_prepared!(InsertAudit);

impl QueryFragment<Pg> for InsertAudit<'_> {
    fn walk_ast<'q>(&'q self, mut out: AstPass<'_, 'q, Pg>) -> QueryResult<()> {
        walk_arrays!(
            out,
            "INSERT INTO audit_log (at, instance, actor, action, target, outcome, detail, count, first_at, \
             seq, prev_hash, hash) \
             SELECT at, instance, actor, action, target, outcome, detail, count, first_at, seq, prev_hash, hash \
             FROM unnest(",
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
                (&self.seq, Nullable<BigInt>, "::int8[]"),
                (&self.prev_hash, Nullable<Text>, "::text[]"),
                (&self.hash, Nullable<Text>, "::text[]"),
            ],
            // Ids (the order the audit writer seals unsealed rows in) follow the batch's order:
            // SQL promises the order of an ORDER BY, not of a bare unnest.
            ") WITH ORDINALITY AS u(at, instance, actor, action, target, outcome, detail, count, first_at, \
             seq, prev_hash, hash, ord) ORDER BY ord"
        )
    }
}

/// The newest link of an instance's chain — `(0, GENESIS)` for an empty chain — or, as `Err`,
/// the seq of a head whose hash is not one a seal writes: neither the append nor the writer's
/// seal extends such a head. Read under the chain's lock, held to the end of the caller's write
/// transaction, so no other writer can extend the chain between this read and the commit (call
/// it inside a write transaction: outside one, the lock ends with the statement). On SQLite the
/// lock is the database's one write lock (`BEGIN IMMEDIATE`); on PostgreSQL a transaction-scoped
/// advisory lock per instance, taken here.
pub trait ChainHead {
    fn locked_head(&mut self, instance: &str) -> QueryResult<Result<(i64, String), i64>>;
}

/// The head as the table holds it (the query is the same on both backends).
macro_rules! head_row {
    ($conn:expr, $instance:expr) => {{
        let last: Option<(Option<i64>, Option<String>)> = audit_log::table
            .filter(audit_log::instance.eq($instance).and(audit_log::seq.is_not_null()))
            .order(audit_log::seq.desc())
            .select((audit_log::seq, audit_log::hash))
            .first($conn)
            .optional()?;
        Ok(match last {
            None => Ok((0, GENESIS.to_string())),
            Some((Some(seq), Some(hash))) if is_link_hash(&hash) => Ok((seq, hash)),
            Some((seq, _)) => Err(seq.unwrap_or_default()),
        })
    }};
}

impl ChainHead for diesel::SqliteConnection {
    fn locked_head(&mut self, instance: &str) -> QueryResult<Result<(i64, String), i64>> {
        head_row!(self, instance)
    }
}

impl ChainHead for diesel::PgConnection {
    fn locked_head(&mut self, instance: &str) -> QueryResult<Result<(i64, String), i64>> {
        LockChain(instance).execute(self)?;
        // A statement of its own: a statement reads what was committed when it started, and
        // only now has the last holder of the lock committed.
        head_row!(self, instance)
    }
}

/// `SELECT pg_advisory_xact_lock(CHAIN_LOCKS, hashtext(instance))`, kept prepared. No writer of
/// audit rows waits on a lock after its append, so a holder of the lock waits on nothing but its
/// own commit. Two instances whose names hash alike share a lock: slower, never wrong (a
/// transaction appending rows of both could meet another in the opposite order, and the server
/// would end one as a deadlock; no writer appends rows of two instances).
struct LockChain<'a>(&'a str);

/// The first key of the chain locks ("CAST"), so they meet no other user's advisory locks by
/// chance.
const CHAIN_LOCKS: i32 = 0x4341_5354;

kept_prepared!(LockChain);

impl QueryFragment<Pg> for LockChain<'_> {
    fn walk_ast<'q>(&'q self, mut out: AstPass<'_, 'q, Pg>) -> QueryResult<()> {
        out.push_sql("SELECT pg_advisory_xact_lock(");
        out.push_bind_param::<diesel::sql_types::Integer, i32>(&CHAIN_LOCKS)?;
        out.push_sql(", hashtext(");
        out.push_bind_param::<Text, str>(self.0)?;
        out.push_sql("))");
        Ok(())
    }
}

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
