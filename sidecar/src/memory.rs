//! Keeping a node's resident memory near what it actually uses.
//!
//! A node's work comes in bursts (a large unit arrives, is decoded, applied and dropped).
//! glibc keeps freed memory in per-thread arenas, so after a burst the process can hold
//! several times its working set for good. Capping the arenas and handing free pages
//! back once in a while keeps RSS close to the live heap (measured: 60k replicated rows
//! left a node at 50–100 MB RSS without this).

use std::time::Duration;

/// How often free heap pages are returned to the OS.
pub const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Caps glibc's malloc arenas; call before any thread starts.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator tuning; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Returns free heap pages to the OS (a few milliseconds at most on a node's heap).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and only releases memory malloc owns and no
    // live allocation uses.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Trims every [`TRIM_EVERY`] on the current runtime until it shuts down.
pub fn spawn_trimmer() {
    tokio::spawn(async {
        let mut tick = tokio::time::interval(TRIM_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    });
}
