//! The SQLite authorizer every API connection runs under (DESIGN §6).
//!
//! The API executes whatever SQL a caller sends, so the connection itself must refuse what
//! would hurt the node: writes to patina's internal tables (clocks, state, bookkeeping),
//! `INSERT INTO crsql_changes` (merges are the node's job), ATTACH/DETACH, VACUUM,
//! `load_extension`, schema changes (schema comes from schema files and `patina reload`)
//! and PRAGMAs that change settings. The extension's own triggers write the clock tables
//! inside the caller's statement; SQLite reports those writes with the trigger's name as
//! `accessor`, and patina's trigger names contain `__patina_`, so they pass.
//!
//! SQLite only tells the caller "not authorized"; the reason is kept in [`AuthState`] so
//! the 403 answer can say what was refused.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use rusqlite::hooks::{AuthAction, AuthContext, Authorization};

/// Per-connection authorizer state.
#[derive(Debug, Default)]
pub struct AuthState {
    /// Set while the API runs its own statements (BEGIN, SAVEPOINT, COMMIT, bookkeeping):
    /// those are allowed; the caller's are not.
    trusted: AtomicBool,
    /// Why the last refusal happened.
    denial: Mutex<Option<String>>,
    /// While set, what statements being prepared read (see [`AuthState::recording`]).
    record: Mutex<Option<ReadSet>>,
}

/// What SQLite reported, while preparing, that a statement reads: the subscription engine
/// decides from it which writes concern a subscription and whether it can be matched
/// incrementally.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReadSet {
    /// Tables read (`SQLITE_READ`), lower-cased, without the schema name.
    pub tables: std::collections::BTreeSet<String>,
    /// `SELECT`s seen: more than one means a subquery, a compound or a CTE.
    pub selects: usize,
    /// Functions called, lower-cased.
    pub functions: std::collections::BTreeSet<String>,
    /// A recursive CTE.
    pub recursive: bool,
}

impl AuthState {
    /// Runs `f` with the API's own statements allowed.
    pub fn trusted<T>(&self, f: impl FnOnce() -> T) -> T {
        self.trusted.store(true, Ordering::SeqCst);
        let out = f();
        self.trusted.store(false, Ordering::SeqCst);
        out
    }

    /// Runs `f` (which prepares statements) and returns what SQLite reported they read.
    pub fn recording<T>(&self, f: impl FnOnce() -> T) -> (T, ReadSet) {
        if let Ok(mut r) = self.record.lock() {
            *r = Some(ReadSet::default());
        }
        let out = f();
        let set = self
            .record
            .lock()
            .ok()
            .and_then(|mut r| r.take())
            .unwrap_or_default();
        (out, set)
    }

    fn note(&self, action: &AuthAction<'_>) {
        let Ok(mut r) = self.record.lock() else {
            return;
        };
        let Some(set) = r.as_mut() else { return };
        match action {
            AuthAction::Read { table_name, .. } => {
                set.tables.insert(table_name.to_ascii_lowercase());
            }
            AuthAction::Select => set.selects += 1,
            AuthAction::Recursive => set.recursive = true,
            AuthAction::Function { function_name } => {
                set.functions.insert(function_name.to_ascii_lowercase());
            }
            _ => {}
        }
    }

    /// Takes the reason of the last refusal.
    pub fn take_denial(&self) -> Option<String> {
        self.denial.lock().ok().and_then(|mut d| d.take())
    }

    fn deny(&self, reason: String) -> Authorization {
        if let Ok(mut d) = self.denial.lock() {
            *d = Some(reason);
        }
        Authorization::Deny
    }

