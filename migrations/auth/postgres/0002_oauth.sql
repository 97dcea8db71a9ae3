-- auth-svc storage: OAuth clients, users, authorization codes, remembered consents and
-- the service's own sealed secrets. Times are unix microseconds (BIGINT) on both backends,
-- so the one store implementation reads them the same way. Settings of a client and the
-- profile of a user are JSON text beside the columns that are looked up or constrained.

CREATE TABLE oauth_clients (
    client_id                TEXT PRIMARY KEY,
    version                  BIGINT NOT NULL,    -- compare-and-set of every update
    settings                 TEXT NOT NULL,     -- ClientSettings as JSON
    secret_hash              BYTEA,                -- HMAC-SHA-256 of the secret, never the secret
    registration_token_hash  BYTEA,                -- RFC 7592 registration access token, hashed
    created_us               BIGINT NOT NULL,
    updated_us               BIGINT NOT NULL,
    secret_rotated_us        BIGINT
);

CREATE TABLE users (
    user_id              TEXT PRIMARY KEY,
    username             TEXT NOT NULL,         -- as entered
    username_lower       TEXT NOT NULL UNIQUE,  -- uniqueness and lookups ignore case
    email                TEXT,
    email_lower          TEXT UNIQUE,           -- NULLs allowed (no email), many of them
    status               TEXT NOT NULL,         -- active | disabled | locked
    password_phc         TEXT,                  -- argon2id PHC string
    profile              TEXT NOT NULL,         -- UserProfile as JSON
    version              BIGINT NOT NULL,
    created_us           BIGINT NOT NULL,
    updated_us           BIGINT NOT NULL,
    password_changed_us  BIGINT
);

-- Authorization codes, stored as SHA-256 of the code. used_us is the single-use
-- compare-and-set; family_id / access_jti are recorded after the exchange so a replay
-- can revoke what the code produced.
CREATE TABLE auth_codes (
    code_hash          BYTEA PRIMARY KEY,
    client_id          TEXT NOT NULL,
    grant_json         TEXT NOT NULL,           -- CodeGrant as JSON
    created_us         BIGINT NOT NULL,
    expires_us         BIGINT NOT NULL,
    used_us            BIGINT,
    family_id          TEXT,
    access_jti         TEXT,
    access_expires_us  BIGINT
);
CREATE INDEX auth_codes_expiry ON auth_codes (expires_us);
CREATE INDEX auth_codes_client ON auth_codes (client_id);

-- Remembered consent: one row per user and client (replaced on a new consent).
CREATE TABLE consents (
    user_id     TEXT NOT NULL,
    client_id   TEXT NOT NULL,
    scopes      TEXT NOT NULL,                  -- sorted, space-separated
    granted_us  BIGINT NOT NULL,
    expires_us  BIGINT NOT NULL,
    PRIMARY KEY (user_id, client_id)
);
CREATE INDEX consents_client ON consents (client_id);
CREATE INDEX consents_expiry ON consents (expires_us);

-- The service's own keys, sealed under its crypto-svc key; the first replica's wins.
CREATE TABLE service_secrets (
    name        TEXT PRIMARY KEY,
    sealed      BYTEA NOT NULL,
    created_us  BIGINT NOT NULL
);
