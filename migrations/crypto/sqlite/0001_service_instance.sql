-- Installation identity: made on first start, kept across restarts.
CREATE TABLE service_instance (
    id         TEXT PRIMARY KEY,
    created_us INTEGER NOT NULL
);
