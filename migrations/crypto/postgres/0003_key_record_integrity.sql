-- Compare-and-set and integrity for key records.
-- `policy_version` is incremented by every write to a key row (policy update, rotation);
-- writers only succeed if the row still has the version they read, so concurrent
-- updates cannot overwrite each other. Existing rows start at 0.
-- `record_mac` is an HMAC (under a key derived from the KEK) over the fields that
-- decide what a key may do: "<kek id>:<base64 tag>". NULL for rows written before this
-- migration; the service backfills them at start.
ALTER TABLE crypto_keys ADD COLUMN policy_version BIGINT NOT NULL DEFAULT 0
    CHECK (policy_version >= 0);
ALTER TABLE crypto_keys ADD COLUMN record_mac TEXT;
