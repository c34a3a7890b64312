//! The engine's typed errors. Every error a caller can see maps to exactly one RFC 9457 problem
//! type (a stable URN) and one HTTP status, so the HTTP layer is a table lookup, never a guess.

use std::time::Duration;

/// Why a request for a certificate (or anything else the engine does for a client) failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EngineError {
    #[error("malformed request: {0}")]
    MalformedRequest(String),
    #[error("request body too large")]
    PayloadTooLarge,
    #[error("malformed CSR: {0}")]
    MalformedCsr(String),
    #[error("the CSR's signature does not verify")]
    BadCsrSignature,
    #[error("weak or unsupported key: {0}")]
    WeakKey(String),
    #[error("weak or unsupported signature algorithm: {0}")]
    WeakSignatureAlgorithm(String),
    #[error("policy violation: {0}")]
    PolicyViolation(String),
    #[error("missing or invalid credentials (API key or client certificate)")]
    Unauthorized,
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("client may not use profile {0:?}")]
    ForbiddenProfile(String),
    #[error("unknown profile {0:?}")]
    UnknownProfile(String),
    #[error("profile {0:?} is disabled")]
    ProfileDisabled(String),
    #[error("CA {0:?} is disabled or retired")]
    CaDisabled(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("Idempotency-Key was already used with a different request")]
    IdempotencyKeyReuse,
    #[error("not found")]
    NotFound,
    #[error("gone: {0}")]
    Gone(String),
    #[error("bad digest: {0}")]
    BadDigest(String),
    #[error("the identity signer has more signatures waiting than it accepts; retry shortly")]
    IdentitySignerBusy,
    #[error("client is over its rate limit")]
    RateLimited { retry_after: Duration },
    /// The body did not arrive within `http.body_timeout` (the connection is closed).
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(Duration),
    /// This source address holds more connections than `http.connections_per_source`.
    #[error("too many connections from this address")]
    TooManyConnections { retry_after: Duration },
    /// This source address failed authentication more than `http.auth_failures` allows.
    #[error("too many failed authentications from this address")]
    TooManyFailedAuthentications { retry_after: Duration },
    #[error("this client keeps retrying CA {ca:?}, which is refusing its work: back off")]
    TooManyRetries { ca: String, retry_after: Duration },
    #[error("CA {ca:?} cannot take more work now: {reason}")]
    CaOverloaded { ca: String, reason: String, retry_after: Duration },
    #[error("CA {ca:?} is not taking this work now: {reason}")]
    CaUnavailable { ca: String, reason: String, retry_after: Duration },
    #[error("the request's deadline passed before it could be signed")]
    DeadlineExceeded { retry_after: Duration },
    #[error("CA {ca:?} signer failure: {reason}")]
    SignerFailure { ca: String, reason: String },
    #[error("database unavailable")]
    DatabaseUnavailable,
    #[error("the store has more writes waiting than it accepts; retry shortly")]
    StoreOverloaded,
    #[error("engine is shutting down")]
    ShuttingDown,
    /// The path exists with other methods (`allowed`, as the `Allow` header says them).
    #[error("method not allowed here; allowed: {allowed}")]
    MethodNotAllowed { allowed: &'static str },
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// Every slug [`EngineError::slug`] can return, in declaration order: counters indexed by
    /// reason (refusal tallies, outcome metrics) are sized from it.
    pub const SLUGS: [&'static str; 33] = [
        "malformed-request",
        "payload-too-large",
        "malformed-csr",
        "bad-csr-signature",
        "weak-key",
        "weak-signature-algorithm",
        "policy-violation",
        "unauthorized",
        "forbidden-profile",
        "forbidden",
        "unknown-profile",
        "profile-disabled",
        "ca-disabled",
        "idempotency-key-reuse",
        "conflict",
        "not-found",
        "gone",
        "bad-digest",
        "identity-signer-busy",
        "rate-limited",
        "request-timeout",
        "too-many-connections",
        "too-many-failed-authentications",
        "too-many-retries",
        "ca-overloaded",
        "ca-unavailable",
        "deadline-exceeded",
        "signer-failure",
        "database-unavailable",
        "store-overloaded",
        "shutting-down",
        "method-not-allowed",
        "internal",
    ];

    /// This error's place in [`EngineError::SLUGS`] (a scan of 28 short strings: no allocation).
    pub fn slug_index(&self) -> usize {
        let slug = self.slug();
        Self::SLUGS.iter().position(|s| *s == slug).unwrap_or(Self::SLUGS.len() - 1)
    }

    /// The stable problem-type slug; the full `type` URI is [`EngineError::problem_type`].
    pub fn slug(&self) -> &'static str {
        use EngineError::*;
        match self {
            MalformedRequest(_) => "malformed-request",
            PayloadTooLarge => "payload-too-large",
            MalformedCsr(_) => "malformed-csr",
            BadCsrSignature => "bad-csr-signature",
            WeakKey(_) => "weak-key",
            WeakSignatureAlgorithm(_) => "weak-signature-algorithm",
            PolicyViolation(_) => "policy-violation",
            Unauthorized => "unauthorized",
            ForbiddenProfile(_) => "forbidden-profile",
            Forbidden(_) => "forbidden",
            UnknownProfile(_) => "unknown-profile",
            ProfileDisabled(_) => "profile-disabled",
            CaDisabled(_) => "ca-disabled",
            IdempotencyKeyReuse => "idempotency-key-reuse",
            Conflict(_) => "conflict",
            NotFound => "not-found",
            Gone(_) => "gone",
            BadDigest(_) => "bad-digest",
            IdentitySignerBusy => "identity-signer-busy",
            RateLimited { .. } => "rate-limited",
            BodyTimeout(_) => "request-timeout",
            TooManyConnections { .. } => "too-many-connections",
            TooManyFailedAuthentications { .. } => "too-many-failed-authentications",
            TooManyRetries { .. } => "too-many-retries",
            CaOverloaded { .. } => "ca-overloaded",
            CaUnavailable { .. } => "ca-unavailable",
            DeadlineExceeded { .. } => "deadline-exceeded",
            SignerFailure { .. } => "signer-failure",
            DatabaseUnavailable => "database-unavailable",
            StoreOverloaded => "store-overloaded",
            ShuttingDown => "shutting-down",
            MethodNotAllowed { .. } => "method-not-allowed",
            Internal(_) => "internal",
        }
    }

    pub fn problem_type(&self) -> String {
        format!("urn:castellum:problem:{}", self.slug())
    }

    pub fn http_status(&self) -> u16 {
        use EngineError::*;
        match self {
            MalformedRequest(_) | MalformedCsr(_) | BadCsrSignature => 400,
            Unauthorized => 401,
            ForbiddenProfile(_) | Forbidden(_) => 403,
            UnknownProfile(_) | NotFound => 404,
            MethodNotAllowed { .. } => 405,
            ProfileDisabled(_) | CaDisabled(_) | Conflict(_) => 409,
            BodyTimeout(_) => 408,
            Gone(_) => 410,
            PayloadTooLarge => 413,
            WeakKey(_) | WeakSignatureAlgorithm(_) | PolicyViolation(_) | IdempotencyKeyReuse | BadDigest(_) => 422,
            RateLimited { .. }
            | TooManyRetries { .. }
            | TooManyConnections { .. }
            | TooManyFailedAuthentications { .. } => 429,
            Internal(_) => 500,
            CaOverloaded { .. }
            | CaUnavailable { .. }
            | DeadlineExceeded { .. }
            | SignerFailure { .. }
            | DatabaseUnavailable
            | StoreOverloaded
            | IdentitySignerBusy
            | ShuttingDown => 503,
        }
    }

    /// How long a client should wait before retrying, where the answer is "not now".
    pub fn retry_after(&self) -> Option<Duration> {
        use EngineError::*;
        match self {
            RateLimited { retry_after }
            | TooManyConnections { retry_after }
            | TooManyFailedAuthentications { retry_after }
            | TooManyRetries { retry_after, .. }
            | CaOverloaded { retry_after, .. }
            | CaUnavailable { retry_after, .. }
            | DeadlineExceeded { retry_after } => Some(*retry_after),
            StoreOverloaded | IdentitySignerBusy => Some(Duration::from_secs(1)),
            SignerFailure { .. } | DatabaseUnavailable | ShuttingDown => Some(Duration::from_secs(5)),
            _ => None,
        }
    }

    /// Whether this failure says something about the request itself (so replaying the same
    /// request can never succeed) rather than about the engine's state at the time.
    pub fn is_permanent(&self) -> bool {
        self.http_status() < 500
            && !matches!(
                self,
                EngineError::RateLimited { .. }
                    | EngineError::TooManyRetries { .. }
                    | EngineError::TooManyConnections { .. }
                    | EngineError::TooManyFailedAuthentications { .. }
                    | EngineError::BodyTimeout(_)
            )
    }

    /// Rebuild an error recorded in the database (request state) from its slug and detail.
    pub fn from_recorded(slug: &str, detail: &str) -> EngineError {
        use EngineError::*;
        let d = detail.to_string();
        match slug {
            "malformed-request" => MalformedRequest(d),
            "malformed-csr" => MalformedCsr(d),
            "bad-csr-signature" => BadCsrSignature,
            "weak-key" => WeakKey(d),
            "weak-signature-algorithm" => WeakSignatureAlgorithm(d),
            "policy-violation" => PolicyViolation(d),
            "forbidden-profile" => ForbiddenProfile(d),
            "unknown-profile" => UnknownProfile(d),
            "profile-disabled" => ProfileDisabled(d),
            "ca-disabled" => CaDisabled(d),
            "deadline-exceeded" => DeadlineExceeded { retry_after: Duration::from_secs(1) },
            _ => Internal(format!("{slug}: {detail}")),
        }
    }
}

