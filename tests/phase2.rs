//! Phase 2 over real sockets: weighted round robin, least connections, IP hash, consistent
//! hashing, their `X-Lb-Decision` explanations, and the offline simulator.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use md5::{Digest, Md5};

const WEIGHTED: &str = env!("CARGO_BIN_EXE_phase2_weighted");
const LEAST_CONN: &str = env!("CARGO_BIN_EXE_phase2_least_conn");
const IP_HASH: &str = env!("CARGO_BIN_EXE_phase2_ip_hash");
const LOADBALANCER: &str = env!("CARGO_BIN_EXE_loadbalancer");

/// Starts `bin` with one `--backend` per spec, then `extra` flags.
fn balancer(bin: &str, specs: &[String], extra: &[&str]) -> Balancer {
    let mut args: Vec<&str> = Vec::new();
    for spec in specs {
        args.extend(["--backend", spec.as_str()]);
    }
    args.extend_from_slice(extra);
    Balancer::start(bin, &args)
}

/// Demo backends named after `names`.
fn demo_backends(names: &[&str]) -> Vec<DemoBackend> {
    names.iter().map(|n| DemoBackend::start(n)).collect()
}

/// `--backend` values giving `backends` the chapter's weights.
fn weighted_specs(backends: &[DemoBackend], weights: [u32; 3]) -> Vec<String> {
    backends
        .iter()
        .zip(weights)
        .map(|(b, w)| format!("{}={w}", b.spec()))
        .collect()
}

/// The algorithm's part of a response's `X-Lb-Decision` header (the balancer ends the header
/// with `; chose NAME`).
fn decision(response: &Response) -> String {
    let line = response.header("x-lb-decision").unwrap_or("");
    let (reason, _chosen) = line.rsplit_once("; chose ").unwrap_or((line, ""));
    reason.to_string()
}

#[test]
fn weighted_gives_fifty_thirty_twenty_without_long_runs() {
    let backends = demo_backends(&["a", "b", "c"]);
    let specs = weighted_specs(&backends, [5, 3, 2]);
    let lb = balancer(WEIGHTED, &specs, &[]);
    let names = backends_hit(lb.addr, 100);
    let counts = count(&names);
    assert_eq!((counts["a"], counts["b"], counts["c"]), (50, 30, 20));
    assert!(names.windows(3).all(|w| !(w[0] == w[1] && w[1] == w[2])));
    assert_eq!(names[..10].join(""), "abcaabacba");
}

#[test]
fn weighted_explains_with_the_current_weights() {
    let backends = demo_backends(&["a", "b", "c"]);
    let specs = weighted_specs(&backends, [5, 3, 2]);
    let lb = balancer(WEIGHTED, &specs, &["--explain"]);
    let (a, b, c) = (backends[0].spec(), backends[1].spec(), backends[2].spec());
    let first = get(lb.addr, "/");
    assert_eq!(first.header("x-backend"), Some("a"));
    assert_eq!(
        decision(&first),
        format!("weighted: current weights {a}=5 {b}=3 {c}=2 -> {a} (largest), which drops by the total 10 to -5")
    );
    let second = get(lb.addr, "/");
    assert_eq!(second.header("x-backend"), Some("b"));
    assert_eq!(
        decision(&second),
        format!("weighted: current weights {a}=0 {b}=6 {c}=4 -> {b} (largest), which drops by the total 10 to -4")
    );
}

/// A backend that answers only once `open` is set, counting the requests it has received.
struct GatedBackend {
    raw: RawBackend,
    received: Arc<AtomicUsize>,
    open: Arc<AtomicBool>,
}

impl GatedBackend {
    fn start(name: &'static str) -> GatedBackend {
        let received = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicBool::new(false));
        let (counter, gate) = (Arc::clone(&received), Arc::clone(&open));
        let raw = RawBackend::start(move |stream| {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            while read_head(&mut reader) {
                counter.fetch_add(1, Ordering::SeqCst);
                assert!(
                    eventually(WAIT, || gate.load(Ordering::SeqCst)),
                    "gate opened"
                );
                let body = format!("Hello from {name}\n");
                let response = format!(
                    "HTTP/1.1 200 OK\r\nX-Backend: {name}\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if (&stream).write_all(response.as_bytes()).is_err() {
                    return;
                }
            }
        });
        GatedBackend {
            raw,
            received,
            open,
        }
    }

    fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }
}

/// Reads one request head (no body); false at end of stream.
fn read_head(reader: &mut impl BufRead) -> bool {
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return false,
            Ok(_) if line == "\r\n" => return true,
            Ok(_) => {}
        }
    }
}

