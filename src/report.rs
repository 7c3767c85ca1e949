//! Statistics reports: one snapshot of the counters, rendered as JSON, Prometheus text and HTML.
//!
//! The admin listener serves these three views. Each request takes a [`Snapshot`] first and renders
//! from it, so every number on one page comes from the same moment and a backend's shares add up.
//! The chapter only printed its statistics every 30 seconds; these views can be scraped by a
//! monitoring system or watched in a browser: the page draws the last five minutes of traffic
//! per backend ([`chart`]) and lists the recent events, newest first.

use std::fmt::Write as _;
use std::time::{Instant, SystemTime};

use serde_json::json;

use crate::health::HealthMode;
use crate::proxy::LoadBalancer;
use crate::stats::events::{rfc3339, Event, EventKind, MAX_EVENTS};
use crate::stats::history::{self, Series, HISTORY_SECONDS};
use crate::stats::LATENCY_BUCKETS;
use crate::sticky::Sticky;

pub mod chart;

/// How often the HTML page reloads itself, in seconds.
const REFRESH_SECONDS: u32 = 2;

/// The summary the chapter prints every 30 seconds, as one log entry: uptime, total, RPS, and
/// per backend its requests, errors and error rate. It reads the live counters, not a
/// [`Snapshot`]: a log line needs no consistent page.
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

