-- The README's shell tour, checked line by line against tour.expected.
-- Run: sqlite3 :memory: with `.load target/<profile>/libpatina` prepended.
.headers on
.mode list
CREATE TABLE machines (id TEXT PRIMARY KEY NOT NULL, name TEXT NOT NULL DEFAULT '', status TEXT NOT NULL DEFAULT 'unknown');
INSERT INTO machines (id, name) VALUES ('machine-123', 'web-1');
SELECT crsql_as_crr('machines');
UPDATE machines SET status = 'healthy' WHERE id = 'machine-123';
SELECT "table", hex(pk) AS pk, cid, val, col_version, db_version, cl FROM crsql_changes;
SELECT crsql_db_version() AS db_version, length(crsql_site_id()) AS site_id_bytes;
DELETE FROM machines WHERE id = 'machine-123';
SELECT cid, col_version, cl FROM crsql_changes WHERE db_version > 3;
SELECT hex(crsql_pack_columns('machine-123')) AS packed;
