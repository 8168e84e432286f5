//! The one thin safe wrapper over the raw SQLite C API.
//!
//! sqlite-loadable covers function and module registration but not statements (blobs,
//! reals, errors, reset). SQLite hands every loadable extension a table of routines at
//! load time; we keep that pointer here and expose only what patina needs, as safe
//! methods. Everything else in the crate stays free of `unsafe` except the vtab glue.
//!
//! Raw pointers cannot be forged into safe calls: a [`Conn`] is built only through the
//! `unsafe` [`Conn::from_raw`], and every function that takes a value or context pointer
//! SQLite handed a callback is `unsafe` with a `# Safety` section saying what the caller
//! vouches for. Statements ([`Stmt`]) are made only by a `Conn`, so they are safe to use.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

use sqlite_loadable::ext::{
    sqlite3, sqlite3_api_routines, sqlite3_context, sqlite3_stmt, sqlite3_value,
};

use crate::error::{Error, Result};

static API: AtomicPtr<sqlite3_api_routines> = AtomicPtr::new(ptr::null_mut());

/// Remembers the routine table SQLite passed to the entry point.
///
/// # Safety
/// `api` must be the pointer SQLite gave `sqlite3_patina_init`; it lives as long as the process.
pub unsafe fn set_api(api: *mut sqlite3_api_routines) {
    if !api.is_null() {
        API.store(api, Ordering::Release);
    }
}

/// The routine table. Every path here starts from a [`Conn`] or a pointer SQLite passed a
/// callback, which exist only after the entry point stored the table; a null table is a
/// bug (or a host calling in without loading), answered with a panic that names it, never
/// a null dereference.
fn api() -> &'static sqlite3_api_routines {
    let p = API.load(Ordering::Acquire);
    assert!(
        !p.is_null(),
        "patina: SQLite's routine table is not set (sqlite3_patina_init has not run)"
    );
    // SAFETY: non-null, so it is the table SQLite gave the entry point, valid for the process.
    unsafe { &*p }
}

/// Calls one routine of the table. The routines are `Option` only because bindgen makes
/// every function pointer optional; SQLite ≥ 3.39 fills all the ones used here.
macro_rules! call {
    ($name:ident ( $($arg:expr),* $(,)? )) => {
        match api().$name {
            Some(f) => f($($arg),*),
            None => panic!(concat!("SQLite routine missing: ", stringify!($name))),
        }
    };
}

pub const SQLITE_OK: c_int = 0;
pub const SQLITE_ERROR: c_int = 1;
pub const SQLITE_ROW: c_int = 100;
pub const SQLITE_DONE: c_int = 101;
const SQLITE_INTEGER: c_int = 1;
const SQLITE_FLOAT: c_int = 2;
const SQLITE_TEXT: c_int = 3;
const SQLITE_BLOB: c_int = 4;
/// `SQLITE_TRANSIENT`: SQLite copies the buffer before the call returns.
fn transient() -> Option<unsafe extern "C" fn(*mut c_void)> {
    // SAFETY: SQLite defines SQLITE_TRANSIENT as the destructor value -1.
    unsafe { std::mem::transmute::<isize, Option<unsafe extern "C" fn(*mut c_void)>>(-1) }
}

/// An SQLite value owned by Rust. TEXT keeps its bytes as stored, so invalid UTF-8 in a
/// replica's data round-trips unchanged instead of being "repaired" differently per node.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Integer(i64),
    Real(f64),
    Text(Vec<u8>),
    Blob(Vec<u8>),
}

impl Value {
    /// Copies a value SQLite passed in (function argument, vtab column).
    ///
    /// # Safety
    /// `v` must be a value SQLite passed the callback now running (an argument of a
    /// function or of `xUpdate`/`xFilter`), still valid.
    pub unsafe fn from_raw(v: *mut sqlite3_value) -> Value {
        // SAFETY: `v` is a live value for the duration of the call that received it.
        unsafe {
            match call!(value_type(v)) {
                SQLITE_INTEGER => Value::Integer(call!(value_int64(v))),
                SQLITE_FLOAT => Value::Real(call!(value_double(v))),
                SQLITE_TEXT => {
                    let p = call!(value_text(v));
                    let n = call!(value_bytes(v));
                    Value::Text(bytes(p.cast(), n))
                }
                SQLITE_BLOB => {
                    let p = call!(value_blob(v));
                    let n = call!(value_bytes(v));
                    Value::Blob(bytes(p.cast(), n))
                }
                _ => Value::Null,
            }
        }
    }

