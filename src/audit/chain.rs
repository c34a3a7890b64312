//! The audit log's hash chain. Each instance's rows form a chain: `seq` counts from 1,
//! `prev_hash` is the previous row's `hash`, and `hash` = SHA-256 over `prev_hash` and the row's
//! canonical encoding (`db::audit::link_hash`). A row changed, deleted, inserted or reordered
//! after sealing breaks the chain where it happened; a tail deleted (or the whole chain
//! rewritten) is caught against the heads checkpointed outside the database. Rows are sealed as
//! they are inserted (`db::audit`); any row left unsealed (PostgreSQL's single-certificate
//! statement, or a head that could not be extended) the audit writer seals here, in id order, at
//! most a second after it is committed; until then it is only as safe as the database.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;

use diesel::prelude::*;
use serde::{Deserialize, Serialize};

pub use crate::db::audit::{link_hash, GENESIS};
use crate::db::audit::{AuditEntry, AuditFields, ChainHead};
use crate::db::schema::audit_log;
use crate::db::DbConn;
use crate::error::DbError;
use crate::{with_conn, write_transaction};

/// Rows sealed per transaction, and transactions per round (100,000 rows a round: a writer
/// interval of 10 s keeps up with 10,000 audit rows a second). Small transactions, with a pause
/// between them: on SQLite a seal holds the database's one write lock, and the issuance Store's
/// commits must not wait behind a whole interval's rows (5,000 rows in one transaction stalled
/// them ~200 ms in the incident-003 drill).
const SEAL_BATCH: i64 = 250;
const MAX_BATCHES_PER_ROUND: usize = 400;
const PAUSE_BETWEEN_BATCHES: std::time::Duration = std::time::Duration::from_millis(5);
/// Rows read per query while verifying (memory stays bounded on any chain length).
const VERIFY_PAGE: i64 = 10_000;

/// An audit row as the chain covers it.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = audit_log)]
pub struct ChainRow {
    pub id: i64,
    pub at: i64,
    pub instance: String,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub detail: String,
    pub count: i64,
    pub first_at: Option<i64>,
    pub seq: Option<i64>,
    pub prev_hash: Option<String>,
    pub hash: Option<String>,
}

impl AuditEntry for ChainRow {
    fn fields(&self) -> AuditFields<'_> {
        AuditFields {
            at: self.at,
            instance: &self.instance,
            actor: &self.actor,
            action: &self.action,
            target: &self.target,
            outcome: &self.outcome,
            detail: &self.detail,
            count: self.count,
            first_at: self.first_at,
        }
    }
}

/// The newest sealed row of an instance's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub instance: String,
    pub seq: i64,
    pub hash: String,
}

fn head_of(conn: &mut DbConn, instance: &str) -> Result<Option<(i64, String)>, DbError> {
    let found: Option<(Option<i64>, Option<String>)> = with_conn!(conn, |c| audit_log::table
        .filter(audit_log::instance.eq(instance).and(audit_log::seq.is_not_null()))
        .order(audit_log::seq.desc())
        .select((audit_log::seq, audit_log::hash))
        .first(c)
        .optional())?;
    Ok(found.and_then(|(seq, hash)| Some((seq?, hash?))))
}

/// Seal batches until the backlog is sealed (bounded: a flood of rows is sealed over several
/// rounds, never in one unbounded loop).
pub fn seal_backlog(conn: &mut DbConn, instance: &str) -> Result<Option<Head>, DbError> {
    let mut head = None;
    for _ in 0..MAX_BATCHES_PER_ROUND {
        let (sealed, now) = seal(conn, instance)?;
        head = now.or(head);
        if sealed < SEAL_BATCH {
            break;
        }
        std::thread::sleep(PAUSE_BETWEEN_BATCHES);
    }
    Ok(head)
}

