-- Retention and rotation (crates/audit-svc/docs/retention.md).
--
-- 1. security_events becomes PARTITIONED BY RANGE (received_at), one partition per UTC
--    month. There is no DEFAULT partition: a row outside every partition fails to
--    insert, loudly. audit-svc creates partitions ahead (at start-up and from a
--    supervised task) through audit_ensure_partition(), which runs as the owner.
-- 2. received_at is monotone in seq (audit-svc stamps max(clock, last received_at)
--    under the sequencer lock; the last one is kept in audit_chain_head.received_at), so
--    every partition holds one contiguous range of positions.
-- 3. Removal leaves gaps in seq; each removed run is recorded in audit_prunes, signed
--    per retention run (audit_prune_runs), so verification accepts exactly those gaps.
-- 4. Legal holds (audit_legal_holds) block deletion.
-- 5. The service's database role (sec_audit_service, created here when the migrating
--    role may create roles) may not UPDATE or DELETE events: deletion is only possible
--    through the SECURITY DEFINER functions below, owned by the migration owner, which
--    refuse rows younger than the floor in audit_retention_floor (owner only) and rows
--    under a legal hold, and rows whose removal was not recorded first.

-- The old table, out of the way (its indexes and key renamed, then dropped with it).
ALTER TABLE security_events RENAME TO security_events_unpartitioned;
ALTER TABLE security_events_unpartitioned RENAME CONSTRAINT security_events_pkey
    TO security_events_unpartitioned_pkey;
DROP INDEX security_events_time_idx, security_events_type_time_idx, security_events_seq_idx,
    security_events_actor_time_idx, security_events_subject_time_idx, security_events_ip_idx,
    security_events_details_idx;

CREATE TABLE security_events (
    id          UUID         NOT NULL,
    event_type  VARCHAR(128) NOT NULL,
    "timestamp" TIMESTAMPTZ  NOT NULL,
    service     VARCHAR(32)  NOT NULL,
    user_id     UUID,
    actor_kind  VARCHAR(16)  NOT NULL,
    actor_id    TEXT         NOT NULL,
    subject     TEXT         NOT NULL,
    ip_address  INET,
    outcome     VARCHAR(16)  NOT NULL,
    severity    VARCHAR(20)  NOT NULL,
    details     JSONB        NOT NULL,
    trace_id    VARCHAR(32)  NOT NULL,
    received_at TIMESTAMPTZ  NOT NULL DEFAULT now(),
    seq         BIGINT,
    hash        BYTEA,
    PRIMARY KEY (id, received_at)
) PARTITION BY RANGE (received_at);
-- Every index of the old table (partitioned indexes: each partition gets its own).
CREATE INDEX security_events_time_idx ON security_events ("timestamp" DESC, id DESC);
CREATE INDEX security_events_type_time_idx ON security_events (event_type, "timestamp" DESC, id DESC);
CREATE INDEX security_events_actor_time_idx ON security_events (actor_id, "timestamp" DESC, id DESC);
CREATE INDEX security_events_subject_time_idx ON security_events (subject, "timestamp" DESC, id DESC);
CREATE INDEX security_events_ip_idx ON security_events USING gist (ip_address inet_ops);
CREATE INDEX security_events_details_idx ON security_events USING gin (details jsonb_path_ops);
-- The sequencer's duplicate check looks ids up without their receipt time.
CREATE INDEX security_events_id_idx ON security_events (id);
-- seq is unique per partition (a unique index on a partitioned table must contain the
-- partition key); across partitions the sequencer hands out each position once.

-- Creates the partition of the UTC month containing p_month, with its unique index on
-- seq; false when it exists already. Serialised by an advisory lock (replicas race).
CREATE FUNCTION audit_ensure_partition(p_month DATE) RETURNS BOOLEAN
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    lo   DATE := date_trunc('month', p_month)::date;
    hi   DATE := (date_trunc('month', p_month) + interval '1 month')::date;
    name TEXT := 'security_events_p' || to_char(p_month, 'YYYYMM');
