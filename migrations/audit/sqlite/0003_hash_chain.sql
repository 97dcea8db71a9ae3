-- Tamper evidence: same shape as the PostgreSQL migration (see
-- crates/audit-svc/docs/chain.md). Time as microseconds since the epoch.
ALTER TABLE security_events ADD COLUMN seq INTEGER;
ALTER TABLE security_events ADD COLUMN hash BLOB;
CREATE UNIQUE INDEX security_events_seq_idx ON security_events (seq);

CREATE TABLE audit_chain_head (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    seq            INTEGER NOT NULL,
    hash           BLOB    NOT NULL,
    legacy_chained INTEGER NOT NULL
);
INSERT INTO audit_chain_head (id, seq, hash, legacy_chained)
VALUES (1, 0, zeroblob(32), 0);

CREATE TABLE audit_checkpoints (
    seq         INTEGER PRIMARY KEY,
    head_hash   BLOB    NOT NULL,
    created_us  INTEGER NOT NULL,
    origin      TEXT    NOT NULL,
    key_name    TEXT    NOT NULL,
    key_version INTEGER NOT NULL,
    signature   TEXT    NOT NULL
);

-- Search: the address as 16 bytes (IPv4 mapped into IPv6), so a CIDR block is a byte
-- range; the other common filters get an index that also serves the time order.
ALTER TABLE security_events ADD COLUMN ip_bytes BLOB;
CREATE INDEX security_events_ip_idx ON security_events (ip_bytes);
CREATE INDEX security_events_actor_time_idx ON security_events (actor_id, ts_us DESC, id DESC);
CREATE INDEX security_events_subject_time_idx ON security_events (subject, ts_us DESC, id DESC);
