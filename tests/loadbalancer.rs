//! The `loadbalancer` capstone over real sockets: every phase at once, chosen by flags.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;

const LOADBALANCER: &str = env!("CARGO_BIN_EXE_loadbalancer");

/// Backends `a`, `b`, `c` whose health the test controls, and their controls.
fn controlled_backends() -> (Vec<RawBackend>, Vec<Arc<HealthControl>>) {
    let controls: Vec<Arc<HealthControl>> = (0..3).map(|_| Arc::default()).collect();
    let backends = ["a", "b", "c"]
        .iter()
        .zip(&controls)
        .map(|(name, control)| controlled(name, control))
        .collect();
    (backends, controls)
}

/// `loadbalancer` in front of `backends` with `extra` flags.
fn start(backends: &[RawBackend], extra: &[&str]) -> Balancer {
    let specs: Vec<String> = backends.iter().map(RawBackend::spec).collect();
    let mut args: Vec<&str> = Vec::new();
    for spec in &specs {
        args.extend(["--backend", spec.as_str()]);
    }
    args.extend_from_slice(extra);
    Balancer::start(LOADBALANCER, &args)
}

#[test]
fn at_its_defaults_it_balances_in_turn_checks_health_and_serves_statistics() {
    let (backends, _controls) = controlled_backends();
    let lb = start(&backends, &["--admin", "127.0.0.1:0"]);
    assert_eq!(backends_hit(lb.addr, 6), ["a", "b", "c", "a", "b", "c"]);
    let stats = stats_json(&lb);
    assert_eq!(stats["algorithm"], "round-robin");
    assert_eq!(stats["total_requests"], 6);
    let backends_json = stats["backends"].as_array().unwrap();
    assert_eq!(backends_json.len(), 3);
    assert!(backends_json
        .iter()
        .all(|b| b["healthy"] == true && b["requests"] == 2));
    // Both kinds of health check are on by default: the statistics say so.
    let health = backends_json[0]["health"].as_str().unwrap();
    assert!(
        health.contains("checks") && health.contains("failed requests"),
        "{health}"
    );
}

#[test]
fn a_sticky_session_moves_when_health_checks_take_its_backend_out() {
    let (backends, controls) = controlled_backends();
    let lb = start(
        &backends,
        &[
            "--sticky",
            "--health-check",
            "active",
            "--health-interval",
            "100ms",
            "--health-timeout",
            "200ms",
            "--fall",
            "2",
        ],
    );
    let first = get(lb.addr, "/");
    let session = session_cookie(&first).expect("a new session gets a cookie");
    let home = first.header("x-backend").unwrap().to_string();
    let cookie = format!("Cookie: SESSION_ID={session}\r\n");
    for _ in 0..5 {
        assert_eq!(
            get_with(lb.addr, &cookie).header("x-backend"),
            Some(home.as_str())
        );
    }
    let home_index = ["a", "b", "c"].iter().position(|n| *n == home).unwrap();
    controls[home_index].status.store(500, Ordering::SeqCst);
    assert!(
        eventually(WAIT, || lb
            .log()
            .contains(&format!("{} is down", backends[home_index].spec()))),
        "the health checks never took {home} out:\n{}",
        lb.log()
    );
    let moved = get_with(lb.addr, &cookie);
    let new_home = moved.header("x-backend").unwrap().to_string();
    assert_ne!(new_home, home);
    assert_eq!(session_cookie(&moved), None, "the session keeps its cookie");
    for _ in 0..5 {
        assert_eq!(
            get_with(lb.addr, &cookie).header("x-backend"),
            Some(new_home.as_str())
        );
    }
}

#[test]
fn every_algorithm_works_with_health_checks_and_sessions_together() {
    for algorithm in ALGORITHMS {
        let (backends, controls) = controlled_backends();
        let lb = start(
            &backends,
            &[
                "--algorithm",
                algorithm,
                "--sticky",
                "--health-interval",
                "100ms",
                "--fall",
                "1",
                "--explain",
            ],
        );
        // Backend b fails its checks from the start, so no request may reach it.
        controls[1].status.store(503, Ordering::SeqCst);
        assert!(
            eventually(WAIT, || lb.log().contains("is down")),
            "{algorithm}: {}",
            lb.log()
        );
        for n in 2..=7 {
            let response = Client::connect_from(lb.addr, &format!("127.0.0.{n}")).get("/");
            assert_eq!(response.status, 200, "{algorithm}");
            assert_ne!(response.header("x-backend"), Some("b"), "{algorithm}");
            let decision = response.header("x-lb-decision").unwrap_or_default();
            assert!(
                decision.starts_with("sticky miss: new session"),
                "{algorithm}: {decision}"
            );
            assert!(decision.contains(algorithm), "{algorithm}: {decision}");
        }
    }
}

#[test]
fn flags_that_would_be_ignored_are_refused() {
    let cases: [(&[&str], &str); 4] = [
        (&["--max-sessions", "10"], "--max-sessions needs --sticky"),
        (&["--cookie-name", "SID"], "--cookie-name needs --sticky"),
        (
            &["--health-check", "passive", "--rise", "3"],
            "--rise needs --health-check active or both",
        ),
        (
            &["--health-check", "none", "--max-fails", "2"],
            "--max-fails needs --health-check passive or both",
        ),
    ];
    for (args, message) in cases {
        let output = std::process::Command::new(LOADBALANCER)
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert_eq!(stderr.trim(), format!("error: {message}"), "{args:?}");
    }
}

#[test]
fn help_reads_as_a_summary_of_the_course() {
    let output = std::process::Command::new(LOADBALANCER)
        .arg("--help")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let help = String::from_utf8_lossy(&output.stdout);
    let headings = [
        "Phase 1: serving and statistics",
        "Phase 2: algorithms",
        "Phase 3: health checks",
        "Phase 4: sticky sessions",
    ];
    let mut last = 0;
    for heading in headings {
        let at = help
            .find(heading)
            .unwrap_or_else(|| panic!("no '{heading}' in:\n{help}"));
        assert!(at > last, "'{heading}' out of order");
        last = at;
    }
    for flag in [
        "--algorithm",
        "--health-check",
        "--max-fails",
        "--sticky",
        "--admin",
        "simulate",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}

#[test]
fn sigterm_also_shuts_down_gracefully() {
    let (backends, _controls) = controlled_backends();
    let mut lb = start(&backends, &[]);
    assert_eq!(get(lb.addr, "/").status, 200);
    let pid = lb.pid().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert_eq!(lb.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(lb.log().contains("statistics:"));
}

#[test]
fn a_client_that_gives_up_is_not_counted_against_the_backend() {
    let (backends, _controls) = controlled_backends();
    let lb = start(
        &backends,
        &["--admin", "127.0.0.1:0", "--backend-timeout", "1s"],
    );
    let mut client = Client::connect(lb.addr);
    client
        .send(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\nonly the start");
    drop(client);
    assert!(eventually(WAIT, || {
        let stats = stats_json(&lb);
        let backends = stats["backends"].as_array().unwrap().clone();
        backends
            .iter()
            .map(|b| b["requests"].as_u64().unwrap())
            .sum::<u64>()
            == 1
            && backends.iter().all(|b| b["active_connections"] == 0)
    }));
    let stats = stats_json(&lb);
    assert!(
        stats["backends"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["errors"] == 0 && b["healthy"] == true),
        "{stats}"
    );
}
