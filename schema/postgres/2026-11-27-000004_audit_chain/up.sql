-- Each instance's audit rows form a hash chain, sealed by that instance's audit writer after the
-- rows are committed: `seq` counts from 1 per instance, `hash` = SHA-256 over `prev_hash` and the
-- row's canonical encoding. NULL until sealed.
ALTER TABLE audit_log ADD COLUMN seq BIGINT;
ALTER TABLE audit_log ADD COLUMN prev_hash TEXT;
ALTER TABLE audit_log ADD COLUMN hash TEXT;
CREATE UNIQUE INDEX audit_log_chain ON audit_log (instance, seq);
