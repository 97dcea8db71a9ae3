-- Ingest cost. Every stored event pays for each index of security_events inside the
-- sequencer's lock, so ingest throughput is bounded by the slowest of them
-- (crates/audit-svc/docs/search.md, "Indexes and plans"):
-- - security_events_id_idx (0005) repeated the primary key's leading column: the
--   sequencer's duplicate check `id = ANY(...)` uses the primary key (id, received_at).
-- - The GiST inet_ops index on ip_address (0003) cost more per insert than any other
--   index. A B-tree serves the store's CIDR search as well: the store states the block as
--   the range network(block) .. broadcast(block) (what PostgreSQL derives itself for
--   `<<=` with a constant), which a B-tree scans in address order.
DROP INDEX security_events_id_idx;
DROP INDEX security_events_ip_idx;
CREATE INDEX security_events_ip_idx ON security_events (ip_address);
