"""An existing app that knows nothing of patina writes a replicated table; its writes
must show up in crsql_changes with correct clocks.

Usage: /usr/bin/python3 tests/python/app_without_extension.py path/to/libpatina.so
Prints one line per check and 'N passed, N failed'; exits non-zero on a failure.
"""
import os
import sqlite3
import sys
import tempfile

lib = sys.argv[1]
results = []


def check(name, ok, detail=""):
    results.append(ok)
    print(("ok   " if ok else "FAIL ") + name + ("" if ok else ": " + str(detail)))


with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "app.db")

    # The operator's side: load patina once and make the table replicated.
    admin = sqlite3.connect(path, isolation_level=None)
    admin.enable_load_extension(True)
    admin.load_extension(lib)  # SQLite derives sqlite3_patina_init from the file name
    admin.execute("PRAGMA journal_mode = WAL")
    admin.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY NOT NULL, body TEXT, n REAL)")
    admin.execute("SELECT crsql_as_crr('notes')")

    # The app: plain sqlite3, nothing loaded, its own transactions.
    app = sqlite3.connect(path, timeout=5)
    with app:
        app.execute("INSERT INTO notes VALUES (1, 'hello', 1.5)")
        app.executemany("INSERT INTO notes VALUES (?, ?, ?)", [(i, "bulk", i) for i in range(2, 12)])
    with app:
        app.execute("UPDATE notes SET body = 'edited' WHERE id = 1")
        app.execute("DELETE FROM notes WHERE id = 2")
    try:
        app.execute("SELECT crsql_db_version()")
        check("app really has no extension", False, "crsql_db_version() worked")
    except sqlite3.OperationalError:
        check("app really has no extension", True)
    app.close()

    rows = admin.execute(
        "SELECT cid, val, col_version, cl, site_id = crsql_site_id() FROM crsql_changes "
        "WHERE pk = crsql_pack_columns(1) ORDER BY cid"
    ).fetchall()
    check("row 1 clocks", rows == [("body", "edited", 2, 1, 1), ("n", 1.5, 1, 1, 1)], rows)
    deleted = admin.execute("SELECT cid, cl FROM crsql_changes WHERE pk = crsql_pack_columns(2)").fetchall()
    check("delete recorded as cl 2", deleted == [("-1", 2)], deleted)
    versions = [r[0] for r in admin.execute("SELECT db_version FROM crsql_changes ORDER BY db_version")]
    check("every change numbered once", len(versions) == len(set(versions)) and versions == sorted(versions), versions)
    total = admin.execute("SELECT crsql_db_version()").fetchone()[0]
    # 11 inserts x 3 numbers (the row clock's, unused in a first life, and one per
    # column) + 1 update + 1 delete
    check("counter advanced by every captured change", total == 35, total)
    check("merge flag clear", admin.execute("SELECT merging FROM patina_state").fetchone()[0] == 0)

passed = sum(results)
failed = len(results) - passed
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
