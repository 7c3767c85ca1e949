//! The chapter's summary line, written to the log every `--stats-interval`.

use std::fmt::Write as _;

use crate::plural;
use crate::proxy::LoadBalancer;

/// The summary the chapter prints every 30 seconds, as one log entry: uptime, total, RPS, and
/// per backend its requests, errors and error rate. It reads the live counters, not a
/// [`Snapshot`](super::Snapshot): a log line needs no consistent page.
pub fn summary(lb: &LoadBalancer) -> String {
    let stats = lb.stats();
    let mut text = format!(
        "statistics: uptime {:.0}s, {}, {:.1} req/s, {}, {}",
        stats.uptime().as_secs_f64(),
        plural::count(stats.total_requests(), "request"),
        stats.requests_per_second(),
        plural::count(stats.active_connections(), "open connection"),
        plural::count(stats.retries(), "retry")
    );
    for backend in lb.backends() {
        let stats = backend.stats();
        let _ = write!(
            text,
            "\n  {}: {}, {} ({:.1}% error rate), {} active, avg {:.2} ms, {}",
            backend.name(),
            plural::count(stats.requests(), "request"),
            plural::count(stats.errors(), "error"),
            stats.error_rate() * 100.0,
            stats.active(),
            stats.latency_ms_avg(),
            backend.health().describe()
        );
    }
    text
}