/// Seal up to [`SEAL_BATCH`] of this instance's unsealed rows (oldest id first) onto its chain,
/// in one transaction: how many, and the chain's head after it (`None` if still empty).
pub fn seal(conn: &mut DbConn, instance: &str) -> Result<(i64, Option<Head>), DbError> {
    write_transaction!(conn, |c| {
        // The head's hash is the next row's `prev_hash`: the append's rule (`db::audit`).
        let (mut seq, mut prev) = match c.locked_head(instance)? {
            Ok(head) => head,
            Err(seq) => {
                return Err(DbError::Pool(format!(
                    "the audit chain's head (seq {seq}) has no valid hash: not sealing"
                )));
            }
        };
        let first_seq = seq;
        let rows: Vec<ChainRow> = audit_log::table
            .filter(audit_log::instance.eq(instance).and(audit_log::seq.is_null()))
            .order(audit_log::id)
            .limit(SEAL_BATCH)
            .select(ChainRow::as_select())
            .load(c)?;
        let mut links = Vec::with_capacity(rows.len());
        for row in &rows {
            seq += 1;
            let hash = link_hash(&prev, seq, &row.fields());
            links.push(Link { id: row.id, seq, prev_hash: std::mem::replace(&mut prev, hash.clone()), hash });
        }
        c.write_links(&links)?;
        Ok::<_, DbError>((seq - first_seq, (seq > 0).then(|| Head { instance: instance.to_string(), seq, hash: prev })))
    })
}

/// Append a head to the checkpoint file (JSON lines, one per seal that moved the head; the last
/// line of an instance is its checkpoint).
pub fn checkpoint(path: &Path, head: &Head, at_ms: i64) -> std::io::Result<()> {
    #[derive(Serialize)]
    struct Line<'a> {
        #[serde(flatten)]
        head: &'a Head,
        at: i64,
    }
    let mut line = serde_json::to_string(&Line { head, at: at_ms }).map_err(std::io::Error::other)?;
    line.push('\n');
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    file.write_all(line.as_bytes())?;
    file.sync_data()
}

/// The last checkpoint of every instance in the file.
pub fn read_checkpoints(path: &Path) -> std::io::Result<HashMap<String, Head>> {
    let text = std::fs::read_to_string(path)?;
    let mut heads = HashMap::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let head: Head = serde_json::from_str(line).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: line {}: {e}", path.display(), n + 1))
        })?;
        heads.insert(head.instance.clone(), head);
    }
    Ok(heads)
}

/// Where a chain stops holding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainFault {
    #[error("row {id} (seq {seq}) was changed: its hash does not match its content")]
    Changed { id: i64, seq: i64 },
    #[error("row {id} (seq {seq}) does not follow seq {prev_seq}: a row was inserted or the rows reordered")]
    NotLinked { id: i64, seq: i64, prev_seq: i64 },
    #[error("the row with seq {seq} is missing (deleted); the chain resumes at row {next_id} (seq {next_seq})")]
    Missing { seq: i64, next_id: i64, next_seq: i64 },
    #[error("row {id} has seq {seq}, outside the chain (which starts at 1): it was inserted")]
    OutsideChain { id: i64, seq: i64 },
    #[error("the chain ends at seq {seq}, before its checkpoint at seq {checkpoint_seq}: its tail was deleted")]
    Truncated { seq: i64, checkpoint_seq: i64 },
    #[error("the row with seq {seq} is not the one checkpointed (hash {found}, checkpoint {checkpointed}): the chain was rewritten")]
    Rewritten { seq: i64, found: String, checkpointed: String },
}

/// One instance's chain, as verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    pub instance: String,
    /// The last row that verified.
    pub head: Option<Head>,
    pub verified: i64,
    /// Rows not sealed yet (written since the last seal, or by an instance that stopped first).
    pub unsealed: i64,
    /// The first place the chain breaks, if it does.
    pub fault: Option<ChainFault>,
}

/// Verify every instance's chain, and each against its checkpoint when `checkpoints` has one.
pub fn verify(conn: &mut DbConn, checkpoints: &HashMap<String, Head>) -> Result<Vec<ChainReport>, DbError> {
    let mut instances: Vec<String> =
        with_conn!(conn, |c| audit_log::table.select(audit_log::instance).distinct().load(c))?;
    for known in checkpoints.keys() {
        if !instances.contains(known) {
            instances.push(known.clone());
        }
    }
    instances.sort();
    instances.into_iter().map(|instance| verify_instance(conn, instance, checkpoints)).collect()
}

