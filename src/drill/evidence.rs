//! What the database itself says, read with plain SQL over a connection of the drill's own: the
//! judges never ask the engine's code (its queries, counters or metrics) whether it kept a
//! promise about what it stored or signed.

use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl, SqliteConnection};

use super::target::{DrillDb, EVIDENCE_APP};
use super::DrillError;

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

enum Conn {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

/// A read-only look at a drill's database.
pub struct Evidence {
    conn: Conn,
}

impl Evidence {
    /// `url` as [`DrillDb::admin_side_url`] gives it.
    pub fn open(url: &str) -> Result<Evidence, DrillError> {
        let conn = match url.strip_prefix("sqlite://") {
            Some(path) => SqliteConnection::establish(path).map(Conn::Sqlite),
            // Named, so the drill's connection counts leave it out.
            None => PgConnection::establish(&crate::db::with_parameter(
                url,
                &format!("connect_timeout=5&application_name={EVIDENCE_APP}"),
            ))
            .map(Conn::Postgres),
        };
        let mut evidence = conn.map(|conn| Evidence { conn }).map_err(|e| DrillError::Evidence(e.to_string()))?;
        if let Conn::Sqlite(c) = &mut evidence.conn {
            // Wait out the engine's checkpoints; never write.
            diesel::sql_query("PRAGMA busy_timeout = 5000")
                .execute(c)
                .map_err(|e| DrillError::Evidence(e.to_string()))?;
            diesel::sql_query("PRAGMA query_only = ON").execute(c).map_err(|e| DrillError::Evidence(e.to_string()))?;
        }
        Ok(evidence)
    }

    /// Run `read` on a fresh look at `db`, off the async threads that drive the load.
    pub async fn read<T: Send + 'static>(
        db: Option<&DrillDb>,
        read: impl FnOnce(&mut Evidence) -> Result<T, DrillError> + Send + 'static,
    ) -> Result<T, DrillError> {
        let url = db.map(DrillDb::admin_side_url).ok_or_else(|| {
            DrillError::Unsupported("judging from the database needs an engine the drill started".into())
        })?;
        tokio::task::spawn_blocking(move || read(&mut Evidence::open(&url)?))
            .await
            .map_err(|e| DrillError::Evidence(e.to_string()))?
    }

    /// `SELECT count(*) AS n ...`, the same text on both backends.
    pub fn count(&mut self, sql: &str) -> Result<i64, DrillError> {
        let query = diesel::sql_query(sql);
        let row = match &mut self.conn {
            Conn::Sqlite(c) => query.get_result::<Count>(c),
            Conn::Postgres(c) => query.get_result::<Count>(c),
        };
        row.map(|r| r.n).map_err(|e| DrillError::Evidence(format!("{sql}: {e}")))
    }

    /// Certificates signed and stored, less the distinct ones handed to asynchronous requests:
    /// one statement, so no commit falls between the two counts.
    pub fn issued_less_async_delivered(&mut self) -> Result<i64, DrillError> {
        self.count(
            "SELECT (SELECT count(*) FROM certificates WHERE state = 'issued') - (SELECT count(DISTINCT serial) FROM requests WHERE mode = 'async' AND state = 'issued' AND serial IS NOT NULL) AS n",
        )
    }

    /// Requests of these CAs still waiting (pending or parked).
    pub fn waiting(&mut self, cas: &[&str]) -> Result<i64, DrillError> {
        let list = quoted(cas.iter().copied())?;
        self.count(&format!(
            "SELECT count(*) AS n FROM requests WHERE ca_id IN ({list}) AND state IN ('pending', 'parked')"
        ))
    }

    /// Certificates whose write-ahead record (the step just before the key signs) was written after
    /// their stored request had expired.
    pub fn signed_after_expiry(&mut self) -> Result<i64, DrillError> {
        self.count(
            "SELECT count(*) AS n FROM certificates c JOIN requests r ON c.request_id = r.id WHERE c.created_at > r.expires_at",
        )
    }

    /// Requests and certificates (any state) for these CAs written after `since_ms`.
    pub fn rows_for_cas_since(&mut self, cas: &[&str], since_ms: i64) -> Result<(i64, i64), DrillError> {
        let list = quoted(cas.iter().copied())?;
        Ok((
            self.count(&format!(
                "SELECT count(*) AS n FROM requests WHERE ca_id IN ({list}) AND created_at > {since_ms}"
            ))?,
            self.count(&format!(
                "SELECT count(*) AS n FROM certificates WHERE ca_id IN ({list}) AND created_at > {since_ms}"
            ))?,
        ))
    }

