//! The node's staleness report, as published: one [`OriginRow`] per origin with wall-clock
//! times, its Prometheus gauges, and the health thresholds over it.
//!
//! The sync driver builds a report once a second from the sync machine's figures
//! (`sync::OriginStaleness`, machine time) and publishes it here; `/v1/health`,
//! `/v1/status` and `/metrics` read the last one without waiting for anything, and the
//! table writer (`db::staleness`) stores it in `patina_staleness` for apps.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use prometheus::{GaugeVec, IntGaugeVec, Opts, Registry};
use serde::Serialize;

use crate::sync::{OriginStaleness, SiteId};

/// One origin as published (and as stored in `patina_staleness`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OriginRow {
    #[serde(with = "hex_site")]
    pub site_id: SiteId,
    pub is_self: bool,
    /// Newest version known to exist.
    pub known_version: i64,
    /// Every version `1..=held_version` is held (the contiguous head).
    pub held_version: i64,
    /// Newest version held (above `held_version` when a gap is being repaired).
    pub newest_held: i64,
    /// How many versions are held.
    pub held_count: i64,
    /// Versions in `1..=known_version` not held.
    pub missing: i64,
    /// When last heard from, ms since the Unix epoch; `None` for this node itself and
    /// for an origin not heard from since this node started.
    pub last_heard_ms: Option<i64>,
}

mod hex_site {
    pub fn serialize<S: serde::Serializer>(s: &[u8; 16], ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(&hex::encode(s))
    }
}

impl OriginRow {
    /// A machine-time figure turned into wall-clock time: `started_ms` is the Unix time
    /// (ms) of the machine's epoch, so the same figure always gives the same row (no
    /// jitter from sampling two clocks, hence no needless table rewrite).
    pub fn from_machine(o: &OriginStaleness, started_ms: i64) -> OriginRow {
        OriginRow {
            site_id: o.site,
            is_self: o.is_self,
            known_version: o.known,
            held_version: o.contiguous,
            newest_held: o.newest_held,
            held_count: o.held,
            missing: o.missing,
            last_heard_ms: o
                .last_heard
                .map(|t| started_ms.saturating_add(t.as_millis() as i64)),
        }
    }

    /// Seconds since last heard from at `now_ms` (Unix ms); for an origin not heard from
    /// since the node started, since `started_ms`; 0 for this node.
    pub fn silent_secs(&self, now_ms: i64, started_ms: i64) -> f64 {
        if self.is_self {
            return 0.0;
        }
        let since = self.last_heard_ms.unwrap_or(started_ms);
        (now_ms.saturating_sub(since)).max(0) as f64 / 1000.0
    }
}

/// The last report and the gauges that show it.
pub struct Published {
    report: Mutex<Report>,
    known: IntGaugeVec,
    held: IntGaugeVec,
    missing: IntGaugeVec,
    silent: GaugeVec,
}

/// A report: the rows and the Unix time (ms) the node's sync machine started at.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub rows: Vec<OriginRow>,
    pub started_ms: i64,
}

impl Published {
    /// The gauges, registered in `registry`:
    /// `patina_origin_known_version`, `patina_origin_held_version`,
    /// `patina_origin_missing_versions` and `patina_origin_silent_seconds`, each labelled
    /// `site_id` (hex). Series of origins that leave the report are removed, so the
    /// cardinality is the number of origins reported (`sync::FORGET_AFTER`).
    pub fn new(registry: &Registry) -> Published {
        let int = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &["site_id"])
                .expect("metric names are constant and valid");
            if let Err(e) = registry.register(Box::new(g.clone())) {
                tracing::error!("cannot register a metric: {e}");
            }
            g
        };
        let silent = GaugeVec::new(
            Opts::new(
                "patina_origin_silent_seconds",
                "Seconds since this node last heard from the origin (a message of its own, \
                 or a newer version of it named by anyone).",
            ),
            &["site_id"],
        )
        .expect("metric names are constant and valid");
        if let Err(e) = registry.register(Box::new(silent.clone())) {
            tracing::error!("cannot register a metric: {e}");
        }
        Published {
            report: Mutex::new(Report::default()),
            known: int(
                "patina_origin_known_version",
                "Newest version of the origin known to exist.",
            ),
            held: int(
                "patina_origin_held_version",
                "This node holds every version of the origin up to this one.",
            ),
            missing: int(
                "patina_origin_missing_versions",
                "Versions of the origin known to exist and not held here.",
            ),
            silent,
        }
    }

    /// Publishes a report taken at `now_ms` (Unix ms): gauges set, series of origins no
    /// longer reported removed.
    pub fn publish(&self, report: Report, now_ms: i64) {
        let mut cur = self.report.lock().unwrap_or_else(|p| p.into_inner());
        let keep: BTreeSet<SiteId> = report.rows.iter().map(|r| r.site_id).collect();
        for gone in cur.rows.iter().filter(|r| !keep.contains(&r.site_id)) {
            let label = hex::encode(gone.site_id);
            for g in [&self.known, &self.held, &self.missing] {
                let _ = g.remove_label_values(&[&label]);
            }
            let _ = self.silent.remove_label_values(&[&label]);
        }
        for r in &report.rows {
            let label = hex::encode(r.site_id);
            let l = [label.as_str()];
            self.known.with_label_values(&l).set(r.known_version);
            self.held.with_label_values(&l).set(r.held_version);
            self.missing.with_label_values(&l).set(r.missing);
            self.silent
                .with_label_values(&l)
                .set(r.silent_secs(now_ms, report.started_ms));
        }
        *cur = report;
    }

    /// Sets the silence gauges as of `now_ms` (Unix ms): `/metrics` calls this before
    /// gathering, so a scrape never reads a silence up to a second old.
    pub fn refresh_silence(&self, now_ms: i64) {
        let cur = self.report.lock().unwrap_or_else(|p| p.into_inner());
        for r in &cur.rows {
            self.silent
                .with_label_values(&[hex::encode(r.site_id).as_str()])
                .set(r.silent_secs(now_ms, cur.started_ms));
        }
    }

    /// The last report published.
    pub fn report(&self) -> Report {
        self.report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl std::fmt::Debug for Published {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Published").finish_non_exhaustive()
    }
}

