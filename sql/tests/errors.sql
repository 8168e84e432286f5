-- Refusals a person in the shell sees; each line of errors.expected is SQLite's message.
CREATE TABLE nopk (a, b);
SELECT crsql_as_crr('nopk');
CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, a);
SELECT crsql_as_crr('t');
INSERT INTO crsql_changes ("table", pk, cid, val, col_version, db_version, site_id, cl, seq) VALUES ('nope', x'010901', 'a', 1, 1, 1, zeroblob(16), 1, 0);
INSERT INTO crsql_changes ("table", pk, cid, val, col_version, db_version, site_id, cl, seq) VALUES ('t', x'01', 'a', 1, 1, 1, zeroblob(16), 1, 0);
SELECT crsql_as_crr(42);
