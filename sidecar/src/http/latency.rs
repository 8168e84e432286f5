//! Latency quantiles from the node's histograms, for `GET /v1/status` and so for
//! `patina status`: the same buckets `/metrics` exports, read the way Prometheus'
//! `histogram_quantile` reads them (linear within a bucket).

use prometheus::proto::MetricFamily;
use serde_json::{json, Value};

/// The histograms `patina status` describes: (key in `/v1/status`, metric name).
pub const DESCRIBED: &[(&str, &str)] = &[
    ("commit_to_applied", "patina_commit_to_applied_seconds"),
    ("apply_batch", "patina_apply_batch_seconds"),
    ("api_request", "patina_http_request_seconds"),
    ("subscription_event", "patina_subscription_event_seconds"),
    ("sync_round", "patina_sync_round_seconds"),
];

/// `{key: {"count", "p50_ms", "p99_ms"}}` for every described histogram, all label sets
/// summed; quantiles are `null` before the first sample.
pub fn summary(families: &[MetricFamily]) -> Value {
    let mut out = serde_json::Map::new();
    for (key, name) in DESCRIBED {
        let (count, buckets) = merged(families, name);
        let ms = |q: f64| quantile(&buckets, count, q).map(|s| (s * 1e5).round() / 100.0);
        out.insert(
            (*key).to_owned(),
            json!({ "count": count, "p50_ms": ms(0.5), "p99_ms": ms(0.99) }),
        );
    }
    Value::Object(out)
}

/// The sample count and cumulative `(upper bound, count)` buckets of the family `name`,
/// summed over its label sets.
fn merged(families: &[MetricFamily], name: &str) -> (u64, Vec<(f64, u64)>) {
    let mut count = 0;
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    for f in families.iter().filter(|f| f.name() == name) {
        for m in f.get_metric() {
            let h = m.get_histogram();
            count += h.get_sample_count();
            for (i, b) in h.get_bucket().iter().enumerate() {
                match buckets.get_mut(i) {
                    Some(slot) => slot.1 += b.cumulative_count(),
                    None => buckets.push((b.upper_bound(), b.cumulative_count())),
                }
            }
        }
    }
    (count, buckets)
}

/// The `q` quantile of a histogram with `count` samples and cumulative `buckets` (finite
/// upper bounds, ascending; samples above the last bound are in `count` only). Linear
/// interpolation inside the bucket holding the rank; a rank past the last bound answers
/// that bound, as Prometheus does. `None` without samples.
pub fn quantile(buckets: &[(f64, u64)], count: u64, q: f64) -> Option<f64> {
    if count == 0 {
        return None;
    }
    let rank = q * count as f64;
    let mut lower = 0.0;
    let mut below = 0u64;
    for &(upper, cumulative) in buckets {
        if cumulative as f64 >= rank {
            let inside = (cumulative - below) as f64;
            if inside == 0.0 {
                return Some(upper);
            }
            return Some(lower + (upper - lower) * (rank - below as f64) / inside);
        }
        lower = upper;
        below = cumulative;
    }
    buckets.last().map(|b| b.0)
}

/// One histogram of [`summary`] in words: `p50 12 ms, p99 40 ms (1234 samples)`.
pub fn in_words(v: &Value) -> String {
    let count = v["count"].as_u64().unwrap_or(0);
    match (v["p50_ms"].as_f64(), v["p99_ms"].as_f64()) {
        (Some(p50), Some(p99)) if count > 0 => {
            format!(
                "p50 {} ms, p99 {} ms ({count} samples)",
                fmt_ms(p50),
                fmt_ms(p99)
            )
        }
        _ => "no samples yet".to_owned(),
    }
}

/// Milliseconds with the precision that matters: 0.42, 4.2, 42.
fn fmt_ms(ms: f64) -> String {
    if ms < 1.0 {
        format!("{ms:.2}")
    } else if ms < 10.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_the_bucket_like_prometheus() {
        // 100 samples: 50 in (0, 0.01], 40 in (0.01, 0.1], 10 in (0.1, 1].
        let b = [(0.01, 50), (0.1, 90), (1.0, 100)];
        assert_eq!(quantile(&b, 0, 0.5), None);
        assert!((quantile(&b, 100, 0.5).unwrap_or(0.0) - 0.01).abs() < 1e-9);
        // Rank 99 is 9/10 of the way through (0.1, 1].
        assert!((quantile(&b, 100, 0.99).unwrap_or(0.0) - 0.91).abs() < 1e-9);
        // Samples above the last bound answer that bound.
        assert_eq!(quantile(&b, 200, 0.99), Some(1.0));
    }

    #[test]
    fn words_name_both_quantiles_or_say_there_is_nothing() {
        let v = json!({"count": 7, "p50_ms": 0.42, "p99_ms": 40.2});
        assert_eq!(in_words(&v), "p50 0.42 ms, p99 40 ms (7 samples)");
        let v = json!({"count": 0, "p50_ms": null, "p99_ms": null});
        assert_eq!(in_words(&v), "no samples yet");
    }
}
