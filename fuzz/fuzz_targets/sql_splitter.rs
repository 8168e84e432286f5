//! The SQL text of `POST /sql`: split into statements and run in order on an API-style
//! connection (the API's authorizer installed), inside a savepoint rolled back after each
//! input. Any text must run or be refused with a typed error; a statement that runs too
//! long is interrupted by a progress handler, as the API's query time limit does.
#![no_main]

use std::cell::RefCell;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use patina_sidecar::http::authorizer::AuthState;
use patina_sidecar::http::exec::{run_specs, Keep};
use patina_sidecar::http::json_values::StatementSpec;
use rusqlite::Connection;

struct Api {
    conn: Connection,
    auth: Arc<AuthState>,
    keep: Keep,
}

fn open() -> Api {
    let mut conn = Connection::open_in_memory().expect("in-memory database");
    conn.execute_batch(
        "CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, v);
         INSERT INTO t VALUES (1, 'a'), (2, x'00ff'), (3, 3.5);",
    )
    .expect("schema");
    let auth = Arc::new(AuthState::default());
    let hook = auth.clone();
    conn.authorizer(Some(move |ctx: rusqlite::hooks::AuthContext<'_>| {
        hook.authorize(ctx)
    }))
    .expect("authorizer");
    conn.progress_handler(1_000_000, Some(|| true)).ok();
    // The API's defaults: 8 MiB answers, four of them in memory at once.
    let keep = Keep {
        limit: 8 << 20,
        budget: Arc::new(tokio::sync::Semaphore::new(32 << 20)),
    };
    Api { conn, auth, keep }
}

thread_local! {
    static API: RefCell<Option<Api>> = const { RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if text.trim().is_empty() {
        return;
    }
    API.with(|cell| {
        let mut slot = cell.borrow_mut();
        let api = slot.get_or_insert_with(open);
        if api.conn.execute_batch("SAVEPOINT fuzz").is_err() {
            *slot = None;
            return;
        }
        let _ = run_specs(
            &api.conn,
            &api.auth,
            &[StatementSpec::plain(text)],
            Some(&api.keep),
        );
        if api.conn.execute_batch("ROLLBACK TO fuzz; RELEASE fuzz").is_err() {
            *slot = None;
        }
    });
});
