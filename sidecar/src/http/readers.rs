//! The threads API reads run on: [`READERS`](super::pool::READERS) dedicated threads at a
//! lower CPU priority (nice 10).
//!
//! Why: a caller's query may burn a core until `api.query_timeout` stops it. With 8 of
//! them on a 2-core node, threads of equal priority left `/v1/health`, `/metrics`,
//! `/v1/members`, the writer and replication a fraction of the CPU each (members took up
//! to 77 ms to answer under the attack). Niced reader threads yield to all of those. They
//! are their own threads, not tokio's blocking pool, so nothing else ever runs niced.
//! Jobs are only queued by a holder of a reader slot, so one thread is always free.

use crossbeam_channel::{Receiver, Sender};

use super::error::HttpError;

/// How much lower the readers' priority is (the nice value added).
const READER_NICE: i32 = 10;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// The reader threads; they end when this is dropped (their channel closes).
pub struct ReaderThreads {
    tx: Sender<Job>,
}

impl ReaderThreads {
    /// Starts `n` threads.
    pub fn start(n: usize) -> Result<ReaderThreads, HttpError> {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        for i in 0..n {
            let rx: Receiver<Job> = rx.clone();
            std::thread::Builder::new()
                .name(format!("patina-api-reader-{i}"))
                .spawn(move || {
                    lower_priority();
                    while let Ok(job) = rx.recv() {
                        // A panicking job must not take a reader thread with it.
                        let run = std::panic::AssertUnwindSafe(job);
                        if std::panic::catch_unwind(run).is_err() {
                            tracing::error!("an API reader job panicked");
                        }
                    }
                })
                .map_err(HttpError::Io)?;
        }
        Ok(ReaderThreads { tx })
    }

    /// Runs `job` on a reader thread.
    pub fn run(&self, job: impl FnOnce() + Send + 'static) -> Result<(), HttpError> {
        self.tx
            .send(Box::new(job))
            .map_err(|_| HttpError::Unavailable("the API is shutting down".into()))
    }
}

/// Lowers the calling thread's CPU priority; a failure only costs fairness, so it is
/// logged and ignored.
#[cfg(target_os = "linux")]
fn lower_priority() {
    // SAFETY: gettid(2) has no preconditions; setpriority(2) on our own thread id (on
    // Linux PRIO_PROCESS with a thread id sets that thread's nice value alone).
    let rc = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let current = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, current + READER_NICE)
    };
    if rc != 0 {
        tracing::debug!("cannot lower an API reader thread's priority (rc {rc})");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_on_niced_threads() {
        let threads = ReaderThreads::start(2).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        threads
            .run(move || {
                // SAFETY: as in lower_priority.
                let nice = unsafe {
                    let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                    libc::getpriority(libc::PRIO_PROCESS, tid)
                };
                tx.send(nice).unwrap();
            })
            .unwrap();
        let nice = rx.recv().unwrap();
        // SAFETY: getpriority on this process.
        let ours = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        assert!(nice >= (ours + READER_NICE).min(19), "nice {nice}");
    }
}