    /// Borrows the bytes of a BLOB value SQLite passed in, without copying them (None
    /// for any other type, or when SQLite could not produce them).
    ///
    /// # Safety
    /// As [`Value::from_raw`]; the slice must not outlive the callback that received `v`.
    pub unsafe fn blob_of<'a>(v: *mut sqlite3_value) -> Option<&'a [u8]> {
        // SAFETY: `v` is a live value for the duration of the call that received it, and
        // SQLite keeps its bytes in place until the value changes.
        unsafe {
            if call!(value_type(v)) != SQLITE_BLOB {
                return None;
            }
            let p = call!(value_blob(v)).cast::<u8>();
            let n = call!(value_bytes(v));
            if n <= 0 {
                Some(&[])
            } else if p.is_null() {
                None // SQLite could not produce the bytes (out of memory)
            } else {
                Some(std::slice::from_raw_parts(p, n as usize))
            }
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Integer(i) => Some(*i),
            _ => None,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "NULL",
            Value::Integer(_) => "INTEGER",
            Value::Real(_) => "REAL",
            Value::Text(_) => "TEXT",
            Value::Blob(_) => "BLOB",
        }
    }
}

unsafe fn bytes(p: *const u8, n: c_int) -> Vec<u8> {
    if p.is_null() || n <= 0 {
        Vec::new()
    } else {
        // SAFETY: SQLite guarantees `n` readable bytes at `p` until the value changes.
        unsafe { std::slice::from_raw_parts(p, n as usize).to_vec() }
    }
}

/// Sets a function's or vtab column's result.
///
/// # Safety
/// `ctx` must be the context SQLite passed the function or `xColumn` call now running.
pub unsafe fn result_value(ctx: *mut sqlite3_context, v: &Value) {
    // SAFETY: ctx is the live context of the current call; buffers are copied (TRANSIENT).
    unsafe {
        match v {
            Value::Null => call!(result_null(ctx)),
            Value::Integer(i) => call!(result_int64(ctx, *i)),
            Value::Real(f) => call!(result_double(ctx, *f)),
            Value::Text(t) => call!(result_text(
                ctx,
                t.as_ptr().cast(),
                t.len() as c_int,
                transient()
            )),
            Value::Blob(b) => call!(result_blob(
                ctx,
                b.as_ptr().cast(),
                b.len() as c_int,
                transient()
            )),
        }
    }
}

/// An `sqlite3_mprintf`-allocated copy of `msg`, for `zErrMsg` fields SQLite frees itself.
pub fn sqlite_string(msg: &str) -> *mut c_char {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    // SAFETY: "%s" with a valid C string.
    unsafe { call!(mprintf(c"%s".as_ptr(), c.as_ptr())) }
}

/// Frees memory SQLite allocated (e.g. a `zErrMsg` we replace).
///
/// # Safety
/// `p` must be null or come from SQLite's allocator and not have been freed.
pub unsafe fn sqlite_free(p: *mut c_void) {
    if !p.is_null() {
        // SAFETY: p came from SQLite's allocator.
        unsafe { call!(free(p)) }
    }
}

/// A database connection handle borrowed from SQLite (we never close it). Built only
/// by [`Conn::from_raw`], so safe code cannot make one from an arbitrary pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conn(*mut sqlite3);

impl Conn {
    /// Wraps a connection handle.
    ///
    /// # Safety
    /// `db` must be an open connection SQLite gave patina (the entry point's, a function
    /// context's, a vtab's), which stays open while the `Conn` and statements made from it
    /// are used. The entry point must have run (it stores the routine table).
    pub unsafe fn from_raw(db: *mut sqlite3) -> Conn {
        Conn(db)
    }

