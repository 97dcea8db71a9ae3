-- The audit trail. Columns of the requirement document (id, event_type, timestamp,
-- user_id, ip_address, details, severity) plus the rest of the SecurityEvent envelope.
CREATE TABLE security_events (
    id          UUID PRIMARY KEY,
    event_type  VARCHAR(128) NOT NULL,
    "timestamp" TIMESTAMPTZ  NOT NULL,
    service     VARCHAR(32)  NOT NULL,
    user_id     UUID,
    actor_kind  VARCHAR(16)  NOT NULL,
    actor_id    TEXT         NOT NULL,
    subject     TEXT         NOT NULL,
    ip_address  INET,
    outcome     VARCHAR(16)  NOT NULL,
    severity    VARCHAR(20)  NOT NULL,
    details     JSONB        NOT NULL,
    trace_id    VARCHAR(32)  NOT NULL,
    received_at TIMESTAMPTZ  NOT NULL DEFAULT now()
);
CREATE INDEX security_events_time_idx ON security_events ("timestamp" DESC, id DESC);
CREATE INDEX security_events_type_time_idx ON security_events (event_type, "timestamp" DESC, id DESC);

CREATE TABLE service_instance (
    id         UUID PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL
);
