-- All times are milliseconds since the Unix epoch (BIGINT), the same on both backends.

CREATE TABLE cas (
    id         TEXT PRIMARY KEY NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('enabled', 'parked', 'draining', 'disabled', 'retired')),
    updated_at BIGINT NOT NULL
);

CREATE TABLE profiles (
    id         TEXT PRIMARY KEY NOT NULL,
    ca_id      TEXT NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('enabled', 'disabled')),
    updated_at BIGINT NOT NULL
);

-- One row: bumped in the same transaction as every CA or profile state change.
CREATE TABLE registry (
    id      INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO registry (id, version) VALUES (1, 1);

CREATE TABLE instances (
    id               TEXT PRIMARY KEY NOT NULL,
    started_at       BIGINT NOT NULL,
    heartbeat_at     BIGINT NOT NULL,
    registry_version BIGINT NOT NULL
);

CREATE TABLE requests (
    id              TEXT PRIMARY KEY NOT NULL,
    client          TEXT NOT NULL,
    profile         TEXT NOT NULL,
    ca_id           TEXT NOT NULL,
    mode            TEXT NOT NULL CHECK (mode IN ('sync', 'async')),
    state           TEXT NOT NULL CHECK (state IN ('pending', 'issued', 'failed', 'retryable', 'expired', 'parked')),
    idempotency_key TEXT,
    body_sha256     TEXT NOT NULL,
    csr_der         BYTEA NOT NULL,
    serial          TEXT,
    error_type      TEXT,
    error_detail    TEXT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    claimed_by      TEXT,
    claimed_until   BIGINT
);
CREATE UNIQUE INDEX requests_idempotency ON requests (client, idempotency_key);
CREATE INDEX requests_pending ON requests (state, claimed_until);

CREATE TABLE certificates (
    serial            TEXT PRIMARY KEY NOT NULL,
    ca_id             TEXT NOT NULL,
    profile           TEXT NOT NULL,
    client            TEXT NOT NULL,
    request_id        TEXT,
    state             TEXT NOT NULL CHECK (state IN ('signing', 'issued', 'abandoned', 'revoked')),
    tbs_der           BYTEA NOT NULL,
    cert_der          BYTEA,
    not_before        BIGINT NOT NULL,
    not_after         BIGINT NOT NULL,
    created_at        BIGINT NOT NULL,
    issued_at         BIGINT,
    revoked_at        BIGINT,
    revocation_reason INTEGER
);
CREATE INDEX certificates_ca ON certificates (ca_id, state);

CREATE TABLE audit_log (
    id       BIGSERIAL PRIMARY KEY,
    at       BIGINT NOT NULL,
    instance TEXT NOT NULL,
    actor    TEXT NOT NULL,
    action   TEXT NOT NULL,
    target   TEXT NOT NULL,
    outcome  TEXT NOT NULL,
    detail   TEXT NOT NULL
);
