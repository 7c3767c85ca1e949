//! Statistics reports: one snapshot of the counters, rendered as JSON, Prometheus text and HTML.
//!
//! The admin listener serves these three views. Each request takes a [`Snapshot`] first and renders
//! from it, so every number on one page comes from the same moment and a backend's shares add up.
//! The chapter only printed its statistics every 30 seconds ([`summary`] still writes that line
//! to the log); these views can be scraped by a monitoring system or watched in a browser: the
//! page draws the last five minutes of traffic per backend ([`chart`]) and lists the recent
//! events, newest first.
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | [`Snapshot`]: every counter read at one moment |
//! | `json.rs` | `/stats.json` ([`Snapshot::to_json`]) |
//! | `prometheus.rs` | `/metrics` ([`Snapshot::to_prometheus`]) |
//! | `html.rs` | `/stats` ([`Snapshot::to_html`]) |
//! | `chart.rs` | the page's SVG chart of one backend |
//! | `summary.rs` | the chapter's periodic summary line in the log ([`summary()`]) |

use std::time::{Duration, Instant, SystemTime};

use crate::admin_state::AdminState;
use crate::backend::Backend;
use crate::health::HealthMode;
use crate::limit::ConnectionLimit;
use crate::memory::{self, Heap};
use crate::proxy::LoadBalancer;
use crate::stats::events::{Event, EventKind, MAX_EVENTS};
use crate::stats::history::{self, Series, HISTORY_SECONDS};
use crate::sticky::Sticky;

pub mod chart;
mod html;
mod json;
mod prometheus;
mod summary;

pub use summary::summary;

/// The balancer's statistics at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The balancing algorithm's name.
    pub algorithm: &'static str,
    /// Whether admin writes need the admin token (the page's forms then ask for it).
    pub admin_token_required: bool,
    /// Whether requests go to every primary backend now (`--panic-threshold`).
    pub in_panic: bool,
    /// The allocator's bytes in use and held free, where it can say.
    pub heap: Option<Heap>,
    /// Seconds spent in panic since start.
    pub panic_seconds: f64,
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
    /// Access-log lines dropped because the log's writer could not keep up.
    pub access_log_dropped: u64,
    /// Connections closed for want of a valid PROXY protocol header (`--accept-proxy`).
    pub proxy_headers_rejected: u64,
    /// Sticky sessions held and the table's bound, when sessions are kept in a table.
    pub sessions: Option<(usize, usize)>,
    /// How sticky sessions are kept: `"table"`, `"signed"` (cookies, no table), or none.
    pub sticky: Option<&'static str>,
    /// Backend names that resolve to nothing now (their backends are missing).
    pub unresolved: Vec<String>,
    /// Reloads of the configuration applied and refused so far.
    pub reloads: (u64, u64),
    /// The last reload, if any: when, whether applied, what changed or why not.
    pub last_reload: Option<crate::stats::LastReload>,
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
    /// Relative share of traffic for weighted algorithms, as set at run time (0 takes no new
    /// request).
    pub weight: u32,
    /// The weight the configuration gave.
    pub configured_weight: u32,
    /// What the operator set: ready, drain or maint.
    pub admin_state: AdminState,
    /// Whether it is a backup (`--backup`).
    pub backup: bool,
    /// How far up its slow-start ramp it is, in percent, while it ramps.
    pub slow_start_percent: Option<f64>,
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
    /// The connection limit and its queue.
    pub queue: QueueSnapshot,
}

/// A backend's connection limit and queue at one moment ([`crate::limit`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueSnapshot {
    /// The most requests in flight at once; `None` without a limit.
    pub max_conns: Option<u32>,
    /// Requests waiting now.
    pub length: u64,
    /// Requests that had to wait, since start.
    pub queued: u64,
    /// Requests whose wait ran out (answered 503).
    pub timeouts: u64,
    /// How long queued requests waited, however their wait ended: p50, p90 and p99 in
    /// milliseconds, within 5 %.
    pub wait_ms: [f64; 3],
}

impl QueueSnapshot {
    fn of(limit: &ConnectionLimit) -> QueueSnapshot {
        QueueSnapshot {
            max_conns: limit.max(),
            length: limit.queue_length(),
            queued: limit.queued(),
            timeouts: limit.timeouts(),
            wait_ms: [50.0, 90.0, 99.0].map(|p| limit.wait_ms_percentile(p)),
        }
    }
}

impl Snapshot {
    /// Reads every counter of `lb` now.
    pub fn of(lb: &LoadBalancer) -> Snapshot {
        let stats = lb.stats();
        let now = history::current_second();
        let mut events = stats.events();
        let set = lb.snapshot();
        let slow_start = set.settings().slow_start;
        let backends = set
            .backends()
            .iter()
            .map(|backend| {
                let own_events = backend.stats().events();
                let snapshot = BackendSnapshot::of(backend, &own_events, now, slow_start);
                events.extend(own_events);
                snapshot
            })
            .collect();
        Snapshot {
            algorithm: set.balancer().name(),
            admin_token_required: set.settings().admin_token.is_some(),
            in_panic: stats.in_panic(),
            heap: memory::heap(lb.spare_buffer_bytes()),
            panic_seconds: stats.panic_seconds(),
            uptime_seconds: stats.uptime().as_secs_f64(),
            total_requests: stats.total_requests(),
            requests_per_second: stats.requests_per_second(),
            active_connections: stats.active_connections(),
            retries: stats.retries(),
            tunnels: stats.tunnels().active(),
            tunnels_total: stats.tunnels().total(),
            tls_handshakes: stats.tls().by_version(),
            tls_handshake_failures: stats.tls().failures(),
            access_log_dropped: lb.access_log().map_or(0, |log| log.dropped()),
            proxy_headers_rejected: lb.client_addresses().rejected(),
            sessions: set.sessions().map(|s| (s.len(), s.max_sessions())),
            sticky: set.sticky().map(|sticky| match sticky {
                Sticky::Table(_) => "table",
                Sticky::Signed(_) => "signed",
            }),
            unresolved: stats.unresolved(),
            reloads: stats.reloads().counts(),
            last_reload: stats.reloads().last(),
            backends,
            history_last: history::wall_time(now as i64),
            events: newest_events(events, stats.started()),
        }
    }

