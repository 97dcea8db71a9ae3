-- Installation identity: made on first start, kept across restarts.
CREATE TABLE service_instance (
    id         UUID PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL
);
