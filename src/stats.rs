//! Statistics: counters kept while the balancer runs ([`crate::report`] shows them).
//!
//! Every counter is an atomic, so recording a request never takes a lock and never waits on
//! another thread. Latency goes into a fixed set of histogram buckets instead of a growing list,
//! so memory stays flat however long the balancer runs and percentiles can still be estimated.
//! The chapter keeps its counters under one lock and only prints them; this module keeps the
//! same numbers (uptime, total, requests per second, per-backend requests, errors, error rate).
//!
//! For the statistics page, each backend also keeps its last five minutes second by second
//! ([`history`]), a fine latency histogram for honest percentiles ([`latency`]), and, with the
//! balancer, a short list of what changed ([`events`]). All three have a fixed size.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

pub mod events;
pub mod history;
pub mod latency;

use events::{EventKind, EventLog};
use history::History;
use latency::LatencyHistogram;

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
    tls: TlsCounters,
    events: EventLog,
    reloads: Reloads,
    /// Backend names that resolve to nothing now.
    unresolved: std::sync::Mutex<Vec<String>>,
    panic: Panic,
}

/// Panic (`--panic-threshold`): whether requests go to every primary backend now, and for how
/// long they have in all.
#[derive(Debug, Default)]
struct Panic {
    /// Read by every request: a change is rare.
    on: AtomicBool,
    times: std::sync::Mutex<PanicTimes>,
}

#[derive(Debug, Default)]
struct PanicTimes {
    since: Option<Instant>,
    before: Duration,
}

/// Reloads of the configuration: how many applied and refused, and the last one.
#[derive(Debug, Default)]
pub struct Reloads {
    applied: AtomicU64,
    refused: AtomicU64,
    last: std::sync::Mutex<Option<LastReload>>,
}

/// The last reload: when, whether it was applied, and what changed (or why not).
#[derive(Debug, Clone, PartialEq)]
pub struct LastReload {
    /// Wall-clock time, in Unix seconds.
    pub unix_time: f64,
    /// Whether it was applied (`false`: refused, the old configuration kept).
    pub ok: bool,
    /// What changed, or why nothing did.
    pub message: String,
}

impl Reloads {
    /// Records a reload's result.
    pub fn record(&self, ok: bool, message: &str) {
        let counter = if ok { &self.applied } else { &self.refused };
        counter.fetch_add(1, Relaxed);
        let unix_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(LastReload {
            unix_time,
            ok,
            message: message.to_string(),
        });
    }

