//! Phase 3 over real sockets: active checks take a backend whose `/health` fails out of rotation
//! and bring it back, passive checks take a dead backend out after `--max-fails` and try it
//! again after `--fail-timeout`, and a balancer with no healthy backend answers 503 at once.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const ACTIVE: &str = env!("CARGO_BIN_EXE_phase3_active_health");
const PASSIVE: &str = env!("CARGO_BIN_EXE_phase3_passive_health");

/// Fast active checks, so a verdict takes a few hundred milliseconds.
const FAST_CHECKS: [&str; 8] = [
    "--health-interval",
    "100ms",
    "--health-timeout",
    "200ms",
    "--rise",
    "2",
    "--fall",
    "3",
];

/// Starts `bin` in front of `backends` with `extra` flags.
fn balancer(bin: &str, backends: &[String], extra: &[&str]) -> Balancer {
    let mut args: Vec<&str> = Vec::new();
    for spec in backends {
        args.extend(["--backend", spec.as_str()]);
    }
    args.extend_from_slice(extra);
    Balancer::start(bin, &args)
}

/// How many log lines contain `text`.
fn log_count(lb: &Balancer, text: &str) -> usize {
    lb.log().lines().filter(|line| line.contains(text)).count()
}

/// Restarts a demo backend on the address a stopped one used.
fn restart(addr: SocketAddr, name: &str) -> lb::demo::DemoBackend {
    let listener = TcpListener::bind(addr).expect("the stopped backend's port is free again");
    lb::demo::start(listener, name.to_string(), Duration::ZERO).expect("demo backend starts")
}

#[test]
fn active_a_failing_health_check_takes_a_backend_out_and_back() {
    let control_a = Arc::new(HealthControl::default());
    let control_b = Arc::new(HealthControl::default());
    let a = controlled("a", &control_a);
    let b = controlled("b", &control_b);
    let lb = balancer(ACTIVE, &[a.spec(), b.spec()], &FAST_CHECKS);
    assert_eq!(
        count(&backends_hit(lb.addr, 4))["a"],
        2,
        "both start healthy"
    );

    control_a.status.store(500, Ordering::SeqCst);
    let failing_since = Instant::now();
    let down = format!("❌ backend {} is down", a.spec());
    // interval × fall, plus one interval, plus slack for a loaded machine.
    assert!(eventually(Duration::from_millis(1400), || log_count(
        &lb, &down
    ) == 1));
    assert!(
        failing_since.elapsed() >= Duration::from_millis(150),
        "not on one failure"
    );
    let log = lb.log();
    let line = log.lines().find(|l| l.contains(&down)).unwrap();
    assert!(
        line.contains("3 checks failed in a row (last: 500)"),
        "{line}"
    );
    assert!(line.contains("1/2 backends healthy"), "{line}");
    assert!(backends_hit(lb.addr, 6).iter().all(|name| name == "b"));

    control_a.status.store(0, Ordering::SeqCst);
    let back = format!("✅ backend {} is back", a.spec());
    assert!(eventually(Duration::from_millis(1400), || log_count(
        &lb, &back
    ) == 1));
    assert!(lb.log().contains("2/2 backends healthy"));
    assert_eq!(
        count(&backends_hit(lb.addr, 4))["a"],
        2,
        "a is in turn again"
    );
    assert_eq!(log_count(&lb, &down), 1, "each transition is logged once");
}