/// What the health thresholds found: each problem in words (empty: within them).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Lag {
    /// Versions missing, summed over every origin.
    pub missing: i64,
    /// The longest silence of an origin other than this node, in seconds.
    pub max_silent_secs: f64,
    pub problems: Vec<String>,
}

/// Checks a report against `max_lag_versions` (some origin misses more versions than
/// this) and `max_lag_secs` (some origin has been silent longer than this), at `now_ms`.
pub fn check(
    report: &Report,
    now_ms: i64,
    max_lag_versions: Option<i64>,
    max_lag_secs: Option<f64>,
) -> Lag {
    let mut lag = Lag::default();
    for r in &report.rows {
        lag.missing = lag.missing.saturating_add(r.missing);
        let silent = r.silent_secs(now_ms, report.started_ms);
        if !r.is_self {
            lag.max_silent_secs = lag.max_silent_secs.max(silent);
        }
        let site = hex::encode(r.site_id);
        if let Some(max) = max_lag_versions {
            if r.missing > max {
                lag.problems.push(format!(
                    "origin {site} is {} versions behind (holds up to {} of {}), more than \
                     max_lag_versions={max}",
                    r.missing, r.held_version, r.known_version
                ));
            }
        }
        if let Some(max) = max_lag_secs {
            if !r.is_self && silent > max {
                lag.problems.push(format!(
                    "origin {site} not heard from for {silent:.1} s, more than max_lag_secs={max}"
                ));
            }
        }
    }
    lag
}

/// The Unix time (ms) of a machine epoch that began `elapsed` ago.
pub fn epoch_unix_ms(now_unix_ms: i64, elapsed: Duration) -> i64 {
    now_unix_ms.saturating_sub(elapsed.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(site: u8, missing: i64, heard: Option<i64>) -> OriginRow {
        OriginRow {
            site_id: [site; 16],
            is_self: site == 1,
            known_version: 10,
            held_version: 10 - missing,
            newest_held: 10 - missing,
            held_count: 10 - missing,
            missing,
            last_heard_ms: heard,
        }
    }

    #[test]
    fn thresholds_name_the_origin_and_the_parameter() {
        let report = Report {
            rows: vec![row(1, 0, None), row(2, 3, Some(9_000)), row(3, 0, None)],
            started_ms: 5_000,
        };
        let ok = check(&report, 10_000, Some(3), Some(5.0));
        assert!(ok.problems.is_empty(), "{:?}", ok.problems);
        assert_eq!(ok.missing, 3);
        assert_eq!(
            ok.max_silent_secs, 5.0,
            "never heard: silent since the start"
        );
        let bad = check(&report, 10_000, Some(2), Some(4.0));
        assert_eq!(bad.problems.len(), 2, "{:?}", bad.problems);
        assert!(bad.problems[0].contains("max_lag_versions=2"));
        assert!(bad.problems[0].contains(&hex::encode([2u8; 16])));
        assert!(bad.problems[1].contains("max_lag_secs=4"));
        assert!(bad.problems[1].contains(&hex::encode([3u8; 16])));
    }

    #[test]
    fn publishing_drops_the_series_of_origins_that_left() {
        let registry = Registry::new();
        let p = Published::new(&registry);
        let series = |r: &Registry| {
            r.gather()
                .iter()
                .find(|f| f.name() == "patina_origin_missing_versions")
                .map_or(0, |f| f.get_metric().len())
        };
        p.publish(
            Report {
                rows: vec![row(1, 0, None), row(2, 1, Some(1))],
                started_ms: 0,
            },
            10,
        );
        assert_eq!(series(&registry), 2);
        p.publish(
            Report {
                rows: vec![row(1, 0, None)],
                started_ms: 0,
            },
            20,
        );
        assert_eq!(series(&registry), 1);
        assert_eq!(p.report().rows.len(), 1);
    }

    #[test]
    fn machine_times_become_stable_wall_clock_times() {
        let o = OriginStaleness {
            site: [2; 16],
            is_self: false,
            known: 4,
            contiguous: 4,
            newest_held: 4,
            held: 4,
            missing: 0,
            last_heard: Some(Duration::from_millis(1500)),
            silent_for: Duration::from_millis(10),
        };
        let a = OriginRow::from_machine(&o, 1_000_000);
        assert_eq!(a.last_heard_ms, Some(1_001_500));
        let later = OriginStaleness {
            silent_for: Duration::from_secs(9),
            ..o
        };
        assert_eq!(OriginRow::from_machine(&later, 1_000_000), a);
    }
}
