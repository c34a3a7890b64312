DROP TABLE audit_log;
DROP TABLE certificates;
DROP TABLE requests;
DROP TABLE instances;
DROP TABLE registry;
DROP TABLE profiles;
DROP TABLE cas;
