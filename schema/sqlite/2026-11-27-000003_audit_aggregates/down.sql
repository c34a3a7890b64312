ALTER TABLE audit_log DROP COLUMN first_at;
ALTER TABLE audit_log DROP COLUMN count;
