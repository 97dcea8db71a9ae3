-- Per-key service access: the service identities allowed to use the key, as a JSON array
-- of strings; '[]' (the default, and every existing key) means any trusted service.
-- Covered by the record MAC when non-empty, so a database writer cannot widen it.
ALTER TABLE crypto_keys ADD COLUMN allowed_services TEXT NOT NULL DEFAULT '[]';
