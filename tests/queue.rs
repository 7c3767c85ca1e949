//! The connection limit and its queue (`--backend-max-conns`, `--queue-timeout`), over real
//! sockets: a backend at its limit never sees more requests at once, those waiting are served
//! in order of arrival, a wait that runs out is a 503 with `Retry-After`, a client that leaves
//! the queue frees its place, and an algorithm that may choose sends requests to a backend with
//! room instead of queuing them.
//!
//! The backends here hold every request until the test opens their gate, so that who is at the
//! backend and who waits is known at each step; each step waits for the balancer's own word
//! (`/stats.json`) or the backend's, never for a fixed time.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{
    eventually, get, stats_json, Balancer, Client, RawBackend, Response, ServerConn, WAIT,
};

const LB: &str = env!("CARGO_BIN_EXE_loadbalancer");

/// A switch the test opens once; until then the backend holds every request it received.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }

    /// Waits until the gate opens, for [`WAIT`] at most.
    fn wait(&self) {
        let open = self.open.lock().unwrap();
        drop(self.opened.wait_timeout_while(open, WAIT, |open| !*open));
    }
}

/// What a held backend saw: the paths in the order they arrived, and how many requests it had
/// at once, now and at most.
#[derive(Default)]
struct Seen {
    paths: Mutex<Vec<String>>,
    now: AtomicUsize,
    most: AtomicUsize,
    gate: Gate,
    /// Answers go out one at a time, `spacing` apart, once the gate is open.
    turn: Mutex<()>,
}

/// A backend that holds each request until its gate opens, then answers them one at a time,
/// `spacing` apart, with `X-Backend: NAME` and the request's path as the body.
struct Held {
    backend: RawBackend,
    seen: Arc<Seen>,
}

impl Held {
    fn start(name: &str, spacing: Duration) -> Held {
        let seen = Arc::new(Seen::default());
        let (name, shared) = (name.to_string(), Arc::clone(&seen));
        let backend = RawBackend::start(move |stream| {
            let mut conn = ServerConn::new(stream);
            while let Some(request) = conn.read_request() {
                let now = shared.now.fetch_add(1, Ordering::SeqCst) + 1;
                shared.most.fetch_max(now, Ordering::SeqCst);
                shared.paths.lock().unwrap().push(request.path.clone());
                shared.gate.wait();
                let turn = shared.turn.lock().unwrap();
                thread::sleep(spacing);
                drop(turn);
                // No longer in flight before the answer goes: the balancer's next request may
                // come as soon as it has it.
                shared.now.fetch_sub(1, Ordering::SeqCst);
                conn.respond(
                    200,
                    &format!("X-Backend: {name}\r\n"),
                    request.path.as_bytes(),
                );
            }
        });
        Held { backend, seen }
    }

    fn spec(&self) -> String {
        self.backend.spec()
    }

    fn paths(&self) -> Vec<String> {
        self.seen.paths.lock().unwrap().clone()
    }

    fn most_at_once(&self) -> usize {
        self.seen.most.load(Ordering::SeqCst)
    }

    fn open(&self) {
        self.seen.gate.open();
    }

    /// Waits until the backend has received `n` requests.
    fn until_received(&self, n: usize) {
        let received = eventually(WAIT, || self.paths().len() >= n);
        assert!(
            received,
            "{n} requests never reached the backend: {:?}",
            self.paths()
        );
    }
}

/// `GET path` on a connection of its own, answered on a thread of its own.
fn request(addr: SocketAddr, path: &str) -> JoinHandle<(Response, Duration)> {
    let path = path.to_string();
    thread::spawn(move || {
        let started = Instant::now();
        let response = get(addr, &path);
        (response, started.elapsed())
    })
}

/// The `queue` of backend `index` in `/stats.json`.
fn queue_of(lb: &Balancer, index: usize) -> serde_json::Value {
    stats_json(lb)["backends"][index]["queue"].clone()
}

/// Waits until backend `index` has `n` requests waiting in its queue.
fn until_queued(lb: &Balancer, index: usize, n: u64) {
    let queued = eventually(WAIT, || queue_of(lb, index)["length"] == n);
    assert!(queued, "never {n} in the queue: {}", queue_of(lb, index));
}

/// A `loadbalancer` over `backends` with no health checks (they would queue too), statistics
/// on, and `flags`.
fn balancer(backends: &[String], flags: &[&str]) -> Balancer {
    let mut args = vec!["--health-check", "none", "--admin", "127.0.0.1:0"];
    for spec in backends {
        args.extend(["--backend", spec]);
    }
    args.extend(flags);
    Balancer::start(LB, &args)
}

