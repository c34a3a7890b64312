//! The database: SQLite (embedded, one instance) or PostgreSQL (several instances), chosen from
//! the URL. `diesel::MultiConnection` cannot batch-insert or upsert, so a connection here is an
//! enum of the two concrete connections and [`with_conn!`] compiles one body for each.
//!
//! Pools are bulkheads (issuance, control, status, admin, audit): each has its own budget, timeouts and
//! metrics, so a saturated issuance path cannot starve health checks or the admin console.

pub mod audit;
pub mod gate;
pub mod holds;
pub mod identities;
pub mod migrate;
pub mod models;
pub mod one_statement;
pub mod queries;
pub mod revocation;
pub mod schema;
pub mod server_limits;
pub mod unnest;
pub mod writes;

use std::sync::Arc;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, HandleEvent, Pool, PooledConnection};
use diesel::{PgConnection, SqliteConnection};

use crate::config::{DatabaseConfig, PoolConfig};
use crate::error::DbError;
use crate::metrics::{self, Metrics};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn from_url(url: &str) -> Result<Backend, DbError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("sqlite://") || !url.contains("://") {
            Ok(Backend::Sqlite)
        } else {
            Err(DbError::UnsupportedUrl)
        }
    }
}

/// The file path of a SQLite URL.
pub fn sqlite_path(url: &str) -> &str {
    url.strip_prefix("sqlite://").unwrap_or(url)
}

/// libpq waits forever for an unreachable server, and for an answer over a dead connection,
/// unless told otherwise: bound both (the operator's URL may set its own values).
fn postgres_url_with_timeout(url: &str) -> String {
    let mut url = url.to_string();
    for (param, value) in [("connect_timeout", "2"), ("tcp_user_timeout", "5000"), ("keepalives_idle", "5")] {
        if !url.contains(&format!("{param}=")) {
            url = with_parameter(&url, &format!("{param}={value}"));
        }
    }
    url
}

/// `url` with one more parameter (`key=value`), whether it has parameters already or not.
pub fn with_parameter(url: &str, parameter: &str) -> String {
    match url.split_once('?') {
        Some((_, "")) => format!("{url}{parameter}"),
        Some(_) => format!("{url}&{parameter}"),
        None => format!("{url}?{parameter}"),
    }
}

/// The URL of database `name` on the PostgreSQL server of `server_url` (which names no
/// database), its parameters (`?sslmode=disable`) kept after the path. One trailing slash of a
/// host goes; a URL without a host (`postgres://?host=/run/postgresql`) keeps its `//`.
pub fn on_database(server_url: &str, name: &str) -> String {
    let (server, parameters) = server_url.split_once('?').unwrap_or((server_url, ""));
    let server = match server.strip_suffix('/') {
        Some(trimmed) if !trimmed.ends_with('/') => trimmed,
        _ => server,
    };
    match parameters {
        "" => format!("{server}/{name}"),
        _ => format!("{server}/{name}?{parameters}"),
    }
}

/// A connection of its own, outside every pool: only [`crate::config::Sabotage::ConnectionPerRequest`]
/// opens one (incident 000's defect, for drills to catch). Nothing else in castellum may.
pub enum StrayConnection {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

impl StrayConnection {
    pub fn open(url: &str) -> Result<StrayConnection, DbError> {
        use diesel::Connection;
        let conn = match Backend::from_url(url)? {
            Backend::Sqlite => SqliteConnection::establish(sqlite_path(url)).map(StrayConnection::Sqlite),
            Backend::Postgres => {
                PgConnection::establish(&postgres_url_with_timeout(url)).map(StrayConnection::Postgres)
            }
        };
        conn.map_err(|e| DbError::Pool(e.to_string()))
    }
}

pub enum DbConn {
    /// With the turn its write transactions take at the file's write lock ([`gate`]).
    Sqlite(PooledConnection<ConnectionManager<SqliteConnection>>, gate::WriteTurn),
    Postgres(PooledConnection<ConnectionManager<PgConnection>>),
}

/// Run the same diesel code on whichever backend `conn` is: `with_conn!(conn, |c| query.execute(c))`.
#[macro_export]
macro_rules! with_conn {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            $crate::db::DbConn::Sqlite(pooled, _) => {
                let $c: &mut diesel::SqliteConnection = &mut *pooled;
                $body
            }
            $crate::db::DbConn::Postgres(pooled) => {
                let $c: &mut diesel::PgConnection = &mut *pooled;
                $body
            }
        }
    };
}

