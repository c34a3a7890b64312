ALTER TABLE instances ADD COLUMN address TEXT NOT NULL DEFAULT '';
-- This instance's actor tree (cells, store, pools) as JSON, so any console can show it.
ALTER TABLE instances ADD COLUMN tree TEXT NOT NULL DEFAULT '{}';
