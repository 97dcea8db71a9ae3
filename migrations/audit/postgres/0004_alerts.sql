-- Alerts raised by the rules of [audit.alerts] (see crates/audit-svc/docs/alerts.md).
-- Counting is done on security_events, never in memory, so every replica and every
-- redelivery sees the same numbers; this table only records what was raised.
CREATE TABLE alerts (
    id              UUID         PRIMARY KEY,
    rule            VARCHAR(64)  NOT NULL,
    group_key       TEXT         NOT NULL,
    severity        VARCHAR(20)  NOT NULL,
    status          VARCHAR(16)  NOT NULL CHECK (status IN ('open', 'acknowledged')),
    first_seen      TIMESTAMPTZ  NOT NULL,
    last_seen       TIMESTAMPTZ  NOT NULL,
    count           BIGINT       NOT NULL,
    raised_at       TIMESTAMPTZ  NOT NULL,
    acknowledged_at TIMESTAMPTZ,
    acknowledged_by TEXT,
    note            TEXT
);
-- At most one open alert per rule and group: two replicas evaluating the same batch (or
-- a redelivery) cannot both raise; the loser updates the open one instead.
CREATE UNIQUE INDEX alerts_open_idx ON alerts (rule, group_key) WHERE status = 'open';
CREATE INDEX alerts_raised_idx ON alerts (raised_at DESC, id DESC);
-- The newest acknowledged alert of a group bounds what a new alert may count.
CREATE INDEX alerts_rule_group_idx ON alerts (rule, group_key, last_seen DESC);

-- Events behind an alert (at most about 100 per alert).
CREATE TABLE alert_events (
    alert_id UUID NOT NULL REFERENCES alerts (id),
    event_id UUID NOT NULL,
    PRIMARY KEY (alert_id, event_id)
);

-- One row per (alert, webhook): the durable retry queue. A restart resumes what is
-- pending; `attempts` counts every attempt started, including one cut short by a crash.
CREATE TABLE alert_webhook_deliveries (
    id              UUID         PRIMARY KEY,
    alert_id        UUID         NOT NULL REFERENCES alerts (id),
    webhook         VARCHAR(64)  NOT NULL,
    body            TEXT         NOT NULL,
    status          VARCHAR(16)  NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER      NOT NULL,
    next_attempt_at TIMESTAMPTZ  NOT NULL,
    last_error      VARCHAR(256),
    created_at      TIMESTAMPTZ  NOT NULL,
    finished_at     TIMESTAMPTZ,
    UNIQUE (alert_id, webhook)
);
CREATE INDEX alert_webhook_due_idx ON alert_webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
