-- Same shape as the PostgreSQL tables; times as microseconds since the epoch, booleans
-- as 0/1. Key material is stored only wrapped by a KEK (`kek_id` names it).
CREATE TABLE crypto_keys (
    name                    TEXT    NOT NULL PRIMARY KEY,
    key_type                TEXT    NOT NULL,
    latest_version          INTEGER NOT NULL CHECK (latest_version BETWEEN 0 AND 4294967295),
    min_decryption_version  INTEGER NOT NULL CHECK (min_decryption_version BETWEEN 0 AND 4294967295),
    min_encryption_version  INTEGER NOT NULL CHECK (min_encryption_version BETWEEN 0 AND 4294967295),
    rotation_period_seconds INTEGER NOT NULL CHECK (rotation_period_seconds >= 0),
    deletion_allowed        INTEGER NOT NULL CHECK (deletion_allowed IN (0, 1)),
    exportable              INTEGER NOT NULL CHECK (exportable IN (0, 1)),
    created_us              INTEGER NOT NULL,
    updated_us              INTEGER NOT NULL,
    last_rotated_us         INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE crypto_key_versions (
    key_name   TEXT    NOT NULL REFERENCES crypto_keys (name) ON DELETE CASCADE,
    version    INTEGER NOT NULL CHECK (version BETWEEN 0 AND 4294967295),
    created_us INTEGER NOT NULL,
    kek_id     TEXT    NOT NULL,
    wrapped    BLOB    NOT NULL,
    -- DER SubjectPublicKeyInfo, for asymmetric keys.
    public_key BLOB,
    PRIMARY KEY (key_name, version)
) WITHOUT ROWID;
-- KEK rotation: which versions are (not) wrapped by a KEK, and how many per KEK.
CREATE INDEX crypto_key_versions_kek_idx ON crypto_key_versions (kek_id);
