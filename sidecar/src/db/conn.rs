//! Opening the node's database: WAL mode, a busy timeout, the extension loaded.
//!
//! The sidecar never links the extension (two copies of SQLite would collide at link
//! time, DESIGN §3); it loads `libpatina.so` at run time into every connection, with the
//! entry point named explicitly so the file name does not matter.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::config::Synchronous;

/// The extension's entry point (`.load` derives the same name from `libpatina`).
pub const ENTRY_POINT: &str = "sqlite3_patina_init";

/// How long a connection waits for another writer before answering `SQLITE_BUSY`.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors opening or preparing the database. None of them has changed the file.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// `libpatina.so` was not found where it was looked for.
    #[error(
        "cannot find the patina extension: looked for {looked_at}; build it with \
         `cargo build --release --workspace` (it lands beside the patina binary) or set \
         db.extension_path / --db-extension-path"
    )]
    ExtensionNotFound { looked_at: String },
    /// SQLite refused to open the file, load the extension or run a setup statement.
    #[error("{context} ({path}): {source}")]
    Sqlite {
        context: &'static str,
        path: PathBuf,
        source: rusqlite::Error,
    },
}

/// Where the extension is: the configured path, or `libpatina.so` beside this executable
/// (and, for `cargo test` binaries in `target/*/deps`, one directory up).
pub fn extension_path(configured: Option<&Path>) -> Result<PathBuf, DbError> {
    if let Some(p) = configured {
        return if p.exists() {
            Ok(p.to_path_buf())
        } else {
            Err(DbError::ExtensionNotFound {
                looked_at: p.display().to_string(),
            })
        };
    }
    let exe = std::env::current_exe().ok();
    let mut candidates = Vec::new();
    if let Some(dir) = exe.as_deref().and_then(Path::parent) {
        candidates.push(dir.join(lib_file_name()));
        if let Some(up) = dir.parent() {
            candidates.push(up.join(lib_file_name()));
        }
    }
    for c in &candidates {
        if c.exists() {
            return Ok(c.clone());
        }
    }
    Err(DbError::ExtensionNotFound {
        looked_at: candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

fn lib_file_name() -> &'static str {
    if cfg!(target_os = "macos") {
        "libpatina.dylib"
    } else {
        "libpatina.so"
    }
}

/// Opens (creating if needed) the database with the extension loaded, in WAL mode with
/// the given `synchronous` level and a busy timeout.
pub fn open(db_path: &Path, extension: &Path, sync: Synchronous) -> Result<Connection, DbError> {
    let err = |context: &'static str| {
        let path = db_path.to_path_buf();
        move |source| DbError::Sqlite {
            context,
            path,
            source,
        }
    };
    let conn = Connection::open_with_flags(
        db_path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(err("cannot open database"))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(err("cannot set busy timeout"))?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(err("cannot switch to WAL mode"))?;
    conn.pragma_update(None, "synchronous", sync.as_sql())
        .map_err(err("cannot set synchronous"))?;
    // SAFETY: loading an extension runs its native code; the path is the node's own
    // configured or co-built libpatina, and loading is disabled again right after.
    unsafe {
        let _guard = rusqlite::LoadExtensionGuard::new(&conn)
            .map_err(err("cannot enable extension loading"))?;
        conn.load_extension(extension, Some(ENTRY_POINT))
            .map_err(err("cannot load the patina extension"))?;
    }
    Ok(conn)
}
