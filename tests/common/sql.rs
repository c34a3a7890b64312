//! The database as the tests see it: plain SQL over a connection of the test's own (SQLite or
//! PostgreSQL), never the engine's queries, so a judge does not share the engine's mistakes.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Binary, Nullable, Text};

use super::TestDb;

pub enum RawConn {
    Pg(PgConnection),
    Sqlite(SqliteConnection),
}

pub fn connect(db: &TestDb) -> RawConn {
    if db.postgres {
        RawConn::Pg(PgConnection::establish(&db.url).unwrap_or_else(|e| panic!("connect to {}: {e}", db.url)))
    } else {
        let path = db.url.trim_start_matches("sqlite://");
        let mut conn = SqliteConnection::establish(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        diesel::sql_query("PRAGMA busy_timeout = 5000").execute(&mut conn).expect("busy_timeout");
        RawConn::Sqlite(conn)
    }
}

fn load<T: QueryableByName<diesel::pg::Pg> + QueryableByName<diesel::sqlite::Sqlite> + 'static>(
    db: &TestDb,
    sql: &str,
) -> Vec<T> {
    let result = match connect(db) {
        RawConn::Pg(mut c) => diesel::sql_query(sql).load::<T>(&mut c),
        RawConn::Sqlite(mut c) => diesel::sql_query(sql).load::<T>(&mut c),
    };
    result.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Run a statement (an UPDATE or INSERT a test needs to stage a situation); rows affected.
pub fn execute(db: &TestDb, sql: &str) -> usize {
    let result = match connect(db) {
        RawConn::Pg(mut c) => diesel::sql_query(sql).execute(&mut c),
        RawConn::Sqlite(mut c) => diesel::sql_query(sql).execute(&mut c),
    };
    result.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// The value of `SELECT count(*) AS n ...` (or any BIGINT column named `n`).
pub fn count(db: &TestDb, sql: &str) -> i64 {
    load::<Count>(db, sql).first().unwrap_or_else(|| panic!("{sql}: no row")).n
}

#[derive(QueryableByName)]
struct TextRow {
    #[diesel(sql_type = Text)]
    s: String,
}

/// Every value of a TEXT column named `s`.
pub fn texts(db: &TestDb, sql: &str) -> Vec<String> {
    load::<TextRow>(db, sql).into_iter().map(|r| r.s).collect()
}

/// A stored request as the database holds it.
#[derive(QueryableByName, Debug, Clone)]
pub struct Request {
    #[diesel(sql_type = Text)]
    pub id: String,
    #[diesel(sql_type = Text)]
    pub state: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub serial: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub claimed_by: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub claimed_until: Option<i64>,
    #[diesel(sql_type = BigInt)]
    pub expires_at: i64,
    #[diesel(sql_type = Nullable<Text>)]
    pub error_type: Option<String>,
}

/// The requests matching `condition` (an SQL boolean expression on the `requests` table).
pub fn requests(db: &TestDb, condition: &str) -> Vec<Request> {
    load(
        db,
        &format!(
            "SELECT id, state, serial, claimed_by, claimed_until, expires_at, error_type FROM requests WHERE {condition} ORDER BY id"
        ),
    )
}

/// An identity's row, as stored.
#[derive(QueryableByName, Debug)]
pub struct IdentityRow {
    #[diesel(sql_type = Text)]
    pub state: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub destroy_reason: Option<String>,
    #[diesel(sql_type = Nullable<Binary>)]
    pub sealed_key: Option<Vec<u8>>,
    #[diesel(sql_type = BigInt)]
    pub uses: i64,
    #[diesel(sql_type = Text)]
    pub kek_id: String,
}

pub fn identity(db: &TestDb, id: &str) -> IdentityRow {
    assert!(id.chars().all(|c| c.is_ascii_hexdigit() || c == '-'), "an identity id: {id:?}");
    let sql = format!("SELECT state, destroy_reason, sealed_key, uses, kek_id FROM identities WHERE id = '{id}'");
    load::<IdentityRow>(db, &sql).pop().unwrap_or_else(|| panic!("{sql}: no row"))
}

/// One audit event, as stored.
#[derive(QueryableByName, Debug)]
pub struct AuditRow {
    #[diesel(sql_type = Text)]
    pub actor: String,
    #[diesel(sql_type = Text)]
    pub action: String,
    #[diesel(sql_type = Text)]
    pub target: String,
    #[diesel(sql_type = Text)]
    pub outcome: String,
    #[diesel(sql_type = Text)]
    pub detail: String,
}

/// Every audit event, oldest first.
pub fn audit(db: &TestDb) -> Vec<AuditRow> {
    load(db, "SELECT actor, action, target, outcome, detail FROM audit_log ORDER BY id")
}