/// Verify one instance's chain (against its checkpoint, if `checkpoints` has one).
pub fn verify_instance(
    conn: &mut DbConn,
    instance: String,
    checkpoints: &HashMap<String, Head>,
) -> Result<ChainReport, DbError> {
    let checkpoint = checkpoints.get(&instance);
    let mut report = ChainReport { instance, head: None, verified: 0, unsealed: 0, fault: None };
    let (mut expected, mut prev) = (1i64, GENESIS.to_string());
    'pages: loop {
        let page: Vec<ChainRow> = with_conn!(conn, |c| audit_log::table
            .filter(audit_log::instance.eq(&report.instance).and(audit_log::seq.ge(expected)))
            .order(audit_log::seq)
            .limit(VERIFY_PAGE)
            .select(ChainRow::as_select())
            .load(c))?;
        if page.is_empty() {
            break;
        }
        for row in page {
            let seq = row.seq.unwrap_or_default();
            if seq != expected {
                report.fault = Some(ChainFault::Missing { seq: expected, next_id: row.id, next_seq: seq });
                break 'pages;
            }
            if row.prev_hash.as_deref() != Some(prev.as_str()) {
                report.fault = Some(ChainFault::NotLinked { id: row.id, seq, prev_seq: seq - 1 });
                break 'pages;
            }
            let hash = link_hash(&prev, seq, &row.fields());
            if row.hash.as_deref() != Some(hash.as_str()) {
                report.fault = Some(ChainFault::Changed { id: row.id, seq });
                break 'pages;
            }
            if let Some(cp) = checkpoint.filter(|cp| cp.seq == seq && cp.hash != hash) {
                report.fault = Some(ChainFault::Rewritten { seq, found: hash.clone(), checkpointed: cp.hash.clone() });
                break 'pages;
            }
            report.verified += 1;
            report.head = Some(Head { instance: report.instance.clone(), seq, hash: hash.clone() });
            (expected, prev) = (seq + 1, hash);
        }
    }
    let last = report.head.as_ref().map_or(0, |h| h.seq);
    // A row given a seq below the chain's start is never reached by the walk above.
    let outside: Option<(i64, Option<i64>)> = with_conn!(conn, |c| audit_log::table
        .filter(audit_log::instance.eq(&report.instance).and(audit_log::seq.lt(1)))
        .order(audit_log::seq)
        .select((audit_log::id, audit_log::seq))
        .first(c)
        .optional())?;
    if let (None, Some((id, seq))) = (&report.fault, outside) {
        report.fault = Some(ChainFault::OutsideChain { id, seq: seq.unwrap_or_default() });
    }
    if let (None, Some(cp)) = (&report.fault, checkpoint) {
        if last < cp.seq {
            report.fault = Some(ChainFault::Truncated { seq: last, checkpoint_seq: cp.seq });
        }
    }
    report.unsealed = with_conn!(conn, |c| audit_log::table
        .filter(audit_log::instance.eq(&report.instance).and(audit_log::seq.is_null()))
        .count()
        .get_result::<i64>(c))?;
    Ok(report)
}

/// The head of every instance's chain (for the admin console).
pub fn heads(conn: &mut DbConn) -> Result<Vec<Head>, DbError> {
    let instances: Vec<String> = with_conn!(conn, |c| audit_log::table
        .filter(audit_log::seq.is_not_null())
        .select(audit_log::instance)
        .distinct()
        .order(audit_log::instance)
        .load(c))?;
    let mut heads = Vec::new();
    for instance in instances {
        if let Some((seq, hash)) = head_of(conn, &instance)? {
            heads.push(Head { instance, seq, hash });
        }
    }
    Ok(heads)
}

/// The outcome of the engine's own periodic verification of its chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verification {
    pub instance: String,
    pub at: i64,
    pub verified: i64,
    /// The first break found, as text; none if the chain held.
    pub fault: Option<String>,
}

/// What `castellum audit verify` checks: the database the configuration names, against the
/// checkpoint file it names (if that file exists yet).
pub fn verify_configured(config: &crate::config::Config) -> Result<(Vec<ChainReport>, Option<String>), DbError> {
    let (checkpoints, note) = match &config.audit.checkpoint_file {
        None => (HashMap::new(), Some("no audit.checkpoint_file configured: a deleted tail cannot be seen".into())),
        Some(path) => match read_checkpoints(path) {
            Ok(heads) => (heads, None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (HashMap::new(), Some(format!("checkpoint file {} does not exist yet", path.display())))
            }
            Err(e) => return Err(DbError::Pool(format!("reading the checkpoint file: {e}"))),
        },
    };
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
    let one = crate::config::PoolConfig { max_size: 1, min_idle: Some(0), ..Default::default() };
    let pool = crate::db::DbPool::build(&config.database, &one, "audit", metrics)?;
    let mut conn = pool.get()?;
    Ok((verify(&mut conn, &checkpoints)?, note))
}

