-- patina's per-database state, created once when the extension first loads into a
-- writable database (ext/src/state.rs includes this file).
--
-- db_version: the last change number handed out. Triggers advance it inside the writing
--   transaction, so numbers are gap-free and in commit order.
-- merging: set only inside a merge's own transaction (triggers skip while it is 1); never
--   committed as 1, so other connections only ever see 0.
-- site_id / local_site: this database's 16-byte site id and its ordinal in patina_sites;
--   the triggers carry the ordinal as a literal, regenerated if the site id changes.
CREATE TABLE IF NOT EXISTS patina_state (
    id                 INTEGER PRIMARY KEY CHECK (id = 0),
    db_version         INTEGER NOT NULL DEFAULT 0,
    merging            INTEGER NOT NULL DEFAULT 0,
    merge_equal_values INTEGER NOT NULL DEFAULT 0,
    site_id            BLOB NOT NULL,
    local_site         INTEGER NOT NULL,
    layout             INTEGER NOT NULL DEFAULT 1
);
-- Site ids seen in clocks, by a small ordinal so clock rows stay narrow.
CREATE TABLE IF NOT EXISTS patina_sites (
    ord     INTEGER PRIMARY KEY,
    site_id BLOB NOT NULL UNIQUE
);