    pub fn errmsg(&self) -> String {
        // SAFETY: errmsg returns a NUL-terminated string owned by the connection.
        unsafe {
            let p = call!(errmsg(self.0));
            if p.is_null() {
                "unknown error".into()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        }
    }

    fn error(&self, context: &str, code: c_int) -> Error {
        Error::Sqlite {
            context: context.to_string(),
            message: self.errmsg(),
            code,
        }
    }

    /// Runs one or more statements that return no rows.
    pub fn exec(&self, sql: &str) -> Result<()> {
        let c = CString::new(sql).map_err(|_| Error::State("SQL contains NUL".into()))?;
        // SAFETY: valid connection and C string; no callback.
        let rc = unsafe {
            call!(exec(
                self.0,
                c.as_ptr(),
                None,
                ptr::null_mut(),
                ptr::null_mut()
            ))
        };
        if rc == SQLITE_OK {
            Ok(())
        } else {
            Err(self.error(&first_line(sql), rc))
        }
    }

    pub fn prepare(&self, sql: &str) -> Result<Stmt> {
        let mut raw: *mut sqlite3_stmt = ptr::null_mut();
        // SAFETY: sql pointer/len are valid; raw receives the statement.
        let rc = unsafe {
            call!(prepare_v2(
                self.0,
                sql.as_ptr().cast(),
                sql.len() as c_int,
                &mut raw,
                ptr::null_mut()
            ))
        };
        if rc != SQLITE_OK {
            return Err(self.error(&format!("preparing {}", first_line(sql)), rc));
        }
        Ok(Stmt {
            raw,
            conn: *self,
            sql_head: first_line(sql),
        })
    }

    /// First column of the first row, if any.
    pub fn query_value(&self, sql: &str, params: &[Value]) -> Result<Option<Value>> {
        let mut s = self.prepare(sql)?;
        s.query_value(params)
    }

    pub fn query_i64(&self, sql: &str) -> Result<Option<i64>> {
        Ok(self.query_value(sql, &[])?.and_then(|v| v.as_i64()))
    }

    /// The most parameters one statement may bind on this connection
    /// (`SQLITE_LIMIT_VARIABLE_NUMBER`: 32766 by default since SQLite 3.32, 999 before;
    /// an app may lower it).
    pub fn variable_limit(&self) -> usize {
        const SQLITE_LIMIT_VARIABLE_NUMBER: c_int = 9;
        // SAFETY: valid connection; -1 reads the limit without changing it.
        let n = unsafe { call!(limit(self.0, SQLITE_LIMIT_VARIABLE_NUMBER, -1)) };
        usize::try_from(n).unwrap_or(0)
    }

    /// Rows changed by every completed statement of this connection (`sqlite3_total_changes`):
    /// if it has not moved, nothing wrote through this connection in between.
    pub fn total_changes(&self) -> i64 {
        // SAFETY: valid connection.
        i64::from(unsafe { call!(total_changes(self.0)) })
    }

    /// Rows changed by the most recent completed statement (`sqlite3_changes`).
    pub fn changes(&self) -> i64 {
        // SAFETY: valid connection.
        i64::from(unsafe { call!(changes(self.0)) })
    }
}

fn first_line(sql: &str) -> String {
    let s = sql.trim();
    let line = s.lines().next().unwrap_or("");
    if line.len() > 80 {
        format!(
            "{}…",
            &line[..line
                .char_indices()
                .nth(80)
                .map(|(i, _)| i)
                .unwrap_or(line.len())]
        )
    } else {
        line.to_string()
    }
}

/// A prepared statement, finalized on drop. Methods reset it after use so a cached
/// statement never holds a read transaction open between calls.
pub struct Stmt {
    raw: *mut sqlite3_stmt,
    conn: Conn,
    sql_head: String,
}

impl Stmt {
    fn check(&self, rc: c_int) -> Result<()> {
        if rc == SQLITE_OK {
            Ok(())
        } else {
            Err(self.conn.error(&self.sql_head, rc))
        }
    }

    pub fn bind(&mut self, index: usize, v: &Value) -> Result<()> {
        let i = index as c_int;
        // SAFETY: live statement; buffers copied (TRANSIENT).
        let rc = unsafe {
            match v {
                Value::Null => call!(bind_null(self.raw, i)),
                Value::Integer(x) => call!(bind_int64(self.raw, i, *x)),
                Value::Real(x) => call!(bind_double(self.raw, i, *x)),
                Value::Text(t) => call!(bind_text(
                    self.raw,
                    i,
                    t.as_ptr().cast(),
                    t.len() as c_int,
                    transient()
                )),
                Value::Blob(b) => call!(bind_blob(
                    self.raw,
                    i,
                    b.as_ptr().cast(),
                    b.len() as c_int,
                    transient()
                )),
            }
        };
        self.check(rc)
    }

    pub fn bind_all(&mut self, params: &[Value]) -> Result<()> {
        for (i, p) in params.iter().enumerate() {
            self.bind(i + 1, p)?;
        }
        Ok(())
    }

