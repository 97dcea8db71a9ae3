-- PostgreSQL's 0006 grants the alert tables to the restricted service role; SQLite has
-- no roles. Kept so both backends number their migrations alike.
SELECT 1;