/// The admin listener's answer to `GET path`, as text.
fn admin_page(lb: &Balancer, path: &str) -> String {
    get(lb.admin.expect("admin is on"), path).text()
}

#[test]
fn a_backend_at_its_limit_never_sees_more_and_answers_everyone_in_order_of_arrival() {
    let held = Held::start("small", Duration::from_millis(50));
    let lb = balancer(
        &[held.spec()],
        &["--backend-max-conns", "2", "--queue-timeout", "60s"],
    );
    // Each request arrives before the next is sent: the first two at the backend, the others
    // in the queue.
    let clients: Vec<_> = (0..20u64)
        .map(|i| {
            let client = request(lb.addr, &format!("/{i}"));
            if i < 2 {
                held.until_received(i as usize + 1);
            } else {
                until_queued(&lb, 0, i - 1);
            }
            client
        })
        .collect();
    let stats = stats_json(&lb);
    assert_eq!(stats["backends"][0]["in_flight"], 2);
    assert_eq!(stats["backends"][0]["queue"]["max_conns"], 2);
    assert_eq!(stats["queue"]["length"], 18, "the total");
    let metrics = admin_page(&lb, "/metrics");
    let line = format!("lb_queue_length{{backend=\"{}\"}} 18\n", held.spec());
    assert!(metrics.contains(&line), "{metrics}");
    assert!(admin_page(&lb, "/stats").contains("queue 18 &middot;"));

    held.open();
    for (i, client) in clients.into_iter().enumerate() {
        let (response, _) = client.join().unwrap();
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(response.text(), format!("/{i}"));
    }
    let sent: Vec<String> = (0..20).map(|i| format!("/{i}")).collect();
    assert_eq!(held.paths(), sent, "served in order of arrival");
    assert_eq!(held.most_at_once(), 2, "never more than the limit");
    let queue = queue_of(&lb, 0);
    assert_eq!(
        (&queue["length"], &queue["queued"]),
        (&0.into(), &18.into())
    );
    assert_eq!(queue["timeouts"], 0);
    assert!(queue["wait_ms_p50"].as_f64().unwrap() > 0.0, "{queue}");
}

#[test]
fn past_the_queue_timeout_the_excess_gets_503_with_retry_after() {
    let held = Held::start("small", Duration::ZERO);
    let lb = balancer(
        &[held.spec()],
        &["--backend-max-conns", "2", "--queue-timeout", "300ms"],
    );
    let first: Vec<_> = (0..2).map(|i| request(lb.addr, &format!("/{i}"))).collect();
    held.until_received(2);
    let excess: Vec<_> = (2..5).map(|i| request(lb.addr, &format!("/{i}"))).collect();
    for client in excess {
        let (response, waited) = client.join().unwrap();
        assert_eq!(response.status, 503, "{}", response.text());
        assert_eq!(response.header("retry-after"), Some("1"));
        assert!(
            response.text().contains("at its limit of 2 connections"),
            "{}",
            response.text()
        );
        assert!(waited >= Duration::from_millis(250), "{waited:?}");
    }
    held.open();
    for client in first {
        assert_eq!(client.join().unwrap().0.status, 200);
    }
    let mut reached = held.paths();
    reached.sort();
    assert_eq!(
        reached,
        ["/0", "/1"],
        "the excess never reached the backend"
    );
    let queue = queue_of(&lb, 0);
    assert_eq!(
        (&queue["timeouts"], &queue["length"]),
        (&3.into(), &0.into())
    );
    let metrics = admin_page(&lb, "/metrics");
    let line = format!("lb_queue_timeouts_total{{backend=\"{}\"}} 3\n", held.spec());
    assert!(metrics.contains(&line), "{metrics}");
}

#[test]
fn a_client_that_leaves_the_queue_frees_its_place() {
    let held = Held::start("small", Duration::ZERO);
    let lb = balancer(
        &[held.spec()],
        &["--backend-max-conns", "1", "--queue-timeout", "60s"],
    );
    let first = request(lb.addr, "/first");
    held.until_received(1);
    let mut leaving = Client::connect(lb.addr);
    leaving.send(b"GET /left HTTP/1.1\r\nHost: test\r\n\r\n");
    until_queued(&lb, 0, 1);
    let next = request(lb.addr, "/next");
    until_queued(&lb, 0, 2);

    drop(leaving);
    let left = Instant::now();
    until_queued(&lb, 0, 1);
    assert!(
        left.elapsed() < Duration::from_secs(2),
        "{:?}",
        left.elapsed()
    );
    held.open();
    assert_eq!(first.join().unwrap().0.status, 200);
    let (response, _) = next.join().unwrap();
    assert_eq!(
        (response.status, response.text()),
        (200, "/next".to_string())
    );
    assert_eq!(
        held.paths(),
        ["/first", "/next"],
        "the departed request never went out"
    );
    assert_eq!(queue_of(&lb, 0)["timeouts"], 0);
    assert!(lb.log().contains("went away while queued"), "{}", lb.log());
}

