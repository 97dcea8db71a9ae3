-- Same shape as the PostgreSQL migration; times in microseconds since the epoch.
CREATE TABLE alerts (
    id              TEXT    PRIMARY KEY,
    rule            TEXT    NOT NULL,
    group_key       TEXT    NOT NULL,
    severity        TEXT    NOT NULL,
    status          TEXT    NOT NULL CHECK (status IN ('open', 'acknowledged')),
    first_seen_us   INTEGER NOT NULL,
    last_seen_us    INTEGER NOT NULL,
    count           INTEGER NOT NULL,
    raised_us       INTEGER NOT NULL,
    acknowledged_us INTEGER,
    acknowledged_by TEXT,
    note            TEXT
);
CREATE UNIQUE INDEX alerts_open_idx ON alerts (rule, group_key) WHERE status = 'open';
CREATE INDEX alerts_raised_idx ON alerts (raised_us DESC, id DESC);
CREATE INDEX alerts_rule_group_idx ON alerts (rule, group_key, last_seen_us DESC);

CREATE TABLE alert_events (
    alert_id TEXT NOT NULL REFERENCES alerts (id),
    event_id TEXT NOT NULL,
    PRIMARY KEY (alert_id, event_id)
) WITHOUT ROWID;

CREATE TABLE alert_webhook_deliveries (
    id              TEXT    PRIMARY KEY,
    alert_id        TEXT    NOT NULL REFERENCES alerts (id),
    webhook         TEXT    NOT NULL,
    body            TEXT    NOT NULL,
    status          TEXT    NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL,
    next_attempt_us INTEGER NOT NULL,
    last_error      TEXT,
    created_us      INTEGER NOT NULL,
    finished_us     INTEGER,
    UNIQUE (alert_id, webhook)
);
CREATE INDEX alert_webhook_due_idx ON alert_webhook_deliveries (next_attempt_us)
    WHERE status = 'pending';
