//! Faults under load: a backend process killed while it holds a request, and a balancer left
//! alone. Idempotent requests go on to the next backend; a POST is never sent twice; an idle
//! balancer has nothing to warn about.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::*;

const PHASE1: &str = env!("CARGO_BIN_EXE_phase1_rr");
const BACKEND: &str = env!("CARGO_BIN_EXE_backend");

/// A demo backend in a process of its own, so that it can be killed as a crash would.
struct BackendProcess {
    child: Child,
    addr: SocketAddr,
}

impl BackendProcess {
    /// Starts `backend --name NAME --delay DELAY` on a free port and waits until it listens.
    fn start(name: &str, delay: &str) -> BackendProcess {
        let mut child = Command::new(BACKEND)
            .args(["--listen", "127.0.0.1:0", "--name", name, "--delay", delay])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("backend starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (found, address) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some((_, addr)) = line.split_once(" listening on ") {
                    let _ = found.send(addr.trim().to_string());
                }
            }
        });
        let addr = address
            .recv_timeout(WAIT)
            .expect("backend says where it listens")
            .parse()
            .expect("a socket address");
        BackendProcess { child, addr }
    }

    fn spec(&self) -> String {
        self.addr.to_string()
    }

    /// SIGKILL: the kernel closes its sockets, the request it held unanswered.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A balancer over a slow backend process (first in round-robin order) and a demo backend,
/// with statistics on and the decision header.
fn balancer_over(slow: &BackendProcess, other: &DemoBackend, extra: &[&str]) -> Balancer {
    let slow = slow.spec();
    let other = other.spec();
    let mut args = vec![
        "--backend",
        slow.as_str(),
        "--backend",
        other.as_str(),
        "--admin",
        "127.0.0.1:0",
        "--explain",
    ];
    args.extend_from_slice(extra);
    Balancer::start(PHASE1, &args)
}

/// Sends `request` on a thread of its own, kills `slow` once the balancer has sent the request
/// to it, and returns the response.
fn kill_while_in_flight(lb: &Balancer, slow: &mut BackendProcess, request: &[u8]) -> Response {
    let addr = lb.addr;
    let request = request.to_vec();
    let client = thread::spawn(move || {
        let mut client = Client::connect(addr);
        client.send(&request);
        client.read_response("GET")
    });
    let in_flight = eventually(WAIT, || {
        let backend = &stats_json(lb)["backends"][0];
        backend["requests"] == 1 && backend["active_connections"] == 1
    });
    assert!(in_flight, "the request reached the slow backend");
    slow.kill();
    client.join().expect("the client gets an answer")
}

#[test]
fn a_get_whose_backend_dies_mid_request_gets_the_next_backends_answer() {
    let mut slow = BackendProcess::start("slow", "30s");
    let other = DemoBackend::start("other");
    let lb = balancer_over(&slow, &other, &[]);

    let response = kill_while_in_flight(
        &lb,
        &mut slow,
        b"GET /page HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );

    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.header("x-backend"), Some("other"));
    let decision = response.header("x-lb-decision").unwrap_or_default();
    assert!(
        decision.contains(&format!("retry after {}", slow.spec())),
        "{decision}"
    );
    let stats = stats_json(&lb);
    assert_eq!(stats["retries"], 1, "{stats}");
    assert_eq!(stats["backends"][0]["errors"], 1, "{stats}");
    let metrics = get(lb.admin.unwrap(), "/metrics").text();
    assert!(metrics.contains("\nlb_retries_total 1\n"), "{metrics}");
    assert!(
        lb.log()
            .contains(&format!("{} failed before answering", slow.spec())),
        "the debug log names the retry:\n{}",
        lb.log()
    );
}

#[test]
fn a_post_whose_backend_dies_mid_request_is_not_sent_again() {
    let mut slow = BackendProcess::start("slow", "30s");
    let other = DemoBackend::start("other");
    let lb = balancer_over(&slow, &other, &[]);

    let response = kill_while_in_flight(
        &lb,
        &mut slow,
        b"POST /order HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    );

    assert_eq!(response.status, 502, "{}", response.text());
    let stats = stats_json(&lb);
    assert_eq!(stats["retries"], 0, "{stats}");
    assert_eq!(
        stats["backends"][1]["requests"], 0,
        "never sent twice: {stats}"
    );
}

#[test]
fn with_retries_0_a_get_whose_backend_dies_gets_502() {
    let mut slow = BackendProcess::start("slow", "30s");
    let other = DemoBackend::start("other");
    let lb = balancer_over(&slow, &other, &["--retries", "0"]);

    let response = kill_while_in_flight(
        &lb,
        &mut slow,
        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );

    assert_eq!(response.status, 502, "{}", response.text());
    assert_eq!(stats_json(&lb)["backends"][1]["requests"], 0);
}

#[test]
fn a_backend_timeout_is_not_retried() {
    let slow = BackendProcess::start("slow", "30s");
    let other = DemoBackend::start("other");
    let lb = balancer_over(&slow, &other, &["--backend-timeout", "300ms"]);

    let response = get(lb.addr, "/");

    assert_eq!(response.status, 504, "{}", response.text());
    let stats = stats_json(&lb);
    assert_eq!(stats["retries"], 0, "{stats}");
    assert_eq!(stats["backends"][1]["requests"], 0, "{stats}");
}

#[test]
fn an_idle_balancer_does_not_warn() {
    let backend = DemoBackend::start("a");
    let mut lb = Balancer::start(
        PHASE1,
        &["--backend", &backend.spec(), "--client-timeout", "200ms"],
    );
    // A client that connects and says nothing is closed quietly after the client timeout.
    let mut quiet = Client::connect(lb.addr);
    assert!(eventually(WAIT, || quiet.is_closed()));
    // Nothing to wait for but time: six client timeouts with nobody connecting. Before the fix,
    // `accept` timed out and warned once per client timeout.
    thread::sleep(Duration::from_millis(1200));
    assert_eq!(get(lb.addr, "/").status, 200);
    lb.interrupt();
    assert_eq!(lb.wait_exit(WAIT), Some(0));
    let log = lb.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
        .collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
}
