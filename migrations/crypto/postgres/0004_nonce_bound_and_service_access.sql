-- Per-key service access: the service identities allowed to use the key, as a JSON array
-- of strings; '[]' (the default, and every existing key) means any trusted service.
-- Covered by the record MAC when non-empty, so a database writer cannot widen it.
ALTER TABLE crypto_keys ADD COLUMN allowed_services TEXT NOT NULL DEFAULT '[]';
-- Encryptions reserved under each version (random-nonce AEADs), incremented in blocks
-- before use, so it may over-count but never under-count. Existing versions start at 0.
ALTER TABLE crypto_key_versions ADD COLUMN encryptions BIGINT NOT NULL DEFAULT 0
    CHECK (encryptions >= 0);