/// The balancer's statistics at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The balancing algorithm's name.
    pub algorithm: &'static str,
    /// Seconds since start.
    pub uptime_seconds: f64,
    /// Requests the balancer answered, by a backend or by itself.
    pub total_requests: u64,
    /// Average requests per second since start.
    pub requests_per_second: f64,
    /// Client connections open now.
    pub active_connections: u64,
    /// Requests sent on to another backend after one failed them.
    pub retries: u64,
    /// Tunnels (after `101 Switching Protocols`) open now.
    pub tunnels: u64,
    /// Tunnels opened since start.
    pub tunnels_total: u64,
    /// Completed TLS handshakes by protocol version (`1.2`, `1.3`).
    pub tls_handshakes: [(&'static str, u64); 2],
    /// Failed TLS handshakes.
    pub tls_handshake_failures: u64,
    /// Sticky sessions held and the table's bound, when sessions are kept in a table.
    pub sessions: Option<(usize, usize)>,
    /// How sticky sessions are kept: `"table"`, `"signed"` (cookies, no table), or none.
    pub sticky: Option<&'static str>,
    /// One entry per backend, in the order they were given.
    pub backends: Vec<BackendSnapshot>,
    /// The wall-clock time at the start of the newest second of every backend's `history`.
    pub history_last: SystemTime,
    /// The last [`MAX_EVENTS`] events of the balancer and its backends, newest first.
    pub events: Vec<EventSnapshot>,
}

/// One event as the reports show it.
#[derive(Debug, Clone)]
pub struct EventSnapshot {
    /// When it happened.
    pub time: SystemTime,
    /// Seconds after the balancer started.
    pub uptime_seconds: f64,
    /// The backend it concerns; `None` for the balancer itself.
    pub backend: Option<String>,
    /// What changed.
    pub kind: EventKind,
    /// The log line's words.
    pub message: String,
}

/// One backend's statistics at one moment.
#[derive(Debug, Clone)]
pub struct BackendSnapshot {
    /// The address as the user wrote it.
    pub address: String,
    /// Relative share of traffic for weighted algorithms.
    pub weight: u32,
    /// Whether the backend is considered healthy. Always true without health checks: the
    /// backend stays in rotation.
    pub healthy: bool,
    /// Which health checks `healthy` rests on; [`HealthMode::None`] when nothing checks the
    /// backend (phases 1, 2 and 4, `--health-check none`).
    pub health_checks: HealthMode,
    /// The health state and the counts behind it, in one line (`up, checks 3 passed / 0 failed
    /// in a row, last 200 1.2s ago`).
    pub health: String,
    /// Active checks passed in a row.
    pub checks_passed: u32,
    /// Active checks failed in a row.
    pub checks_failed: u32,
    /// Requests failed in a row, as passive checks count them.
    pub failed_requests: u32,
    /// The latest active check's result and how many seconds ago it ended.
    pub last_check: Option<(String, f64)>,
    /// Requests that reached it.
    pub requests: u64,
    /// Failed requests and connection attempts.
    pub errors: u64,
    /// Errors per request.
    pub error_rate: f64,
    /// Requests in flight now, open tunnels included.
    pub active_connections: u64,
    /// Tunnels to it open now.
    pub tunnels: u64,
    /// Tunnels to it opened since start.
    pub tunnels_total: u64,
    /// Average latency in milliseconds.
    pub latency_ms_avg: f64,
    /// Median latency in milliseconds, within 5 % (from the fine histogram).
    pub latency_ms_p50: f64,
    /// 90th percentile latency in milliseconds, within 5 %.
    pub latency_ms_p90: f64,
    /// 99th percentile latency in milliseconds, within 5 %.
    pub latency_ms_p99: f64,
    /// Total latency in seconds.
    pub latency_seconds_sum: f64,
    /// Requests per latency bucket (not cumulative); the last is above every bound.
    pub latency_buckets: Vec<u64>,
    /// The last [`HISTORY_SECONDS`] seconds, oldest first.
    pub history: Series,
    /// For each second of `history`, whether the backend was out of rotation during it.
    pub down: Vec<bool>,
}

impl Snapshot {
    /// Reads every counter of `lb` now.
    pub fn of(lb: &LoadBalancer) -> Snapshot {
        let stats = lb.stats();
        let now = history::current_second();
        let mut events = stats.events();
        let backends = lb
            .backends()
            .iter()
            .map(|backend| {
                let counters = backend.stats();
                let health = backend.health();
                let own_events = counters.events();
                let down = down_seconds(&own_events, backend.is_healthy(), now);
                events.extend(own_events);
                BackendSnapshot {
                    address: backend.name().to_string(),
                    weight: backend.weight(),
                    healthy: backend.is_healthy(),
                    health_checks: health.mode(),
                    health: health.describe(),
                    checks_passed: health.consecutive_successes(),
                    checks_failed: health.consecutive_failures(),
                    failed_requests: health.failed_requests(),
                    last_check: health
                        .last_check()
                        .map(|check| (check.result.clone(), check.ago().as_secs_f64())),
                    requests: counters.requests(),
                    errors: counters.errors(),
                    error_rate: counters.error_rate(),
                    active_connections: counters.active(),
                    tunnels: counters.tunnels().active(),
                    tunnels_total: counters.tunnels().total(),
                    latency_ms_avg: counters.latency_ms_avg(),
                    latency_ms_p50: counters.latency_ms_percentile(50.0),
                    latency_ms_p90: counters.latency_ms_percentile(90.0),
                    latency_ms_p99: counters.latency_ms_percentile(99.0),
                    latency_seconds_sum: counters.latency_seconds_sum(),
                    latency_buckets: counters.latency_buckets(),
                    history: counters.history(now),
                    down,
                }
            })
            .collect();
        Snapshot {
            algorithm: lb.balancer().name(),
            uptime_seconds: stats.uptime().as_secs_f64(),
            total_requests: stats.total_requests(),
            requests_per_second: stats.requests_per_second(),
            active_connections: stats.active_connections(),
            retries: stats.retries(),
            tunnels: stats.tunnels().active(),
            tunnels_total: stats.tunnels().total(),
            tls_handshakes: stats.tls().by_version(),
            tls_handshake_failures: stats.tls().failures(),
            sessions: lb.sessions().map(|s| (s.len(), s.max_sessions())),
            sticky: lb.sticky().map(|sticky| match sticky {
                Sticky::Table(_) => "table",
                Sticky::Signed(_) => "signed",
            }),
            backends,
            history_last: history::wall_time(now as i64),
            events: newest_events(events, stats.started()),
        }
    }

    /// Requests that reached any backend: the sum of the per-backend counts.
    fn backend_requests(&self) -> u64 {
        self.backends.iter().map(|b| b.requests).sum()
    }

    /// The JSON document of `/stats.json`: the contract's fields, then extras (`algorithm`,
    /// `sessions`, and per backend `error_rate`, `latency_ms_p99`, `share`, and the health
    /// fields, `health_checks` first: what `healthy` rests on, `"none"` when nothing checks).
    pub fn to_json(&self) -> String {
        let reached = self.backend_requests();
        let backends: Vec<_> = self
            .backends
            .iter()
            .map(|b| {
                json!({
                    "address": b.address,
                    "weight": b.weight,
                    "healthy": b.healthy,
                    "requests": b.requests,
                    "errors": b.errors,
                    "active_connections": b.active_connections,
                    "tunnels": b.tunnels,
                    "tunnels_total": b.tunnels_total,
                    "latency_ms_avg": round3(b.latency_ms_avg),
                    "latency_ms_p50": round3(b.latency_ms_p50),
                    "latency_ms_p90": round3(b.latency_ms_p90),
                    "latency_ms_p99": round3(b.latency_ms_p99),
                    "error_rate": round3(b.error_rate),
                    "share": round3(share(b.requests, reached)),
                    "health_checks": b.health_checks.to_string(),
                    "health": b.health,
                    "checks_passed_in_a_row": b.checks_passed,
                    "checks_failed_in_a_row": b.checks_failed,
                    "failed_requests_in_a_row": b.failed_requests,
                    "last_check": b.last_check.as_ref().map(|(result, ago)| json!({
                        "result": result,
                        "seconds_ago": round3(*ago),
                    })),
                })
            })
            .collect();
        let mut document = json!({
            "uptime_seconds": round3(self.uptime_seconds),
            "total_requests": self.total_requests,
            "requests_per_second": round3(self.requests_per_second),
            "active_connections": self.active_connections,
            "retries": self.retries,
            "tunnels": self.tunnels,
            "tunnels_total": self.tunnels_total,
            "tls": {
                "handshakes": self.tls_handshakes.iter().map(|(_, n)| n).sum::<u64>(),
                "handshake_failures": self.tls_handshake_failures,
                "versions": self.tls_handshakes.iter()
                    .map(|(version, n)| (format!("TLSv{version}"), json!(n)))
                    .collect::<serde_json::Map<_, _>>(),
            },
            "algorithm": self.algorithm,
            "backends": backends,
            "history": self.history_json(),
            "events": self.events_json(),
        });
        // With signed cookies there is no table to count: `sessions` is null.
        if let (Some(sticky), Some(fields)) = (self.sticky, document.as_object_mut()) {
            let (held, max) = self.sessions.unzip();
            fields.insert("sticky".into(), json!(sticky));
            fields.insert("sessions".into(), json!(held));
            fields.insert("max_sessions".into(), json!(max));
        }
        document.to_string()
    }

    /// `"history"`: per backend, one entry per second for the last five minutes, oldest first;
    /// the last entry is the current second, still filling.
    fn history_json(&self) -> serde_json::Value {
        let last = self.history_last;
        let first = last - std::time::Duration::from_secs(HISTORY_SECONDS as u64 - 1);
        let backends: Vec<_> = self
            .backends
            .iter()
            .map(|b| {
                let latency: Vec<_> = b
                    .history
                    .latency_ms_avg
                    .iter()
                    .map(|ms| ms.map(round3))
                    .collect();
                json!({
                    "address": b.address,
                    "requests": b.history.requests,
                    "errors": b.history.errors,
                    "latency_ms_avg": latency,
                    "down": b.down,
                })
            })
            .collect();
        json!({
            "interval_seconds": 1,
            "length": HISTORY_SECONDS,
            "first": rfc3339(first),
            "last": rfc3339(last),
            "backends": backends,
        })
    }

    /// `"events"`: newest first.
    fn events_json(&self) -> serde_json::Value {
        self.events
            .iter()
            .map(|e| {
                json!({
                    "time": rfc3339(e.time),
                    "uptime_seconds": round3(e.uptime_seconds),
                    "backend": e.backend,
                    "kind": e.kind.to_string(),
                    "message": e.message,
                })
            })
            .collect()
    }

    /// The Prometheus text exposition format (version 0.0.4) of `/metrics`: per-backend series
    /// labelled `backend`, and a few balancer-wide gauges.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::with_capacity(4096);
        let whole = [
            (
                "lb_uptime_seconds",
                "gauge",
                "Seconds since the balancer started.",
                self.uptime_seconds,
            ),
            (
                "lb_client_requests_total",
                "counter",
                "Requests the balancer answered, by a backend or by itself.",
                self.total_requests as f64,
            ),
            (
                "lb_client_connections",
                "gauge",
                "Client connections open now.",
                self.active_connections as f64,
            ),
            (
                "lb_retries_total",
                "counter",
                "Requests sent on to another backend after one failed them.",
                self.retries as f64,
            ),
        ];
        for (name, kind, help, value) in whole {
            metric_header(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
        if let Some((held, _)) = self.sessions {
            metric_header(&mut out, "lb_sessions", "gauge", "Sticky sessions held.");
            let _ = writeln!(out, "lb_sessions {held}");
        }
        self.per_backend(
            &mut out,
            "lb_requests_total",
            "counter",
            "Requests that reached the backend.",
            |b| b.requests as f64,
        );
        self.per_backend(
            &mut out,
            "lb_backend_errors_total",
            "counter",
            "Failed requests and connection attempts.",
            |b| b.errors as f64,
        );
        // Without health checks a backend stays 1: the gauge says whether the backend is in
        // rotation, which it is, and `lb_backend_up == 0` alerts keep meaning "taken out". No
        // label says which checks ran: it would be the same on every series of one balancer,
        // and would change the series' identity when the checks are turned on. /stats.json's
        // `health_checks` says it instead.
        self.per_backend(
            &mut out,
            "lb_backend_up",
            "gauge",
            "1 when the backend is in rotation (healthy, or not health-checked), else 0.",
            |b| f64::from(u8::from(b.healthy)),
        );
        self.per_backend(
            &mut out,
            "lb_backend_active_connections",
            "gauge",
            "Requests in flight to the backend.",
            |b| b.active_connections as f64,
        );
        self.per_backend(
            &mut out,
            "lb_backend_weight",
            "gauge",
            "The backend's weight.",
            |b| f64::from(b.weight),
        );
        self.tunnel_metrics(&mut out);
        self.tls_metrics(&mut out);
        self.latency_histogram(&mut out);
        out
    }

    /// `lb_tunnels_active` and `lb_tunnels_total`: the balancer's total without labels, then
    /// one series per backend.
    fn tunnel_metrics(&self, out: &mut String) {
        let families = [
            (
                "lb_tunnels_active",
                "gauge",
                "Tunnels (after 101 Switching Protocols) open now.",
                self.tunnels,
                (|b: &BackendSnapshot| b.tunnels) as fn(&BackendSnapshot) -> u64,
            ),
            (
                "lb_tunnels_total",
                "counter",
                "Tunnels opened since start.",
                self.tunnels_total,
                |b: &BackendSnapshot| b.tunnels_total,
            ),
        ];
        for (name, kind, help, total, per_backend) in families {
            metric_header(out, name, kind, help);
            let _ = writeln!(out, "{name} {total}");
            for backend in &self.backends {
                let label = escape_label(&backend.address);
                let _ = writeln!(
                    out,
                    "{name}{{backend=\"{label}\"}} {}",
                    per_backend(backend)
                );
            }
        }
    }

    /// `lb_tls_handshakes_total` by protocol version, and `lb_tls_handshake_failures_total`.
    fn tls_metrics(&self, out: &mut String) {
        let name = "lb_tls_handshakes_total";
        metric_header(
            out,
            name,
            "counter",
            "Completed TLS handshakes, by protocol version.",
        );
        for (version, count) in self.tls_handshakes {
            let _ = writeln!(out, "{name}{{version=\"{version}\"}} {count}");
        }
        let name = "lb_tls_handshake_failures_total";
        metric_header(
            out,
            name,
            "counter",
            "TLS handshakes that failed or timed out.",
        );
        let _ = writeln!(out, "{name} {}", self.tls_handshake_failures);
    }

    fn per_backend(
        &self,
        out: &mut String,
        name: &str,
        kind: &str,
        help: &str,
        value: impl Fn(&BackendSnapshot) -> f64,
    ) {
        metric_header(out, name, kind, help);
        for backend in &self.backends {
            let label = escape_label(&backend.address);
            let _ = writeln!(out, "{name}{{backend=\"{label}\"}} {}", value(backend));
        }
    }

    /// `lb_request_duration_seconds`: cumulative buckets ending with `+Inf`, then `_sum` and
    /// `_count`, per backend.
    fn latency_histogram(&self, out: &mut String) {
        let name = "lb_request_duration_seconds";
        metric_header(
            out,
            name,
            "histogram",
            "Time from request to complete response.",
        );
        for backend in &self.backends {
            let label = escape_label(&backend.address);
            let mut cumulative = 0;
            for (i, count) in backend.latency_buckets.iter().enumerate() {
                cumulative += count;
                let le = LATENCY_BUCKETS
                    .get(i)
                    .map_or_else(|| "+Inf".to_string(), f64::to_string);
                let _ = writeln!(
                    out,
                    "{name}_bucket{{backend=\"{label}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "{name}_sum{{backend=\"{label}\"}} {}",
                backend.latency_seconds_sum
            );
            let _ = writeln!(out, "{name}_count{{backend=\"{label}\"}} {cumulative}");
        }
    }

    /// The HTML page of `/stats`: self-contained (inline style and SVG, no scripts or external
    /// assets), reloading itself every few seconds, and narrow enough for a phone: the table
    /// turns into one card per backend below 1000 px.
    pub fn to_html(&self) -> String {
        let mut page = String::with_capacity(64 * 1024);
        page.push_str(HTML_START);
        let _ = writeln!(
            page,
            "<meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">"
        );
        page.push_str(HTML_STYLE);
        let _ = writeln!(
            page,
            "<p class=\"summary\">{} &middot; up {} &middot; {} &middot; {:.1} req/s \
             &middot; {} &middot; {} &middot; {}{}</p>",
            escape_html(self.algorithm),
            human_duration(self.uptime_seconds),
            count(self.total_requests, "request"),
            self.requests_per_second,
            count(self.active_connections, "open connection"),
            count(self.tunnels, "tunnel"),
            count(self.retries, "retry"),
            match (self.sessions, self.sticky) {
                (Some((held, max)), _) => format!(" &middot; {held} of {max} sticky sessions"),
                (None, Some(_)) => " &middot; sticky sessions in signed cookies".to_string(),
                (None, None) => String::new(),
            }
        );
        self.html_table(&mut page);
        self.html_charts(&mut page);
        self.html_events(&mut page);
        page.push_str(
            "<p class=\"links\">Also as <a href=\"/stats.json\">JSON</a> \
             and <a href=\"/metrics\">Prometheus metrics</a>.</p>\n</body>\n</html>\n",
        );
        page
    }

    /// The table of totals, one row per backend. Each cell carries its column's name in
    /// `data-label`, which the narrow layout shows beside the value.
    fn html_table(&self, page: &mut String) {
        page.push_str(
            "<table>\n<thead><tr><th>backend</th><th>state</th><th>health checks</th>\
             <th>weight</th><th>requests</th><th>errors</th><th>active</th>\
             <th>latency p50 / p90 / p99</th><th>share of traffic</th></tr></thead>\n<tbody>\n",
        );
        let reached = self.backend_requests();
        for b in &self.backends {
            let share = share(b.requests, reached) * 100.0;
            // Without checks, "up" beside a 100 % error rate would claim a verdict nothing made.
            let (state, class) = match (b.health_checks, b.healthy) {
                (HealthMode::None, _) => ("not checked", "unchecked"),
                (_, true) => ("up", "up"),
                (_, false) => ("down", "down"),
            };
            // The counts behind the state, so a learner can watch rise and fall happen.
            let health = match b.health_checks {
                HealthMode::None => String::from("none"),
                _ => escape_html(&b.health),
            };
            let _ = writeln!(
                page,
                "<tr><td class=\"name\" data-label=\"backend\">{}</td>\
                 <td class=\"{class}\">{state}</td>\
                 <td class=\"health\" data-label=\"health checks\">{health}</td>\
                 <td data-label=\"weight\">{}</td><td data-label=\"requests\">{}</td>\
                 <td data-label=\"errors\">{} ({:.1}%)</td><td data-label=\"active\">{}{}</td>\
                 <td class=\"latency\" data-label=\"latency p50 / p90 / p99\" title=\"average {:.2} ms\">{} / {} / {} ms</td>\
                 <td class=\"share\" data-label=\"share\"><div class=\"bar\"><div style=\"width:{share:.1}%\"></div></div> {share:.1}%</td></tr>",
                escape_html(&b.address),
                b.weight,
                b.requests,
                b.errors,
                b.error_rate * 100.0,
                b.active_connections,
                tunnels_note(b.tunnels),
                b.latency_ms_avg,
                milliseconds(b.latency_ms_p50),
                milliseconds(b.latency_ms_p90),
                milliseconds(b.latency_ms_p99),
            );
        }
        page.push_str("</tbody>\n</table>\n");
    }

    /// One chart per backend of its last five minutes, all on the same scales.
    fn html_charts(&self, page: &mut String) {
        let busiest = self
            .backends
            .iter()
            .flat_map(|b| b.history.requests.iter().chain(&b.history.errors))
            .copied()
            .max()
            .unwrap_or(0);
        let slowest = self
            .backends
            .iter()
            .flat_map(|b| b.history.latency_ms_avg.iter().flatten())
            .copied()
            .fold(0.0, f64::max);
        let scales = chart::Scales::fitting(busiest, slowest);
        let _ = writeln!(
            page,
            "<h2>Traffic, last 5 minutes <small>until {} UTC</small></h2>\n\
             <p class=\"legend\"><span class=\"key req\"></span>requests/s \
             <span class=\"key err\"></span>errors/s <span class=\"key lat\"></span>mean latency \
             <span class=\"key out\"></span>out of rotation</p>\n<div class=\"charts\">",
            &rfc3339(self.history_last)[11..19]
        );
        for b in &self.backends {
            // The newest second is still running; the one before it is complete.
            let now = b.history.requests.iter().rev().nth(1).copied().unwrap_or(0);
            let series = chart::Seconds {
                requests: &b.history.requests,
                errors: &b.history.errors,
                latency_ms: &b.history.latency_ms_avg,
                down: &b.down,
            };
            let address = escape_html(&b.address);
            let _ = writeln!(
                page,
                "<figure><figcaption><b>{address}</b> {now} req/s in the last second</figcaption>{}</figure>",
                chart::svg(&address, series, scales)
            );
        }
        page.push_str("</div>\n");
    }

    /// The recent events, newest first.
    fn html_events(&self, page: &mut String) {
        page.push_str("<h2>Recent events</h2>\n");
        if self.events.is_empty() {
            page.push_str("<p class=\"links\">None yet.</p>\n");
            return;
        }
        page.push_str("<ol class=\"events\">\n");
        for event in &self.events {
            let time = rfc3339(event.time);
            let _ = writeln!(
                page,
                "<li><time datetime=\"{time}\" title=\"{time}, {:.1} s after start\">{}</time> \
                 <span class=\"kind {kind}\">{kind}</span> {}</li>",
                event.uptime_seconds,
                &time[11..19],
                escape_html(&event.message),
                kind = event.kind,
            );
        }
        page.push_str("</ol>\n");
    }
}

/// For each second of the window ending with `now`, whether the backend was out of rotation
/// at any moment of it. `events` are the backend's own, oldest first; the state before the
/// first of them follows from it (an `up` means it was out before), and with no event at all
/// the backend has been as it is now.
fn down_seconds(events: &[Event], healthy_now: bool, now: u64) -> Vec<bool> {
    let changes: Vec<(i64, bool)> = events
        .iter()
        .filter_map(|e| {
            let out = e.kind.leaves_backend_out()?;
            Some((history::second_of(e.at) as i64, out))
        })
        .collect();
    let mut out = match events
        .iter()
        .find(|e| e.kind.leaves_backend_out().is_some())
    {
        Some(first) => matches!(first.kind, EventKind::Up | EventKind::Trial),
        None => !healthy_now,
    };
    let first_second = now as i64 - (HISTORY_SECONDS as i64 - 1);
    let mut next = changes.iter().peekable();
    while let Some((_, state)) = next.next_if(|(second, _)| *second < first_second) {
        out = *state;
    }
    (first_second..=now as i64)
        .map(|second| {
            let mut any = out;
            while let Some((_, state)) = next.next_if(|(at, _)| *at <= second) {
                out = *state;
                any |= out;
            }
            any
        })
        .collect()
}

/// The newest [`MAX_EVENTS`] of `events` (from every log), newest first, timed from `started`.
fn newest_events(mut events: Vec<Event>, started: Instant) -> Vec<EventSnapshot> {
    events.sort_by_key(|e| std::cmp::Reverse(e.at));
    events.truncate(MAX_EVENTS);
    events
        .into_iter()
        .map(|e| EventSnapshot {
            time: history::wall_time_of(e.at),
            uptime_seconds: e.at.saturating_duration_since(started).as_secs_f64(),
            backend: e.backend,
            kind: e.kind,
            message: e.message,
        })
        .collect()
}

/// A latency for the page: three significant digits, `0.102`, `1.05`, `12.4`, `250`.
fn milliseconds(ms: f64) -> String {
    match ms {
        ms if ms >= 100.0 => format!("{ms:.0}"),
        ms if ms >= 10.0 => format!("{ms:.1}"),
        ms if ms >= 1.0 => format!("{ms:.2}"),
        ms => format!("{ms:.3}"),
    }
}

/// The start of the HTML page, before the refresh line.
const HTML_START: &str = "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n";

/// The rest of the HTML page's head, up to the summary line. Below 1000 px the table becomes
/// one card per backend, each value under its column's name; the health details wrap instead of
/// widening the table; colours follow the reader's light or dark preference.
const HTML_STYLE: &str = concat!(
    "<title>Load balancer statistics</title>\n<style>\n",
    ":root { color-scheme: light dark; --fg: #222; --muted: #555; --line: #ddd; --bg: #fff;\n",
    "  --up: #17803d; --down: #c0262d; --req: #3b7dd8; --lat: #d97706; --track: #eee; }\n",
    "@media (prefers-color-scheme: dark) { :root { --fg: #e4e4e4; --muted: #a8a8a8;\n",
    "  --line: #3a3a3a; --bg: #161616; --up: #4ade80; --down: #f87171; --req: #60a5fa;\n",
    "  --lat: #fbbf24; --track: #333; } }\n",
    "body { font-family: system-ui, sans-serif; margin: 1em 1.5em; color: var(--fg);\n",
    "  background: var(--bg); overflow-wrap: anywhere; }\n",
    "h1 { font-size: 1.6em; margin: 0.3em 0; } h2 { font-size: 1.2em; margin: 1.2em 0 0.3em; }\n",
    "h2 small { font-weight: normal; color: var(--muted); font-size: 0.75em; }\n",
    "table { border-collapse: collapse; width: 100%; }\n",
    "th, td { padding: 0.35em 0.5em; border-bottom: 1px solid var(--line); text-align: right;\n",
    "  vertical-align: top; }\n",
    "th { font-size: 0.85em; color: var(--muted); font-weight: 600; }\n",
    "th:nth-child(-n+3), td:nth-child(-n+3) { text-align: left; }\n",
    "td { white-space: nowrap; } td.name { font-family: monospace; font-size: 1.1em; }\n",
    "td.health { white-space: normal; font-size: 0.85em; color: var(--muted); min-width: 12em;\n",
    "  max-width: 22em; }\n",
    ".up { color: var(--up); font-weight: bold; } .down { color: var(--down); font-weight: bold; }\n",
    ".unchecked { color: var(--muted); }\n",
    ".bar { display: inline-block; width: 6em; height: 0.8em; background: var(--track);\n",
    "  vertical-align: middle; }\n",
    ".bar div { height: 100%; background: var(--req); }\n",
    ".summary, .links, .legend { color: var(--muted); }\n",
    ".charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(100%, 20em), 1fr));\n",
    "  gap: 0.5em 1.5em; }\n",
    "figure { margin: 0; } figcaption { font-size: 0.9em; color: var(--muted); }\n",
    "figcaption b { font-family: monospace; color: var(--fg); font-size: 1.1em; }\n",
    "svg.chart { width: 100%; height: auto; display: block; }\n",
    "svg text { font-size: 9px; fill: var(--muted); }\n",
    ".chart .req { stroke: var(--req); stroke-width: 1; }\n",
    ".chart .err { stroke: var(--down); stroke-width: 1; }\n",
    ".chart .lat { stroke: var(--lat); stroke-width: 1.2; fill: none; }\n",
    ".chart .out { fill: var(--down); opacity: 0.18; }\n",
    ".chart .axis, .chart .tick { stroke: var(--muted); fill: none; stroke-width: 0.6; }\n",
    ".chart .grid { stroke: var(--line); stroke-width: 0.6; }\n",
    ".key { display: inline-block; width: 0.9em; height: 0.9em; margin: 0 0.3em 0 0.8em;\n",
    "  vertical-align: -0.1em; }\n",
    ".key.req { background: var(--req); } .key.err { background: var(--down); }\n",
    ".key.lat { background: var(--lat); height: 0.2em; vertical-align: 0.25em; }\n",
    ".key.out { background: var(--down); opacity: 0.25; }\n",
    ".events { list-style: none; padding: 0; margin: 0; font-size: 0.9em; }\n",
    ".events li { padding: 0.25em 0; border-bottom: 1px solid var(--line); }\n",
    ".events time { font-family: monospace; color: var(--muted); }\n",
    ".kind { display: inline-block; min-width: 4.5em; font-weight: bold; }\n",
    ".kind.down, .kind.ejected, .kind.trial { color: var(--down); } .kind.up { color: var(--up); }\n",
    ".kind.start, .kind.stop { color: var(--muted); }\n",
    "@media (max-width: 1000px) {\n",
    "  body { margin: 0.6em; }\n",
    "  thead { display: none; }\n",
    "  table, tr, td { display: block; width: auto; }\n",
    "  tbody { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(100%, 21em), 1fr));\n",
    "    gap: 0.8em; }\n",
    "  tr { display: grid; grid-template-columns: 1fr 1fr; column-gap: 1em;\n",
    "    border: 1px solid var(--line); border-radius: 6px; padding: 0.4em; }\n",
    "  td { border: none; text-align: left; padding: 0.2em 0.3em; white-space: normal; }\n",
    "  td.health, td.latency, td.share { grid-column: 1 / -1; max-width: none; min-width: 0; }\n",
    "  td[data-label]::before { content: attr(data-label); display: block; font-size: 0.75em;\n",
    "    color: var(--muted); font-family: system-ui, sans-serif; }\n",
    "}\n",
    "</style>\n</head>\n<body>\n<h1>Load balancer statistics</h1>\n",
);

/// How many of a backend's requests in flight are tunnels, when any are.
fn tunnels_note(tunnels: u64) -> String {
    match tunnels {
        0 => String::new(),
        n => format!(" ({})", count(n, "tunnel")),
    }
}

/// `n` and `noun` for the page, plural unless `n` is 1: "1 tunnel", "2 tunnels", "3 retries".
/// A no-break space keeps the number and its noun on one line on a narrow screen.
fn count(n: u64, noun: &str) -> String {
    match (n, noun.strip_suffix('y')) {
        (1, _) => format!("1&nbsp;{noun}"),
        (_, Some(stem)) => format!("{n}&nbsp;{stem}ies"),
        (_, None) => format!("{n}&nbsp;{noun}s"),
    }
}

/// Writes the `# HELP` and `# TYPE` lines that precede a metric's samples.
fn metric_header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value with `\`, `"` and line feeds escaped, as the text format requires.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Text made safe to place inside HTML elements and attribute values.
fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `part` as a fraction of `whole` (0 when `whole` is 0).
fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Rounds to three decimals, so the JSON shows 0.412 rather than 0.41234999999.
fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// An uptime such as `3h 04m 05s`.
fn human_duration(seconds: f64) -> String {
    let total = seconds as u64;
    let (h, m, s) = (total / 3600, total / 60 % 60, total % 60);
    if h > 0 {
        format!("{h}h {m:02}m {s:02}s")
    } else if m > 0 {
        format!("{m}m {s:02}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        let backend = |address: &str, requests: u64, healthy: bool| BackendSnapshot {
            address: address.into(),
            weight: 1,
            healthy,
            health_checks: HealthMode::Active,
            health: if healthy { "up".into() } else { "DOWN".into() },
            checks_passed: 0,
            checks_failed: 3,
            failed_requests: 0,
            last_check: Some(("refused".into(), 1.5)),
            requests,
            errors: 1,
            error_rate: 1.0 / requests as f64,
            active_connections: 0,
            tunnels: 1,
            tunnels_total: 4,
            latency_ms_avg: 0.4,
            latency_ms_p50: 0.3,
            latency_ms_p90: 0.5,
            latency_ms_p99: 1.0,
            latency_seconds_sum: 0.004,
            latency_buckets: {
                let mut buckets = vec![0; LATENCY_BUCKETS.len() + 1];
                buckets[0] = requests - 1;
                buckets[LATENCY_BUCKETS.len()] = 1;
                buckets
            },
            history: Series {
                last: 1000,
                requests: (0..HISTORY_SECONDS as u64).map(|i| i % 7).collect(),
                errors: vec![0; HISTORY_SECONDS],
                latency_ms_avg: vec![Some(0.4); HISTORY_SECONDS],
            },
            down: (0..HISTORY_SECONDS).map(|i| !healthy && i > 250).collect(),
        };
        Snapshot {
            algorithm: "round-robin",
            uptime_seconds: 12.3,
            total_requests: 10,
            requests_per_second: 0.8,
            active_connections: 1,
            retries: 2,
            tunnels: 2,
            tunnels_total: 8,
            tls_handshakes: [("1.2", 1), ("1.3", 5)],
            tls_handshake_failures: 2,
            sessions: Some((3, 100)),
            sticky: Some("table"),
            backends: vec![backend("a:1", 6, true), backend("<b\"\\>:2", 4, false)],
            history_last: std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_080_000),
            events: vec![EventSnapshot {
                time: std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_079_990),
                uptime_seconds: 2.5,
                backend: Some("<b\"\\>:2".into()),
                kind: EventKind::Down,
                message: "backend <b\"\\>:2 is down: 3 checks failed".into(),
            }],
        }
    }

    #[test]
    fn json_has_the_contract_fields() {
        let value: serde_json::Value = serde_json::from_str(&snapshot().to_json()).unwrap();
        assert_eq!(value["total_requests"], 10);
        assert_eq!(value["uptime_seconds"], 12.3);
        assert_eq!(value["sessions"], 3);
        assert_eq!(value["sticky"], "table");
        assert_eq!(value["retries"], 2);
        assert_eq!(value["tunnels"], 2);
        assert_eq!(value["backends"][0]["tunnels_total"], 4);
        let first = &value["backends"][0];
        for field in ["address", "weight", "healthy", "requests", "errors"] {
            assert!(!first[field].is_null(), "{field}");
        }
        assert_eq!(first["share"], 0.6);
        assert_eq!(value["backends"][1]["healthy"], false);
        assert_eq!(value["backends"][1]["health"], "DOWN");
        assert_eq!(value["backends"][1]["last_check"]["result"], "refused");
        assert_eq!(value["backends"][1]["checks_failed_in_a_row"], 3);
        assert_eq!(value["backends"][1]["health_checks"], "active");
    }

    #[test]
    fn without_health_checks_the_state_is_not_checked() {
        let mut unchecked = snapshot();
        for backend in &mut unchecked.backends {
            backend.health_checks = HealthMode::None;
            backend.healthy = true;
            backend.health = "not checked".into();
        }
        let value: serde_json::Value = serde_json::from_str(&unchecked.to_json()).unwrap();
        let first = &value["backends"][0];
        assert_eq!(first["healthy"], true, "still chosen");
        assert_eq!(first["health_checks"], "none");
        assert_eq!(first["health"], "not checked");
        let page = unchecked.to_html();
        assert!(
            page.contains("<td class=\"unchecked\">not checked</td>"),
            "{page}"
        );
        assert!(!page.contains("class=\"up\""), "{page}");
        // In rotation, so 1 for Prometheus; see `to_prometheus`.
        assert!(unchecked
            .to_prometheus()
            .contains("lb_backend_up{backend=\"a:1\"} 1\n"));
        let checked = snapshot().to_html();
        assert!(checked.contains("<td class=\"up\">up</td>"), "{checked}");
        assert!(
            checked.contains("<td class=\"down\">down</td>"),
            "{checked}"
        );
    }

    #[test]
    fn prometheus_labels_are_escaped_and_buckets_cumulative() {
        let text = snapshot().to_prometheus();
        assert!(text.contains("lb_backend_up{backend=\"<b\\\"\\\\>:2\"} 0\n"));
        assert!(
            text.contains("lb_request_duration_seconds_bucket{backend=\"a:1\",le=\"0.0005\"} 5\n")
        );
        assert!(
            text.contains("lb_request_duration_seconds_bucket{backend=\"a:1\",le=\"+Inf\"} 6\n")
        );
        assert!(text.contains("lb_request_duration_seconds_count{backend=\"a:1\"} 6\n"));
        assert!(text.contains("# TYPE lb_retries_total counter\nlb_retries_total 2\n"));
        assert!(text.contains("# TYPE lb_tunnels_active gauge\nlb_tunnels_active 2\n"));
        assert!(text.contains("lb_tunnels_total{backend=\"a:1\"} 4\n"));
    }

    #[test]
    fn html_escapes_backend_names() {
        let page = snapshot().to_html();
        assert!(page.contains("&lt;b&quot;\\&gt;:2"));
        assert!(!page.contains("<b\""));
        assert!(page.contains("width:60.0%"));
    }

    #[test]
    fn html_summary_counts_in_plural_only_when_not_one() {
        let page = snapshot().to_html();
        assert!(page.contains(" &middot; 2&nbsp;retries"), "{page}");
        assert_eq!(count(1, "tunnel"), "1&nbsp;tunnel");
        assert_eq!(count(0, "open connection"), "0&nbsp;open connections");
        assert_eq!(count(1, "retry"), "1&nbsp;retry");
        assert_eq!(count(3, "retry"), "3&nbsp;retries");
    }

    #[test]
    fn json_has_history_and_events() {
        let value: serde_json::Value = serde_json::from_str(&snapshot().to_json()).unwrap();
        let history = &value["history"];
        assert_eq!(history["interval_seconds"], 1);
        assert_eq!(history["length"], 300);
        assert_eq!(history["last"], "2026-11-30T23:06:40.000Z");
        assert_eq!(history["first"], "2026-11-30T23:01:41.000Z");
        let first = &history["backends"][0];
        assert_eq!(first["address"], "a:1");
        for series in ["requests", "errors", "latency_ms_avg", "down"] {
            assert_eq!(first[series].as_array().unwrap().len(), 300, "{series}");
        }
        assert_eq!(first["requests"][8], 1);
        assert_eq!(history["backends"][1]["down"][299], true);
        let event = &value["events"][0];
        assert_eq!(event["time"], "2026-11-30T23:06:30.000Z");
        assert_eq!(event["kind"], "down");
        assert_eq!(event["backend"], "<b\"\\>:2");
        assert_eq!(event["uptime_seconds"], 2.5);
        assert!(event["message"].as_str().unwrap().contains("is down"));
        assert_eq!(value["backends"][0]["latency_ms_p50"], 0.3);
    }

    #[test]
    fn html_draws_a_chart_per_backend_and_lists_events() {
        let page = snapshot().to_html();
        assert_eq!(page.matches("<svg").count(), 2, "{page}");
        assert_eq!(page.matches("</svg>").count(), 2);
        assert!(page.contains("<rect class=\"out\""), "the outage is shaded");
        // The newest second (299 % 7 = 5) is still running: the caption gives the one before.
        assert!(page.contains("</b> 4 req/s in the last second"), "{page}");
        assert!(page.contains("<span class=\"kind down\">down</span>"));
        assert!(page.contains(">23:06:30</time>"));
        assert!(page.contains("is down: 3 checks failed"));
        assert!(page.contains("0.300 / 0.500 / 1.00 ms"), "{page}");
        assert!(page.contains("prefers-color-scheme: dark"));
        assert!(page.contains("max-width: 1000px"));
        for external in ["<script", "<link", "src=", "url("] {
            assert!(!page.contains(external), "{external}");
        }
    }

    fn event(second: u64, kind: EventKind) -> Event {
        let now = Instant::now();
        let at = now - std::time::Duration::from_secs(history::second_of(now))
            + std::time::Duration::from_secs(second);
        Event {
            at,
            backend: Some("a:1".into()),
            kind,
            message: String::new(),
        }
    }

    #[test]
    fn down_seconds_follow_the_events() {
        let now = history::current_second().max(1000);
        let first = now - 299;
        // Nothing happened: as the backend is now.
        assert!(down_seconds(&[], true, now).iter().all(|d| !d));
        assert!(down_seconds(&[], false, now).iter().all(|&d| d));
        // Down for seconds 10..=20 of the window, back during second 20.
        let events = [
            event(first + 10, EventKind::Down),
            event(first + 20, EventKind::Up),
        ];
        let down = down_seconds(&events, true, now);
        assert_eq!(down.len(), 300);
        let out: Vec<usize> = (0..300).filter(|&i| down[i]).collect();
        assert_eq!(out, (10..=20).collect::<Vec<_>>());
        // Came back before the window began: up all along. Went out before it: out until the
        // `up`; a failed trial keeps it out.
        let early = [
            event(first - 50, EventKind::Down),
            event(first - 5, EventKind::Up),
        ];
        assert!(down_seconds(&early, true, now).iter().all(|d| !d));
        let late_up = [
            event(first + 3, EventKind::Trial),
            event(first + 30, EventKind::Up),
        ];
        let down = down_seconds(&late_up, true, now);
        assert!(down[..=30].iter().all(|&d| d) && down[31..].iter().all(|d| !d));
        let ejected = [event(first + 290, EventKind::Ejected)];
        let down = down_seconds(&ejected, false, now);
        assert!(down[..290].iter().all(|d| !d) && down[290..].iter().all(|&d| d));
    }

    #[test]
    fn durations_read_as_hours_minutes_seconds() {
        assert_eq!(human_duration(5.2), "5s");
        assert_eq!(human_duration(65.0), "1m 05s");
        assert_eq!(human_duration(3725.0), "1h 02m 05s");
    }
}
