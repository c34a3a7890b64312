//! The database as the tests see it: plain SQL over a connection of the test's own, made with
//! diesel alone, never the engine's queries, so a judge does not share the engine's mistakes.
//! PostgreSQL is read as the superuser, so the test never counts against a test role's limit.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Binary, Nullable, Text};

use super::{postgres_admin_url, TestDb};

pub enum RawConn {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

pub fn connect(db: &TestDb) -> RawConn {
    if db.postgres || db.url.starts_with("postgres") {
        let url = super::on_database(&postgres_admin_url(), &db.name);
        RawConn::Postgres(PgConnection::establish(&url).unwrap_or_else(|e| panic!("raw connection to {url}: {e}")))
    } else {
        let path = db.url.strip_prefix("sqlite://").unwrap_or_else(|| panic!("not a sqlite:// URL: {}", db.url));
        let mut conn = SqliteConnection::establish(path).unwrap_or_else(|e| panic!("raw connection to {path}: {e}"));
        diesel::sql_query("PRAGMA busy_timeout = 5000").execute(&mut conn).expect("busy timeout");
        RawConn::Sqlite(conn)
    }
}

impl RawConn {
    pub fn open(db: &TestDb) -> RawConn {
        connect(db)
    }

    /// Run statements (a transaction a test holds open, a lock, ...).
    pub fn execute(&mut self, sql: &str) {
        use diesel::connection::SimpleConnection;
        match self {
            RawConn::Sqlite(c) => c.batch_execute(sql),
            RawConn::Postgres(c) => c.batch_execute(sql),
        }
        .unwrap_or_else(|e| panic!("raw SQL {sql:?} failed: {e}"));
    }

    pub fn load<T>(&mut self, sql: &str) -> Vec<T>
    where
        T: QueryableByName<diesel::sqlite::Sqlite> + QueryableByName<diesel::pg::Pg> + 'static,
    {
        match self {
            RawConn::Sqlite(c) => diesel::sql_query(sql).load(c),
            RawConn::Postgres(c) => diesel::sql_query(sql).load(c),
        }
        .unwrap_or_else(|e| panic!("raw SQL {sql:?} failed: {e}"))
    }
}

/// Rows of a query, on either backend; a failed query fails the test.
pub fn rows<T>(db: &TestDb, sql: &str) -> Vec<T>
where
    T: QueryableByName<diesel::sqlite::Sqlite> + QueryableByName<diesel::pg::Pg> + 'static,
{
    connect(db).load(sql)
}

/// Run a statement (a change a test makes to stage a situation); rows affected.
pub fn execute(db: &TestDb, sql: &str) -> usize {
    match connect(db) {
        RawConn::Sqlite(mut c) => diesel::sql_query(sql).execute(&mut c),
        RawConn::Postgres(mut c) => diesel::sql_query(sql).execute(&mut c),
    }
    .unwrap_or_else(|e| panic!("raw SQL {sql:?} failed: {e}"))
}

/// A text literal (test-controlled values only).
pub fn text(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// `SELECT count(*) AS n ...` (or any BIGINT column named `n`), the same text on both backends.
pub fn count(db: &TestDb, sql: &str) -> i64 {
    rows::<Count>(db, sql).first().unwrap_or_else(|| panic!("{sql}: no row")).n
}

#[derive(QueryableByName)]
struct TextRow {
    #[diesel(sql_type = Text)]
    s: String,
}

/// Every value of a TEXT column named `s`.
pub fn texts(db: &TestDb, sql: &str) -> Vec<String> {
    rows::<TextRow>(db, sql).into_iter().map(|r| r.s).collect()
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
    rows(
        db,
        &format!(
            "SELECT id, state, serial, claimed_by, claimed_until, expires_at, error_type FROM requests WHERE {condition} ORDER BY id"
        ),
    )
}

/// One stored request.
pub fn request(db: &TestDb, id: &str) -> Option<Request> {
    requests(db, &format!("id = {}", text(id))).pop()
}

/// A certificate row (write-ahead record or signed).
#[derive(QueryableByName, Debug, Clone)]
pub struct Certificate {
    #[diesel(sql_type = Text)]
    pub serial: String,
    #[diesel(sql_type = Text)]
    pub ca_id: String,
    #[diesel(sql_type = Text)]
    pub state: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub request_id: Option<String>,
    #[diesel(sql_type = Binary)]
    pub tbs_der: Vec<u8>,
    #[diesel(sql_type = Nullable<Binary>)]
    pub cert_der: Option<Vec<u8>>,
}

impl Certificate {
    /// Whether the record carries `name` (a DNS name is stored as its ASCII bytes in the DER, so
    /// a unique name per request identifies the request's record): in its TBS while it is
    /// signing, in its certificate once issued (the TBS is then cleared).
    pub fn names(&self, name: &str) -> bool {
        let holds = |der: &[u8]| der.windows(name.len()).any(|w| w == name.as_bytes());
        holds(&self.tbs_der) || self.cert_der.as_deref().is_some_and(holds)
    }
}

const CERTIFICATE_COLUMNS: &str = "serial, ca_id, state, request_id, tbs_der, cert_der";

/// Every certificate row, by serial.
pub fn certificates(db: &TestDb) -> Vec<Certificate> {
    rows(db, &format!("SELECT {CERTIFICATE_COLUMNS} FROM certificates ORDER BY serial"))
}

pub fn certificate(db: &TestDb, serial: &str) -> Option<Certificate> {
    let sql = format!("SELECT {CERTIFICATE_COLUMNS} FROM certificates WHERE serial = {}", text(serial));
    rows(db, &sql).into_iter().next()
}

/// The ids of the instances with a heartbeat row.
pub fn instance_ids(db: &TestDb) -> Vec<String> {
    texts(db, "SELECT id AS s FROM instances ORDER BY id")
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
    let sql = format!("SELECT state, destroy_reason, sealed_key, uses, kek_id FROM identities WHERE id = {}", text(id));
    rows::<IdentityRow>(db, &sql).pop().unwrap_or_else(|| panic!("{sql}: no row"))
}

/// One audit event, as stored.
#[derive(QueryableByName, Debug, Clone)]
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

/// The audit log, newest first.
pub fn audit(db: &TestDb) -> Vec<AuditRow> {
    rows(db, "SELECT actor, action, target, outcome, detail FROM audit_log ORDER BY id DESC")
}
