-- patina's per-database state, created once when the extension first loads into a
-- writable database (ext/src/state.rs includes this file).
--
-- db_version: the last change number handed out. Triggers advance it inside the writing
--   transaction, so numbers are gap-free and in commit order.
-- origin_version: the last number of this site's own numbering (its origin versions).
--   Advanced by the same trigger UPDATE as db_version, but only for local writes (merges
--   never touch it), so this site's versions are gap-free: it holds 1..origin_version.
-- merging: set only inside a merge's own transaction, never committed other than 0: 1 for
--   a whole batched merge (set by its caller); during a one-by-one merge's base write, a
--   mark equal to that connection's total_changes() + 2, which its next statement makes
--   stale. Triggers skip while it is 1 or a live mark (ext/src/triggers.rs, capturing).
-- layout: the version of the triggers' and clocks' shape; older ones are regenerated
--   when the extension loads (ext/src/state.rs, LAYOUT).
-- cl_floor: the highest causal length among the tombstones collected here, or learned from
--   a peer that collected some (always even). A row inserted where it has no clock row
--   starts at cl_floor + 1, so it outranks a tombstone of the same key that a peer has not
--   collected yet (ext/src/collect.rs).
-- site_id / local_site: this database's 16-byte site id and its ordinal in patina_sites;
--   the triggers carry the ordinal as a literal, regenerated if the site id changes.
CREATE TABLE IF NOT EXISTS patina_state (
    id                 INTEGER PRIMARY KEY CHECK (id = 0),
    db_version         INTEGER NOT NULL DEFAULT 0,
    merging            INTEGER NOT NULL DEFAULT 0,
    merge_equal_values INTEGER NOT NULL DEFAULT 0,
    site_id            BLOB NOT NULL,
    local_site         INTEGER NOT NULL,
    layout             INTEGER NOT NULL DEFAULT 1,
    origin_version     INTEGER NOT NULL DEFAULT 0,
    cl_floor           INTEGER NOT NULL DEFAULT 0
);
-- Site ids seen in clocks, by a small ordinal so clock rows stay narrow.
CREATE TABLE IF NOT EXISTS patina_sites (
    ord     INTEGER PRIMARY KEY,
    site_id BLOB NOT NULL UNIQUE
);
-- Which versions of each other origin this database holds, as coalesced inclusive ranges
-- (no two of one site overlap or touch). Written in the transaction of every merge, on
-- both merge paths; a superseded change counts as held. This site's own versions are not
-- stored here: it holds 1..patina_state.origin_version (see patina_origin_held).
CREATE TABLE IF NOT EXISTS patina_origin_ranges (
    site_id BLOB NOT NULL,
    start   INTEGER NOT NULL,
    "end"   INTEGER NOT NULL,
    PRIMARY KEY (site_id, start)
) WITHOUT ROWID;
-- Every origin's held ranges, this site's own included, for plain-SQL readers.
CREATE VIEW IF NOT EXISTS patina_origin_held AS
    SELECT site_id, start, "end" FROM patina_origin_ranges
    UNION ALL
    SELECT site_id, 1, origin_version FROM patina_state WHERE id = 0 AND origin_version > 0;
