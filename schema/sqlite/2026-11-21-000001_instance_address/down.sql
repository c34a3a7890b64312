ALTER TABLE instances DROP COLUMN tree;
ALTER TABLE instances DROP COLUMN address;
