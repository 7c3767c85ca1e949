//! `/stats.json`: the snapshot as one JSON document.

use serde_json::json;

use crate::stats::events::rfc3339;
use crate::stats::history::HISTORY_SECONDS;

use super::{share, BackendSnapshot, QueueSnapshot, Snapshot};

impl Snapshot {
    /// The JSON document of `/stats.json`: the contract's fields, then extras (`algorithm`,
    /// `sessions`, the queues' totals, and per backend `error_rate`, `latency_ms_p99`, `share`,
    /// its `queue`, and the health fields, `health_checks` first: what `healthy` rests on,
    /// `"none"` when nothing checks).
    pub fn to_json(&self) -> String {
        let reached = self.backend_requests();
        let backends: Vec<_> = self
            .backends
            .iter()
            .map(|b| backend_json(b, reached))
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
            "access_log_dropped": self.access_log_dropped,
            "proxy_headers_rejected": self.proxy_headers_rejected,
            "algorithm": self.algorithm,
            "panic": { "active": self.in_panic, "seconds_total": round3(self.panic_seconds) },
            "heap": self.heap.map(|heap| json!({
                "in_use_bytes": heap.in_use,
                "free_bytes": heap.free,
                "spare_buffer_bytes": heap.spare_buffers,
            })),
            "unresolved": self.unresolved,
            "config_reloads": { "ok": self.reloads.0, "error": self.reloads.1 },
            "last_reload": self.last_reload.as_ref().map(|last| json!({
                "time": round3(last.unix_time),
                "result": if last.ok { "ok" } else { "error" },
                "message": last.message,
            })),
            "queue": self.queue_json(),
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

    /// `"queue"`: every backend's queue added up (`length`, `queued`, `timeouts`).
    fn queue_json(&self) -> serde_json::Value {
        let (length, queued, timeouts) = self.queue_totals();
        json!({ "length": length, "queued": queued, "timeouts": timeouts })
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
}

/// The weight balancing gives the backend now: its weight, times its slow-start ramp while it
/// ramps.
fn effective_weight(b: &BackendSnapshot) -> f64 {
    let ramp = b.slow_start_percent.map_or(1.0, |percent| percent / 100.0);
    f64::from(b.weight) * ramp
}

/// One backend's entry in `"backends"`; `reached` is every backend's requests, for its share.
fn backend_json(b: &BackendSnapshot, reached: u64) -> serde_json::Value {
    json!({
        "address": b.address,
        "weight": b.weight,
        "configured_weight": b.configured_weight,
        "admin_state": b.admin_state.name(),
        "backup": b.backup,
        "slow_start_percent": b.slow_start_percent.map(round3),
        "effective_weight": round3(effective_weight(b)),
        "healthy": b.healthy,
        "in_flight": b.active_connections,
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
        "queue": queue_json(&b.queue),
    })
}

/// A backend's `"queue"`: its connection limit (`max_conns`, null without one), the requests
/// waiting now (`length`), those that had to wait and those whose wait ran out, and how long
/// they waited.
fn queue_json(q: &QueueSnapshot) -> serde_json::Value {
    json!({
        "max_conns": q.max_conns,
        "length": q.length,
        "queued": q.queued,
        "timeouts": q.timeouts,
        "wait_ms_p50": round3(q.wait_ms[0]),
        "wait_ms_p90": round3(q.wait_ms[1]),
        "wait_ms_p99": round3(q.wait_ms[2]),
    })
}

/// Rounds to three decimals, so the JSON shows 0.412 rather than 0.41234999999.
fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use crate::report::tests::snapshot;

    #[test]
    fn json_has_the_contract_fields() {
        let value: serde_json::Value = serde_json::from_str(&snapshot().to_json()).unwrap();
        assert_eq!(value["total_requests"], 10);
        assert_eq!(value["uptime_seconds"], 12.3);
        assert_eq!(value["sessions"], 3);
        assert_eq!(value["sticky"], "table");
        assert_eq!(value["retries"], 2);
        assert_eq!(value["access_log_dropped"], 4);
        assert_eq!(value["proxy_headers_rejected"], 1);
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
    fn json_has_each_queue_and_their_total() {
        let value: serde_json::Value = serde_json::from_str(&snapshot().to_json()).unwrap();
        let queue = &value["backends"][0]["queue"];
        assert_eq!(queue["max_conns"], 2);
        assert_eq!(queue["length"], 18);
        assert_eq!(queue["queued"], 40);
        assert_eq!(queue["timeouts"], 3);
        assert_eq!(queue["wait_ms_p99"], 4900.0);
        assert!(value["backends"][1]["queue"]["max_conns"].is_null());
        assert_eq!(value["backends"][1]["queue"]["length"], 0);
        assert_eq!(value["queue"]["length"], 18);
        assert_eq!(value["queue"]["timeouts"], 3);
    }
}
