-- The resumer marks write-ahead records a crash left in `signing` as abandoned, every few
-- seconds: `WHERE state = 'signing' AND created_at < ?`. certificates_ca starts with ca_id, so
-- without this index that statement read every stored certificate (at 10 million, SQLite held
-- its write lock for over 2 s each time and issuance failed).
CREATE INDEX certificates_by_state ON certificates (state, created_at);