/// Sends `GET /` on a new connection without waiting for the answer.
fn send_get(addr: std::net::SocketAddr) -> Client {
    let mut client = Client::connect(addr);
    client.send(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n");
    client
}

#[test]
fn least_conn_steers_new_requests_away_from_a_slow_backend() {
    let mut slow = DemoBackend::with_delay("slow", Duration::from_secs(8));
    let (a, b) = (GatedBackend::start("a"), GatedBackend::start("b"));
    let specs = [slow.spec(), a.raw.spec(), b.raw.spec()];
    let lb = balancer(LEAST_CONN, &specs, &["--explain", "--admin", "127.0.0.1:0"]);

    // While a and b hold their requests too, least connections spreads 15 requests evenly. Each
    // is sent once the one before is in flight: two picks at the same moment may see the same
    // counts (the count rises just after the pick) and choose the same backend.
    let in_flight = || -> u64 {
        let stats = stats_json(&lb);
        let backends = stats["backends"].as_array().unwrap();
        backends
            .iter()
            .map(|b| b["active_connections"].as_u64().unwrap())
            .sum()
    };
    let held: Vec<Client> = (0..15)
        .map(|sent| {
            let client = send_get(lb.addr);
            assert!(
                eventually(WAIT, || in_flight() == sent + 1),
                "request {sent} in flight"
            );
            client
        })
        .collect();
    assert!(
        eventually(WAIT, || a.received() == 5 && b.received() == 5),
        "a {} b {}: {}",
        a.received(),
        b.received(),
        lb.log()
    );
    a.open.store(true, Ordering::SeqCst);
    b.open.store(true, Ordering::SeqCst);
    let mut answered = 0;
    for mut client in held {
        // a and b answer within milliseconds of opening; the slow backend's five do not.
        client
            .stream
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        if let Some(response) = client.try_read_response("GET") {
            assert_ne!(response.header("x-backend"), Some("slow"));
            answered += 1;
        }
    }
    assert_eq!(
        answered, 10,
        "a and b answered theirs; slow still holds five"
    );

    // Now slow holds five requests in flight and a and b none: new requests avoid slow.
    let names: HashMap<&str, &str> = [(specs[1].as_str(), "a"), (specs[2].as_str(), "b")].into();
    for _ in 0..6 {
        let response = get(lb.addr, "/");
        let why = decision(&response);
        let served = response.header("x-backend").unwrap_or("none");
        assert!(served == "a" || served == "b", "{served}: {why}");
        assert!(why.starts_with("least-conn: in flight/weight "), "{why}");
        assert!(why.contains(&format!("{}=5/1", specs[0])), "{why}");
        let chosen = why
            .split(" -> ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .unwrap();
        assert_eq!(names[chosen], served, "{why}");
    }
    slow.stop();
}

#[test]
fn least_conn_releases_the_count_after_errors_and_timeouts() {
    let ok = DemoBackend::start("ok");
    // Reads the request and closes without answering: the balancer answers 502.
    let failing = RawBackend::start(|stream| {
        let mut reader = BufReader::new(stream);
        read_head(&mut reader);
    });
    // Reads the request and never answers: the balancer times out with 504.
    let hanging = RawBackend::start(|stream| {
        let mut reader = BufReader::new(stream);
        read_head(&mut reader);
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut reader, &mut rest);
    });
    let specs = [ok.spec(), failing.spec(), hanging.spec()];
    // Without retries, so that the failing backend's 502 reaches the client.
    let lb = balancer(
        LEAST_CONN,
        &specs,
        &["--explain", "--backend-timeout", "300ms", "--retries", "0"],
    );

    // Ties rotate: ok, failing, hanging, ok.
    assert_eq!(get(lb.addr, "/").status, 200);
    assert_eq!(get(lb.addr, "/").status, 502);
    assert_eq!(get(lb.addr, "/").status, 504);
    let response = get(lb.addr, "/");
    assert_eq!(response.header("x-backend"), Some("ok"));
    let [o, f, h] = &specs;
    assert_eq!(
        decision(&response),
        format!(
            "least-conn: in flight/weight {o}=0/1 {f}=0/1 {h}=0/1 -> {o} (fewest; ties go to \
             the first from {o}, which moves on each request)"
        )
    );
}

/// Which of `count` backends the chapter's formula sends `ip` to.
fn chapter_ip_hash(ip: &str, count: u128) -> usize {
    let digest: [u8; 16] = Md5::digest(ip.as_bytes()).into();
    (u128::from_be_bytes(digest) % count) as usize
}

#[test]
fn ip_hash_keeps_each_client_address_on_one_backend() {
    let backends = demo_backends(&["a", "b", "c"]);
    let specs: Vec<String> = backends.iter().map(DemoBackend::spec).collect();
    let lb = balancer(IP_HASH, &specs, &["--explain"]);
    for n in 1..=6 {
        let ip = format!("127.0.0.{n}");
        let expected = backends[chapter_ip_hash(&ip, 3)].name.as_str();
        let mut keep_alive = Client::connect_from(lb.addr, &ip);
        for _ in 0..3 {
            let fresh = Client::connect_from(lb.addr, &ip).get("/");
            assert_eq!(fresh.header("x-backend"), Some(expected), "{ip}");
            assert_eq!(
                keep_alive.get("/").header("x-backend"),
                Some(expected),
                "{ip}"
            );
        }
    }
    let response = Client::connect_from(lb.addr, "127.0.0.2").get("/");
    assert_eq!(response.header("x-backend"), Some("c"));
    assert_eq!(
        decision(&response),
        format!(
            "ip-hash: md5(\"127.0.0.2\") = ab416c39d509e72c5a0a7451a45bc65e, mod 3 = 2 -> {}",
            specs[2]
        )
    );
}

#[test]
fn ip_hash_moves_only_the_clients_of_a_backend_that_is_down() {
    let mut backends = demo_backends(&["a", "b", "c"]);
    let specs: Vec<String> = backends.iter().map(DemoBackend::spec).collect();
    let lb = balancer(IP_HASH, &specs, &["--explain"]);
    let clients: Vec<String> = (1..=8).map(|n| format!("127.0.0.{n}")).collect();
    backends[1].stop();
    for ip in &clients {
        let home = chapter_ip_hash(ip, 3);
        let response = Client::connect_from(lb.addr, ip).get("/");
        // The stopped backend refuses the connection, so its clients go on to the next one.
        let expected = if home == 1 {
            "c"
        } else {
            backends[home].name.as_str()
        };
        assert_eq!(response.header("x-backend"), Some(expected), "{ip}");
        if home == 1 {
            assert!(decision(&response).starts_with("ip-hash: md5("));
        }
    }
}

#[test]
fn consistent_hash_keeps_clients_and_explains_the_ring_point() {
    let backends = demo_backends(&["a", "b", "c"]);
    let specs: Vec<String> = backends.iter().map(DemoBackend::spec).collect();
    let names: HashMap<&str, &str> = specs
        .iter()
        .map(String::as_str)
        .zip(["a", "b", "c"])
        .collect();
    let lb = balancer(
        LOADBALANCER,
        &specs,
        &["--algorithm", "consistent-hash", "--explain"],
    );
    for n in 1..=6 {
        let ip = format!("127.0.0.{n}");
        let first = Client::connect_from(lb.addr, &ip).get("/");
        let why = decision(&first);
        assert!(
            why.starts_with(&format!("consistent-hash: md5(\"{ip}\") -> 0x")),
            "{why}"
        );
        assert!(why.contains("next of 480 ring points clockwise"), "{why}");
        let chosen = why.rsplit(" -> ").next().unwrap();
        assert_eq!(first.header("x-backend"), Some(names[chosen]), "{why}");
        for _ in 0..3 {
            let again = Client::connect_from(lb.addr, &ip).get("/");
            assert_eq!(again.header("x-backend"), first.header("x-backend"));
        }
    }
}

#[test]
fn loadbalancer_serves_every_algorithm_by_name() {
    let backends = demo_backends(&["a", "b"]);
    let specs: Vec<String> = backends.iter().map(DemoBackend::spec).collect();
    for algorithm in ALGORITHMS {
        let lb = balancer(
            LOADBALANCER,
            &specs,
            &["--algorithm", algorithm, "--explain"],
        );
        let response = get(lb.addr, "/");
        assert_eq!(response.status, 200);
        assert!(decision(&response).starts_with(&format!("{algorithm}: ")));
        assert!(lb.log().contains(&format!("{algorithm} over 2 backends")));
    }
}

#[test]
fn simulate_prints_the_table_without_any_network() {
    let output = Command::new(LOADBALANCER)
        .args([
            "simulate",
            "--requests",
            "20000",
            "--clients",
            "2000",
            "--weights",
            "5,3,2",
        ])
        .output()
        .expect("loadbalancer runs");
    assert!(output.status.success());
    let table = String::from_utf8_lossy(&output.stdout);
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} row in\n{table}"))
            .to_string()
    };
    assert!(row("weighted").contains("50.0%     30.0%     20.0%     1.00            2"));
    assert!(row("ip-hash").ends_with('%'));
    assert!(row("round-robin").trim_end().ends_with('-'));

    let help = Command::new(LOADBALANCER)
        .args(["simulate", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for column in [
        "max/min",
        "longest run",
        "moved if down",
        "moved if removed",
    ] {
        assert!(help.contains(column), "--help explains {column}");
    }
}
