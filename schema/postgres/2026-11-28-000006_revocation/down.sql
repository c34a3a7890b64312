DROP TABLE crl_shards;
DROP INDEX certificates_revoked;
ALTER TABLE certificates DROP COLUMN crl_shard;
