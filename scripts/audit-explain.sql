-- EXPLAIN of audit-svc's search statements on 500,000 synthetic events, in a throwaway
-- schema. Run from the repository root: psql -h 127.0.0.1 -U postgres -d test -q -f scripts/audit-explain.sql
-- Output is quoted in crates/audit-svc/docs/search.md.
DROP SCHEMA IF EXISTS explain_demo CASCADE;
CREATE SCHEMA explain_demo;
SET search_path = explain_demo;
-- Every migration, as audit-svc applies them (0005 grants on the migrator's table).
CREATE TABLE _sqlx_migrations (version BIGINT);
\i migrations/audit/postgres/0001_security_events.sql
\i migrations/audit/postgres/0002_dead_letters.sql
\i migrations/audit/postgres/0003_hash_chain.sql
\i migrations/audit/postgres/0004_alerts.sql
\i migrations/audit/postgres/0005_retention.sql
\i migrations/audit/postgres/0006_alert_grants.sql
\i migrations/audit/postgres/0007_ingest_indexes.sql
INSERT INTO security_events (id, event_type, "timestamp", service, user_id, actor_kind, actor_id, subject, ip_address, outcome, severity, details, trace_id, received_at, seq, hash)
SELECT gen_random_uuid(),
       (ARRAY['sec.auth.login.failed','sec.auth.login.succeeded','sec.auth.token.granted','sec.crypto.key.created','sec.token.refresh.reuse_detected','sec.session.session.created'])[1 + i % 6],
       now() - (i || ' seconds')::interval, 'auth', NULL, 'user', 'user-' || (i % 5000), 'user:u' || (i % 20000),
       ('10.' || (i % 256) || '.' || ((i / 256) % 256) || '.' || (i % 7))::inet,
       (ARRAY['success','failure','denied'])[1 + i % 3], (ARRAY['info','low','medium','high','critical'])[1 + i % 5],
       jsonb_build_object('client_id', 'c' || (i % 300), 'reason', 'r' || (i % 11)), '', now(), i, '\x00'::bytea
FROM generate_series(1, 500000) AS s(i);
ANALYZE security_events;
\echo '--- newest first, one type, a day'
EXPLAIN (COSTS OFF) SELECT * FROM security_events WHERE TRUE AND (event_type = 'sec.auth.login.failed') AND "timestamp" >= now() - interval '1 day' ORDER BY "timestamp" DESC, id DESC LIMIT 51;
\echo '--- type prefix'
EXPLAIN (COSTS OFF) SELECT * FROM security_events WHERE TRUE AND (event_type LIKE 'sec.crypto.%' ESCAPE '\') ORDER BY "timestamp" DESC, id DESC LIMIT 51;
\echo '--- actor'
EXPLAIN (COSTS OFF) SELECT * FROM security_events WHERE TRUE AND actor_id = 'user-42' ORDER BY "timestamp" DESC, id DESC LIMIT 51;
\echo '--- subject'
EXPLAIN (COSTS OFF) SELECT * FROM security_events WHERE TRUE AND subject = 'user:u42' ORDER BY "timestamp" DESC, id DESC LIMIT 51;
\echo '--- CIDR'
EXPLAIN (COSTS OFF) SELECT * FROM security_events WHERE TRUE AND ip_address BETWEEN '10.42.0.0'::inet AND '10.42.255.255'::inet ORDER BY "timestamp" DESC, id DESC LIMIT 51;
\echo '--- one address'
EXPLAIN (COSTS OFF) SELECT * FROM security_events WHERE TRUE AND ip_address BETWEEN '10.42.7.3'::inet AND '10.42.7.3'::inet ORDER BY "timestamp" DESC, id DESC LIMIT 51;
\echo '--- duplicate check of the sequencer'
EXPLAIN (COSTS OFF) SELECT id FROM security_events WHERE id = ANY('{6f1c2b1e-0000-4000-8000-000000000001,6f1c2b1e-0000-4000-8000-000000000002}'::uuid[]);
\echo '--- detail'
EXPLAIN (COSTS OFF) SELECT * FROM security_events WHERE TRUE AND details @> '{"client_id": "c7"}'::jsonb ORDER BY "timestamp" DESC, id DESC LIMIT 51;
\echo '--- chain walk'
EXPLAIN (COSTS OFF) SELECT * FROM security_events WHERE seq >= 1000 AND seq <= 3000 ORDER BY seq LIMIT 2000;
DROP SCHEMA explain_demo CASCADE;
