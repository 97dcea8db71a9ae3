-- Tamper evidence (see crates/audit-svc/docs/chain.md for the canonical encoding).
-- Every stored event gets its position in one linear chain and
-- hash = SHA-256(previous hash || canonical record). Rows stored before this migration
-- have no position yet: audit-svc chains them, oldest receipt first, once at start-up
-- (`legacy_chained` flips to true), after which an unchained row can only be a row
-- somebody inserted by hand, and VerifyChain reports it.
ALTER TABLE security_events ADD COLUMN seq BIGINT;
ALTER TABLE security_events ADD COLUMN hash BYTEA;
CREATE UNIQUE INDEX security_events_seq_idx ON security_events (seq);

-- The sequencer: one row whose lock every writer takes for the length of its batch
-- transaction, so replicas that ingest concurrently still extend one linear chain.
CREATE TABLE audit_chain_head (
    id             SMALLINT PRIMARY KEY CHECK (id = 1),
    seq            BIGINT  NOT NULL,
    hash           BYTEA   NOT NULL,
    legacy_chained BOOLEAN NOT NULL
);
INSERT INTO audit_chain_head (id, seq, hash, legacy_chained)
VALUES (1, 0, decode(repeat('00', 32), 'hex'), false);

-- Signed statements "the chain had this head at this position at this time".
CREATE TABLE audit_checkpoints (
    seq         BIGINT PRIMARY KEY,
    head_hash   BYTEA        NOT NULL,
    created_at  TIMESTAMPTZ  NOT NULL,
    origin      TEXT         NOT NULL,
    key_name    TEXT         NOT NULL,
    key_version INTEGER      NOT NULL,
    signature   TEXT         NOT NULL
);

-- Search (SearchEvents): the common filters each have an index that also serves the
-- newest-first order; addresses and CIDR blocks go through GiST, detail matches through
-- GIN (`details @> '{"key": "value"}'`).
CREATE INDEX security_events_actor_time_idx ON security_events (actor_id, "timestamp" DESC, id DESC);
CREATE INDEX security_events_subject_time_idx ON security_events (subject, "timestamp" DESC, id DESC);
CREATE INDEX security_events_ip_idx ON security_events USING gist (ip_address inet_ops);
CREATE INDEX security_events_details_idx ON security_events USING gin (details jsonb_path_ops);
