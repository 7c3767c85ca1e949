//! Two balancers side by side on one machine: a learner comparing phases in two terminals.
//!
//! The statistics listener defaults to 127.0.0.1:8404, and a balancer started without `--admin`
//! must not fail because that port is busy: it takes the next free port of 8404–8413 and says
//! which, or, with all ten busy, starts with statistics off. That behaviour is about fixed ports,
//! so these tests (unlike every other file) touch them: each test holds whichever of them it
//! needs busy, and the tests of this file take turns (no other test file starts a balancer
//! without `--admin`). A port the test cannot bind is held by something else, which exercises
//! the same fallback.

mod common;

use std::net::TcpListener;
use std::sync::{Mutex, MutexGuard, PoisonError};

use common::*;

const PHASE1: &str = env!("CARGO_BIN_EXE_phase1_rr");
const PHASE2_WEIGHTED: &str = env!("CARGO_BIN_EXE_phase2_weighted");

/// The ports a balancer tries for statistics when `--admin` is not given.
const DEFAULT_ADMIN_PORTS: std::ops::RangeInclusive<u16> = 8404..=8413;

/// Held by each test while it uses the default statistics ports.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The balancer's warning lines.
fn warnings(lb: &Balancer) -> Vec<String> {
    lb.log()
        .lines()
        .filter(|line| line.contains(" WARN "))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_busy_default_admin_port_moves_to_the_next_free_one() {
    let _turn = one_at_a_time();
    let held = TcpListener::bind(("127.0.0.1", 8404)).ok();
    let backend = DemoBackend::start("a");
    let lb = Balancer::start_default_admin(PHASE1, &["--backend", &backend.spec()]);

    let admin = lb
        .admin
        .unwrap_or_else(|| panic!("statistics are on:\n{}", lb.log()));
    let warnings = warnings(&lb);
    if held.is_none() && admin.port() == 8404 {
        // Whatever held 8404 let it go before the balancer started: no fallback to see.
        assert!(warnings.is_empty(), "{warnings:?}");
    } else {
        assert!((8405..=8413).contains(&admin.port()), "{admin}");
        assert_eq!(warnings.len(), 1, "{}", lb.log());
        let warning = &warnings[0];
        assert!(warning.contains("127.0.0.1:8404 is in use"), "{warning}");
        assert!(
            warning.contains(&format!("on {admin} instead")),
            "{warning}"
        );
        assert!(warning.contains("--admin ADDR"), "{warning}");
    }
    assert!(lb
        .log()
        .contains(&format!("statistics on http://{admin}/stats")));

    // The balancer serves, and its statistics answer on the port it announced.
    assert_eq!(get(lb.addr, "/").header("x-backend"), Some("a"));
    assert_eq!(stats_json(&lb)["total_requests"], 1);
}

#[test]
fn with_every_default_admin_port_busy_statistics_are_off() {
    let _turn = one_at_a_time();
    let _held: Vec<TcpListener> = DEFAULT_ADMIN_PORTS
        .filter_map(|port| TcpListener::bind(("127.0.0.1", port)).ok())
        .collect();
    let backend = DemoBackend::start("a");
    let lb = Balancer::start_default_admin(PHASE1, &["--backend", &backend.spec()]);

    assert_eq!(lb.admin, None, "{}", lb.log());
    assert!(!lb.log().contains("statistics on"), "{}", lb.log());
    let warnings = warnings(&lb);
    assert_eq!(warnings.len(), 1, "{}", lb.log());
    let warning = &warnings[0];
    assert!(warning.contains("statistics off"), "{warning}");
    assert!(warning.contains("8404-8413"), "{warning}");
    assert!(warning.contains("--admin ADDR"), "{warning}");
    assert_eq!(get(lb.addr, "/").header("x-backend"), Some("a"));
}

#[test]
fn two_demo_balancers_run_side_by_side() {
    let _turn = one_at_a_time();
    let ports = free_ports(4);
    let specs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    // As a learner would start them: each with --demo and its own ports, neither with --admin.
    let first = Balancer::start_default_admin(
        PHASE1,
        &["--demo", "--backend", &specs[0], "--backend", &specs[1]],
    );
    let second = Balancer::start_default_admin(
        PHASE2_WEIGHTED,
        &["--demo", "--backend", &specs[2], "--backend", &specs[3]],
    );

    for (lb, own) in [(&first, &ports[..2]), (&second, &ports[2..])] {
        let expected: Vec<String> = [0, 1, 0, 1]
            .iter()
            .map(|&i| format!("backend-{}", own[i]))
            .collect();
        assert_eq!(backends_hit(lb.addr, 4), expected, "{}", lb.log());
    }

    // Both keep their statistics, on ports of their own, each about its own backends.
    let (Some(first_admin), Some(second_admin)) = (first.admin, second.admin) else {
        panic!("statistics are on:\n{}\n{}", first.log(), second.log());
    };
    assert_ne!(first_admin, second_admin);
    for (lb, own) in [(&first, &specs[..2]), (&second, &specs[2..])] {
        let stats = stats_json(lb);
        let addresses: Vec<&str> = stats["backends"]
            .as_array()
            .expect("a list of backends")
            .iter()
            .filter_map(|backend| backend["address"].as_str())
            .collect();
        assert_eq!(addresses, own, "{stats}");
        assert_eq!(stats["total_requests"], 4);
    }
}
