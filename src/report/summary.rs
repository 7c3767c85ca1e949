//! The chapter's summary line, written to the log every `--stats-interval`.

use std::fmt::Write as _;

use crate::proxy::LoadBalancer;

/// The summary the chapter prints every 30 seconds, as one log entry: uptime, total, RPS, and
/// per backend its requests, errors and error rate. It reads the live counters, not a
/// [`Snapshot`](super::Snapshot): a log line needs no consistent page.
pub fn summary(lb: &LoadBalancer) -> String {
    let stats = lb.stats();
    let mut text = format!(
        "statistics: uptime {:.0}s, {} requests, {:.1} req/s, {} open connections, {} retries",
        stats.uptime().as_secs_f64(),
        stats.total_requests(),
        stats.requests_per_second(),
        stats.active_connections(),
        stats.retries()
    );
    for backend in lb.backends() {
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
