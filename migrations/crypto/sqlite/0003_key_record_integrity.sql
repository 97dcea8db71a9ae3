-- Same as the PostgreSQL migration: a write counter for compare-and-set, and the
-- record's integrity tag (NULL until the service backfills it at start).
ALTER TABLE crypto_keys ADD COLUMN policy_version INTEGER NOT NULL DEFAULT 0
    CHECK (policy_version >= 0);
ALTER TABLE crypto_keys ADD COLUMN record_mac TEXT;