#[test]
fn active_a_hung_probe_does_not_delay_the_verdict_on_the_others() {
    let hung = Arc::new(HealthControl::default());
    hung.hang.store(true, Ordering::SeqCst);
    let failing = Arc::new(HealthControl::default());
    failing.status.store(503, Ordering::SeqCst);
    let fine = Arc::new(HealthControl::default());
    let backends = [
        controlled("hung", &hung),
        controlled("failing", &failing),
        controlled("fine", &fine),
    ];
    let specs: Vec<String> = backends.iter().map(RawBackend::spec).collect();
    // Probes of the hung backend take the whole two seconds; checked one after another, the
    // failing backend's second failed probe would come after more than two seconds.
    let flags = [
        "--health-interval",
        "100ms",
        "--health-timeout",
        "2s",
        "--fall",
        "2",
    ];
    let started = Instant::now();
    let lb = balancer(ACTIVE, &specs, &flags);
    let failing_down = format!("❌ backend {} is down", specs[1]);
    assert!(eventually(Duration::from_secs(3), || log_count(
        &lb,
        &failing_down
    ) == 1));
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "the failing backend's verdict took {:?}",
        started.elapsed()
    );
    let hung_down = format!("❌ backend {} is down", specs[0]);
    assert!(eventually(WAIT, || log_count(&lb, &hung_down) == 1));
    assert!(lb.log().contains("(last: timeout)"));
    assert!(backends_hit(lb.addr, 4).iter().all(|name| name == "fine"));
    hung.hang.store(false, Ordering::SeqCst);
}

#[test]
fn active_a_single_failed_check_does_not_flip_a_backend() {
    let flaky = Arc::new(HealthControl::default());
    let backend = {
        let control = Arc::clone(&flaky);
        responder(move |request| {
            // Every other probe fails: never three in a row.
            let probe = control.probes.fetch_add(1, Ordering::SeqCst);
            let status = if request.path == "/health" && probe % 2 == 0 {
                500
            } else {
                200
            };
            (status, String::new(), b"flaky".to_vec())
        })
    };
    let lb = balancer(ACTIVE, &[backend.spec()], &FAST_CHECKS);
    assert!(eventually(WAIT, || flaky.probes.load(Ordering::SeqCst) >= 8));
    assert_eq!(
        log_count(&lb, "is down"),
        0,
        "fall = 3 holds:\n{}",
        lb.log()
    );
    assert_eq!(get(lb.addr, "/").status, 200);
}

#[test]
fn passive_a_killed_backend_gets_at_most_max_fails_requests() {
    let mut a = DemoBackend::start("a");
    let b = DemoBackend::start("b");
    let lb = balancer(
        PASSIVE,
        &[a.spec(), b.spec()],
        &[
            "--max-fails",
            "3",
            "--fail-timeout",
            "60s",
            "--admin",
            "127.0.0.1:0",
        ],
    );
    assert_eq!(count(&backends_hit(lb.addr, 4))["a"], 2);
    a.stop();
    for _ in 0..30 {
        let response = get(lb.addr, "/");
        assert_eq!(
            response.status, 200,
            "no client request fails while b is up"
        );
        assert_eq!(response.header("x-backend"), Some("b"));
    }
    // Three tries at connecting, then no more: a's only errors are those three.
    let stats = stats_json(&lb);
    assert_eq!(stats["backends"][0]["errors"], 3, "{stats}");
    // The warning repeats per request, so it is logged once and the rest counted.
    let unreachable = format!("backend {} unreachable", a.spec());
    assert_eq!(log_count(&lb, &unreachable), 1, "{}", lb.log());
    let down = format!(
        "❌ backend {} is down: 3 requests failed in a row",
        a.spec()
    );
    assert_eq!(log_count(&lb, &down), 1, "{}", lb.log());
    assert!(lb.log().contains("1/2 backends healthy"));
}

