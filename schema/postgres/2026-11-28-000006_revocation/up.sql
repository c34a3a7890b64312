-- Revocation (issue 14). Additive: one nullable column, one index, one table.
-- The CRL shard a certificate was given at issuance (its CRL distribution point names it).
-- Certificates issued before this migration have none and are listed on shard 0.
ALTER TABLE certificates ADD COLUMN crl_shard INTEGER;
-- A shard's CRL reads only its revoked certificates.
CREATE INDEX certificates_revoked ON certificates (ca_id, crl_shard) WHERE revoked_at IS NOT NULL;
-- Each CA's CRL shards: the latest CRL (DER), its number (only grows, across instances and
-- restarts), when a revocation last made it stale, and which instance holds the lease to
-- generate it.
CREATE TABLE crl_shards (
    ca_id       TEXT NOT NULL,
    shard       INTEGER NOT NULL,
    crl_number  BIGINT NOT NULL DEFAULT 0,
    this_update BIGINT,
    next_update BIGINT,
    der         BYTEA,
    stale_since BIGINT,
    revision    BIGINT NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until BIGINT,
    PRIMARY KEY (ca_id, shard)
);
