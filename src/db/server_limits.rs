//! What a PostgreSQL server allows castellum's role to open, read from the server itself for
//! `check-config`: configuration can only say what an operator believes the server allows.

use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};

use crate::error::DbError;

/// A server's connection limits as it reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, QueryableByName)]
pub struct ServerLimits {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pub max_connections: i32,
    /// Slots only superusers may take.
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pub superuser_reserved_connections: i32,
    /// Slots kept for roles with `pg_use_reserved_connections` (PostgreSQL 16+; 0 before).
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pub reserved_connections: i32,
    /// The role's `CONNECTION LIMIT` (-1: none).
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pub role_limit: i32,
    /// The database's `CONNECTION LIMIT` (-1: none).
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pub database_limit: i32,
}

impl ServerLimits {
    /// Read them over one short-lived connection of the configured role.
    pub fn read(url: &str) -> Result<ServerLimits, DbError> {
        let with_timeout = super::postgres_url_with_timeout(url);
        let mut conn =
            PgConnection::establish(&with_timeout).map_err(|e| DbError::Pool(without_password(url, &e.to_string())))?;
        Ok(diesel::sql_query(
            "SELECT current_setting('max_connections')::int AS max_connections, \
             current_setting('superuser_reserved_connections')::int AS superuser_reserved_connections, \
             COALESCE(current_setting('reserved_connections', true), '0')::int AS reserved_connections, \
             (SELECT rolconnlimit FROM pg_roles WHERE rolname = current_user) AS role_limit, \
             (SELECT datconnlimit FROM pg_database WHERE datname = current_database()) AS database_limit",
        )
        .get_result(&mut conn)?)
    }

    /// Slots an ordinary role may take: `max_connections` less the reserved ones.
    pub fn open_to_roles(&self) -> u32 {
        let open = self.max_connections - self.superuser_reserved_connections - self.reserved_connections;
        open.max(0) as u32
    }
}

/// `message` with the URL's password, if it has one, replaced: libpq repeats a malformed URL
/// whole in its errors, and check-config prints them.
fn without_password(url: &str, message: &str) -> String {
    let userinfo = url.split_once("://").and_then(|(_, rest)| rest.split_once('@')).map(|(info, _)| info);
    match userinfo.and_then(|info| info.split_once(':')).map(|(_, password)| password) {
        Some(password) if !password.is_empty() => message.replace(password, "<redacted>"),
        _ => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::without_password;

    #[test]
    fn a_password_never_reaches_the_message() {
        let url = "postgres://castellum:s3cret@db:5432/castellum";
        let said = without_password(url, &format!("invalid URI: \"{url}\""));
        assert!(!said.contains("s3cret") && said.contains("<redacted>"), "{said}");
        assert_eq!(without_password("postgres://castellum@db/c", "refused"), "refused");
    }
}
