-- token-svc storage. Times are unix microseconds (BIGINT) on both backends, so the one
-- store implementation reads them the same way.

-- Signing keys: private key sealed with sec_common::envelope (never plaintext).
CREATE TABLE token_signing_keys (
    kid             TEXT PRIMARY KEY,
    alg             TEXT NOT NULL,
    state           TEXT NOT NULL,   -- next | current | retiring | retired | revoked
    created_at      BIGINT NOT NULL,
    activated_at    BIGINT,
    deactivated_at  BIGINT,
    unpublish_at    BIGINT,
    revoked_at      BIGINT,
    public_key      BYTEA NOT NULL,  -- what aws-lc-rs verifies with
    public_jwk      TEXT NOT NULL,
    sealed_private  BYTEA NOT NULL
);
-- At most one current and one next key: the lifecycle's compare-and-set relies on it.
CREATE UNIQUE INDEX token_signing_keys_one_current ON token_signing_keys (state) WHERE state IN ('current', 'next');

-- The requirement document's table: refresh tokens (token_type 'refresh', stored only as
-- SHA-256 of the token) and revocation records (token_type 'revocation').
CREATE TABLE security_tokens (
    id               TEXT PRIMARY KEY,
    token_type       TEXT NOT NULL,
    user_id          TEXT NOT NULL DEFAULT '',
    client_id        TEXT NOT NULL DEFAULT '',
    expires_at       BIGINT NOT NULL,
    is_revoked       BOOLEAN NOT NULL DEFAULT FALSE,
    created_at       BIGINT NOT NULL,
    token_hash       BYTEA,
    family_id        TEXT,
    parent_id        TEXT,
    rotated_at       BIGINT,
    successor_id     TEXT,
    scope            TEXT NOT NULL DEFAULT '',
    grant_json       TEXT NOT NULL DEFAULT '',
    revocation_kind  TEXT,
    target           TEXT,
    not_before       BIGINT
);
CREATE UNIQUE INDEX security_tokens_hash ON security_tokens (token_hash);
CREATE INDEX security_tokens_family ON security_tokens (family_id);
CREATE INDEX security_tokens_user ON security_tokens (token_type, user_id);
CREATE INDEX security_tokens_client ON security_tokens (token_type, client_id);
CREATE INDEX security_tokens_expiry ON security_tokens (expires_at);
CREATE INDEX security_tokens_created ON security_tokens (token_type, created_at);
