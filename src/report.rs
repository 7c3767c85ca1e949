//! Statistics reports: one snapshot of the counters, rendered as JSON, Prometheus text and HTML.
//!
//! The admin listener serves these three views. Each request takes a [`Snapshot`] first and renders
//! from it, so every number on one page comes from the same moment and a backend's shares add up.
//! The chapter only printed its statistics every 30 seconds; these views can be scraped by a
//! monitoring system or watched in a browser.

use std::fmt::Write as _;

use serde_json::json;

use crate::health::HealthMode;
use crate::proxy::LoadBalancer;
use crate::stats::LATENCY_BUCKETS;

/// How often the HTML page reloads itself, in seconds.
const REFRESH_SECONDS: u32 = 2;

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
    /// Sticky sessions held and the table's bound, when sessions are on.
    pub sessions: Option<(usize, usize)>,
    /// One entry per backend, in the order they were given.
    pub backends: Vec<BackendSnapshot>,
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
    /// 99th percentile latency in milliseconds, estimated from the histogram.
    pub latency_ms_p99: f64,
    /// Total latency in seconds.
    pub latency_seconds_sum: f64,
    /// Requests per latency bucket (not cumulative); the last is above every bound.
    pub latency_buckets: Vec<u64>,
}

impl Snapshot {
    /// Reads every counter of `lb` now.
    pub fn of(lb: &LoadBalancer) -> Snapshot {
        let stats = lb.stats();
        let backends = lb
            .backends()
            .iter()
            .map(|backend| {
                let counters = backend.stats();
                let health = backend.health();
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
                    latency_ms_p99: counters.latency_ms_percentile(99.0),
                    latency_seconds_sum: counters.latency_seconds_sum(),
                    latency_buckets: counters.latency_buckets(),
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
            sessions: lb.sessions().map(|s| (s.len(), s.max_sessions())),
            backends,
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
            "algorithm": self.algorithm,
            "backends": backends,
        });
        if let (Some((held, max)), Some(fields)) = (self.sessions, document.as_object_mut()) {
            fields.insert("sessions".into(), json!(held));
            fields.insert("max_sessions".into(), json!(max));
        }
        document.to_string()
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

    /// The HTML page of `/stats`: self-contained (inline style, no scripts or external assets)
    /// and reloading itself every few seconds.
    pub fn to_html(&self) -> String {
        let mut page = String::with_capacity(8192);
        page.push_str(HTML_START);
        let _ = writeln!(
            page,
            "<meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">"
        );
        page.push_str(HTML_STYLE);
        let _ = writeln!(
            page,
            "<p class=\"summary\">{} &middot; up {} &middot; {} requests &middot; {:.1} req/s \
             &middot; {} open connections &middot; {} tunnels &middot; {} retries{}</p>",
            escape_html(self.algorithm),
            human_duration(self.uptime_seconds),
            self.total_requests,
            self.requests_per_second,
            self.active_connections,
            self.tunnels,
            self.retries,
            self.sessions
                .map(|(held, max)| format!(" &middot; {held} of {max} sticky sessions"))
                .unwrap_or_default()
        );
        page.push_str(
            "<table>\n<thead><tr><th>backend</th><th>state</th><th>health checks</th><th>weight</th><th>requests</th>\
             <th>errors</th><th>error rate</th><th>active</th><th>avg latency</th>\
             <th>p99 latency</th><th>share of traffic</th></tr></thead>\n<tbody>\n",
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
                "<tr><td>{}</td><td class=\"{class}\">{state}</td><td class=\"health\">{health}</td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{:.1}%</td><td>{}</td><td>{:.2} ms</td><td>{:.1} ms</td>\
                 <td><div class=\"bar\"><div style=\"width:{share:.1}%\"></div></div> {share:.1}%</td></tr>",
                escape_html(&b.address),
                b.weight,
                b.requests,
                b.errors,
                b.error_rate * 100.0,
                b.active_connections,
                b.latency_ms_avg,
                b.latency_ms_p99,
            );
        }
        page.push_str(
            "</tbody>\n</table>\n<p class=\"links\">Also as <a href=\"/stats.json\">JSON</a> \
             and <a href=\"/metrics\">Prometheus metrics</a>.</p>\n</body>\n</html>\n",
        );
        page
    }
}

/// The start of the HTML page, before the refresh line.
const HTML_START: &str = "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n";

/// The rest of the HTML page's head, up to the summary line.
const HTML_STYLE: &str = concat!(
    "<title>Load balancer statistics</title>\n<style>\n",
    "body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }\n",
    "table { border-collapse: collapse; }\n",
    "th, td { padding: 0.35em 0.6em; border-bottom: 1px solid #ddd; text-align: right; }\n",
    "th:first-child, td:first-child { text-align: left; }\n",
    "td { white-space: nowrap; } td:first-child { font-family: monospace; font-size: 1.1em; }\n",
    ".up { color: #17803d; font-weight: bold; } .down { color: #c0262d; font-weight: bold; }\n",
    ".unchecked { color: #555; }\n",
    ".bar { display: inline-block; width: 8em; height: 0.8em; background: #eee; vertical-align: middle; }\n",
    ".bar div { height: 100%; background: #3b7dd8; }\n",
    ".summary, .links { color: #555; } td.health { text-align: left; font-size: 0.85em; color: #555; }\n",
    "</style>\n</head>\n<body>\n<h1>Load balancer statistics</h1>\n",
);

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
            latency_ms_p99: 1.0,
            latency_seconds_sum: 0.004,
            latency_buckets: {
                let mut buckets = vec![0; LATENCY_BUCKETS.len() + 1];
                buckets[0] = requests - 1;
                buckets[LATENCY_BUCKETS.len()] = 1;
                buckets
            },
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
            sessions: Some((3, 100)),
            backends: vec![backend("a:1", 6, true), backend("<b\"\\>:2", 4, false)],
        }
    }

    #[test]
    fn json_has_the_contract_fields() {
        let value: serde_json::Value = serde_json::from_str(&snapshot().to_json()).unwrap();
        assert_eq!(value["total_requests"], 10);
        assert_eq!(value["uptime_seconds"], 12.3);
        assert_eq!(value["sessions"], 3);
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
    fn durations_read_as_hours_minutes_seconds() {
        assert_eq!(human_duration(5.2), "5s");
        assert_eq!(human_duration(65.0), "1m 05s");
        assert_eq!(human_duration(3725.0), "1h 02m 05s");
    }
}
