-- Messages audit-svc could never store (undecodable, invalid, unknown type, too large,
-- refused by the database), kept so they can be counted, inspected and replayed. The
-- payload is the bytes as received, cut at audit.max_details_bytes (payload_size is the
-- full size); detail describes the failure, never the event's details.
CREATE TABLE dead_letters (
    id           BIGSERIAL    PRIMARY KEY,
    received_at  TIMESTAMPTZ  NOT NULL,
    reason       VARCHAR(16)  NOT NULL,
    detail       VARCHAR(256) NOT NULL,
    event_id     UUID,
    event_type   VARCHAR(128),
    -- `<stream>:<sequence>` on NATS: a redelivered message is recorded once.
    source_key   TEXT UNIQUE,
    payload      BYTEA        NOT NULL,
    payload_size INTEGER      NOT NULL
);
CREATE INDEX dead_letters_time_idx ON dead_letters (received_at DESC);
CREATE INDEX dead_letters_reason_time_idx ON dead_letters (reason, received_at DESC);
