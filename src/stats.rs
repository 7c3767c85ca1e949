//! Statistics: counters kept while the balancer runs, and the periodic summary in the log.
//!
//! Every counter is an atomic, so recording a request never takes a lock and never waits on
//! another thread. Latency goes into a fixed set of histogram buckets instead of a growing list,
//! so memory stays flat however long the balancer runs and percentiles can still be estimated.
//! The chapter keeps its counters under one lock and only prints them; this module keeps the
//! same numbers (uptime, total, requests per second, per-backend requests, errors, error rate).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crate::backend::Backend;

/// Upper bounds of the latency histogram's buckets, in seconds; a last bucket holds the rest.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Counters for the balancer as a whole.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    total_requests: AtomicU64,
    retries: AtomicU64,
    active_connections: AtomicU64,
    tunnels: Tunnels,
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

impl Stats {
    /// Starts the clock for uptime and requests per second.
    pub fn new() -> Self {
        Stats {
            started: Instant::now(),
            total_requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            tunnels: Tunnels::default(),
            active_connections: AtomicU64::new(0),
        }
    }

    /// Counts one request the balancer answered, whether a backend or the balancer itself did.
    pub fn count_request(&self) {
        self.total_requests.fetch_add(1, Relaxed);
    }

    /// Requests answered so far.
    pub fn total_requests(&self) -> u64 {
        self.total_requests.load(Relaxed)
    }

    /// Counts a request sent on to another backend after one failed it.
    pub fn count_retry(&self) {
        self.retries.fetch_add(1, Relaxed);
    }

    /// Requests sent on to another backend after one failed them, so far.
    pub fn retries(&self) -> u64 {
        self.retries.load(Relaxed)
    }

    /// The balancer's tunnels, over all backends.
    pub fn tunnels(&self) -> &Tunnels {
        &self.tunnels
    }

    /// Client connections open now.
    pub fn active_connections(&self) -> u64 {
        self.active_connections.load(Relaxed)
    }

    /// Marks a client connection as open until the returned guard is dropped.
    pub fn open_connection(&self) -> Gauge<'_> {
        Gauge::raise(&self.active_connections)
    }

    /// Time since the balancer started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Average requests per second since start.
    pub fn requests_per_second(&self) -> f64 {
        let seconds = self.uptime().as_secs_f64();
        if seconds > 0.0 {
            self.total_requests() as f64 / seconds
        } else {
            0.0
        }
    }

    /// The summary the chapter prints every 30 seconds: uptime, total, RPS, and per backend its
    /// requests, errors and error rate.
    pub fn summary(&self, backends: &[std::sync::Arc<Backend>]) -> String {
        let mut text = format!(
            "statistics: uptime {:.0}s, {} requests, {:.1} req/s, {} open connections, {} retries",
            self.uptime().as_secs_f64(),
            self.total_requests(),
            self.requests_per_second(),
            self.active_connections(),
            self.retries()
        );
        for backend in backends {
            let stats = backend.stats();
            let _ = write!(
                text,
                "\n  {}: {} requests, {} errors ({:.1}% error rate), {} active, avg {:.2} ms, {}",
                backend.name(),
                stats.requests(),
                stats.errors(),
                stats.error_rate() * 100.0,
                stats.active(),
                stats.latency_ms_avg(),
                backend.health().describe()
            );
        }
        text
    }
}

/// Counters for one backend.
#[derive(Debug, Default)]
pub struct BackendStats {
    requests: AtomicU64,
    errors: AtomicU64,
    active: AtomicU64,
    latency_micros_sum: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    tunnels: Tunnels,
}

impl BackendStats {
    /// The tunnels to this backend.
    pub fn tunnels(&self) -> &Tunnels {
        &self.tunnels
    }

