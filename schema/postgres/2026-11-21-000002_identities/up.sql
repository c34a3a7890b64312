-- Disposable identities: a key the engine generated, sealed under the key-encryption key
-- (AES-256-GCM, the identity id as additional data), and the certificate issued for it.
-- sealed_key is NULL once the identity is destroyed (last use or expiry).
CREATE TABLE identities (
    id             TEXT PRIMARY KEY NOT NULL,
    client         TEXT NOT NULL,
    profile        TEXT NOT NULL,
    ca_id          TEXT NOT NULL,
    serial         TEXT NOT NULL UNIQUE,
    key_type       TEXT NOT NULL,
    -- ecdsa, ed25519, rsa-pkcs1 or rsa-pss: fixed at creation.
    signature_scheme TEXT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('active', 'destroyed')),
    sealed_key     BYTEA,
    kek_id         TEXT NOT NULL,
    uses           BIGINT NOT NULL,
    max_uses       BIGINT NOT NULL,
    created_at     BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL,
    destroyed_at   BIGINT,
    destroy_reason TEXT,
    CHECK (state = 'active' OR sealed_key IS NULL)
);
CREATE INDEX identities_expiry ON identities (state, expires_at);