/// A write transaction, the same code on either backend: `write_transaction!(conn, |c| ...)`,
/// the body returning `Result<T, E>` with `E: From<diesel::result::Error>`. On SQLite it first
/// takes the process's turn at the file's write lock ([`gate`]), then `BEGIN IMMEDIATE` (the
/// lock from the start: a transaction that read first and then upgraded could fail at once).
#[macro_export]
macro_rules! write_transaction {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            $crate::db::DbConn::Sqlite(pooled, turn) => match turn.take() {
                Ok(_turn) => {
                    let conn: &mut diesel::SqliteConnection = &mut *pooled;
                    conn.immediate_transaction(|$c| $body)
                }
                Err(busy) => Err(From::from(busy)),
            },
            $crate::db::DbConn::Postgres(pooled) => {
                let conn: &mut diesel::PgConnection = &mut *pooled;
                diesel::Connection::transaction(conn, |$c| $body)
            }
        }
    };
}

#[derive(Clone)]
enum PoolInner {
    Sqlite(Pool<ConnectionManager<SqliteConnection>>, gate::WriteTurn),
    Postgres(Pool<ConnectionManager<PgConnection>>),
}

/// One bounded pool of connections.
#[derive(Clone)]
pub struct DbPool {
    inner: PoolInner,
    pub name: &'static str,
    pub max_size: u32,
    pub holds: Arc<holds::Holds>,
    pub waits: Arc<RecentWaits>,
}

#[derive(Debug)]
struct Customizer {
    backend: Backend,
    pool: &'static str,
    statement_timeout: Duration,
    busy_timeout: Duration,
}

impl<C: SimpleConnection + Send + 'static> CustomizeConnection<C, diesel::r2d2::Error> for Customizer {
    fn on_acquire(&self, conn: &mut C) -> Result<(), diesel::r2d2::Error> {
        let sql = match self.backend {
            // WAL is set once by the migration step; these are per connection.
            // secure_delete: a destroyed identity's sealed key is overwritten, not left in free space.
            Backend::Sqlite => format!(
                "PRAGMA busy_timeout = {}; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA secure_delete = ON;",
                self.busy_timeout.as_millis()
            ),
            // READ COMMITTED whatever the server's default: the audit chain's head is read in a
            // statement after its lock is granted, and must see the last holder's commit
            // (`db::audit`); a transaction-wide snapshot would not.
            Backend::Postgres => format!(
                "SET statement_timeout = {}; SET application_name = 'castellum:{}'; \
                 SET default_transaction_isolation = 'read committed';",
                self.statement_timeout.as_millis(),
                self.pool
            ),
        };
        conn.batch_execute(&sql).map_err(diesel::r2d2::Error::QueryError)
    }
}

/// The last checkout waits of a pool, for a p99 the console can show.
#[derive(Default)]
pub struct RecentWaits(std::sync::Mutex<std::collections::VecDeque<Duration>>);

impl RecentWaits {
    const KEEP: usize = 512;

    fn push(&self, wait: Duration) {
        let mut waits = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if waits.len() == Self::KEEP {
            waits.pop_front();
        }
        waits.push_back(wait);
    }

    pub fn p99(&self) -> Duration {
        let mut waits: Vec<Duration> = self.0.lock().unwrap_or_else(|e| e.into_inner()).iter().copied().collect();
        waits.sort_unstable();
        waits.get((waits.len() * 99).div_ceil(100).saturating_sub(1)).copied().unwrap_or_default()
    }
}

