-- Same as the PostgreSQL migration: the services allowed to use a key (JSON array,
-- '[]' = any trusted service).
ALTER TABLE crypto_keys ADD COLUMN allowed_services TEXT NOT NULL DEFAULT '[]';