    /// Steps once: `Ok(true)` when a row is ready.
    pub fn step(&mut self) -> Result<bool> {
        // SAFETY: live statement.
        let rc = unsafe { call!(step(self.raw)) };
        match rc {
            SQLITE_ROW => Ok(true),
            SQLITE_DONE => Ok(false),
            _ => {
                let err = self.conn.error(&self.sql_head, rc);
                self.reset();
                Err(err)
            }
        }
    }

    pub fn reset(&mut self) {
        // SAFETY: live statement. The return code repeats the last step's error, already reported.
        unsafe {
            call!(reset(self.raw));
        }
    }

    pub fn column(&self, i: usize) -> Value {
        // SAFETY: called only after step() returned a row.
        unsafe {
            let i = i as c_int;
            match call!(column_type(self.raw, i)) {
                SQLITE_INTEGER => Value::Integer(call!(column_int64(self.raw, i))),
                SQLITE_FLOAT => Value::Real(call!(column_double(self.raw, i))),
                SQLITE_TEXT => {
                    let p = call!(column_text(self.raw, i));
                    let n = call!(column_bytes(self.raw, i));
                    Value::Text(bytes(p.cast(), n))
                }
                SQLITE_BLOB => {
                    let p = call!(column_blob(self.raw, i));
                    let n = call!(column_bytes(self.raw, i));
                    Value::Blob(bytes(p.cast(), n))
                }
                _ => Value::Null,
            }
        }
    }

    pub fn column_i64(&self, i: usize) -> i64 {
        // SAFETY: called only after step() returned a row.
        unsafe { call!(column_int64(self.raw, i as c_int)) }
    }

    pub fn column_is_null(&self, i: usize) -> bool {
        // SAFETY: called only after step() returned a row.
        unsafe { call!(column_type(self.raw, i as c_int)) == 5 }
    }

    /// Runs what is bound to completion, then resets.
    pub fn run(&mut self) -> Result<()> {
        while self.step()? {}
        self.reset();
        Ok(())
    }

    /// Binds, runs to completion, resets.
    pub fn execute(&mut self, params: &[Value]) -> Result<()> {
        self.reset();
        self.bind_all(params)?;
        self.run()
    }

    /// How many times SQLite re-prepared this statement since it was made (a schema
    /// change in between: a table, index or trigger created or dropped).
    pub fn reprepares(&self) -> i32 {
        const SQLITE_STMTSTATUS_REPREPARE: c_int = 5;
        // SAFETY: live statement.
        unsafe { call!(stmt_status(self.raw, SQLITE_STMTSTATUS_REPREPARE, 0)) }
    }

    /// Binds, returns the first column of the first row, resets.
    pub fn query_value(&mut self, params: &[Value]) -> Result<Option<Value>> {
        self.reset();
        self.bind_all(params)?;
        let v = if self.step()? {
            Some(self.column(0))
        } else {
            None
        };
        self.reset();
        Ok(v)
    }