    /// Rows written for a client: its audit rows (single or aggregate) and its requests.
    pub fn rows_of_client(&mut self, client: &str) -> Result<i64, DrillError> {
        let client = quoted([client])?;
        Ok(self.count(&format!("SELECT count(*) AS n FROM audit_log WHERE actor = {client}"))?
            + self.count(&format!("SELECT count(*) AS n FROM requests WHERE client = {client}"))?)
    }

    /// Requests of this CA held parked right now.
    pub fn parked(&mut self, ca: &str) -> Result<i64, DrillError> {
        let ca = quoted([ca])?;
        self.count(&format!("SELECT count(*) AS n FROM requests WHERE ca_id = {ca} AND state = 'parked'"))
    }

    /// Of these requests: how many are issued, and how many of their certificates were signed
    /// before `not_before_ms`.
    pub fn issued_among(&mut self, ids: &[String], not_before_ms: i64) -> Result<(i64, i64), DrillError> {
        if ids.is_empty() {
            return Ok((0, 0));
        }
        let list = quoted(ids.iter().map(String::as_str))?;
        Ok((
            self.count(&format!("SELECT count(*) AS n FROM requests WHERE id IN ({list}) AND state = 'issued'"))?,
            self.count(&format!(
                "SELECT count(*) AS n FROM requests r JOIN certificates c ON c.serial = r.serial WHERE r.id IN ({list}) AND c.created_at < {not_before_ms}"
            ))?,
        ))
    }
}

impl Evidence {
    /// Wait (up to `within`) until `instance` holds a synchronous keyed attempt whose
    /// write-ahead record is committed and not yet signed: whether one was found.
    pub fn wait_for_keyed_attempt_recorded(
        &mut self,
        instance: &str,
        within: std::time::Duration,
    ) -> Result<bool, DrillError> {
        let until = std::time::Instant::now() + within;
        while std::time::Instant::now() < until {
            if self.keyed_attempt_recorded(instance)? {
                return Ok(true);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(false)
    }

    /// Whether `instance` holds a synchronous keyed attempt whose write-ahead record is
    /// committed and not yet signed, now.
    pub fn keyed_attempt_recorded(&mut self, instance: &str) -> Result<bool, DrillError> {
        let sql = format!(
            "SELECT count(*) AS n FROM requests r JOIN certificates c ON c.request_id = r.id \
             WHERE r.claimed_by = {} AND r.mode = 'sync' AND r.state = 'pending' \
             AND r.idempotency_key IS NOT NULL AND c.state = 'signing'",
            quoted([instance])?
        );
        Ok(self.count(&sql)? > 0)
    }

    /// Of these requests: how many are issued, and how many issued certificates name them.
    pub fn issued_requests_and_certificates(&mut self, ids: &[String]) -> Result<(i64, i64), DrillError> {
        if ids.is_empty() {
            return Ok((0, 0));
        }
        let list = quoted(ids.iter().map(String::as_str))?;
        Ok((
            self.count(&format!("SELECT count(*) AS n FROM requests WHERE id IN ({list}) AND state = 'issued'"))?,
            self.count(&format!(
                "SELECT count(*) AS n FROM certificates WHERE request_id IN ({list}) AND state = 'issued'"
            ))?,
        ))
    }

    /// Issued certificates for the requests made with these idempotency keys.
    pub fn certificates_of_keys(&mut self, keys: &[String]) -> Result<i64, DrillError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let list = quoted(keys.iter().map(String::as_str))?;
        self.count(&format!(
            "SELECT count(*) AS n FROM certificates c JOIN requests r ON c.request_id = r.id WHERE r.idempotency_key IN ({list}) AND c.state = 'issued'"
        ))
    }
}

/// A SQL list of quoted identifiers; anything but ids (letters, digits, '-', '_') is refused.
fn quoted<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<String, DrillError> {
    let mut out = Vec::new();
    for item in items {
        if item.is_empty() || !item.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(DrillError::Evidence(format!("not an id: {item:?}")));
        }
        out.push(format!("'{item}'"));
    }
    Ok(out.join(", "))
}
