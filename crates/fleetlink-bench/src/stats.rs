//! What one run measures, and medians over runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Counters and the latency histogram shared by a run's tasks.
#[derive(Debug, Clone)]
pub struct Meter {
    pub sent: Arc<AtomicU64>,
    pub delivered: Arc<AtomicU64>,
    pub errors: Arc<AtomicU64>,
    hist: Arc<Mutex<Histogram<u64>>>,
}

impl Default for Meter {
    fn default() -> Self {
        Self::new()
    }
}

impl Meter {
    pub fn new() -> Self {
        Self {
            sent: Arc::default(),
            delivered: Arc::default(),
            errors: Arc::default(),
            // 1 µs .. 1000 s, 3 significant digits
            hist: Arc::new(Mutex::new(
                Histogram::new_with_bounds(1, 1_000_000_000, 3)
                    .unwrap_or_else(|e| panic!("histogram bounds: {e}")),
            )),
        }
    }

    pub fn sent(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
    }

    /// One message delivered (or durably acked) `since` was when it was sent.
    pub fn delivered_since(&self, since: Instant) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        self.latency(since.elapsed().as_micros() as u64);
    }

    /// Delivered messages whose latency is not measured.
    pub fn delivered(&self, n: u64) {
        self.delivered.fetch_add(n, Ordering::Relaxed);
    }

    pub fn latency(&self, micros: u64) {
        if let Ok(mut h) = self.hist.lock() {
            h.saturating_record(micros.max(1));
        }
    }

    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn sent_total(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn delivered_total(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    pub fn errors_total(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    pub fn reset_latency(&self) {
        if let Ok(mut h) = self.hist.lock() {
            h.reset();
        }
    }

    /// (p50, p99, p99.9) in µs; zeros if nothing was recorded.
    pub fn percentiles(&self) -> (u64, u64, u64) {
        match self.hist.lock() {
            Ok(h) if !h.is_empty() => (
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99),
                h.value_at_quantile(0.999),
            ),
            _ => (0, 0, 0),
        }
    }
}

/// One run of one system in one scenario.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Run {
    /// Length of the measured window (s).
    pub seconds: f64,
    /// Messages sent by the load generator during the run (window and drain).
    pub sent: u64,
    /// Messages delivered (or durably acked) within the measured window.
    pub delivered: u64,
    /// Messages sent but never delivered, counted after the drain.
    pub lost: u64,
    /// Errors the clients saw.
    pub errors: u64,
    /// Server CPU seconds (utime + stime) within the window.
    pub server_cpu_s: f64,
    /// Load generator CPU seconds within the window.
    pub client_cpu_s: f64,
    /// Server RSS at the end of the window (bytes).
    pub server_rss: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    /// Scenario-specific figures (connections per second, RSS per connection, ...).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub extra: std::collections::BTreeMap<String, f64>,
}

impl Run {
    pub fn msgs_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.delivered as f64 / self.seconds
        } else {
            0.0
        }
    }

    pub fn msgs_per_server_cpu_s(&self) -> f64 {
        if self.server_cpu_s > 0.0 {
            self.delivered as f64 / self.server_cpu_s
        } else {
            0.0
        }
    }

    /// Server CPU µs per delivered message.
    pub fn server_us_per_msg(&self) -> f64 {
        if self.delivered > 0 {
            self.server_cpu_s * 1e6 / self.delivered as f64
        } else {
            0.0
        }
    }
}

/// Median, min and max of a figure over runs.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(mut values: Vec<f64>) -> Spread {
        values.retain(|v| v.is_finite());
        if values.is_empty() {
            return Spread::default();
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Spread {
            median,
            min: values[0],
            max: values[n - 1],
        }
    }
}

/// Every run of one system in one scenario, with the medians the report shows.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub scenario: String,
    pub system: String,
    pub runs: Vec<Run>,
}

impl Series {
    pub fn spread(&self, f: impl Fn(&Run) -> f64) -> Spread {
        Spread::of(self.runs.iter().map(f).collect())
    }

    pub fn extra(&self, key: &str) -> Spread {
        self.spread(|r| r.extra.get(key).copied().unwrap_or(f64::NAN))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_median_of_odd_and_even_counts() {
        let s = Spread::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Spread::of(vec![4.0, 1.0, 2.0, 3.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
        let s = Spread::of(vec![f64::NAN]);
        assert_eq!(s.median, 0.0);
    }

    #[test]
    fn meter_reports_percentiles_of_recorded_latencies() {
        let m = Meter::new();
        for us in 1..=1000 {
            m.latency(us);
        }
        let (p50, p99, p999) = m.percentiles();
        assert!((495..=505).contains(&p50), "{p50}");
        assert!((985..=995).contains(&p99), "{p99}");
        assert!((995..=1001).contains(&p999), "{p999}");
    }
}
