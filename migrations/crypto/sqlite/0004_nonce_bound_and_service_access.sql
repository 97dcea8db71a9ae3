-- Same as the PostgreSQL migration: the services allowed to use a key (JSON array,
-- '[]' = any trusted service).
ALTER TABLE crypto_keys ADD COLUMN allowed_services TEXT NOT NULL DEFAULT '[]';
-- Encryptions reserved under each version (random-nonce AEADs), incremented in blocks
-- before use, so it may over-count but never under-count. Existing versions start at 0.
ALTER TABLE crypto_key_versions ADD COLUMN encryptions INTEGER NOT NULL DEFAULT 0
    CHECK (encryptions >= 0);