/// With round robin or weighted round robin, `x` holds the one request its limit allows; the
/// next requests all go to `y`, none waits.
fn a_full_backend_gives_way(algorithm: &str, x_weight: &str) {
    let (x, y) = (
        Held::start("x", Duration::ZERO),
        Held::start("y", Duration::ZERO),
    );
    y.open();
    let x_spec = format!("{}{x_weight}", x.spec());
    let lb = balancer(
        &[x_spec, y.spec()],
        &["--algorithm", algorithm, "--backend-max-conns", "1"],
    );
    let held = request(lb.addr, "/held");
    x.until_received(1);
    for _ in 0..4 {
        let response = get(lb.addr, "/");
        assert_eq!(response.header("x-backend"), Some("y"), "{algorithm}");
    }
    assert_eq!(
        stats_json(&lb)["queue"]["queued"],
        0,
        "{algorithm}: nobody waited"
    );
    x.open();
    assert_eq!(held.join().unwrap().0.status, 200);
}

#[test]
fn round_robin_and_weighted_send_a_full_backends_requests_to_one_with_room() {
    a_full_backend_gives_way("round-robin", "");
    a_full_backend_gives_way("weighted", "=5");
}

#[test]
fn least_connections_passes_over_a_full_backend_and_queues_only_when_all_are_full() {
    let (x, y) = (
        Held::start("x", Duration::ZERO),
        Held::start("y", Duration::ZERO),
    );
    // By its load (in flight per weight) least connections would always prefer x.
    let lb = balancer(
        &[format!("{}=100", x.spec()), y.spec()],
        &["--algorithm", "least-conn", "--backend-max-conns", "2"],
    );
    let mut clients = Vec::new();
    for (i, (backend, received)) in [(&x, 1), (&y, 1), (&x, 2), (&y, 2)].into_iter().enumerate() {
        clients.push(request(lb.addr, &format!("/{i}")));
        backend.until_received(received);
    }
    // The fourth went to y although x was less loaded: x was full. Now both are full, and the
    // fifth waits in x's queue.
    clients.push(request(lb.addr, "/4"));
    until_queued(&lb, 0, 1);
    assert_eq!(queue_of(&lb, 1)["length"], 0);
    x.open();
    y.open();
    let last = clients.pop().unwrap().join().unwrap().0;
    assert_eq!(last.header("x-backend"), Some("x"));
    for client in clients {
        assert_eq!(client.join().unwrap().0.status, 200);
    }
    assert!(x.most_at_once() <= 2 && y.most_at_once() <= 2);
}

#[test]
fn ip_hash_waits_in_its_own_backends_queue() {
    let (x, y) = (
        Held::start("x", Duration::ZERO),
        Held::start("y", Duration::ZERO),
    );
    let lb = balancer(
        &[x.spec(), y.spec()],
        &["--algorithm", "ip-hash", "--backend-max-conns", "1"],
    );
    let first = request(lb.addr, "/first");
    assert!(eventually(WAIT, || x.paths().len() + y.paths().len() == 1));
    let (own, other, index) = if x.paths().is_empty() {
        (&y, &x, 1)
    } else {
        (&x, &y, 0)
    };
    let second = request(lb.addr, "/second");
    until_queued(&lb, index, 1);
    assert!(other.paths().is_empty(), "the client stays on its backend");
    own.open();
    other.open();
    for client in [first, second] {
        assert_eq!(client.join().unwrap().0.status, 200);
    }
    assert_eq!(own.paths(), ["/first", "/second"]);
}

#[test]
fn a_backend_of_the_configuration_file_may_have_a_limit_of_its_own() {
    let (x, y) = (
        Held::start("x", Duration::ZERO),
        Held::start("y", Duration::ZERO),
    );
    let path = std::env::temp_dir().join(format!("lb-queue-{}.toml", std::process::id()));
    let text = format!(
        "backend-max-conns = 5\n\n[[backend]]\naddress = \"{}\"\nmax_conns = 1\n\n\
         [[backend]]\naddress = \"{}\"\n",
        x.spec(),
        y.spec()
    );
    std::fs::write(&path, text).unwrap();
    let lb = balancer(&[], &["--config", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(queue_of(&lb, 0)["max_conns"], 1, "its own");
    assert_eq!(queue_of(&lb, 1)["max_conns"], 5, "everyone's");
}
