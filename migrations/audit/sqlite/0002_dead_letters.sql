-- Same shape as the PostgreSQL table; receipt time in microseconds since the epoch.
CREATE TABLE dead_letters (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    received_us  INTEGER NOT NULL,
    reason       TEXT    NOT NULL,
    detail       TEXT    NOT NULL,
    event_id     TEXT,
    event_type   TEXT,
    source_key   TEXT UNIQUE,
    payload      BLOB    NOT NULL,
    payload_size INTEGER NOT NULL
);
CREATE INDEX dead_letters_time_idx ON dead_letters (received_us DESC);
CREATE INDEX dead_letters_reason_time_idx ON dead_letters (reason, received_us DESC);
