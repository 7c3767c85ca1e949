//! Phase 4 over real sockets: cookie sticky sessions, the admin listener's three statistics views,
//! `X-Request-Id`, and the `X-Lb-Decision` header of `--explain`.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::thread;
use std::time::Duration;

use common::*;

const PHASE1: &str = env!("CARGO_BIN_EXE_phase1_rr");
const PHASE4: &str = env!("CARGO_BIN_EXE_phase4_sticky");
const PHASE3_PASSIVE: &str = env!("CARGO_BIN_EXE_phase3_passive_health");

/// Three demo backends called a, b and c, and `bin` in front of them with `extra` flags.
fn three_backends(bin: &str, extra: &[&str]) -> (Vec<DemoBackend>, Balancer) {
    let backends: Vec<DemoBackend> = ["a", "b", "c"]
        .iter()
        .map(|n| DemoBackend::start(n))
        .collect();
    let mut args: Vec<String> = Vec::new();
    for backend in &backends {
        args.extend(["--backend".to_string(), backend.spec()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let lb = Balancer::start(bin, &args);
    (backends, lb)
}

// ---------------------------------------------------------------- sticky sessions

#[test]
fn a_client_keeping_its_cookie_stays_while_cookie_less_clients_rotate() {
    let (_backends, lb) = three_backends(PHASE4, &[]);
    let first = get(lb.addr, "/");
    let id = session_cookie(&first).expect("a new session gets a cookie");
    assert!(
        uuid::Uuid::parse_str(&id).is_ok_and(|u| u.get_version_num() == 4),
        "{id}"
    );
    let set_cookie = first.headers_named("set-cookie").join("");
    assert!(
        set_cookie.ends_with("; Path=/; HttpOnly; SameSite=Lax"),
        "{set_cookie}"
    );
    let home = backend_of(&first);

    // The cookie among others, in a field of its own, quoted, or with stray spaces.
    let cookie_forms = [
        format!("Cookie: SESSION_ID={id}\r\n"),
        format!("Cookie: theme=dark; SESSION_ID={id}; lang=ko\r\n"),
        format!("Cookie: theme=dark\r\nCookie: SESSION_ID={id}\r\n"),
        format!("Cookie:  lang=ko ;SESSION_ID=\"{id}\"\r\n"),
    ];
    for i in 0..20 {
        let response = get_with(lb.addr, &cookie_forms[i % cookie_forms.len()]);
        assert_eq!(backend_of(&response), home, "request {i} left its backend");
        assert_eq!(
            session_cookie(&response),
            None,
            "a known session gets no new cookie"
        );
    }

    let cookie_less: Vec<String> = (0..6).map(|_| backend_of(&get(lb.addr, "/"))).collect();
    assert_eq!(
        count(&cookie_less).len(),
        3,
        "cookie-less clients rotate: {cookie_less:?}"
    );
}

#[test]
fn the_backends_own_set_cookie_survives_beside_the_balancers() {
    let backend = responder(|_| {
        (
            200,
            "Set-Cookie: theme=dark; Path=/\r\nSet-Cookie: lang=ko\r\n".into(),
            b"hello\r\n\r\nbody".to_vec(),
        )
    });
    let spec = backend.spec();
    let lb = Balancer::start(PHASE4, &["--backend", &spec]);
    let response = get(lb.addr, "/");
    let cookies = response.headers_named("set-cookie");
    assert_eq!(cookies.len(), 3, "{cookies:?}");
    assert!(cookies.contains(&"theme=dark; Path=/"));
    assert!(cookies.contains(&"lang=ko"));
    assert!(session_cookie(&response).is_some());
    // The body is relayed untouched, even where it looks like the end of a head.
    assert_eq!(response.body, b"hello\r\n\r\nbody");
}

#[test]
fn the_session_table_stays_at_max_sessions_under_a_flood_of_new_clients() {
    let (_backends, lb) =
        three_backends(PHASE4, &["--max-sessions", "5", "--admin", "127.0.0.1:0"]);
    let mut client = Client::connect(lb.addr);
    let mut sessions = Vec::new();
    for _ in 0..50 {
        let response = client.get("/");
        sessions
            .push(session_cookie(&response).expect("every cookie-less request is a new session"));
        let held = stats_json(&lb)["sessions"]
            .as_u64()
            .expect("sessions is reported");
        assert!(held <= 5, "{held} sessions held");
    }
    assert_eq!(stats_json(&lb)["sessions"], 5);
    assert_eq!(stats_json(&lb)["max_sessions"], 5);
    // The oldest sessions were evicted, the newest are still known.
    let oldest = get_with(lb.addr, &format!("Cookie: SESSION_ID={}\r\n", sessions[0]));
    assert!(
        session_cookie(&oldest).is_some(),
        "the oldest session was forgotten"
    );
    let newest = get_with(lb.addr, &format!("Cookie: SESSION_ID={}\r\n", sessions[49]));
    assert_eq!(
        session_cookie(&newest),
        None,
        "the newest session is still known"
    );
}

#[test]
fn an_idle_session_expires() {
    let (_backends, lb) = three_backends(PHASE4, &["--session-ttl", "1s"]);
    let id = session_cookie(&get(lb.addr, "/")).expect("a cookie");
    let cookie = format!("Cookie: SESSION_ID={id}\r\n");
    assert_eq!(
        session_cookie(&get_with(lb.addr, &cookie)),
        None,
        "still known"
    );
    // Expiry is the passing of idle time itself, so this one wait cannot be a poll: any request
    // made to check would count as use and keep the session alive.
    thread::sleep(Duration::from_millis(1300));
    let renewed =
        session_cookie(&get_with(lb.addr, &cookie)).expect("an expired session gets a new cookie");
    assert_ne!(renewed, id);
}

#[test]
fn a_session_whose_backend_died_moves_keeps_its_cookie_and_stays() {
    let (mut backends, lb) = three_backends(PHASE4, &["--explain"]);
    let first = get(lb.addr, "/");
    let id = session_cookie(&first).expect("a cookie");
    let home = backend_of(&first);
    let cookie = format!("Cookie: SESSION_ID={id}\r\n");
    assert_eq!(backend_of(&get_with(lb.addr, &cookie)), home);

    let dead = backends
        .iter_mut()
        .find(|b| b.name == home)
        .expect("the home backend");
    let dead_addr = dead.spec();
    dead.stop();

    let moved = get_with(lb.addr, &cookie);
    assert_eq!(moved.status, 200);
    let new_home = backend_of(&moved);
    assert_ne!(new_home, home);
    assert_eq!(session_cookie(&moved), None, "the session keeps its cookie");
    let decision = moved.header("x-lb-decision").unwrap_or_default();
    assert!(
        decision.contains(&format!("moves from {dead_addr}")),
        "{decision}"
    );
    assert!(
        decision.contains(&format!("retry after {dead_addr}")),
        "{decision}"
    );

    for _ in 0..10 {
        let response = get_with(lb.addr, &cookie);
        assert_eq!(backend_of(&response), new_home);
        let decision = response.header("x-lb-decision").unwrap_or_default();
        assert!(decision.starts_with("sticky hit"), "{decision}");
    }
}

// ---------------------------------------------------------------- statistics

#[test]
fn stats_json_totals_equal_the_requests_made_and_backends_add_up() {
    let (backends, lb) = three_backends(PHASE1, &["--admin", "127.0.0.1:0"]);
    const N: u64 = 30;
    for _ in 0..N {
        assert_eq!(get(lb.addr, "/").status, 200);
    }
    // A backend's counters are updated right after its response is relayed, so the last one may
    // trail the client by a moment.
    let settled = eventually(WAIT, || {
        let stats = stats_json(&lb);
        let reached: u64 = stats["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["requests"].as_u64().unwrap())
            .sum();
        reached == N
    });
    assert!(
        settled,
        "per-backend requests never added up: {}",
        stats_json(&lb)
    );
    let stats = stats_json(&lb);
    assert_eq!(stats["total_requests"], N, "{stats}");
    for field in [
        "uptime_seconds",
        "requests_per_second",
        "active_connections",
    ] {
        assert!(stats[field].is_number(), "{field} in {stats}");
    }
    let listed = stats["backends"].as_array().unwrap();
    assert_eq!(listed.len(), 3);
    for (entry, backend) in listed.iter().zip(&backends) {
        assert_eq!(entry["address"], backend.spec().as_str());
        assert_eq!(entry["weight"], 1);
        assert_eq!(entry["healthy"], true);
        assert_eq!(entry["requests"], N / 3);
        assert_eq!(entry["errors"], 0);
        assert!(entry["active_connections"].is_u64());
        assert!(entry["latency_ms_avg"].as_f64().is_some_and(|ms| ms > 0.0));
        assert!(entry["latency_ms_p99"].is_number());
        assert_eq!(entry["error_rate"], 0.0);
    }
}

#[test]
fn metrics_parse_as_prometheus_text() {
    let (backends, lb) = three_backends(PHASE1, &["--admin", "127.0.0.1:0"]);
    for _ in 0..9 {
        get(lb.addr, "/");
    }
    let response = get(lb.admin.unwrap(), "/metrics");
    assert_eq!(response.status, 200);
    assert!(response
        .header("content-type")
        .unwrap_or_default()
        .starts_with("text/plain; version=0.0.4"));
    let families = prometheus::parse(&response.text())
        .unwrap_or_else(|err| panic!("{err}\n{}", response.text()));

    for (name, kind) in [
        ("lb_requests_total", "counter"),
        ("lb_backend_errors_total", "counter"),
        ("lb_backend_up", "gauge"),
        ("lb_backend_active_connections", "gauge"),
        ("lb_request_duration_seconds", "histogram"),
    ] {
        let family = families
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(family.kind, kind, "{name}");
        for backend in &backends {
            let labelled = family
                .samples
                .iter()
                .any(|s| s.labels.get("backend") == Some(&backend.spec()));
            assert!(labelled, "{name} has no sample for {}", backend.spec());
        }
    }
    let ups = &families["lb_backend_up"].samples;
    assert!(ups.iter().all(|s| s.value == 1.0));
    let served: f64 = families["lb_requests_total"]
        .samples
        .iter()
        .map(|s| s.value)
        .sum();
    assert!(served <= 9.0);
    assert!(families["lb_client_requests_total"].samples[0].value >= served);
}

#[test]
fn the_stats_page_is_html_with_every_backend() {
    let (backends, lb) = three_backends(PHASE4, &["--admin", "127.0.0.1:0"]);
    get(lb.addr, "/");
    let response = get(lb.admin.unwrap(), "/stats");
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let page = response.text();
    if let Err(err) = check_tags_balance(&page) {
        panic!("{err}\n{page}");
    }
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(
        page.contains("<meta http-equiv=\"refresh\""),
        "refreshes itself"
    );
    for external in ["<script", "<link", "src=", "url("] {
        assert!(!page.contains(external), "no external assets: {external}");
    }
    for backend in &backends {
        assert!(page.contains(&backend.spec()), "{} missing", backend.spec());
    }
    // A traffic chart per backend, and the start-up among the events.
    assert_eq!(page.matches("<svg").count(), backends.len(), "{page}");
    assert!(
        page.contains("<span class=\"kind start\">start</span>"),
        "{page}"
    );
}

/// A backend answering every request `503`, the passive checks' failed request.
fn always_503() -> RawBackend {
    responder(|_| (503, String::new(), b"unavailable".to_vec()))
}

/// The `/stats.json` entry of the backend `spec`.
fn backend_entry(lb: &Balancer, spec: &str) -> serde_json::Value {
    let stats = stats_json(lb);
    stats["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == spec)
        .unwrap_or_else(|| panic!("no {spec} in {stats}"))
        .clone()
}

#[test]
fn without_health_checks_a_failing_backend_is_not_checked_rather_than_up() {
    let sick = always_503();
    let well = DemoBackend::start("well");
    let mut lb = Balancer::start(
        PHASE1,
        &[
            "--backend",
            &sick.spec(),
            "--backend",
            &well.spec(),
            "--admin",
            "127.0.0.1:0",
        ],
    );
    // The start-up log says which phase this is.
    assert!(
        lb.log().contains("Phase 1, 기본 로드 밸런서"),
        "{}",
        lb.log()
    );
    for _ in 0..6 {
        get(lb.addr, "/");
    }
    assert!(eventually(WAIT, || backend_entry(&lb, &sick.spec())
        ["errors"]
        == 3));
    let entry = backend_entry(&lb, &sick.spec());
    assert_eq!(entry["error_rate"], 1.0, "{entry}");
    // Still chosen (nothing takes it out), and the statistics say nothing judged it.
    assert_eq!(entry["healthy"], true, "{entry}");
    assert_eq!(entry["health_checks"], "none", "{entry}");
    assert_eq!(entry["health"], "not checked", "{entry}");
    let page = get(lb.admin.unwrap(), "/stats").text();
    assert!(page.contains(">not checked</td>"), "{page}");
    assert!(!page.contains(">up</td>"), "{page}");
    let metrics = get(lb.admin.unwrap(), "/metrics").text();
    let up = format!("lb_backend_up{{backend=\"{}\"}} 1\n", sick.spec());
    assert!(metrics.contains(&up), "in rotation, so 1: {metrics}");
    // The final statistics in the log say it too.
    lb.interrupt();
    assert_eq!(lb.wait_exit(WAIT), Some(0));
    let log = lb.log();
    let line = log
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{}:", sick.spec())))
        .unwrap_or_else(|| panic!("no statistics line for the sick backend:\n{log}"));
    assert!(line.contains("(100.0% error rate)"), "{line}");
    assert!(line.ends_with(", not checked"), "{line}");
}

#[test]
fn with_health_checks_a_failing_backend_is_down_and_says_by_which_checks() {
    let sick = always_503();
    let well = DemoBackend::start("well");
    let lb = Balancer::start(
        PHASE3_PASSIVE,
        &[
            "--backend",
            &sick.spec(),
            "--backend",
            &well.spec(),
            "--admin",
            "127.0.0.1:0",
        ],
    );
    assert!(
        lb.log()
            .contains("Phase 3, 헬스 체크 — Passive Health Check"),
        "{}",
        lb.log()
    );
    // Three failed requests in a row (--max-fails) take it out.
    let out = eventually(WAIT, || {
        get(lb.addr, "/");
        backend_entry(&lb, &sick.spec())["healthy"] == false
    });
    assert!(out, "{}", stats_json(&lb));
    let entry = backend_entry(&lb, &sick.spec());
    assert_eq!(entry["health_checks"], "passive", "{entry}");
    assert!(
        entry["health"].as_str().unwrap().starts_with("DOWN"),
        "{entry}"
    );
    let well_entry = backend_entry(&lb, &well.spec());
    assert_eq!(well_entry["health_checks"], "passive", "{well_entry}");
    assert!(
        well_entry["health"].as_str().unwrap().starts_with("up"),
        "{well_entry}"
    );
    let page = get(lb.admin.unwrap(), "/stats").text();
    assert!(
        page.contains(">down</td>") && page.contains(">up</td>"),
        "{page}"
    );
    assert!(!page.contains("not checked"), "{page}");
}

#[test]
fn the_admin_port_answers_only_what_it_serves() {
    let (_backends, lb) = three_backends(PHASE1, &["--admin", "127.0.0.1:0"]);
    let admin = lb.admin.unwrap();
    assert_ne!(admin, lb.addr);
    assert_eq!(get(admin, "/stats.json?fresh=1").status, 200);
    assert_eq!(get(admin, "/nothing-here").status, 404);
    assert_eq!(get(admin, "/").status, 404);
    assert_eq!(get(admin, "/stats/").status, 404);

    let mut client = Client::connect(admin);
    client.send(b"POST /stats HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    let refused = client.read_response("POST");
    assert_eq!(refused.status, 405);
    assert_eq!(refused.header("allow"), Some("GET, HEAD"));

    let mut client = Client::connect(admin);
    client.send(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let head = client.read_response("HEAD");
    assert_eq!(head.status, 200);
    assert!(
        client.is_closed(),
        "HEAD has no body and the connection closes"
    );

    let mut client = Client::connect(admin);
    client.send(b"GET /stats HTTP/1.1\r\nX-Big: ");
    let _ = client.stream.write_all(&vec![b'a'; 16 * 1024]);
    assert_eq!(client.read_response("GET").status, 431);

    let mut client = Client::connect(admin);
    client.send(b"\x16\x03\x01 not http\r\n\r\n");
    assert_eq!(client.read_response("GET").status, 400);

    // The traffic port still balances, and does not serve statistics.
    assert_eq!(get(lb.addr, "/stats.json").header("x-backend"), Some("a"));
}

#[test]
fn admin_off_means_no_statistics_listener() {
    let (_backends, lb) = three_backends(PHASE1, &["--admin", "off"]);
    assert_eq!(get(lb.addr, "/").status, 200);
    assert!(lb.admin.is_none());
    assert!(!lb.log().contains("statistics on"), "{}", lb.log());
}

#[test]
fn an_admin_port_in_use_is_a_start_up_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut child = std::process::Command::new(PHASE1)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin",
            &addr,
            "--backend",
            "127.0.0.1:9",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let exited = eventually(WAIT, || {
        child.try_wait().is_ok_and(|status| status.is_some())
    });
    if !exited {
        let _ = child.kill();
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        exited,
        "the balancer kept running with its admin port taken"
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("--admin {addr}")), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

// ---------------------------------------------------------------- X-Request-Id

fn received_headers(response: &Response) -> Vec<(String, String)> {
    response
        .text()
        .lines()
        .filter_map(|line| line.split_once(": "))
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

#[test]
fn request_ids_are_added_kept_and_logged() {
    let backend = header_echo_with("");
    let spec = backend.spec();
    let lb = Balancer::start(PHASE1, &["--backend", &spec]);

    let received = received_headers(&get_with(lb.addr, "X-Forwarded-For: 203.0.113.9\r\n"));
    let ids: Vec<&str> = received
        .iter()
        .filter(|(n, _)| n == "x-request-id")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(ids.len(), 1, "{received:?}");
    let id = uuid::Uuid::parse_str(ids[0]).expect("the request id is a UUID");
    assert_eq!(id.get_version_num(), 4);
    let forwarded: Vec<&(String, String)> = received
        .iter()
        .filter(|(n, _)| n == "x-forwarded-for")
        .collect();
    assert_eq!(forwarded.len(), 1);
    assert_eq!(forwarded[0].1, "203.0.113.9, 127.0.0.1");
    assert!(
        eventually(WAIT, || lb.log().contains(ids[0])),
        "the id is in the debug log:\n{}",
        lb.log()
    );

    let received = received_headers(&get_with(lb.addr, "X-Request-Id: trace-me-123\r\n"));
    let ids: Vec<&str> = received
        .iter()
        .filter(|(n, _)| n == "x-request-id")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(ids, ["trace-me-123"], "an existing id is kept as it is");
}

// ---------------------------------------------------------------- --explain

#[test]
fn explain_names_the_backend_round_robin_actually_chose() {
    let (backends, lb) = three_backends(PHASE1, &["--explain"]);
    let address: HashMap<&str, String> = backends
        .iter()
        .map(|b| (b.name.as_str(), b.spec()))
        .collect();
    for turn in 0..6 {
        let response = get(lb.addr, "/");
        let decision = response.header("x-lb-decision").expect("a decision header");
        let chosen = &address[backend_of(&response).as_str()];
        assert!(decision.starts_with("round-robin: turn "), "{decision}");
        assert!(
            decision.starts_with(&format!(
                "round-robin: turn {turn} goes to {chosen} ({} of 3)",
                turn % 3 + 1
            )),
            "{decision}"
        );
        assert!(decision.ends_with(&format!("chose {chosen}")), "{decision}");
        assert!(!decision.contains("sticky"), "{decision}");
    }
    let (_quiet_backends, quiet) = three_backends(PHASE1, &[]);
    assert_eq!(
        get(quiet.addr, "/").header("x-lb-decision"),
        None,
        "off by default"
    );
}

#[test]
fn explain_tells_sticky_hits_from_misses() {
    let (backends, lb) = three_backends(PHASE4, &["--explain"]);
    let address: HashMap<&str, String> = backends
        .iter()
        .map(|b| (b.name.as_str(), b.spec()))
        .collect();
    let first = get(lb.addr, "/");
    let id = session_cookie(&first).unwrap();
    let chosen = &address[backend_of(&first).as_str()];
    let decision = first.header("x-lb-decision").unwrap();
    assert!(
        decision.starts_with(&format!("sticky miss: new session {id}; round-robin: ")),
        "{decision}"
    );
    assert!(decision.ends_with(&format!("chose {chosen}")), "{decision}");

    for _ in 0..3 {
        let again = get_with(lb.addr, &format!("Cookie: SESSION_ID={id}\r\n"));
        let decision = again.header("x-lb-decision").unwrap();
        assert_eq!(
            decision,
            format!("sticky hit: session {id} belongs to {chosen}; chose {chosen}")
        );
        assert_eq!(&address[backend_of(&again).as_str()], chosen);
    }
}

#[test]
fn explain_lists_retries_and_the_backends_health_checks_took_out() {
    let flags = [
        "--explain",
        "--max-fails",
        "1",
        "--fail-timeout",
        "1m",
        "--admin",
        "127.0.0.1:0",
    ];
    let (mut backends, lb) = three_backends(PHASE3_PASSIVE, &flags);
    let dead = backends[0].spec();
    backends[0].stop();

    // Round robin's first turn is the stopped backend: the request moves on to the next one,
    // and that one failure takes the stopped backend out (--max-fails 1).
    let first = get(lb.addr, "/");
    assert_eq!(backend_of(&first), "b");
    let decision = first.header("x-lb-decision").unwrap_or_default();
    assert!(
        decision.contains(&format!("retry after {dead}")),
        "{decision}"
    );
    assert!(
        decision.ends_with(&format!("chose {}", backends[1].spec())),
        "{decision}"
    );

    for _ in 0..4 {
        let response = get(lb.addr, "/");
        assert_ne!(backend_of(&response), "a");
        let decision = response.header("x-lb-decision").unwrap_or_default();
        assert!(
            decision.contains(&format!("unavailable: {dead}")),
            "{decision}"
        );
        assert!(!decision.contains("retry"), "{decision}");
    }

    // The statistics show the same verdict.
    let stats = stats_json(&lb);
    assert_eq!(stats["backends"][0]["healthy"], false, "{stats}");
    assert_eq!(stats["backends"][1]["healthy"], true, "{stats}");
    let metrics = get(lb.admin.unwrap(), "/metrics").text();
    let families = prometheus::parse(&metrics).unwrap();
    let up: Vec<(String, f64)> = families["lb_backend_up"]
        .samples
        .iter()
        .map(|s| (s.labels["backend"].clone(), s.value))
        .collect();
    assert_eq!(up[0], (dead, 0.0));
    assert!(up[1..].iter().all(|(_, value)| *value == 1.0), "{up:?}");
}

// ---------------------------------------------------------------- checkers

/// A strict parser of the Prometheus text exposition format (version 0.0.4), enough to reject
/// anything a Prometheus server would.
mod prometheus {
    use super::*;

    /// One metric family: its type and samples (histogram series included).
    #[derive(Debug, Default)]
    pub struct Family {
        pub kind: String,
        pub samples: Vec<Sample>,
    }

    /// One sample line.
    #[derive(Debug)]
    pub struct Sample {
        pub name: String,
        pub labels: BTreeMap<String, String>,
        pub value: f64,
    }

    pub fn parse(text: &str) -> Result<HashMap<String, Family>, String> {
        if !text.ends_with('\n') {
            return Err("the exposition must end with a line feed".into());
        }
        let mut families: HashMap<String, Family> = HashMap::new();
        let mut helped = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let at = |why: String| format!("line {}: {why}: {line:?}", number + 1);
            if let Some(comment) = line.strip_prefix('#') {
                let words: Vec<&str> = comment.trim_start().splitn(3, ' ').collect();
                match words.as_slice() {
                    ["HELP", name, _] => {
                        check_name(name).map_err(at)?;
                        if helped.contains(&name.to_string()) {
                            return Err(at("a second HELP".into()));
                        }
                        helped.push(name.to_string());
                    }
                    ["TYPE", name, kind] => {
                        check_name(name).map_err(at)?;
                        if !["counter", "gauge", "histogram", "summary", "untyped"].contains(kind) {
                            return Err(at(format!("unknown type {kind}")));
                        }
                        if families.contains_key(*name) {
                            return Err(at("TYPE after samples or a second TYPE".into()));
                        }
                        families.insert(
                            name.to_string(),
                            Family {
                                kind: kind.to_string(),
                                samples: Vec::new(),
                            },
                        );
                    }
                    _ => {}
                }
                continue;
            }
            if line.trim().is_empty() {
                continue;
            }
            let sample = parse_sample(line).map_err(at)?;
            let family = family_of(&sample.name, &families)
                .ok_or_else(|| at("a sample with no TYPE before it".into()))?;
            families
                .get_mut(&family)
                .map(|f| f.samples.push(sample))
                .ok_or_else(|| at("lost family".into()))?;
        }
        for (name, family) in &families {
            check_family(name, family)?;
        }
        Ok(families)
    }

    fn check_name(name: &str) -> Result<(), String> {
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
        if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            Ok(())
        } else {
            Err(format!("bad metric name {name:?}"))
        }
    }

    /// The family a sample belongs to: its own name, or for histograms its name less the suffix.
    fn family_of(sample: &str, families: &HashMap<String, Family>) -> Option<String> {
        if families.get(sample).is_some_and(|f| f.kind != "histogram") {
            return Some(sample.to_string());
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = sample.strip_suffix(suffix)?;
            families
                .get(base)
                .filter(|f| f.kind == "histogram")
                .map(|_| base.to_string())
        })
    }

    fn parse_sample(line: &str) -> Result<Sample, String> {
        let name_end = line.find(['{', ' ']).ok_or("no value")?;
        let name = &line[..name_end];
        check_name(name)?;
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(inner) = rest.strip_prefix('{') {
            rest = parse_labels(inner, &mut labels)?;
        }
        let rest = rest.strip_prefix(' ').ok_or("no space before the value")?;
        let mut parts = rest.split(' ');
        let value = parts.next().ok_or("no value")?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            number => number
                .parse()
                .map_err(|_| format!("bad value {number:?}"))?,
        };
        if let Some(timestamp) = parts.next() {
            timestamp.parse::<i64>().map_err(|_| "bad timestamp")?;
        }
        if parts.next().is_some() {
            return Err("trailing text".into());
        }
        Ok(Sample {
            name: name.to_string(),
            labels,
            value,
        })
    }

    /// Parses `name="value",...}` and returns what follows the closing brace.
    fn parse_labels<'l>(
        mut text: &'l str,
        labels: &mut BTreeMap<String, String>,
    ) -> Result<&'l str, String> {
        loop {
            if let Some(after) = text.strip_prefix('}') {
                return Ok(after);
            }
            let equals = text.find('=').ok_or("a label without =")?;
            let name = &text[..equals];
            check_name(name)?;
            if name.contains(':') {
                return Err(format!("label name {name:?} has a colon"));
            }
            let mut chars = text[equals + 1..].char_indices();
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err("label value not quoted".into());
            }
            let mut value = String::new();
            let close = loop {
                match chars.next().ok_or("unterminated label value")? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        other => return Err(format!("bad escape \\{other}")),
                    },
                    (_, '\n') => return Err("line feed in a label value".into()),
                    (_, c) => value.push(c),
                }
            };
            if labels.insert(name.to_string(), value).is_some() {
                return Err(format!("label {name} repeated"));
            }
            text = &text[equals + 1 + close + 1..];
            text = text.strip_prefix(',').unwrap_or(text);
        }
    }

    /// One histogram series: its (bound, cumulative count) buckets, `_sum` and `_count`.
    type Series = (Vec<(f64, f64)>, Option<f64>, Option<f64>);

    /// Histogram rules: per label set, buckets in increasing `le` with cumulative counts, the
    /// last `le="+Inf"`, equal to `_count`, and a `_sum`.
    fn check_family(name: &str, family: &Family) -> Result<(), String> {
        if family.kind != "histogram" {
            return Ok(());
        }
        let mut series: BTreeMap<String, Series> = BTreeMap::new();
        for sample in &family.samples {
            let mut labels = sample.labels.clone();
            let le = labels.remove("le");
            let key = format!("{labels:?}");
            let entry = series.entry(key).or_default();
            match sample.name.strip_prefix(name) {
                Some("_bucket") => {
                    let le = le.ok_or("a bucket without le")?;
                    let bound = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().map_err(|_| format!("bad le {le}"))?
                    };
                    entry.0.push((bound, sample.value));
                }
                Some("_sum") => entry.1 = Some(sample.value),
                Some("_count") => entry.2 = Some(sample.value),
                _ => return Err(format!("{} in histogram {name}", sample.name)),
            }
        }
        for (labels, (buckets, sum, count)) in series {
            let count = count.ok_or(format!("{name}{labels}: no _count"))?;
            sum.ok_or(format!("{name}{labels}: no _sum"))?;
            let last = buckets
                .last()
                .ok_or(format!("{name}{labels}: no buckets"))?;
            if last.0 != f64::INFINITY || last.1 != count {
                return Err(format!(
                    "{name}{labels}: last bucket {last:?}, count {count}"
                ));
            }
            if buckets
                .windows(2)
                .any(|w| w[0].0 >= w[1].0 || w[0].1 > w[1].1)
            {
                return Err(format!(
                    "{name}{labels}: buckets not increasing and cumulative: {buckets:?}"
                ));
            }
        }
        Ok(())
    }

    #[test]
    fn the_parser_rejects_what_prometheus_would() {
        let good = "# HELP m x\n# TYPE m gauge\nm{a=\"1\"} 2\n";
        assert!(parse(good).is_ok());
        for bad in [
            "m 1\n",
            "# TYPE m gauge\nm{a=1} 2\n",
            "# TYPE m gauge\nm{a=\"1\" 2\n",
            "# TYPE m gauge\n1m 2\n",
            "# TYPE m gauge\nm two\n",
            "# TYPE m gauge\nm 2",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
            "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n",
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}