    /// Binds, collects every row with `f`, resets.
    pub fn query_map<T>(
        &mut self,
        params: &[Value],
        mut f: impl FnMut(&Stmt) -> T,
    ) -> Result<Vec<T>> {
        self.reset();
        self.bind_all(params)?;
        let mut out = Vec::new();
        while self.step()? {
            out.push(f(self));
        }
        self.reset();
        Ok(out)
    }
}

impl Drop for Stmt {
    fn drop(&mut self) {
        // SAFETY: the statement is finalized exactly once.
        unsafe {
            call!(finalize(self.raw));
        }
    }
}

/// Declares a vtab's schema from inside xConnect.
///
/// # Safety
/// `db` must be the connection SQLite passed the `xConnect` call now running.
pub unsafe fn declare_vtab(db: *mut sqlite3, sql: &CStr) -> c_int {
    // SAFETY: called from xConnect with the connection SQLite passed.
    unsafe { call!(declare_vtab(db, sql.as_ptr())) }
}

/// Registers a raw module (the vtab glue in `changes.rs` builds the struct).
///
/// # Safety
/// `aux` must be valid for the module's callbacks until SQLite calls `destroy` on it.
pub unsafe fn create_module(
    conn: Conn,
    name: &CStr,
    module: &'static sqlite_loadable::ext::sqlite3_module,
    aux: *mut c_void,
    destroy: Option<unsafe extern "C" fn(*mut c_void)>,
) -> c_int {
    // SAFETY: the module is 'static; aux ownership passes to SQLite with `destroy`.
    unsafe {
        call!(create_module_v2(
            conn.0,
            name.as_ptr(),
            module,
            aux,
            destroy
        ))
    }
}

/// A scalar function's implementation: the call's context, its arguments, and the state
/// it was registered with.
pub type ScalarFn<T> =
    fn(*mut sqlite3_context, &[*mut sqlite3_value], &T) -> sqlite_loadable::Result<()>;

/// What SQLite holds for one registered function; freed by [`drop_function`] when the
/// function is replaced or the connection closes.
struct Registered<T> {
    func: ScalarFn<T>,
    aux: T,
}

unsafe extern "C" fn call_function<T>(
    ctx: *mut sqlite3_context,
    argc: c_int,
    argv: *mut *mut sqlite3_value,
) {
    // SAFETY: SQLite hands back the pointer `create_function` registered for this
    // function, alive until `drop_function`; argv holds argc values for this call.
    let (reg, args) = unsafe {
        let reg = &*call!(user_data(ctx)).cast::<Registered<T>>();
        let args: &[*mut sqlite3_value] = if argc > 0 && !argv.is_null() {
            std::slice::from_raw_parts(argv, argc as usize)
        } else {
            &[]
        };
        (reg, args)
    };
    if let Err(e) = (reg.func)(ctx, args, &reg.aux) {
        let msg = e.result_error_message();
        if sqlite_loadable::api::result_error(ctx, &msg).is_err() {
            // SAFETY: ctx is the live context of this call.
            unsafe { call!(result_error_code(ctx, SQLITE_ERROR)) };
        }
    }
}

unsafe extern "C" fn drop_function<T>(p: *mut c_void) {
    // SAFETY: p came from Box::into_raw in `create_function`; SQLite destroys it once.
    drop(unsafe { Box::from_raw(p.cast::<Registered<T>>()) });
}

/// Registers a scalar function whose state SQLite frees when the connection closes.
///
/// sqlite-loadable's `define_scalar_function_with_aux` passes SQLite no destructor, so
/// every connection that loaded the extension leaked its functions' boxes and state
/// (found by the `changes_insert` fuzz target's leak check); this one hands SQLite
/// [`drop_function`].
pub fn create_function<T: 'static>(
    conn: Conn,
    name: &str,
    n_args: c_int,
    flags: c_int,
    func: ScalarFn<T>,
    aux: T,
) -> Result<()> {
    let cname = CString::new(name)
        .map_err(|_| Error::State(format!("function name {name:?} holds a NUL byte")))?;
    let reg = Box::into_raw(Box::new(Registered { func, aux })).cast::<c_void>();
    // SAFETY: conn is a live connection; on failure SQLite calls the destructor itself
    // (sqlite3_create_function_v2 destroys pApp when it fails), so reg is never leaked
    // nor freed twice.
    let rc = unsafe {
        call!(create_function_v2(
            conn.0,
            cname.as_ptr(),
            n_args,
            flags,
            reg,
            Some(call_function::<T>),
            None,
            None,
            Some(drop_function::<T>)
        ))
    };
    if rc == SQLITE_OK {
        Ok(())
    } else {
        Err(Error::State(format!(
            "registering {name}() failed (code {rc})"
        )))
    }
}

/// `sqlite3_table_column_metadata`: the collation of a column (None when default BINARY).
pub fn column_collation(conn: Conn, table: &str, column: &str) -> Option<String> {
    let t = CString::new(table).ok()?;
    let c = CString::new(column).ok()?;
    let mut decl: *const c_char = ptr::null();
    let mut coll: *const c_char = ptr::null();
    let (mut notnull, mut pk, mut autoinc) = (0, 0, 0);
    // SAFETY: out-pointers are valid; strings owned by SQLite are copied immediately.
    unsafe {
        let rc = call!(table_column_metadata(
            conn.0,
            c"main".as_ptr(),
            t.as_ptr(),
            c.as_ptr(),
            &mut decl,
            &mut coll,
            &mut notnull,
            &mut pk,
            &mut autoinc
        ));
        if rc != SQLITE_OK || coll.is_null() {
            return None;
        }
        let s = CStr::from_ptr(coll).to_string_lossy().into_owned();
        if s.eq_ignore_ascii_case("BINARY") {
            None
        } else {
            Some(s)
        }
    }
}
