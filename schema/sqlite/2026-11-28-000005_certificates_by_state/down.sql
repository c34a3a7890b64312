DROP INDEX certificates_by_state;
