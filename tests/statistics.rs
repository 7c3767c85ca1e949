//! The statistics page over time, over real sockets: a backend stopped and restarted shows as
//! `down`/`up` (active checks) and `ejected`/`up` (passive checks) events in `/stats.json` and on
//! `/stats`, its outage is shaded on its chart, and requests appear in the per-second history.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use common::*;

const ACTIVE: &str = env!("CARGO_BIN_EXE_phase3_active_health");
const PASSIVE: &str = env!("CARGO_BIN_EXE_phase3_passive_health");
const LOADBALANCER: &str = env!("CARGO_BIN_EXE_loadbalancer");

/// The events of `/stats.json` as (backend, kind, message), newest first.
fn events(lb: &Balancer) -> Vec<(Option<String>, String, String)> {
    let document = stats_json(lb);
    document["events"]
        .as_array()
        .expect("events is a list")
        .iter()
        .map(|e| {
            assert!(e["time"].as_str().unwrap().ends_with('Z'), "{e}");
            (
                e["backend"].as_str().map(str::to_string),
                e["kind"].as_str().unwrap().to_string(),
                e["message"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Waits until an event of `kind` about `backend` is listed.
fn wait_for_event(lb: &Balancer, backend: &str, kind: &str, mut poke: impl FnMut()) -> bool {
    eventually(WAIT, || {
        poke();
        events(lb)
            .iter()
            .any(|(b, k, _)| b.as_deref() == Some(backend) && k == kind)
    })
}

/// A demo backend on `addr` again, after the previous one there stopped.
fn restart(addr: SocketAddr, name: &str) -> lb::demo::DemoBackend {
    let listener = TcpListener::bind(addr).expect("the port is free again");
    lb::demo::start(listener, name.to_string(), Duration::ZERO).unwrap()
}

/// The page must stay well-formed, self-contained, and draw one chart per backend.
fn check_page(page: &str, backends: usize) {
    if let Err(err) = check_tags_balance(page) {
        panic!("{err}\n{page}");
    }
    assert_eq!(page.matches("<svg").count(), backends, "{page}");
    for external in ["<script", "<link", "src=", "url("] {
        assert!(!page.contains(external), "no external assets: {external}");
    }
}

#[test]
fn a_backend_stopped_and_restarted_shows_down_and_up_events_with_active_checks() {
    let mut flaky = DemoBackend::start("flaky");
    let steady = DemoBackend::start("steady");
    let (addr, spec) = (flaky.addr, flaky.spec());
    let lb = Balancer::start(
        ACTIVE,
        &[
            "--backend",
            &spec,
            "--backend",
            &steady.spec(),
            "--health-interval",
            "100ms",
            "--health-timeout",
            "200ms",
            "--rise",
            "2",
            "--fall",
            "2",
            "--admin",
            "127.0.0.1:0",
        ],
    );
    let start = events(&lb);
    assert!(
        start
            .iter()
            .any(|(b, k, m)| b.is_none() && k == "start" && m.contains("listening on")),
        "{start:?}"
    );

    flaky.stop();
    assert!(
        wait_for_event(&lb, &spec, "down", || {}),
        "{:?}",
        events(&lb)
    );
    let _back = restart(addr, "flaky");
    assert!(wait_for_event(&lb, &spec, "up", || {}), "{:?}", events(&lb));

    // Newest first, in the log's words.
    let listed = events(&lb);
    let mine: Vec<_> = listed
        .iter()
        .filter(|(b, _, _)| b.as_deref() == Some(spec.as_str()))
        .collect();
    assert_eq!(mine[0].1, "up", "{listed:?}");
    assert_eq!(mine[1].1, "down", "{listed:?}");
    assert!(mine[1].2.contains("checks failed in a row"), "{listed:?}");
    assert!(mine[0].2.contains("checks passed in a row"), "{listed:?}");
    let said = eventually(WAIT, || lb.log().contains(&mine[1].2));
    assert!(said, "the log says the same:\n{}", lb.log());

    // The outage is in the history and shaded on the page.
    let document = stats_json(&lb);
    let history = &document["history"]["backends"][0];
    assert_eq!(history["address"], spec.as_str());
    let down = history["down"].as_array().unwrap();
    assert_eq!(down.len(), 300);
    assert!(down.iter().any(|d| d == true), "{history}");
    // The outage lasted well under a few seconds; the second it ended in counts as down.
    assert!(down.iter().filter(|&d| d == true).count() <= 5, "{history}");
    let page = get(lb.admin.unwrap(), "/stats").text();
    check_page(&page, 2);
    assert!(page.contains("<rect class=\"out\""), "{page}");
    let (up_at, down_at) = (
        page.find("<span class=\"kind up\">").expect("an up event"),
        page.find("<span class=\"kind down\">")
            .expect("a down event"),
    );
    assert!(up_at < down_at, "newest first");
}

#[test]
fn a_backend_stopped_and_restarted_is_ejected_and_back_with_passive_checks() {
    let mut flaky = DemoBackend::start("flaky");
    let steady = DemoBackend::start("steady");
    let (addr, spec) = (flaky.addr, flaky.spec());
    let lb = Balancer::start(
        PASSIVE,
        &[
            "--backend",
            &spec,
            "--backend",
            &steady.spec(),
            "--max-fails",
            "1",
            "--fail-timeout",
            "300ms",
            "--admin",
            "127.0.0.1:0",
        ],
    );
    flaky.stop();
    assert!(
        wait_for_event(&lb, &spec, "ejected", || {
            get(lb.addr, "/");
        }),
        "{:?}",
        events(&lb)
    );
    let _back = restart(addr, "flaky");
    assert!(
        wait_for_event(&lb, &spec, "up", || {
            get(lb.addr, "/");
        }),
        "{:?}",
        events(&lb)
    );
    let listed = events(&lb);
    let up = listed.iter().find(|(_, k, _)| k == "up").unwrap();
    assert!(up.2.contains("a trial request succeeded"), "{listed:?}");
    let page = get(lb.admin.unwrap(), "/stats").text();
    check_page(&page, 2);
    assert!(
        page.contains("<span class=\"kind ejected\">ejected</span>"),
        "{page}"
    );
}

#[test]
fn requests_appear_in_the_history_of_the_current_seconds() {
    let backends = [DemoBackend::start("a"), DemoBackend::start("b")];
    let lb = Balancer::start(
        LOADBALANCER,
        &[
            "--backend",
            &backends[0].spec(),
            "--backend",
            &backends[1].spec(),
            "--health-check",
            "none",
            "--admin",
            "127.0.0.1:0",
        ],
    );
    let mut client = Client::connect(lb.addr);
    for _ in 0..10 {
        assert_eq!(client.get("/").status, 200);
    }
    let document = stats_json(&lb);
    let history = &document["history"];
    assert_eq!(history["interval_seconds"], 1);
    assert_eq!(history["length"], 300);
    for (i, backend) in history["backends"].as_array().unwrap().iter().enumerate() {
        let requests: Vec<u64> = backend["requests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .collect();
        assert_eq!(requests.len(), 300);
        // Five each, in the last seconds (the ten requests may straddle a second).
        let recent: u64 = requests[295..].iter().sum();
        assert_eq!(recent, 5, "{backend}");
        assert_eq!(requests.iter().sum::<u64>(), 5);
        assert_eq!(
            document["backends"][i]["requests"], 5,
            "the totals agree with the history"
        );
        let latency = backend["latency_ms_avg"].as_array().unwrap();
        assert!(latency[295..]
            .iter()
            .any(|ms| ms.as_f64().is_some_and(|ms| ms > 0.0)));
        assert!(backend["down"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d == false));
    }
    // Percentiles from the fine histogram, ordered.
    let first = &document["backends"][0];
    let (p50, p90, p99) = (
        first["latency_ms_p50"].as_f64().unwrap(),
        first["latency_ms_p90"].as_f64().unwrap(),
        first["latency_ms_p99"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p90 && p90 <= p99, "{first}");
}
