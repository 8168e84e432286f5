//! A subscription's latest committed changes, kept as ready stream lines so that live
//! streams take them from memory instead of reading each round back from the log.
//!
//! With 100 subscriptions at 1,000 writes/s, nearly every round changes a different
//! subscription, so every change woke a stream that read it back from the log on a
//! reader thread (a hop, a read transaction, two queries): a fifth of the node's CPU
//! (BENCHMARKS.md). The engine appends a round's lines here after the round commits and
//! before it publishes the new last change id, so a stream that sees that id finds its
//! changes here unless they were already pushed out; then it reads the log as before.
//! What a stream sends is the same either way: the log's rows, formatted by
//! [`change_line`].

use std::collections::VecDeque;

use axum::body::Bytes;

/// Bytes of lines kept per subscription. A stream that fell further behind (or resumes
/// from further back) reads the log.
pub const RECENT_BYTES: usize = 8 << 10;

/// One `{"change"}` event line of a subscription stream.
pub fn change_line(change_id: i64, kind: &str, rowid: i64, vals: &str) -> Bytes {
    Bytes::from(format!(
        "{{\"change\":[\"{kind}\",{rowid},{vals},{change_id}]}}\n"
    ))
}

/// The latest committed change lines, oldest first, with contiguous change ids.
#[derive(Debug, Default)]
pub struct Recent {
    lines: VecDeque<(i64, Bytes)>,
    bytes: usize,
}

impl Recent {
    /// Appends the line of change `id`; a line that does not follow the last one kept
    /// (which the engine never produces) drops the older ones, so what is kept stays
    /// contiguous. Oldest lines go past [`RECENT_BYTES`].
    pub fn push(&mut self, id: i64, line: Bytes) {
        if self.lines.back().is_some_and(|(last, _)| *last + 1 != id) {
            self.lines.clear();
            self.bytes = 0;
        }
        self.bytes += line.len();
        self.lines.push_back((id, line));
        while self.bytes > RECENT_BYTES {
            match self.lines.pop_front() {
                Some((_, l)) => self.bytes -= l.len(),
                None => break,
            }
        }
    }

    /// The lines of every change after `cursor` up to `latest`, or `None` when change
    /// `cursor + 1` is no longer (or not yet) kept here: then the caller reads the log.
    pub fn after(&self, cursor: i64, latest: i64) -> Option<Vec<(i64, Bytes)>> {
        let (first, _) = self.lines.front()?;
        let (last, _) = self.lines.back()?;
        if cursor + 1 < *first || latest > *last || cursor >= latest {
            return None;
        }
        let skip = usize::try_from(cursor + 1 - first).ok()?;
        let take = usize::try_from(latest - cursor).ok()?;
        Some(self.lines.iter().skip(skip).take(take).cloned().collect())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ids(v: Option<Vec<(i64, Bytes)>>) -> Option<Vec<i64>> {
        v.map(|v| v.into_iter().map(|(id, _)| id).collect())
    }

    #[test]
    fn serves_contiguous_ranges_it_holds_and_nothing_else() {
        let mut r = Recent::default();
        assert_eq!(ids(r.after(0, 1)), None);
        for id in 1..=5 {
            r.push(id, change_line(id, "update", 7, "[1]"));
        }
        assert_eq!(ids(r.after(0, 5)), Some(vec![1, 2, 3, 4, 5]));
        assert_eq!(ids(r.after(2, 4)), Some(vec![3, 4]));
        // Not yet kept, or nothing new.
        assert_eq!(ids(r.after(4, 6)), None);
        assert_eq!(ids(r.after(5, 5)), None);
        // A gap (never produced by the engine) forgets what came before it.
        r.push(9, change_line(9, "delete", 7, "[1]"));
        assert_eq!(ids(r.after(4, 5)), None);
        assert_eq!(ids(r.after(8, 9)), Some(vec![9]));
    }

    #[test]
    fn keeps_a_bounded_number_of_bytes() {
        let mut r = Recent::default();
        let line = change_line(1, "update", 1, &format!("[\"{}\"]", "x".repeat(100)));
        let n = (RECENT_BYTES / line.len()) as i64;
        for id in 1..=n * 3 {
            r.push(id, line.clone());
        }
        assert!(r.bytes <= RECENT_BYTES);
        assert_eq!(ids(r.after(0, 3)), None, "the oldest were pushed out");
        assert_eq!(ids(r.after(n * 3 - 1, n * 3)), Some(vec![n * 3]));
        assert_eq!(
            String::from_utf8(change_line(4, "insert", 2, "[1,\"a\"]").to_vec()).unwrap(),
            "{\"change\":[\"insert\",2,[1,\"a\"],4]}\n"
        );
    }
}