/// Errors of the database layer. They never carry connection strings or secrets.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database connection unavailable: {0}")]
    Pool(String),
    #[error("database query failed: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("database migration failed: {0}")]
    Migration(String),
    #[error("store worker panicked: {0}")]
    WorkerPanic(String),
    #[error("unsupported database URL scheme (expected sqlite://, a file path, or postgres://)")]
    UnsupportedUrl,
    /// A state change refused by the database: the row is in a state nothing leaves.
    #[error("{0}")]
    FinalState(String),
}

impl From<DbError> for EngineError {
    /// The database being unreachable is `503` (retry later); a query the database refuses is a
    /// bug or a schema mismatch, `500`, and is logged.
    fn from(e: DbError) -> Self {
        use diesel::result::{DatabaseErrorKind, Error};
        match e {
            DbError::Pool(_) => EngineError::DatabaseUnavailable,
            DbError::FinalState(why) => EngineError::Conflict(why),
            DbError::Query(Error::DatabaseError(DatabaseErrorKind::ClosedConnection, _))
            | DbError::Query(Error::BrokenTransactionManager) => EngineError::DatabaseUnavailable,
            DbError::Query(Error::DatabaseError(_, ref info)) if is_unavailable_message(info.message()) => {
                EngineError::DatabaseUnavailable
            }
            other => {
                tracing::error!(error = %other, "database refused a query");
                EngineError::Internal(format!("database: {other}"))
            }
        }
    }
}

fn is_unavailable_message(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("connection") || m.contains("timeout") || m.contains("locked") || m.contains("busy")
}
