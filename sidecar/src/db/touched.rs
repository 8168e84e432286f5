//! What each read of the local feed touched: the `(table, packed primary key)` pairs, handed
//! from the tailer to whoever listens (the subscription engine), so that a write is matched
//! against the subscriptions that read its table, by key, instead of re-running them all.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

/// The keys one read of the feed touched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TouchedKeys {
    /// Table name (as `crsql_changes` spells it) → packed primary keys touched.
    Keys(HashMap<String, HashSet<Vec<u8>>>),
    /// Unknown: a unit too large to read whole, or a listener that fell behind. Listeners
    /// treat every table as changed.
    #[default]
    All,
}

impl TouchedKeys {
    /// No keys at all.
    pub fn none() -> TouchedKeys {
        TouchedKeys::Keys(HashMap::new())
    }

    /// Adds `other` to these keys.
    pub fn merge(&mut self, other: TouchedKeys) {
        match (&mut *self, other) {
            (TouchedKeys::All, _) => {}
            (me, TouchedKeys::All) => *me = TouchedKeys::All,
            (TouchedKeys::Keys(a), TouchedKeys::Keys(b)) => {
                for (t, keys) in b {
                    a.entry(t).or_default().extend(keys);
                }
            }
        }
    }

    /// Records one touched key.
    pub fn add(&mut self, table: &str, pk: &[u8]) {
        if let TouchedKeys::Keys(m) = self {
            match m.get_mut(table) {
                Some(s) => {
                    s.insert(pk.to_vec());
                }
                None => {
                    m.insert(table.to_owned(), HashSet::from([pk.to_vec()]));
                }
            }
        }
    }

    /// Whether nothing was touched.
    pub fn is_empty(&self) -> bool {
        matches!(self, TouchedKeys::Keys(m) if m.is_empty())
    }
}

/// One read of the feed: what it touched, up to which `db_version`, and when the node
/// noticed it (the start of the subscription event latency).
#[derive(Debug, Clone)]
pub struct Touched {
    pub to: i64,
    pub keys: TouchedKeys,
    pub noticed: Instant,
}

/// Fan-out of [`Touched`] from the tailer to its listeners. Listeners that went away are
/// dropped at the next publish.
#[derive(Debug, Default)]
pub struct TouchedHub {
    listeners: Mutex<Vec<Sender<Arc<Touched>>>>,
}

impl TouchedHub {
    /// A new listener; it receives every later publish.
    pub fn listen(&self) -> Receiver<Arc<Touched>> {
        let (tx, rx) = crossbeam_channel::unbounded();
        if let Ok(mut l) = self.listeners.lock() {
            l.push(tx);
        }
        rx
    }

    /// Hands `t` to every listener.
    pub fn publish(&self, t: Touched) {
        let Ok(mut l) = self.listeners.lock() else {
            return;
        };
        if l.is_empty() {
            return;
        }
        let t = Arc::new(t);
        l.retain(|tx| tx.send(t.clone()).is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_keeps_every_key_and_all_absorbs() {
        let mut a = TouchedKeys::none();
        assert!(a.is_empty());
        a.add("t", b"\x01\x09\x01");
        let mut b = TouchedKeys::none();
        b.add("t", b"\x01\x09\x02");
        b.add("u", b"\x01\x09\x01");
        a.merge(b);
        match &a {
            TouchedKeys::Keys(m) => {
                assert_eq!(m["t"].len(), 2);
                assert_eq!(m["u"].len(), 1);
            }
            TouchedKeys::All => panic!("keys expected"),
        }
        a.merge(TouchedKeys::All);
        assert_eq!(a, TouchedKeys::All);
        a.merge(TouchedKeys::none());
        assert_eq!(a, TouchedKeys::All);
    }

    #[test]
    fn publishing_reaches_live_listeners_and_forgets_gone_ones() {
        let hub = TouchedHub::default();
        let rx = hub.listen();
        drop(hub.listen());
        hub.publish(Touched {
            to: 3,
            keys: TouchedKeys::All,
            noticed: Instant::now(),
        });
        assert_eq!(rx.try_recv().map(|t| t.to).ok(), Some(3));
        assert_eq!(hub.listeners.lock().map(|l| l.len()).ok(), Some(1));
    }
}
