//! Migrations, embedded in the binary, one set per backend (`schema/sqlite`, `schema/postgres`).
//! On PostgreSQL they are serialised across instances with an advisory lock.

use diesel::connection::SimpleConnection;
use diesel::Connection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use super::{sqlite_path, Backend};
use crate::error::DbError;

const SQLITE: EmbeddedMigrations = embed_migrations!("schema/sqlite");
const POSTGRES: EmbeddedMigrations = embed_migrations!("schema/postgres");

/// An arbitrary constant naming castellum's migration lock.
const MIGRATION_LOCK: i64 = 0x6361_7374_656c_6c75;

/// Run every pending migration; returns how many ran.
pub fn run(url: &str) -> Result<usize, DbError> {
    let fail = |e: &dyn std::fmt::Display| DbError::Migration(e.to_string());
    match Backend::from_url(url)? {
        Backend::Sqlite => {
            let mut conn = diesel::SqliteConnection::establish(sqlite_path(url)).map_err(|e| fail(&e))?;
            // WAL is a property of the database file, set once here rather than per connection.
            conn.batch_execute("PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 5000;").map_err(|e| fail(&e))?;
            let ran = conn.run_pending_migrations(SQLITE).map_err(|e| fail(&e))?.len();
            warn_if_plans_follow_bound_values(&mut conn);
            Ok(ran)
        }
        Backend::Postgres => {
            let mut conn = diesel::PgConnection::establish(url).map_err(|e| fail(&e))?;
            conn.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK})")).map_err(|e| fail(&e))?;
            let result = conn.run_pending_migrations(POSTGRES).map(|v| v.len()).map_err(|e| fail(&e));
            let unlock = conn.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"));
            let ran = result?;
            unlock.map_err(|e| fail(&e))?;
            Ok(ran)
        }
    }
}

/// castellum builds its bundled SQLite with the query planner stability guarantee
/// (`.cargo/config.toml`); an application that embeds it builds SQLite without that file. Without
/// it SQLite 3.53 prepares a statement with a bound `LIMIT` (every diesel `.first()`) again each
/// time it runs: slower, not wrong, so a warning, once, at start-up.
fn warn_if_plans_follow_bound_values(conn: &mut diesel::SqliteConnection) {
    use diesel::RunQueryDsl;
    let stable = diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
        "(SELECT count(*) FROM pragma_compile_options WHERE compile_options = 'ENABLE_QPSG')",
    ))
    .get_result::<i64>(conn);
    if !matches!(stable, Ok(1)) {
        tracing::warn!(
            "SQLite was built without SQLITE_ENABLE_QPSG: statements with a bound LIMIT are prepared again on \
             every run; build libsqlite3-sys with LIBSQLITE3_FLAGS=-DSQLITE_ENABLE_QPSG"
        );
    }
}
