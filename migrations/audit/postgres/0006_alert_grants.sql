-- The alert tables of 0004 for the restricted service role of 0005 (`sec_audit_service`,
-- see deploy/README.md): audit-svc raises, updates and acknowledges alerts and works its
-- webhook queue, so it may read, insert and update them; it never deletes one.
DO $$
DECLARE
    s TEXT := current_schema();
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sec_audit_service') THEN
        RAISE NOTICE 'role sec_audit_service does not exist (see 0005_retention.sql); alert grants skipped';
        RETURN;
    END IF;
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON %I.alerts, %I.alert_webhook_deliveries
        TO sec_audit_service', s, s);
    EXECUTE format('GRANT SELECT, INSERT ON %I.alert_events TO sec_audit_service', s);
END $$;
