//! Protecting the backends (issue 32): backups, the panic threshold, slow start, and the return
//! of a backend that failed requests took out as soon as its active checks pass, tested over
//! real sockets against the `loadbalancer` binary.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const LB: &str = env!("CARGO_BIN_EXE_loadbalancer");

/// A balancer over `primaries` (and `backups`) with `extra` flags, statistics on.
fn start(primaries: &[String], backups: &[String], extra: &[&str]) -> Balancer {
    let mut args = vec!["--admin".to_string(), "127.0.0.1:0".to_string()];
    for spec in primaries {
        args.extend(["--backend".to_string(), spec.clone()]);
    }
    for spec in backups {
        args.extend(["--backup".to_string(), spec.clone()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Balancer::start(LB, &args)
}

/// Backends whose `/health` each follow their own [`HealthControl`].
fn controlled_backends(names: &[&str]) -> (Vec<Arc<HealthControl>>, Vec<RawBackend>) {
    let controls: Vec<Arc<HealthControl>> = names.iter().map(|_| Arc::default()).collect();
    let backends = names
        .iter()
        .zip(&controls)
        .map(|(name, control)| controlled(name, control))
        .collect();
    (controls, backends)
}

const QUICK_CHECKS: [&str; 8] = [
    "--health-check",
    "active",
    "--health-interval",
    "100ms",
    "--rise",
    "1",
    "--fall",
    "1",
];

#[test]
fn backups_take_traffic_only_while_no_primary_is_in_rotation() {
    let (controls, primaries) = controlled_backends(&["p1", "p2"]);
    let backup = DemoBackend::start("backup");
    let specs: Vec<String> = primaries.iter().map(RawBackend::spec).collect();
    let mut flags = QUICK_CHECKS.to_vec();
    flags.push("--explain");
    let lb = start(&specs, &[backup.spec()], &flags);
    assert!(!backends_hit(lb.addr, 12).contains(&"backup".to_string()));

    for control in &controls {
        control.status.store(500, Ordering::SeqCst);
    }
    assert!(
        eventually(WAIT, || backends_hit(lb.addr, 6)
            .iter()
            .all(|b| b == "backup")),
        "every request on the backup once no primary is in rotation"
    );
    let decision = get(lb.addr, "/")
        .header("x-lb-decision")
        .unwrap_or_default()
        .to_string();
    assert!(
        decision.contains("no primary backend in rotation: a backup"),
        "{decision}"
    );
    let stats = stats_json(&lb);
    assert_eq!(stats["backends"][2]["backup"], true);
    assert_eq!(stats["backends"][0]["backup"], false);
    assert!(get(lb.admin.unwrap(), "/stats").text().contains("(backup)"));

    controls[1].status.store(0, Ordering::SeqCst);
    assert!(
        eventually(WAIT, || backends_hit(lb.addr, 6).iter().all(|b| b == "p2")),
        "back to the primary that recovered"
    );
}

#[test]
fn below_the_panic_threshold_every_backend_takes_requests_again() {
    let (controls, backends) = controlled_backends(&["a", "b", "c"]);
    let specs: Vec<String> = backends.iter().map(RawBackend::spec).collect();
    let mut flags = QUICK_CHECKS.to_vec();
    flags.extend(["--panic-threshold", "50"]);
    let lb = start(&specs, &[], &flags);
    // Two of three fail their checks (but still answer requests): one in three is in rotation,
    // below 50 %, so all three take requests.
    controls[0].status.store(500, Ordering::SeqCst);
    controls[1].status.store(500, Ordering::SeqCst);
    // Panic starts with the first request that finds too few in rotation.
    let in_panic = |lb: &Balancer| {
        get(lb.addr, "/");
        stats_json(lb)["panic"]["active"] == true
    };
    assert!(eventually(WAIT, || in_panic(&lb)));
    let hits = count(&backends_hit(lb.addr, 30));
    assert_eq!(hits.len(), 3, "all three in panic: {hits:?}");
    let metrics = get(lb.admin.unwrap(), "/metrics").text();
    assert!(metrics.contains("\nlb_panic 1\n"), "{metrics}");
    assert!(get(lb.admin.unwrap(), "/stats").text().contains("panic:"));

    // One recovers: two of three, at or above 50 %: the unhealthy one is left out again.
    controls[1].status.store(0, Ordering::SeqCst);
    assert!(eventually(WAIT, || !in_panic(&lb)));
    assert!(!backends_hit(lb.addr, 12).contains(&"a".to_string()));
    let events = stats_json(&lb)["events"].to_string();
    assert!(
        events.contains("panic: 1 of 3 primary backends in rotation"),
        "{events}"
    );
    assert!(events.contains("panic over: 2 of 3"), "{events}");
    assert!(stats_json(&lb)["panic"]["seconds_total"].as_f64().unwrap() > 0.0);
}

/// The share of requests `b` answers in each quarter of `over`, from sequential requests.
fn shares_over(addr: SocketAddr, over: Duration) -> Vec<f64> {
    let started = Instant::now();
    let mut buckets = [(0usize, 0usize); 4];
    let mut client = Client::connect(addr);
    while started.elapsed() < over {
        let quarter = (started.elapsed().as_secs_f64() / over.as_secs_f64() * 4.0) as usize;
        let on_b = backend_of(&client.get("/")) == "b";
        let bucket = &mut buckets[quarter.min(3)];
        bucket.0 += usize::from(on_b);
        bucket.1 += 1;
    }
    buckets
        .iter()
        .map(|&(b, all)| b as f64 / all.max(1) as f64)
        .collect()
}

#[test]
fn slow_start_ramps_a_returning_backend_up_to_its_share() {
    let backends = [DemoBackend::start("a"), DemoBackend::start("b")];
    let specs: Vec<String> = backends.iter().map(DemoBackend::spec).collect();
    for algorithm in ["weighted", "least-conn"] {
        let lb = start(
            &specs,
            &[],
            &[
                "--algorithm",
                algorithm,
                "--health-check",
                "none",
                "--slow-start",
                "2s",
            ],
        );
        let post_with = |action: &str, body: &str| {
            admin_post(lb.admin.unwrap(), &backends[1].spec(), action, body)
        };
        post_with("maint", "");
        post_with("ready", "");
        let shares = shares_over(lb.addr, Duration::from_secs(2));
        // Full share: one in two. Near nothing at first, most of it by the last quarter.
        assert!(shares[0] < 0.2, "{algorithm}: {shares:?}");
        assert!(shares[3] > 0.3, "{algorithm}: {shares:?}");
        assert!(
            shares[0] < shares[2] && shares[1] < shares[3],
            "{algorithm}: {shares:?}"
        );
        let after = count(&backends_hit(lb.addr, 20));
        assert_eq!(after["b"], 10, "{algorithm}: the full share after the ramp");
        // A weight given back after 0 ramps too.
        post_with("weight", "weight=0");
        post_with("weight", "weight=1");
        let early = shares_over(lb.addr, Duration::from_millis(400));
        assert!(early[0] < 0.2, "{algorithm}, weight back: {early:?}");
    }
}

/// `POST /backends/{backend}/{action}` with `body` on the admin listener at `admin`; must answer 200.
fn admin_post(admin: SocketAddr, backend: &str, action: &str, body: &str) {
    let mut client = Client::connect(admin);
    let length = body.len();
    client.send(
        format!(
            "POST /backends/{backend}/{action} HTTP/1.1\r\nHost: x\r\n\
             Content-Length: {length}\r\n\r\n{body}"
        )
        .as_bytes(),
    );
    assert_eq!(
        client.read_response("POST").status,
        200,
        "{action} {backend}"
    );
}

/// A demo backend at `addr` again (after it was stopped), as a restart brings it back.
fn restart_at(addr: SocketAddr, name: &str, delay: Duration) -> lb::demo::DemoBackend {
    let deadline = Instant::now() + WAIT;
    loop {
        match TcpListener::bind(addr) {
            Ok(listener) => return lb::demo::start(listener, name.to_string(), delay).unwrap(),
            Err(err) if Instant::now() > deadline => panic!("{addr} stays taken: {err}"),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// GET and POST clients running until [`Load::finish`].
struct Load {
    stop: Arc<AtomicBool>,
    gets: Vec<thread::JoinHandle<(usize, usize)>>,
    posts: Vec<thread::JoinHandle<(usize, usize)>>,
}

impl Load {
    fn start(addr: SocketAddr, gets: usize, posts: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        Load {
            gets: clients(addr, gets, false, &stop),
            posts: clients(addr, posts, true, &stop),
            stop,
        }
    }

    /// Stops the clients: (requests, failures) of the GETs, then of the POSTs.
    fn finish(self) -> ((usize, usize), (usize, usize)) {
        self.stop.store(true, Ordering::SeqCst);
        let total = |handles: Vec<thread::JoinHandle<(usize, usize)>>| {
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
        };
        (total(self.gets), total(self.posts))
    }
}

/// Keep-alive clients (GETs, or POSTs with a small body) until `stop`: (requests, failures).
fn clients(
    addr: SocketAddr,
    n: usize,
    post: bool,
    stop: &Arc<AtomicBool>,
) -> Vec<thread::JoinHandle<(usize, usize)>> {
    (0..n)
        .map(|_| {
            let stop = Arc::clone(stop);
            thread::spawn(move || {
                let (mut sent, mut failed) = (0, 0);
                let mut client = Client::connect(addr);
                while !stop.load(Ordering::SeqCst) && sent < 100_000 {
                    let request: &[u8] = if post {
                        b"POST /form HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
                    } else {
                        b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
                    };
                    client.send(request);
                    sent += 1;
                    match client.try_read_response(if post { "POST" } else { "GET" }) {
                        Some(response) if response.status == 200 => {}
                        Some(_) => failed += 1,
                        None => {
                            failed += 1;
                            client = Client::connect(addr);
                        }
                    }
                }
                (sent, failed)
            })
        })
        .collect()
}

/// A line in the test's output (shown with `--nocapture`).
fn log_line(line: &str) {
    println!("{line}");
}

/// How long the rolling restarts' backends take to answer, like a small application.
const DELAY: Duration = Duration::from_millis(20);

/// Backends a, b and c answering after [`DELAY`], and their addresses.
fn three_backends() -> (Vec<DemoBackend>, Vec<String>) {
    let backends: Vec<DemoBackend> = ["a", "b", "c"]
        .iter()
        .map(|n| DemoBackend::with_delay(n, DELAY))
        .collect();
    let specs = backends.iter().map(DemoBackend::spec).collect();
    (backends, specs)
}

/// The rolling restart: three backends answering in 20 ms, 16 keep-alive GET clients and
/// 8 POST clients, each backend stopped and started again a second later, four seconds apart.
#[test]
fn a_rolling_restart_fails_almost_nothing_with_a_panic_threshold() {
    let (mut backends, specs) = three_backends();
    let lb = start(
        &specs,
        &[],
        &["--panic-threshold", "50", "--health-interval", "1s"],
    );
    let load = Load::start(lb.addr, 16, 8);

    let mut restarted = Vec::new();
    for (index, backend) in backends.iter_mut().enumerate() {
        thread::sleep(Duration::from_secs(1)); // the load runs meanwhile
        let (addr, name) = (backend.addr, backend.name.clone());
        backend.stop();
        thread::sleep(Duration::from_secs(1)); // down for a second
        let started = Instant::now();
        restarted.push(restart_at(addr, &name, DELAY));
        // Back within its --rise (2) checks a second apart, well before the passive
        // --fail-timeout (10 s) would have let it.
        let healthy = || stats_json(&lb)["backends"][index]["healthy"] == true;
        assert!(
            eventually(Duration::from_secs(5), healthy),
            "{name} back within 5 s"
        );
        log_line(&format!(
            "{name} back {:?} after its restart",
            started.elapsed()
        ));
        thread::sleep(Duration::from_secs(2).saturating_sub(started.elapsed()));
    }
    thread::sleep(Duration::from_secs(1));
    let ((get_sent, get_failed), (post_sent, post_failed)) = load.finish();
    log_line(&format!(
        "GET {get_failed} of {get_sent} failed, POST {post_failed} of {post_sent}"
    ));
    assert!(
        get_failed * 200 < get_sent && post_failed * 200 < post_sent,
        "GET {get_failed} of {get_sent} failed, POST {post_failed} of {post_sent}; log:\n{}",
        lb.log()
    );
    assert!(stats_json(&lb)["backends"]
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["healthy"] == true));
}

/// The way the docs give for a planned rolling restart, at the default checks: each backend in
/// turn drained, restarted once nothing is in flight on it, and made ready again, under GET and
/// POST load. Nothing fails (with restarts alone, most requests failed at these defaults).
#[test]
fn a_rolling_restart_with_drain_fails_nothing_at_the_default_checks() {
    let (mut backends, specs) = three_backends();
    let lb = start(&specs, &[], &[]);
    let admin = lb.admin.unwrap();
    let load = Load::start(lb.addr, 8, 4);

    let mut restarted = Vec::new();
    for (index, backend) in backends.iter_mut().enumerate() {
        thread::sleep(Duration::from_millis(500)); // the load runs meanwhile
        let (addr, name) = (backend.addr, backend.name.clone());
        admin_post(admin, &specs[index], "drain", "");
        let idle = || stats_json(&lb)["backends"][index]["in_flight"] == 0;
        assert!(eventually(WAIT, idle), "{name}: nothing in flight");
        backend.stop();
        thread::sleep(Duration::from_millis(300)); // down while it is deployed
        restarted.push(restart_at(addr, &name, DELAY));
        admin_post(admin, &specs[index], "ready", "");
        let healthy = || stats_json(&lb)["backends"][index]["healthy"] == true;
        assert!(eventually(WAIT, healthy), "{name} in rotation again");
    }
    thread::sleep(Duration::from_millis(500));
    let ((get_sent, get_failed), (post_sent, post_failed)) = load.finish();
    assert!(
        get_sent > 100 && post_sent > 50,
        "{get_sent} GET, {post_sent} POST"
    );
    assert_eq!(
        (get_failed, post_failed),
        (0, 0),
        "of {get_sent} GET and {post_sent} POST; log:\n{}",
        lb.log()
    );
    let requests: Vec<u64> = (0..3)
        .map(|i| stats_json(&lb)["backends"][i]["requests"].as_u64().unwrap())
        .collect();
    assert!(
        requests.iter().all(|&n| n > 20),
        "every backend served: {requests:?}"
    );
}
