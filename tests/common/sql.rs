//! The database as the tests see it: plain SQL over a connection of the test's own, never the
//! engine's queries, so a judge does not share the engine's mistakes.

use diesel::prelude::*;

use super::TestDb;

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// `SELECT count(*) AS n ...` on `db`, the same text on both backends.
pub fn count(db: &TestDb, sql: &str) -> i64 {
    let query = diesel::sql_query(sql);
    let row = if db.postgres {
        query.get_result::<Count>(&mut PgConnection::establish(&db.url).expect("test connection to PostgreSQL"))
    } else {
        let path = db.url.strip_prefix("sqlite://").unwrap_or(&db.url);
        query.get_result::<Count>(&mut SqliteConnection::establish(path).expect("test connection to SQLite"))
    };
    row.unwrap_or_else(|e| panic!("{sql}: {e}")).n
}

/// Run a statement (a test's deliberate change to the data) on `db`.
pub fn execute(db: &TestDb, sql: &str) -> usize {
    let query = diesel::sql_query(sql);
    let done = if db.postgres {
        query.execute(&mut PgConnection::establish(&db.url).expect("test connection to PostgreSQL"))
    } else {
        let path = db.url.strip_prefix("sqlite://").unwrap_or(&db.url);
        query.execute(&mut SqliteConnection::establish(path).expect("test connection to SQLite"))
    };
    done.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// An identity's row, as stored.
#[derive(QueryableByName, Debug)]
pub struct IdentityRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub state: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    pub destroy_reason: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Binary>)]
    pub sealed_key: Option<Vec<u8>>,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub uses: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub kek_id: String,
}

pub fn identity(db: &TestDb, id: &str) -> IdentityRow {
    assert!(id.chars().all(|c| c.is_ascii_hexdigit() || c == '-'), "an identity id: {id:?}");
    let sql = format!("SELECT state, destroy_reason, sealed_key, uses, kek_id FROM identities WHERE id = '{id}'");
    let query = diesel::sql_query(&sql);
    let row = if db.postgres {
        query.get_result::<IdentityRow>(&mut PgConnection::establish(&db.url).expect("test connection"))
    } else {
        let path = db.url.strip_prefix("sqlite://").unwrap_or(&db.url);
        query.get_result::<IdentityRow>(&mut SqliteConnection::establish(path).expect("test connection"))
    };
    row.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// One audit event, as stored.
#[derive(QueryableByName, Debug)]
pub struct AuditRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub actor: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub action: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub target: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub outcome: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub detail: String,
}

/// Every audit event, oldest first.
pub fn audit(db: &TestDb) -> Vec<AuditRow> {
    let sql = "SELECT actor, action, target, outcome, detail FROM audit_log ORDER BY id";
    let query = diesel::sql_query(sql);
    let rows = if db.postgres {
        query.load::<AuditRow>(&mut PgConnection::establish(&db.url).expect("test connection"))
    } else {
        let path = db.url.strip_prefix("sqlite://").unwrap_or(&db.url);
        query.load::<AuditRow>(&mut SqliteConnection::establish(path).expect("test connection"))
    };
    rows.unwrap_or_else(|e| panic!("{sql}: {e}"))
}
