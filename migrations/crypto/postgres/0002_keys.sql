-- Named keys and their versions. Key material is stored only wrapped by a KEK
-- (`kek_id` names it); the store never holds plaintext keys.
-- Names use the "C" collation so that listing order (and the `after` cursor) is byte
-- order, identical to SQLite's. Versions are u32 in the service: BIGINT holds all of them.
CREATE TABLE crypto_keys (
    name                    TEXT COLLATE "C" PRIMARY KEY,
    key_type                TEXT        NOT NULL,
    latest_version          BIGINT      NOT NULL CHECK (latest_version BETWEEN 0 AND 4294967295),
    min_decryption_version  BIGINT      NOT NULL CHECK (min_decryption_version BETWEEN 0 AND 4294967295),
    min_encryption_version  BIGINT      NOT NULL CHECK (min_encryption_version BETWEEN 0 AND 4294967295),
    rotation_period_seconds BIGINT      NOT NULL CHECK (rotation_period_seconds >= 0),
    deletion_allowed        BOOLEAN     NOT NULL,
    exportable              BOOLEAN     NOT NULL,
    created_at              TIMESTAMPTZ NOT NULL,
    updated_at              TIMESTAMPTZ NOT NULL,
    last_rotated_at         TIMESTAMPTZ NOT NULL
);

CREATE TABLE crypto_key_versions (
    key_name   TEXT COLLATE "C" NOT NULL REFERENCES crypto_keys (name) ON DELETE CASCADE,
    version    BIGINT      NOT NULL CHECK (version BETWEEN 0 AND 4294967295),
    created_at TIMESTAMPTZ NOT NULL,
    kek_id     TEXT        NOT NULL,
    wrapped    BYTEA       NOT NULL,
    -- DER SubjectPublicKeyInfo, for asymmetric keys.
    public_key BYTEA,
    PRIMARY KEY (key_name, version)
);
-- KEK rotation: which versions are (not) wrapped by a KEK, and how many per KEK.
CREATE INDEX crypto_key_versions_kek_idx ON crypto_key_versions (kek_id);