BEGIN
    IF p_month < DATE '1970-01-01' OR p_month > DATE '9999-01-01' THEN
        RAISE EXCEPTION 'partition month % out of range', p_month;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext(current_schema() || '.security_events partitions'));
    IF to_regclass(quote_ident(current_schema()) || '.' || quote_ident(name)) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I.%I PARTITION OF %I.security_events FOR VALUES FROM (%L) TO (%L)',
        current_schema(), name, current_schema(),
        (lo::timestamp AT TIME ZONE 'UTC'), (hi::timestamp AT TIME ZONE 'UTC'));
    EXECUTE format('CREATE UNIQUE INDEX %I ON %I.%I (seq)', name || '_seq_key', current_schema(), name);
    RETURN true;
END $$;

-- Partitions for every month that has rows, and the current month plus two ahead.
DO $$
DECLARE
    first_month DATE;
    m DATE;
BEGIN
    SELECT date_trunc('month', least(min(received_at), now()) AT TIME ZONE 'UTC')::date
      INTO first_month FROM security_events_unpartitioned;
    FOR m IN SELECT generate_series(first_month,
                 date_trunc('month', now() AT TIME ZONE 'UTC')::date + interval '2 months',
                 interval '1 month')::date
    LOOP
        PERFORM audit_ensure_partition(m);
    END LOOP;
END $$;

