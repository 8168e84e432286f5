-- Example schema used by the README tour and `patina demo`.
-- Every table here is made replicated (crsql_as_crr) when a node starts or reloads.
CREATE TABLE IF NOT EXISTS machines (
    id         TEXT PRIMARY KEY NOT NULL,
    name       TEXT NOT NULL DEFAULT '',
    status     TEXT NOT NULL DEFAULT 'unknown',
    updated_at INTEGER NOT NULL DEFAULT 0
);