/// One sealed row: its place in the chain and the hashes written onto it.
struct Link {
    id: i64,
    seq: i64,
    prev_hash: String,
    hash: String,
}

/// Writing a batch of links, the way each backend does it cheaply. Sealing must not double the
/// writes issuance makes: on PostgreSQL each statement is a round trip, so the batch is one
/// statement; on SQLite a statement is a call, and one `UPDATE` per row kept prepared costs less
/// than parsing a statement of 250 rows that no cache can keep (the seal was 3.3% of the
/// engine's CPU at c=64 that way, 0.9% of it in SQLite's parser; docs/PERFORMANCE.md).
trait WriteLinks {
    fn write_links(&mut self, links: &[Link]) -> QueryResult<()>;
}

impl WriteLinks for diesel::SqliteConnection {
    fn write_links(&mut self, links: &[Link]) -> QueryResult<()> {
        for link in links {
            SealOne(link).execute(self)?;
        }
        Ok(())
    }
}

impl WriteLinks for diesel::PgConnection {
    fn write_links(&mut self, links: &[Link]) -> QueryResult<()> {
        if links.is_empty() {
            return Ok(());
        }
        crate::db::unnest::SealLinks {
            id: links.iter().map(|l| l.id).collect(),
            seq: links.iter().map(|l| l.seq).collect(),
            prev_hash: links.iter().map(|l| l.prev_hash.as_str()).collect(),
            hash: links.iter().map(|l| l.hash.as_str()).collect(),
        }
        .execute(self)
        .map(|_| ())
    }
}

/// `UPDATE audit_log SET seq = ?, prev_hash = ?, hash = ? WHERE id = ?`, as a query diesel keeps
/// prepared (its type is its cache key; diesel caches neither `update(…).set(…)` nor
/// `sql_query`).
struct SealOne<'a>(&'a Link);

impl diesel::query_builder::QueryId for SealOne<'_> {
    type QueryId = SealOne<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl diesel::query_builder::QueryFragment<diesel::sqlite::Sqlite> for SealOne<'_> {
    fn walk_ast<'q>(
        &'q self,
        mut out: diesel::query_builder::AstPass<'_, 'q, diesel::sqlite::Sqlite>,
    ) -> QueryResult<()> {
        use diesel::sql_types::{BigInt, Text};
        out.push_sql("UPDATE audit_log SET seq = ");
        out.push_bind_param::<BigInt, i64>(&self.0.seq)?;
        out.push_sql(", prev_hash = ");
        out.push_bind_param::<Text, str>(&self.0.prev_hash)?;
        out.push_sql(", hash = ");
        out.push_bind_param::<Text, str>(&self.0.hash)?;
        out.push_sql(" WHERE id = ");
        out.push_bind_param::<BigInt, i64>(&self.0.id)?;
        Ok(())
    }
}

impl<Conn> RunQueryDsl<Conn> for SealOne<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DatabaseConfig, PoolConfig};

    #[test]
    fn a_backlog_larger_than_a_batch_is_sealed_in_one_round_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("chain.db").display());
        crate::db::migrate::run(&url).expect("migrated");
        let db = DatabaseConfig { url, ..DatabaseConfig::default() };
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
        let pool = crate::db::DbPool::build(&db, &PoolConfig::default(), "audit", metrics).unwrap();
        let mut conn = pool.get().unwrap();
        let rows = 2 * SEAL_BATCH + 7;
        with_conn!(&mut *conn, |c| {
            for n in 0..rows {
                diesel::sql_query(format!(
                    "INSERT INTO audit_log (at, instance, actor, action, target, outcome, detail) \
                     VALUES ({n}, 'me', 'a', 'ca.state', 't', 'ok', '')"
                ))
                .execute(c)
                .unwrap();
            }
        });
        let head = seal_backlog(&mut conn, "me").unwrap().expect("a head");
        assert_eq!(head.seq, rows);
        let reports = verify(&mut conn, &HashMap::new()).unwrap();
        assert_eq!((reports[0].verified, reports[0].unsealed, reports[0].fault.clone()), (rows, 0, None));
        assert_eq!(seal(&mut conn, "me").unwrap(), (0, Some(head)), "nothing left to seal");
    }
}