-- The rows, unchanged (received_at is hashed into the chain, so rows stored before
-- receipt times were made monotone keep theirs; a partition whose positions interleave
-- with another's is then removed by range, never dropped whole).
ALTER TABLE audit_chain_head ADD COLUMN received_at TIMESTAMPTZ;
INSERT INTO security_events
SELECT id, event_type, "timestamp", service, user_id, actor_kind, actor_id, subject, ip_address,
       outcome, severity, details, trace_id, received_at, seq, hash
FROM security_events_unpartitioned;
DROP TABLE security_events_unpartitioned;
UPDATE audit_chain_head SET received_at = (SELECT max(received_at) FROM security_events);

-- Removed runs of positions, each with the hash at its last position: verification
-- accepts a gap exactly when it is one of these and the run's signature verifies.
CREATE TABLE audit_prune_runs (
    id          BIGSERIAL PRIMARY KEY,
    created_at  TIMESTAMPTZ NOT NULL,
    origin      TEXT        NOT NULL,
    key_name    TEXT        NOT NULL,
    key_version INTEGER     NOT NULL,
    signature   TEXT        NOT NULL
);
CREATE TABLE audit_prunes (
    first_seq BIGINT PRIMARY KEY,
    last_seq  BIGINT      NOT NULL CHECK (last_seq >= first_seq),
    last_hash BYTEA       NOT NULL,
    rows      BIGINT      NOT NULL,
    reason    VARCHAR(16) NOT NULL,
    run_id    BIGINT      NOT NULL REFERENCES audit_prune_runs (id)
);
CREATE INDEX audit_prunes_run_idx ON audit_prunes (run_id);

-- Legal holds: an active hold (released_at NULL) keeps every event it matches. Empty
-- strings mean "any".
CREATE TABLE audit_legal_holds (
    id          UUID PRIMARY KEY,
    name        VARCHAR(128) NOT NULL,
    reason      TEXT         NOT NULL,
    type_prefix VARCHAR(128) NOT NULL,
    actor_id    TEXT         NOT NULL,
    subject     TEXT         NOT NULL,
    since       TIMESTAMPTZ,
    until       TIMESTAMPTZ,
    created_at  TIMESTAMPTZ  NOT NULL,
    created_by  TEXT         NOT NULL,
    released_at TIMESTAMPTZ,
    released_by TEXT
);
CREATE UNIQUE INDEX audit_legal_holds_active_name_idx ON audit_legal_holds (name)
    WHERE released_at IS NULL;

-- The floor below which nothing is deleted, whatever audit-svc asks: the longest
-- matching prefix wins. Owner only (audit-svc cannot read or change it). PCI DSS 10.5.1:
-- keep at least 12 months; add a row for a prefix with a shorter rule, e.g.
--   INSERT INTO audit_retention_floor VALUES ('sec.ratelimit.', 90);
CREATE TABLE audit_retention_floor (
    prefix   VARCHAR(128) PRIMARY KEY,
    min_days INTEGER      NOT NULL CHECK (min_days >= 1)
);
INSERT INTO audit_retention_floor VALUES ('', 365);

-- Whether a row (type, actor, subject, time, receipt) may be removed now: older than its
-- floor, and under no active hold.
CREATE FUNCTION audit_removable(p_type TEXT, p_actor TEXT, p_subject TEXT,
                                p_time TIMESTAMPTZ, p_received TIMESTAMPTZ) RETURNS BOOLEAN
LANGUAGE sql STABLE AS $$
    SELECT p_received < now() - make_interval(days => coalesce((
               SELECT f.min_days FROM audit_retention_floor f
               WHERE substr(p_type, 1, length(f.prefix)) = f.prefix
               ORDER BY length(f.prefix) DESC LIMIT 1), 2147483647 / 2))
       AND NOT EXISTS (
               SELECT 1 FROM audit_legal_holds h
               WHERE h.released_at IS NULL
                 AND (h.type_prefix = '' OR substr(p_type, 1, length(h.type_prefix)) = h.type_prefix)
                 AND (h.actor_id = '' OR p_actor = h.actor_id)
                 AND (h.subject = '' OR p_subject = h.subject)
                 AND (h.since IS NULL OR p_time >= h.since)
                 AND (h.until IS NULL OR p_time < h.until))
$$;

-- Deletes the positions p_first..p_last, which must have been recorded in audit_prunes
-- (with the hash at p_last) first. Refuses, removing nothing, when any row in the range is
-- younger than its floor or under a hold. Returns how many rows it deleted.
CREATE FUNCTION audit_prune_range(p_first BIGINT, p_last BIGINT) RETURNS BIGINT
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    n BIGINT;
BEGIN
    -- A hold created meanwhile waits for this transaction (and is then honoured).
    LOCK TABLE audit_legal_holds IN SHARE MODE;
    IF NOT EXISTS (
        SELECT 1 FROM audit_prunes p JOIN security_events e ON e.seq = p.last_seq
        WHERE p.first_seq = p_first AND p.last_seq = p_last AND e.hash = p.last_hash
    ) THEN
        RAISE EXCEPTION 'positions % to % are not recorded in audit_prunes', p_first, p_last
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF EXISTS (
        SELECT 1 FROM security_events e WHERE e.seq BETWEEN p_first AND p_last
          AND NOT audit_removable(e.event_type, e.actor_id, e.subject, e."timestamp", e.received_at)
    ) THEN
        RAISE EXCEPTION 'positions % to % hold rows younger than the retention floor or under a legal hold',
            p_first, p_last USING ERRCODE = 'insufficient_privilege';
    END IF;
    DELETE FROM security_events WHERE seq BETWEEN p_first AND p_last;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- Detaches and drops a partition of security_events. Its rows (if any) must all be
-- removable and recorded as one run (its first and last position) in audit_prunes.
CREATE FUNCTION audit_drop_partition(p_name TEXT) RETURNS BIGINT
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    part REGCLASS;
    lo BIGINT;
    hi BIGINT;
    n BIGINT;
BEGIN
    LOCK TABLE audit_legal_holds IN SHARE MODE;
    SELECT c.oid::regclass INTO part FROM pg_inherits i
      JOIN pg_class c ON c.oid = i.inhrelid
      JOIN pg_class p ON p.oid = i.inhparent
      JOIN pg_namespace ns ON ns.oid = p.relnamespace
     WHERE p.relname = 'security_events' AND ns.nspname = current_schema() AND c.relname = p_name;
    IF part IS NULL THEN
        RAISE EXCEPTION '% is not a partition of security_events', p_name
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    EXECUTE format('SELECT min(seq), max(seq), count(*) FROM %s', part) INTO lo, hi, n;
    IF n > 0 THEN
        IF NOT EXISTS (
            SELECT 1 FROM audit_prunes p JOIN security_events e ON e.seq = p.last_seq
            WHERE p.first_seq = lo AND p.last_seq = hi AND e.hash = p.last_hash
        ) THEN
            RAISE EXCEPTION 'the rows of % are not recorded in audit_prunes', p_name
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        IF EXISTS (SELECT 1 FROM security_events e WHERE e.seq BETWEEN lo AND hi AND e.tableoid <> part) THEN
            RAISE EXCEPTION 'the positions of % interleave with another partition', p_name
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        EXECUTE format('SELECT count(*) FROM %s e WHERE e.seq IS NULL OR NOT audit_removable(
                e.event_type, e.actor_id, e.subject, e."timestamp", e.received_at)', part) INTO lo;
        IF lo > 0 THEN
            RAISE EXCEPTION '% holds rows younger than the retention floor or under a legal hold', p_name
                USING ERRCODE = 'insufficient_privilege';
        END IF;
    END IF;
    EXECUTE format('ALTER TABLE %I.security_events DETACH PARTITION %s', current_schema(), part);
    EXECUTE format('DROP TABLE %s', part);
    RETURN n;
END $$;

-- Gives a row stored before the chain existed its position (audit-svc's one-time legacy
-- chaining); only rows without one.
CREATE FUNCTION audit_chain_legacy_row(p_id UUID, p_seq BIGINT, p_hash BYTEA) RETURNS VOID
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    UPDATE security_events SET seq = p_seq, hash = p_hash WHERE id = p_id AND seq IS NULL;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'event % has a position already', p_id;
    END IF;
END $$;

-- SECURITY DEFINER functions run with a fixed search path: this schema, then pg_temp.
DO $$
DECLARE
    f TEXT;
BEGIN
    FOREACH f IN ARRAY ARRAY['audit_ensure_partition(date)', 'audit_prune_range(bigint, bigint)',
                             'audit_drop_partition(text)', 'audit_chain_legacy_row(uuid, bigint, bytea)',
                             'audit_removable(text, text, text, timestamptz, timestamptz)']
    LOOP
        EXECUTE format('ALTER FUNCTION %I.%s SET search_path = %I, pg_temp',
            current_schema(), f, current_schema());
        EXECUTE format('REVOKE ALL ON FUNCTION %I.%s FROM PUBLIC', current_schema(), f);
    END LOOP;
END $$;

-- The service's role. Migrations run as the owner (the init container); audit-svc
-- connects as a LOGIN role granted sec_audit_service: it reads and appends, moves the
-- chain head, records prunes and holds, and removes rows only through the functions
-- above. No UPDATE, DELETE or TRUNCATE on security_events, no DDL.
DO $$
DECLARE
    s TEXT := current_schema();
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sec_audit_service') THEN
        IF (SELECT rolcreaterole OR rolsuper FROM pg_roles WHERE rolname = current_user) THEN
            CREATE ROLE sec_audit_service NOLOGIN;
        ELSE
            RAISE NOTICE 'role sec_audit_service not created: % lacks CREATEROLE; create it (NOLOGIN) and rerun the grants of 0005_retention.sql', current_user;
            RETURN;
        END IF;
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO sec_audit_service', s);
    EXECUTE format('GRANT SELECT ON %I._sqlx_migrations TO sec_audit_service', s);
    EXECUTE format('GRANT SELECT, INSERT ON %I.security_events, %I.audit_checkpoints, %I.audit_prunes,
        %I.audit_prune_runs, %I.audit_legal_holds, %I.dead_letters, %I.service_instance
        TO sec_audit_service', s, s, s, s, s, s, s);
    EXECUTE format('GRANT SELECT, UPDATE ON %I.audit_chain_head TO sec_audit_service', s);
    EXECUTE format('GRANT UPDATE (released_at, released_by) ON %I.audit_legal_holds TO sec_audit_service', s);
    EXECUTE format('GRANT USAGE ON SEQUENCE %I.dead_letters_id_seq, %I.audit_prune_runs_id_seq TO sec_audit_service', s, s);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %I.audit_ensure_partition(date), %I.audit_prune_range(bigint, bigint),
        %I.audit_drop_partition(text), %I.audit_chain_legacy_row(uuid, bigint, bytea)
        TO sec_audit_service', s, s, s, s);
END $$;