    /// Reloads applied and refused so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.applied.load(Relaxed), self.refused.load(Relaxed))
    }

    /// The last reload, if any.
    pub fn last(&self) -> Option<LastReload> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
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
            tls: TlsCounters::default(),
            active_connections: AtomicU64::new(0),
            events: EventLog::default(),
            reloads: Reloads::default(),
            unresolved: std::sync::Mutex::new(Vec::new()),
            panic: Panic::default(),
        }
    }

    /// Notes whether a request found the balancer in panic. A change is logged and becomes an
    /// event, in the words `describe` gives; the time spent in panic adds up.
    pub fn observe_panic(&self, on: bool, describe: impl FnOnce() -> String) {
        if self.panic.on.load(Relaxed) == on {
            return;
        }
        let mut times = self.panic.times.lock().unwrap_or_else(|e| e.into_inner());
        if self.panic.on.swap(on, Relaxed) == on {
            return; // another request noted it first
        }
        if on {
            times.since = Some(Instant::now());
        } else if let Some(since) = times.since.take() {
            times.before += since.elapsed();
        }
        drop(times);
        let message = describe();
        if on {
            log::warn!("{message}");
        } else {
            log::info!("{message}");
        }
        self.push_event(EventKind::Panic, message);
    }

    /// Whether requests go to every primary backend now (`--panic-threshold`).
    pub fn in_panic(&self) -> bool {
        self.panic.on.load(Relaxed)
    }

    /// Seconds spent in panic since start, the current spell included.
    pub fn panic_seconds(&self) -> f64 {
        let times = self.panic.times.lock().unwrap_or_else(|e| e.into_inner());
        let current = times.since.map_or(Duration::ZERO, |since| since.elapsed());
        (times.before + current).as_secs_f64()
    }

    /// Notes which backend names resolve to nothing now (the statistics page says so).
    pub fn set_unresolved(&self, names: Vec<String>) {
        *self.unresolved.lock().unwrap_or_else(|e| e.into_inner()) = names;
    }

    /// The backend names that resolved to nothing at the last try.
    pub fn unresolved(&self) -> Vec<String> {
        self.unresolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reloads of the configuration.
    pub fn reloads(&self) -> &Reloads {
        &self.reloads
    }

    /// Notes an event of the balancer as a whole (its start, its stop) for the statistics page,
    /// in the words of its log line.
    pub fn push_event(&self, kind: EventKind, message: String) {
        self.events.push(None, kind, message);
    }

    /// The balancer's own recent events, oldest first.
    pub fn events(&self) -> Vec<events::Event> {
        self.events.recent()
    }

    /// When the balancer started.
    pub fn started(&self) -> Instant {
        self.started
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

    /// The HTTPS listener's handshakes.
    pub fn tls(&self) -> &TlsCounters {
        &self.tls
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
    latency: LatencyHistogram,
    history: History,
    events: EventLog,
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
        self.history.count_request(history::current_second());
    }

    /// Records how long a request to this backend took, and whether it failed.
    pub fn record(&self, latency: Duration, failed: bool) {
        let second = history::current_second();
        if failed {
            self.errors.fetch_add(1, Relaxed);
            self.history.count_error(second);
        }
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_micros_sum.fetch_add(micros, Relaxed);
        self.history.record_latency(second, micros);
        self.latency.record(latency);
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
        self.history.count_error(history::current_second());
    }

    /// The last five minutes, second by second, ending with the second `now`.
    pub fn history(&self, now: u64) -> history::Series {
        self.history.series(now)
    }

    /// Notes a change of this backend's health for the statistics page, in the words of its
    /// log line.
    pub fn push_event(&self, backend: &str, kind: EventKind, message: String) {
        self.events.push(Some(backend), kind, message);
    }

    /// This backend's recent events, oldest first.
    pub fn events(&self) -> Vec<events::Event> {
        self.events.recent()
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

    /// A latency percentile (0–100) in milliseconds, within 5 % of the true value: read from
    /// the fine histogram, not from the Prometheus buckets (see [`latency`]).
    pub fn latency_ms_percentile(&self, percentile: f64) -> f64 {
        self.latency.percentile_ms(percentile)
    }
}

/// TLS handshakes on the HTTPS listener: those done, by protocol version, and those failed.
#[derive(Debug, Default)]
pub struct TlsCounters {
    tls12: AtomicU64,
    tls13: AtomicU64,
    failed: AtomicU64,
}

impl TlsCounters {
    /// Counts a completed handshake that agreed on `version`.
    pub fn handshake(&self, version: Option<rustls::ProtocolVersion>) {
        match version {
            Some(rustls::ProtocolVersion::TLSv1_2) => self.tls12.fetch_add(1, Relaxed),
            _ => self.tls13.fetch_add(1, Relaxed),
        };
    }

    /// Counts a handshake that failed or timed out.
    pub fn failed(&self) {
        self.failed.fetch_add(1, Relaxed);
    }

    /// Completed handshakes with TLS 1.2 and with TLS 1.3.
    pub fn by_version(&self) -> [(&'static str, u64); 2] {
        [
            ("1.2", self.tls12.load(Relaxed)),
            ("1.3", self.tls13.load(Relaxed)),
        ]
    }

    /// Failed handshakes.
    pub fn failures(&self) -> u64 {
        self.failed.load(Relaxed)
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
        assert_eq!(
            stats.latency_buckets()[0],
            99,
            "0.3 ms is in the 0.5 ms bucket"
        );
        let p50 = stats.latency_ms_percentile(50.0);
        assert!((p50 - 0.3).abs() < 0.3 * 0.05, "{p50}");
        let p100 = stats.latency_ms_percentile(100.0);
        assert!((p100 - 200.0).abs() < 200.0 * 0.05, "{p100}");
        assert!((stats.latency_ms_avg() - 2.297).abs() < 0.001);
    }
}