#[test]
fn passive_after_the_fail_timeout_one_trial_request_brings_a_backend_back() {
    let mut a = DemoBackend::start("a");
    let b = DemoBackend::start("b");
    let lb = balancer(
        PASSIVE,
        &[a.spec(), b.spec()],
        &["--max-fails", "1", "--fail-timeout", "1s"],
    );
    a.stop();
    let unreachable = format!("backend {} unreachable", a.spec());
    assert!(eventually(WAIT, || {
        get(lb.addr, "/").status == 200 && log_count(&lb, "is down") == 1
    }));
    let went_out = Instant::now();
    assert_eq!(log_count(&lb, &unreachable), 1);

    // Once the fail-timeout is over, exactly one request tries the dead backend; it fails over
    // to b, and the backend is out for another fail-timeout.
    thread::sleep(Duration::from_millis(1100).saturating_sub(went_out.elapsed()));
    let burst = Instant::now();
    for _ in 0..10 {
        assert_eq!(get(lb.addr, "/").status, 200);
    }
    assert!(
        burst.elapsed() < Duration::from_secs(1),
        "the burst fits in one fail-timeout"
    );
    assert_eq!(log_count(&lb, &unreachable), 2, "{}", lb.log());

    let restarted = restart(a.addr, "a");
    let back = format!("✅ backend {} is back: a trial request succeeded", a.spec());
    assert!(eventually(WAIT, || {
        get(lb.addr, "/").status == 200 && log_count(&lb, &back) == 1
    }));
    assert_eq!(
        count(&backends_hit(lb.addr, 4))["a"],
        2,
        "a is in turn again"
    );
    restarted.stop();
}

#[test]
fn with_every_backend_down_the_answer_is_503_with_retry_after() {
    let mut passive_backend = DemoBackend::start("a");
    let passive = balancer(
        PASSIVE,
        &[passive_backend.spec()],
        &["--max-fails", "1", "--fail-timeout", "5s"],
    );
    passive_backend.stop();
    let first = get(passive.addr, "/");
    assert_eq!(first.status, 503);
    assert_eq!(first.header("retry-after"), Some("5"));
    let asked = Instant::now();
    let second = get(passive.addr, "/");
    assert!(
        asked.elapsed() < Duration::from_millis(500),
        "answered at once"
    );
    assert_eq!(second.status, 503);
    let seconds: u64 = second.header("retry-after").unwrap().parse().unwrap();
    assert!((4..=5).contains(&seconds), "retry after {seconds}s");

    let control = Arc::new(HealthControl::default());
    control.status.store(500, Ordering::SeqCst);
    let active_backend = controlled("a", &control);
    let active = balancer(ACTIVE, &[active_backend.spec()], &FAST_CHECKS);
    assert!(eventually(WAIT, || log_count(&active, "is down") == 1));
    let response = get(active.addr, "/");
    assert_eq!(response.status, 503);
    assert_eq!(
        response.header("retry-after"),
        Some("1"),
        "the next check is near"
    );
    // With three passes needed two seconds apart, the earliest is two intervals after the next.
    let slow_rise = balancer(
        ACTIVE,
        &[active_backend.spec()],
        &["--health-interval", "2s", "--rise", "3", "--fall", "1"],
    );
    assert!(eventually(WAIT, || log_count(&slow_rise, "is down") == 1));
    let response = get(slow_rise.addr, "/");
    assert_eq!(response.status, 503);
    let seconds: u64 = response.header("retry-after").unwrap().parse().unwrap();
    assert!((5..=6).contains(&seconds), "retry after {seconds}s");
}

#[test]
fn the_final_statistics_show_each_backends_health() {
    let control = Arc::new(HealthControl::default());
    control.status.store(500, Ordering::SeqCst);
    let sick = controlled("sick", &control);
    let well = controlled("well", &Arc::new(HealthControl::default()));
    let mut lb = balancer(ACTIVE, &[sick.spec(), well.spec()], &FAST_CHECKS);
    assert!(eventually(WAIT, || log_count(&lb, "is down") == 1));
    lb.interrupt();
    assert_eq!(lb.wait_exit(WAIT), Some(0));
    let log = lb.log();
    let line_of = |spec: String| {
        log.lines()
            .find(|l| l.trim_start().starts_with(&format!("{spec}:")))
            .unwrap_or_else(|| panic!("no statistics line for {spec}:\n{log}"))
            .to_string()
    };
    let sick_line = line_of(sick.spec());
    assert!(
        sick_line.contains("DOWN, checks 0 passed / "),
        "{sick_line}"
    );
    assert!(sick_line.contains("last 500"), "{sick_line}");
    let well_line = line_of(well.spec());
    assert!(well_line.contains("up, checks "), "{well_line}");
    assert!(well_line.contains("last 200"), "{well_line}");
}
