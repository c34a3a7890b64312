-- Refusals are audited in aggregate: one row per (client, target, action, reason) per interval,
-- `count` of them between `first_at` and `at` (the last). A single event keeps count 1.
ALTER TABLE audit_log ADD COLUMN count BIGINT NOT NULL DEFAULT 1;
ALTER TABLE audit_log ADD COLUMN first_at BIGINT;