    /// Requests that reached any backend: the sum of the per-backend counts.
    fn backend_requests(&self) -> u64 {
        self.backends.iter().map(|b| b.requests).sum()
    }

    /// Every backend's queue added up: requests waiting now, those that had to wait, and
    /// those whose wait ran out.
    fn queue_totals(&self) -> (u64, u64, u64) {
        self.backends
            .iter()
            .map(|b| &b.queue)
            .fold((0, 0, 0), |sum, q| {
                (sum.0 + q.length, sum.1 + q.queued, sum.2 + q.timeouts)
            })
    }

    /// Whether any backend has a connection limit.
    fn any_limited(&self) -> bool {
        self.backends.iter().any(|b| b.queue.max_conns.is_some())
    }
}

impl BackendSnapshot {
    /// Reads the counters of `backend` now; `events` are its own, which say when it was out of
    /// rotation during the last five minutes.
    fn of(backend: &Backend, events: &[Event], now: u64, slow_start: Duration) -> BackendSnapshot {
        let counters = backend.stats();
        let health = backend.health();
        BackendSnapshot {
            address: backend.name().to_string(),
            weight: backend.weight(),
            configured_weight: backend.configured_weight(),
            admin_state: backend.admin_state(),
            backup: backend.is_backup(),
            slow_start_percent: backend
                .ramp()
                .progress(slow_start)
                .map(|progress| progress * 100.0),
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
            down: down_seconds(events, backend.is_healthy(), now),
            queue: QueueSnapshot::of(backend.limit()),
        }
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
        Some(first) => matches!(
            first.kind,
            EventKind::Up | EventKind::Trial | EventKind::Admin { out: Some(false) }
        ),
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

/// `part` as a fraction of `whole` (0 when `whole` is 0).
fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::LATENCY_BUCKETS;

    /// The queue of a backend limited to 2 connections, where requests wait and have waited.
    fn busy_queue() -> QueueSnapshot {
        QueueSnapshot {
            max_conns: Some(2),
            length: 18,
            queued: 40,
            timeouts: 3,
            wait_ms: [1200.0, 4000.0, 4900.0],
        }
    }

    /// Two backends, the second down and with a name that needs escaping everywhere; the first
    /// has a connection limit and a queue.
    pub(super) fn snapshot() -> Snapshot {
        let backend = |address: &str, requests: u64, healthy: bool| BackendSnapshot {
            address: address.into(),
            weight: 1,
            configured_weight: 1,
            admin_state: AdminState::Ready,
            backup: false,
            slow_start_percent: None,
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
            queue: QueueSnapshot::default(),
        };
        Snapshot {
            algorithm: "round-robin",
            admin_token_required: false,
            in_panic: false,
            heap: Some(Heap {
                in_use: 1_500_000,
                free: 200_000,
                spare_buffers: 409_600,
            }),
            panic_seconds: 0.0,
            uptime_seconds: 12.3,
            total_requests: 10,
            requests_per_second: 0.8,
            active_connections: 1,
            retries: 2,
            tunnels: 2,
            tunnels_total: 8,
            tls_handshakes: [("1.2", 1), ("1.3", 5)],
            tls_handshake_failures: 2,
            access_log_dropped: 4,
            proxy_headers_rejected: 1,
            sessions: Some((3, 100)),
            sticky: Some("table"),
            unresolved: vec!["app:8000".to_string()],
            reloads: (1, 1),
            last_reload: Some(crate::stats::LastReload {
                unix_time: 1_796_080_000.0,
                ok: false,
                message: "lb.toml:3:1: unknown key 'x'".to_string(),
            }),
            backends: vec![
                BackendSnapshot {
                    queue: busy_queue(),
                    ..backend("a:1", 6, true)
                },
                backend("<b\"\\>:2", 4, false),
            ],
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
        // In rotation, so 1 for Prometheus; see `backend_metrics`.
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
        // The operator's maint, then ready (no health event): out between them.
        let admin = |out| EventKind::Admin { out: Some(out) };
        let maint = [
            event(first + 40, admin(true)),
            event(first + 50, admin(false)),
        ];
        let out: Vec<usize> = (0..300)
            .filter(|&i| down_seconds(&maint, true, now)[i])
            .collect();
        assert_eq!(out, (40..=50).collect::<Vec<_>>());
        let ready_only = [event(first + 60, admin(false))];
        assert!(down_seconds(&ready_only, true, now)[..60]
            .iter()
            .all(|&d| d));
    }
}
