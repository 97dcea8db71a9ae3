-- Edge protection state shared by every replica of the host (sec-edge). Times: unix µs.
-- Runtime rate-limit rules (override configuration rules by id), as sec-edge rule JSON.
CREATE TABLE edge_ratelimit_rules (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
-- Runtime IP rules and automatic blocks (reason auto_block:*), with optional expiry.
CREATE TABLE edge_ip_rules (
    id TEXT PRIMARY KEY,
    action TEXT NOT NULL,
    network TEXT NOT NULL,
    scope TEXT NOT NULL,
    reason TEXT NOT NULL,
    expires_at BIGINT,
    created_at BIGINT NOT NULL
);
CREATE INDEX edge_ip_rules_network ON edge_ip_rules (network);
-- One row: bumped by every change, polled by every replica.
CREATE TABLE edge_version (
    id INTEGER PRIMARY KEY,
    version BIGINT NOT NULL
);
INSERT INTO edge_version (id, version) VALUES (1, 0);