/// Feeds r2d2's checkout/checkin events into the pool metrics and reports long holds.
struct PoolEvents {
    pool: &'static str,
    metrics: Arc<Metrics>,
    slow_hold: Duration,
    waits: Arc<RecentWaits>,
}

impl std::fmt::Debug for PoolEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolEvents").field("pool", &self.pool).finish()
    }
}

impl HandleEvent for PoolEvents {
    fn handle_checkout(&self, event: r2d2::event::CheckoutEvent) {
        self.waits.push(event.duration());
        self.metrics.pool_wait_seconds.get_or_create(&metrics::pool(self.pool)).observe(event.duration().as_secs_f64());
    }
    fn handle_timeout(&self, _event: r2d2::event::TimeoutEvent) {
        self.metrics.pool_timeouts.get_or_create(&metrics::pool(self.pool)).inc();
    }
    fn handle_checkin(&self, event: r2d2::event::CheckinEvent) {
        // The registry's LISTEN connection, held for the engine's life, comes back at shutdown:
        // neither a hold to measure nor a leak.
        if holds::checkin_is_exempt() {
            return;
        }
        let held = event.duration();
        self.metrics.pool_hold_seconds.get_or_create(&metrics::pool(self.pool)).observe(held.as_secs_f64());
        if held > self.slow_hold {
            // Check-in runs where the connection is dropped, so the current span names the holder.
            tracing::warn!(
                pool = self.pool,
                held_ms = held.as_millis() as u64,
                "database connection held longer than the threshold"
            );
        }
    }
}

impl DbPool {
    pub fn build(
        db: &DatabaseConfig,
        cfg: &PoolConfig,
        name: &'static str,
        metrics: Arc<Metrics>,
    ) -> Result<DbPool, DbError> {
        let backend = Backend::from_url(&db.url)?;
        let customizer =
            Customizer { backend, pool: name, statement_timeout: db.statement_timeout, busy_timeout: db.busy_timeout };
        let waits = Arc::new(RecentWaits::default());
        let events = PoolEvents {
            pool: name,
            metrics: metrics.clone(),
            slow_hold: db.slow_hold_threshold,
            waits: waits.clone(),
        };
        metrics.pool_max.get_or_create(&metrics::pool(name)).set(i64::from(cfg.max_size));
        macro_rules! builder {
            () => {
                Pool::builder()
                    .max_size(cfg.max_size)
                    .min_idle(cfg.min_idle)
                    .connection_timeout(cfg.connection_timeout)
                    .max_lifetime(cfg.max_lifetime)
                    .idle_timeout(cfg.idle_timeout)
                    .test_on_check_out(cfg.test_on_check_out)
                    .event_handler(Box::new(events))
            };
        }
        let inner = match backend {
            Backend::Sqlite => PoolInner::Sqlite(
                builder!()
                    .connection_customizer(Box::new(customizer))
                    .build_unchecked(ConnectionManager::new(sqlite_path(&db.url))),
                gate::WriteTurn::new(sqlite_path(&db.url), db.busy_timeout),
            ),
            Backend::Postgres => PoolInner::Postgres(
                builder!()
                    .connection_customizer(Box::new(customizer))
                    .build_unchecked(ConnectionManager::new(postgres_url_with_timeout(&db.url))),
            ),
        };
        Ok(DbPool { inner, name, max_size: cfg.max_size, holds: Arc::default(), waits })
    }

    pub fn backend(&self) -> Backend {
        match self.inner {
            PoolInner::Sqlite(..) => Backend::Sqlite,
            PoolInner::Postgres(_) => Backend::Postgres,
        }
    }

