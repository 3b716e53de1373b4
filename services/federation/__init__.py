"""Federation administration: create, list, status, rollback, pin; client key registration."""
