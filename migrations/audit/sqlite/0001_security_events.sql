-- Same shape as the PostgreSQL table; time as microseconds since the epoch so that
-- ordering and range filters are exact and identical across backends.
CREATE TABLE security_events (
    id          TEXT PRIMARY KEY,
    event_type  TEXT NOT NULL,
    ts_us       INTEGER NOT NULL,
    service     TEXT NOT NULL,
    user_id     TEXT,
    actor_kind  TEXT NOT NULL,
    actor_id    TEXT NOT NULL,
    subject     TEXT NOT NULL,
    ip_address  TEXT,
    outcome     TEXT NOT NULL,
    severity    TEXT NOT NULL,
    details     TEXT NOT NULL,
    trace_id    TEXT NOT NULL,
    received_us INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX security_events_time_idx ON security_events (ts_us DESC, id DESC);
CREATE INDEX security_events_type_time_idx ON security_events (event_type, ts_us DESC, id DESC);

CREATE TABLE service_instance (
    id         TEXT PRIMARY KEY,
    created_us INTEGER NOT NULL
);
