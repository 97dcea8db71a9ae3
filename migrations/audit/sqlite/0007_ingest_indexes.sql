-- PostgreSQL's 0007 trades its GiST address index for a B-tree; SQLite's address index
-- was a B-tree on ip_bytes from the start. Kept so both backends number their
-- migrations alike.
SELECT 1;