    /// Check out a connection, waiting at most the pool's connection timeout.
    /// The hold is registered with the current span, so a long one names its holder.
    pub fn get(&self) -> Result<holds::Held, DbError> {
        let conn = match &self.inner {
            PoolInner::Sqlite(p, turn) => p.get().map(|c| DbConn::Sqlite(c, turn.clone())),
            PoolInner::Postgres(p) => p.get().map(DbConn::Postgres),
        }
        .map_err(|e| DbError::Pool(e.to_string()))?;
        Ok(holds::Held::new(conn, &self.holds))
    }

    pub fn state(&self) -> r2d2::State {
        match &self.inner {
            PoolInner::Sqlite(p, _) => p.state(),
            PoolInner::Postgres(p) => p.state(),
        }
    }
}

/// The three bulkheads.
#[derive(Clone)]
pub struct Pools {
    pub issuance: DbPool,
    pub control: DbPool,
    pub status: DbPool,
    pub admin: DbPool,
    pub audit: DbPool,
}

impl Pools {
    pub fn build(db: &DatabaseConfig, metrics: Arc<Metrics>) -> Result<Pools, DbError> {
        Ok(Pools {
            issuance: DbPool::build(db, &db.pools.issuance, "issuance", metrics.clone())?,
            control: DbPool::build(db, &db.pools.control, "control", metrics.clone())?,
            status: DbPool::build(db, &db.pools.status, "status", metrics.clone())?,
            admin: DbPool::build(db, &db.pools.admin, "admin", metrics.clone())?,
            audit: DbPool::build(db, &db.pools.audit, "audit", metrics)?,
        })
    }

    pub fn all(&self) -> [&DbPool; 5] {
        [&self.issuance, &self.control, &self.status, &self.admin, &self.audit]
    }

    /// Export the longest current hold per pool and report holds past `threshold` while they
    /// are still held.
    pub fn scan_holds(&self, metrics: &Metrics, threshold: Duration) {
        for pool in self.all() {
            let (longest, long) = pool.holds.scan(threshold);
            metrics.pool_longest_hold.get_or_create(&metrics::pool(pool.name)).set(longest.as_secs_f64());
            for hold in long {
                metrics.pool_long_holds.get_or_create(&metrics::pool(pool.name)).inc();
                tracing::warn!(
                    pool = pool.name,
                    holder = %hold.holder,
                    held_ms = hold.held.as_millis() as u64,
                    "a database connection is held longer than the threshold (possible leak)"
                );
            }
        }
    }

    /// Refresh the pool-state gauges (called when metrics are scraped).
    pub fn export_state(&self, metrics: &Metrics) {
        for pool in self.all() {
            let state = pool.state();
            metrics.pool_connections.get_or_create(&metrics::pool(pool.name)).set(i64::from(state.connections));
            metrics.pool_idle.get_or_create(&metrics::pool(pool.name)).set(i64::from(state.idle_connections));
            metrics
                .pool_in_use
                .get_or_create(&metrics::pool(pool.name))
                .set(i64::from(state.connections - state.idle_connections));
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_database_is_named_before_the_servers_parameters() {
        assert_eq!(
            super::on_database("postgres://postgres@127.0.0.1:5432", "d"),
            "postgres://postgres@127.0.0.1:5432/d"
        );
        assert_eq!(super::on_database("postgres://u@h:1/", "d"), "postgres://u@h:1/d");
        assert_eq!(
            super::on_database("postgres://u@h:1?sslmode=disable&application_name=x", "d"),
            "postgres://u@h:1/d?sslmode=disable&application_name=x"
        );
        assert_eq!(super::on_database("postgres://", "d"), "postgres:///d");
        assert_eq!(super::on_database("postgres://?host=/run/postgresql", "d"), "postgres:///d?host=/run/postgresql");
        assert_eq!(super::with_parameter("postgres://h/d", "a=1"), "postgres://h/d?a=1");
        assert_eq!(super::with_parameter("postgres://h/d?", "a=1"), "postgres://h/d?a=1");
        assert_eq!(super::with_parameter("postgres://h/d?b=2", "a=1"), "postgres://h/d?b=2&a=1");
    }
}