    /// Marks a request as in flight on this backend until the guard is dropped. Least-connections
    /// balancing reads this count, so the guard releases it on every path out, panics included.
    pub fn begin_request(&self) -> Gauge<'_> {
        Gauge::raise(&self.active)
    }

    /// Counts a request that reached this backend. It is counted as soon as it is on its way,
    /// so that a client that has its response and then reads the statistics finds it there.
    pub fn count_request(&self) {
        self.requests.fetch_add(1, Relaxed);
    }

    /// Records how long a request to this backend took, and whether it failed.
    pub fn record(&self, latency: Duration, failed: bool) {
        if failed {
            self.errors.fetch_add(1, Relaxed);
        }
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_micros_sum.fetch_add(micros, Relaxed);
        let seconds = latency.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&le| seconds <= le)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency_buckets[bucket].fetch_add(1, Relaxed);
    }

    /// Records a failure that never became a request, such as a refused connection.
    pub fn record_error(&self) {
        self.errors.fetch_add(1, Relaxed);
    }

    /// Requests that reached this backend.
    pub fn requests(&self) -> u64 {
        self.requests.load(Relaxed)
    }

    /// Failed requests and connection attempts.
    pub fn errors(&self) -> u64 {
        self.errors.load(Relaxed)
    }

    /// Requests in flight now.
    pub fn active(&self) -> u64 {
        self.active.load(Relaxed)
    }

    /// Errors per request (0 when there were none).
    pub fn error_rate(&self) -> f64 {
        let requests = self.requests().max(self.errors());
        if requests == 0 {
            0.0
        } else {
            self.errors() as f64 / requests as f64
        }
    }

    /// Average latency in milliseconds.
    pub fn latency_ms_avg(&self) -> f64 {
        let finished: u64 = self.latency_buckets().iter().sum();
        if finished == 0 {
            0.0
        } else {
            self.latency_micros_sum.load(Relaxed) as f64 / finished as f64 / 1000.0
        }
    }

    /// Total latency of all requests, in seconds (the histogram's `_sum`).
    pub fn latency_seconds_sum(&self) -> f64 {
        self.latency_micros_sum.load(Relaxed) as f64 / 1e6
    }

    /// The count in each latency bucket (not cumulative); the last is above every bound.
    pub fn latency_buckets(&self) -> Vec<u64> {
        self.latency_buckets
            .iter()
            .map(|b| b.load(Relaxed))
            .collect()
    }

    /// Estimates a latency percentile (0–100) in milliseconds from the histogram: the upper bound
    /// of the bucket in which that share of requests is reached.
    pub fn latency_ms_percentile(&self, percentile: f64) -> f64 {
        let buckets = self.latency_buckets();
        let total: u64 = buckets.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let wanted = (total as f64 * percentile / 100.0).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, count) in buckets.iter().enumerate() {
            seen += count;
            if seen >= wanted {
                let bound = LATENCY_BUCKETS
                    .get(i)
                    .copied()
                    .unwrap_or(LATENCY_BUCKETS[LATENCY_BUCKETS.len() - 1]);
                return bound * 1000.0;
            }
        }
        0.0
    }
}

/// Tunnels after `101 Switching Protocols` (WebSockets and other upgrades): open now, and
/// opened since start.
#[derive(Debug, Default)]
pub struct Tunnels {
    open: AtomicU64,
    total: AtomicU64,
}

impl Tunnels {
    /// Counts a tunnel that is open until the returned guard is dropped.
    pub fn open(&self) -> Gauge<'_> {
        self.total.fetch_add(1, Relaxed);
        Gauge::raise(&self.open)
    }

    /// Tunnels open now.
    pub fn active(&self) -> u64 {
        self.open.load(Relaxed)
    }

    /// Tunnels opened since start.
    pub fn total(&self) -> u64 {
        self.total.load(Relaxed)
    }
}

/// An RAII guard that holds a gauge one higher while it lives.
#[derive(Debug)]
pub struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn raise(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Relaxed);
        Gauge(counter)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_fall_when_dropped() {
        let stats = BackendStats::default();
        let first = stats.begin_request();
        let second = stats.begin_request();
        assert_eq!(stats.active(), 2);
        drop(first);
        drop(second);
        assert_eq!(stats.active(), 0);
    }

    #[test]
    fn latency_lands_in_buckets() {
        let stats = BackendStats::default();
        for _ in 0..99 {
            stats.count_request();
            stats.record(Duration::from_micros(300), false);
        }
        stats.count_request();
        stats.record(Duration::from_millis(200), true);
        assert_eq!(stats.requests(), 100);
        assert_eq!(stats.errors(), 1);
        assert_eq!(stats.latency_ms_percentile(50.0), 0.5);
        assert_eq!(stats.latency_ms_percentile(100.0), 250.0);
        assert!((stats.latency_ms_avg() - 2.297).abs() < 0.001);
    }
}
