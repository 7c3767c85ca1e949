//! `/metrics`: the snapshot in the Prometheus text exposition format (version 0.0.4).

use std::fmt::Write as _;

use crate::admin_state::AdminState;
use crate::stats::LATENCY_BUCKETS;

use super::{BackendSnapshot, Snapshot};

impl Snapshot {
    /// The Prometheus text exposition format (version 0.0.4) of `/metrics`: per-backend series
    /// labelled `backend`, and a few balancer-wide gauges.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::with_capacity(4096);
        self.balancer_metrics(&mut out);
        self.backend_metrics(&mut out);
        self.queue_metrics(&mut out);
        self.tunnel_metrics(&mut out);
        self.tls_metrics(&mut out);
        self.reload_metrics(&mut out);
        self.latency_histogram(&mut out);
        out
    }

    /// `lb_config_reloads_total` by result, and when the last one was and whether it applied.
    fn reload_metrics(&self, out: &mut String) {
        let name = "lb_config_reloads_total";
        metric_header(
            out,
            name,
            "counter",
            "Reloads of the configuration (SIGHUP, POST /reload, names resolving anew), by result.",
        );
        let _ = writeln!(out, "{name}{{result=\"ok\"}} {}", self.reloads.0);
        let _ = writeln!(out, "{name}{{result=\"error\"}} {}", self.reloads.1);
        if let Some(last) = &self.last_reload {
            let name = "lb_config_last_reload_timestamp_seconds";
            metric_header(
                out,
                name,
                "gauge",
                "When the last reload was, in Unix seconds.",
            );
            let _ = writeln!(out, "{name} {:.3}", last.unix_time);
            let name = "lb_config_last_reload_successful";
            metric_header(
                out,
                name,
                "gauge",
                "1 when the last reload applied, 0 when refused.",
            );
            let _ = writeln!(out, "{name} {}", u8::from(last.ok));
        }
    }

    /// The balancer-wide series, without labels.
    fn balancer_metrics(&self, out: &mut String) {
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
            (
                "lb_access_log_dropped_total",
                "counter",
                "Access-log lines dropped because the log's writer could not keep up.",
                self.access_log_dropped as f64,
            ),
            (
                "lb_panic",
                "gauge",
                "1 while requests go to every primary backend below --panic-threshold, else 0.",
                f64::from(u8::from(self.in_panic)),
            ),
            (
                "lb_panic_seconds_total",
                "counter",
                "Seconds spent in panic (--panic-threshold) since start.",
                self.panic_seconds,
            ),
            (
                "lb_proxy_headers_rejected_total",
                "counter",
                "Client connections closed without a valid PROXY protocol header.",
                self.proxy_headers_rejected as f64,
            ),
        ];
        for (name, kind, help, value) in whole {
            metric_header(out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
        if let Some(heap) = self.heap {
            let figures = [
                (
                    "lb_heap_in_use_bytes",
                    "Heap bytes in use by the balancer's data.",
                    heap.in_use,
                ),
                (
                    "lb_heap_free_bytes",
                    "Heap bytes freed but held by the allocator.",
                    heap.free,
                ),
                (
                    "lb_spare_buffer_bytes",
                    "Heap bytes in use by spare read buffers kept for reuse.",
                    heap.spare_buffers,
                ),
            ];
            for (name, help, value) in figures {
                metric_header(out, name, "gauge", help);
                let _ = writeln!(out, "{name} {value}");
            }
        }
        if let Some((held, _)) = self.sessions {
            metric_header(out, "lb_sessions", "gauge", "Sticky sessions held.");
            let _ = writeln!(out, "lb_sessions {held}");
        }
    }

    /// One series per backend for each of its counters and gauges.
    fn backend_metrics(&self, out: &mut String) {
        self.per_backend(
            out,
            "lb_requests_total",
            "counter",
            "Requests that reached the backend.",
            |b| b.requests as f64,
        );
        self.per_backend(
            out,
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
            out,
            "lb_backend_up",
            "gauge",
            "1 when the backend is in rotation (healthy, or not health-checked), else 0.",
            |b| f64::from(u8::from(b.healthy)),
        );
        self.per_backend(
            out,
            "lb_backend_active_connections",
            "gauge",
            "Requests in flight to the backend (the same as lb_backend_in_flight).",
            |b| b.active_connections as f64,
        );
        self.per_backend(
            out,
            "lb_backend_in_flight",
            "gauge",
            "Requests in flight to the backend, open tunnels included.",
            |b| b.active_connections as f64,
        );
        self.admin_states(out);
        self.per_backend(
            out,
            "lb_backend_weight",
            "gauge",
            "The backend's weight.",
            |b| f64::from(b.weight),
        );
    }

    /// The connection limits and their queues: `lb_queue_length`, `lb_queued_requests_total`
    /// and `lb_queue_timeouts_total` per backend, and `lb_backend_max_conns` for the backends
    /// that have a limit.
    fn queue_metrics(&self, out: &mut String) {
        self.per_backend(
            out,
            "lb_queue_length",
            "gauge",
            "Requests waiting in the backend's queue for room under its connection limit.",
            |b| b.queue.length as f64,
        );
        self.per_backend(
            out,
            "lb_queued_requests_total",
            "counter",
            "Requests that had to wait in the backend's queue.",
            |b| b.queue.queued as f64,
        );
        self.per_backend(
            out,
            "lb_queue_timeouts_total",
            "counter",
            "Requests whose wait in the backend's queue ran out (answered 503).",
            |b| b.queue.timeouts as f64,
        );
        if !self.any_limited() {
            return;
        }
        let name = "lb_backend_max_conns";
        metric_header(out, name, "gauge", "The backend's connection limit.");
        for backend in &self.backends {
            if let Some(max) = backend.queue.max_conns {
                let label = escape_label(&backend.address);
                let _ = writeln!(out, "{name}{{backend=\"{label}\"}} {max}");
            }
        }
    }

    /// `lb_backend_admin_state`: per backend, one series per state, 1 for the state it is in.
    fn admin_states(&self, out: &mut String) {
        let name = "lb_backend_admin_state";
        metric_header(
            out,
            name,
            "gauge",
            "1 for the administrative state the operator set (ready, drain, maint), else 0.",
        );
        for backend in &self.backends {
            let label = escape_label(&backend.address);
            for state in AdminState::ALL {
                let value = u8::from(backend.admin_state == state);
                let _ = writeln!(
                    out,
                    "{name}{{backend=\"{label}\",state=\"{state}\"}} {value}"
                );
            }
        }
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

#[cfg(test)]
mod tests {
    use crate::admin_state::AdminState;
    use crate::report::tests::snapshot;

    #[test]
    fn prometheus_labels_are_escaped_and_buckets_cumulative() {
        let mut snapshot = snapshot();
        snapshot.backends[1].admin_state = AdminState::Drain;
        let text = snapshot.to_prometheus();
        assert!(text.contains("lb_backend_up{backend=\"<b\\\"\\\\>:2\"} 0\n"));
        assert!(
            text.contains("lb_request_duration_seconds_bucket{backend=\"a:1\",le=\"0.0005\"} 5\n")
        );
        assert!(
            text.contains("lb_request_duration_seconds_bucket{backend=\"a:1\",le=\"+Inf\"} 6\n")
        );
        assert!(text.contains("lb_request_duration_seconds_count{backend=\"a:1\"} 6\n"));
        assert!(text.contains("# TYPE lb_retries_total counter\nlb_retries_total 2\n"));
        assert!(text.contains("\nlb_access_log_dropped_total 4\n"));
        assert!(text.contains("\nlb_proxy_headers_rejected_total 1\n"));
        assert!(text.contains("\nlb_heap_in_use_bytes 1500000\n"));
        assert!(text.contains("lb_backend_admin_state{backend=\"a:1\",state=\"ready\"} 1\n"));
        assert!(text.contains("lb_backend_admin_state{backend=\"a:1\",state=\"drain\"} 0\n"));
        assert!(
            text.contains("lb_backend_admin_state{backend=\"<b\\\"\\\\>:2\",state=\"drain\"} 1\n")
        );
        assert!(text.contains("# TYPE lb_tunnels_active gauge\nlb_tunnels_active 2\n"));
        assert!(text.contains("lb_tunnels_total{backend=\"a:1\"} 4\n"));
    }

    #[test]
    fn prometheus_has_each_queue_and_the_limits_set() {
        let text = snapshot().to_prometheus();
        assert!(
            text.contains("# TYPE lb_queue_length gauge\nlb_queue_length{backend=\"a:1\"} 18\n")
        );
        assert!(text.contains("lb_queue_length{backend=\"<b\\\"\\\\>:2\"} 0\n"));
        assert!(text.contains("# TYPE lb_queue_timeouts_total counter\n"));
        assert!(text.contains("lb_queue_timeouts_total{backend=\"a:1\"} 3\n"));
        assert!(text.contains("lb_queued_requests_total{backend=\"a:1\"} 40\n"));
        assert!(text.contains("lb_backend_max_conns{backend=\"a:1\"} 2\n"));
        assert!(
            !text.contains("lb_backend_max_conns{backend=\"<b"),
            "no limit, no series"
        );
    }
}
