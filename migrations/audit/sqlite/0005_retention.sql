-- Retention (crates/audit-svc/docs/retention.md): same tables as the PostgreSQL
-- migration, times in microseconds since the epoch. SQLite has no partitions: expired
-- rows are deleted by range, each removed run of positions recorded (and signed) in
-- audit_prunes first. SQLite has no roles either: the file's permissions are the guard.
ALTER TABLE audit_chain_head ADD COLUMN received_us INTEGER;
UPDATE audit_chain_head SET received_us = (SELECT max(received_us) FROM security_events);
CREATE INDEX security_events_received_idx ON security_events (received_us);

CREATE TABLE audit_prune_runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    created_us  INTEGER NOT NULL,
    origin      TEXT    NOT NULL,
    key_name    TEXT    NOT NULL,
    key_version INTEGER NOT NULL,
    signature   TEXT    NOT NULL
);
CREATE TABLE audit_prunes (
    first_seq INTEGER PRIMARY KEY,
    last_seq  INTEGER NOT NULL CHECK (last_seq >= first_seq),
    last_hash BLOB    NOT NULL,
    rows      INTEGER NOT NULL,
    reason    TEXT    NOT NULL,
    run_id    INTEGER NOT NULL REFERENCES audit_prune_runs (id)
);
CREATE INDEX audit_prunes_run_idx ON audit_prunes (run_id);

CREATE TABLE audit_legal_holds (
    id          TEXT PRIMARY KEY,
    name        TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    type_prefix TEXT    NOT NULL,
    actor_id    TEXT    NOT NULL,
    subject     TEXT    NOT NULL,
    since_us    INTEGER,
    until_us    INTEGER,
    created_us  INTEGER NOT NULL,
    created_by  TEXT    NOT NULL,
    released_us INTEGER,
    released_by TEXT
);
CREATE UNIQUE INDEX audit_legal_holds_active_name_idx ON audit_legal_holds (name)
    WHERE released_us IS NULL;