    /// The authorizer callback.
    pub fn authorize(&self, ctx: AuthContext<'_>) -> Authorization {
        self.note(&ctx.action);
        if self.trusted.load(Ordering::SeqCst) {
            return Authorization::Allow;
        }
        let by_patina_trigger = ctx
            .accessor
            .is_some_and(|a| a.contains("__patina_") || a.starts_with("patina_"));
        match ctx.action {
            AuthAction::Read { .. } | AuthAction::Select | AuthAction::Recursive => {
                Authorization::Allow
            }
            AuthAction::Analyze { .. } | AuthAction::Reindex { .. } => Authorization::Allow,
            AuthAction::Insert { table_name }
            | AuthAction::Delete { table_name }
            | AuthAction::Update { table_name, .. } => {
                if by_patina_trigger || !is_internal_table(table_name) {
                    Authorization::Allow
                } else if is_schema_table(table_name) {
                    // CREATE/DROP/ALTER first show up as writes to the schema table.
                    self.deny(SCHEMA_REFUSED.into())
                } else {
                    self.deny(format!(
                        "not authorized: {table_name} is internal to patina; the API refuses writes to it"
                    ))
                }
            }
            AuthAction::Function { function_name } => {
                let lower = function_name.to_ascii_lowercase();
                if lower == "patina_new_site_id" {
                    // Without this, its own SAVEPOINT would be refused as "transaction
                    // control", which names the wrong thing.
                    self.deny(NEW_SITE_ID_REFUSED.into())
                } else if REFUSED_FUNCTIONS.contains(&lower.as_str()) {
                    self.deny(format!(
                        "not authorized: {function_name}() is refused through the API"
                    ))
                } else {
                    Authorization::Allow
                }
            }
            AuthAction::Pragma {
                pragma_name,
                pragma_value,
            } => {
                let lower = pragma_name.to_ascii_lowercase();
                if pragma_value.is_none() || ARGUMENT_PRAGMAS.contains(&lower.as_str()) {
                    Authorization::Allow
                } else {
                    self.deny(format!(
                        "not authorized: PRAGMA {pragma_name} with a value changes the node's \
                         database settings; the API refuses it"
                    ))
                }
            }
            AuthAction::Transaction { .. } | AuthAction::Savepoint { .. } => self.deny(
                "not authorized: transaction control (BEGIN, COMMIT, ROLLBACK, SAVEPOINT) is \
                 refused; each request already runs as one transaction"
                    .into(),
            ),
            AuthAction::Attach { .. } | AuthAction::Detach { .. } => {
                self.deny("not authorized: ATTACH and DETACH are refused through the API".into())
            }
            AuthAction::CreateIndex { .. }
            | AuthAction::CreateTable { .. }
            | AuthAction::CreateTempIndex { .. }
            | AuthAction::CreateTempTable { .. }
            | AuthAction::CreateTempTrigger { .. }
            | AuthAction::CreateTempView { .. }
            | AuthAction::CreateTrigger { .. }
            | AuthAction::CreateView { .. }
            | AuthAction::DropIndex { .. }
            | AuthAction::DropTable { .. }
            | AuthAction::DropTempIndex { .. }
            | AuthAction::DropTempTable { .. }
            | AuthAction::DropTempTrigger { .. }
            | AuthAction::DropTempView { .. }
            | AuthAction::DropTrigger { .. }
            | AuthAction::DropView { .. }
            | AuthAction::AlterTable { .. }
            | AuthAction::CreateVtable { .. }
            | AuthAction::DropVtable { .. } => self.deny(SCHEMA_REFUSED.into()),
            _ => self
                .deny("not authorized: this kind of statement is refused through the API".into()),
        }
    }
}

/// The message for CREATE/DROP/ALTER.
pub const SCHEMA_REFUSED: &str = "not authorized: schema changes (CREATE, DROP, ALTER) are \
    refused through the API; the schema comes from the node's schema files (db.schema_paths), \
    applied with `patina reload`";

/// The message for `patina_new_site_id()`.
pub const NEW_SITE_ID_REFUSED: &str = "not authorized: patina_new_site_id() gives the node a \
    new identity and is refused through the API; a node gets a fresh site id from \
    `patina restore` (a stopped node), never while it serves";

/// The message for VACUUM, which SQLite does not pass through the authorizer.
pub const VACUUM_REFUSED: &str = "not authorized: VACUUM (and VACUUM INTO) is refused through \
    the API; use `patina backup` for a copy";

/// Functions the API refuses: loading code, and the extension's schema-changing functions
/// (schema is the node's business).
const REFUSED_FUNCTIONS: &[&str] = &[
    "load_extension",
    "crsql_as_crr",
    "crsql_as_table",
    "crsql_begin_alter",
    "crsql_commit_alter",
    "crsql_config_set",
    // Collecting tombstones is safe only with limits the node proved (`sync::stability`).
    "patina_collect_tombstones",
    "readfile",
    "writefile",
    "edit",
];

/// PRAGMAs whose argument names an object rather than a setting: harmless to read.
const ARGUMENT_PRAGMAS: &[&str] = &[
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
    "foreign_key_check",
    "integrity_check",
    "quick_check",
];

/// patina's own tables: the extension's (`patina_*`, `*__patina_*`), cr-sqlite's change
/// feed and SQLite's own.
pub fn is_internal_table(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("patina_")
        || lower.contains("__patina_")
        || lower == "crsql_changes"
        || lower.starts_with("crsql_")
        || lower.starts_with("sqlite_")
}

/// SQLite's schema tables, written by CREATE, DROP and ALTER.
fn is_schema_table(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    matches!(
        lower.as_str(),
        "sqlite_master" | "sqlite_schema" | "sqlite_temp_master" | "sqlite_temp_schema"
    )
}

/// The first keyword of a statement, skipping whitespace and comments, upper-cased.
pub fn leading_keyword(sql: &str) -> String {
    let mut rest = sql;
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix("--") {
            rest = r.split_once('\n').map_or("", |(_, t)| t);
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.split_once("*/").map_or("", |(_, t)| t);
        } else {
            break;
        }
    }
    rest.chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_uppercase()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn keywords() {
        assert_eq!(
            leading_keyword("  -- hi\n /* x */ vacuum into 'x'"),
            "VACUUM"
        );
        assert_eq!(leading_keyword("select 1"), "SELECT");
        assert_eq!(leading_keyword("/* unterminated"), "");
    }

    #[test]
    fn internal_tables() {
        assert!(is_internal_table("patina_state"));
        assert!(is_internal_table("patina_staleness"));
        assert!(is_internal_table("machines__patina_clock"));
        assert!(is_internal_table("crsql_changes"));
        assert!(!is_internal_table("machines"));
    }
}
