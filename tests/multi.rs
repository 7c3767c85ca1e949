//! Beyond one machine, over real sockets: two `loadbalancer` instances that agree (signed sticky
//! cookies, IP hash and consistent hashing), and a takeover with `--reuse-port` in which no
//! request fails.

mod common;

use std::io::Write;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::*;

const LOADBALANCER: &str = env!("CARGO_BIN_EXE_loadbalancer");
const PHASE4: &str = env!("CARGO_BIN_EXE_phase4_sticky");

const SECRET: &str = "correct horse battery staple";

/// Three demo backends, `a`, `b` and `c`.
fn three_backends() -> Vec<DemoBackend> {
    ["a", "b", "c"]
        .iter()
        .map(|n| DemoBackend::start(n))
        .collect()
}

/// `--backend` flags for `backends`, then `extra`.
fn args<'a>(specs: &'a [String], extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = Vec::new();
    for spec in specs {
        args.extend(["--backend", spec.as_str()]);
    }
    args.extend_from_slice(extra);
    args
}

fn specs(backends: &[DemoBackend]) -> Vec<String> {
    backends.iter().map(DemoBackend::spec).collect()
}

/// `loadbalancer --sticky --sticky-secret SECRET` over `backends`.
fn signed(backends: &[DemoBackend], secret: &str, extra: &[&str]) -> Balancer {
    let specs = specs(backends);
    let flags = [&["--sticky", "--sticky-secret", secret, "--explain"], extra].concat();
    Balancer::start(LOADBALANCER, &args(&specs, &flags))
}

/// The cookie value of the balancer's `Set-Cookie`, if any.
fn cookie(response: &Response) -> Option<String> {
    session_cookie(response)
}

fn with_cookie(addr: std::net::SocketAddr, value: &str) -> Response {
    get_with(addr, &format!("Cookie: SESSION_ID={value}\r\n"))
}

fn decision(response: &Response) -> String {
    response.header("x-lb-decision").unwrap_or("").to_string()
}

#[test]
fn a_signed_cookie_from_one_instance_is_honoured_by_the_other_and_after_a_restart() {
    let backends = three_backends();
    let a = signed(&backends, SECRET, &[]);
    // The second instance reads the secret from the environment, as the README advises.
    let specs = specs(&backends);
    let b = Balancer::start_with(
        LOADBALANCER,
        &args(&specs, &["--sticky", "--explain"]),
        |command| {
            command.env("LB_STICKY_SECRET", SECRET);
        },
    );
    // Sessions that began on each of the three backends (round robin hands them out in turn).
    for _ in 0..3 {
        let first = get(a.addr, "/");
        let value = cookie(&first).expect("a new session gets a cookie");
        assert!(value.starts_with("v1."), "{value}");
        let home = backend_of(&first);
        for i in 0..30 {
            let response = with_cookie(b.addr, &value);
            assert_eq!(
                backend_of(&response),
                home,
                "request {i} through the other instance"
            );
            assert!(
                cookie(&response).is_none(),
                "a fresh cookie is not reissued"
            );
            assert!(
                decision(&response).starts_with(&format!(
                    "sticky hit: signed cookie names {}",
                    backends.iter().find(|x| x.name == home).unwrap().spec()
                )),
                "{}",
                decision(&response)
            );
        }
    }
    // A restarted instance forgets nothing: there was nothing to remember.
    let first = get(a.addr, "/");
    let value = cookie(&first).unwrap();
    drop(a);
    let restarted = signed(&backends, SECRET, &[]);
    for _ in 0..5 {
        assert_eq!(
            backend_of(&with_cookie(restarted.addr, &value)),
            backend_of(&first)
        );
    }
}

#[test]
fn a_cookie_signed_with_another_secret_or_edited_gets_a_fresh_session() {
    let backends = three_backends();
    let ours = signed(&backends, SECRET, &[]);
    let theirs = signed(&backends, "another secret of enough length", &[]);
    let foreign = cookie(&get(theirs.addr, "/")).unwrap();
    let response = with_cookie(ours.addr, &foreign);
    let fresh = cookie(&response).expect("a foreign cookie is replaced");
    assert_ne!(fresh, foreign);
    assert!(
        decision(&response).starts_with("sticky miss: bad signature"),
        "{}",
        decision(&response)
    );

    // One character changed anywhere (the backend id, the expiry, the signature) is no cookie.
    let good = cookie(&get(ours.addr, "/")).unwrap();
    for position in [3, 12, good.len() - 1] {
        let mut edited = good.clone().into_bytes();
        edited[position] = if edited[position] == b'1' { b'2' } else { b'1' };
        let edited = String::from_utf8(edited).unwrap();
        let response = with_cookie(ours.addr, &edited);
        assert!(cookie(&response).is_some(), "{edited} was honoured");
        assert!(
            decision(&response).starts_with("sticky miss:"),
            "{edited}: {}",
            decision(&response)
        );
    }
    // Cookie-less clients and rejected cookies alike are balanced in turn: the rejected ones
    // are not all sent to one backend.
    let hits: Vec<String> = (0..6)
        .map(|_| backend_of(&with_cookie(ours.addr, &foreign)))
        .collect();
    assert_eq!(count(&hits).len(), 3, "{hits:?}");
}

#[test]
fn a_cookie_naming_a_backend_that_is_down_moves_and_names_the_new_one() {
    let mut backends = three_backends();
    let lb = signed(&backends, SECRET, &["--health-check", "none"]);
    let first = get(lb.addr, "/");
    let old = cookie(&first).unwrap();
    let home = backend_of(&first);
    backends.iter_mut().find(|b| b.name == home).unwrap().stop();

    let moved = with_cookie(lb.addr, &old);
    assert_eq!(moved.status, 200);
    let new_home = backend_of(&moved);
    assert_ne!(new_home, home);
    let new = cookie(&moved).expect("the moved session gets a cookie naming its new backend");
    assert!(
        decision(&moved).contains("which is unavailable"),
        "{}",
        decision(&moved)
    );
    for _ in 0..10 {
        let response = with_cookie(lb.addr, &new);
        assert_eq!(backend_of(&response), new_home);
        assert!(cookie(&response).is_none());
    }
}

#[test]
fn signed_cookies_expire_after_the_ttl_and_are_renewed_while_used() {
    let backends = three_backends();
    let short = signed(&backends, SECRET, &["--session-ttl", "1s"]);
    let value = cookie(&get(short.addr, "/")).unwrap();
    let expired = eventually(Duration::from_secs(5), || {
        decision(&with_cookie(short.addr, &value)).starts_with("sticky miss: expired cookie")
    });
    assert!(expired, "a cookie past its expiry is no cookie");

    // With 8 s, a cookie older than 1 s (an eighth) comes back renewed, for the same backend.
    let renewing = signed(&backends, SECRET, &["--session-ttl", "8s"]);
    let first = get(renewing.addr, "/");
    let value = cookie(&first).unwrap();
    assert!(cookie(&with_cookie(renewing.addr, &value)).is_none());
    let mut renewed = None;
    assert!(eventually(Duration::from_secs(5), || {
        let response = with_cookie(renewing.addr, &value);
        assert_eq!(backend_of(&response), backend_of(&first));
        renewed = cookie(&response);
        renewed.is_some()
    }));
    let renewed = renewed.unwrap();
    assert_ne!(renewed, value);
    assert!(decision(&with_cookie(renewing.addr, &renewed)).starts_with("sticky hit"));
}

#[test]
fn statistics_say_the_sessions_are_in_signed_cookies() {
    let backends = three_backends();
    let lb = signed(&backends, SECRET, &["--admin", "127.0.0.1:0"]);
    get(lb.addr, "/");
    let stats = stats_json(&lb);
    assert_eq!(stats["sticky"], "signed");
    assert!(stats["sessions"].is_null(), "{stats}");
    assert!(stats["max_sessions"].is_null(), "{stats}");
    let page = get(lb.admin.unwrap(), "/stats").text();
    assert!(page.contains("sticky sessions in signed cookies"));
}

#[test]
fn phase4_sticky_takes_the_secret_too() {
    let backends = three_backends();
    let specs = specs(&backends);
    let a = Balancer::start(PHASE4, &args(&specs, &["--sticky-secret", SECRET]));
    let b = Balancer::start(PHASE4, &args(&specs, &["--sticky-secret", SECRET]));
    let first = get(a.addr, "/");
    let value = cookie(&first).unwrap();
    for _ in 0..5 {
        assert_eq!(backend_of(&with_cookie(b.addr, &value)), backend_of(&first));
    }
}

/// Runs `bin` with `args` to its end; returns the exit code and standard error.
fn run(bin: &str, args: &[&str], env: Option<(&str, &str)>) -> (Option<i32>, String) {
    let mut command = Command::new(bin);
    command.args(args).args(["--admin", "off"]);
    if !args.contains(&"--listen") {
        command.args(["--listen", "127.0.0.1:0"]);
    }
    if let Some((name, value)) = env {
        command.env(name, value);
    }
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let exited = eventually(WAIT, || child.try_wait().is_ok_and(|s| s.is_some()));
    if !exited {
        let _ = child.kill();
    }
    let output = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    (output.status.code(), text)
}

#[test]
fn bad_secrets_and_combinations_are_refused_without_repeating_the_secret() {
    let short = "tooshort";
    let (code, err) = run(LOADBALANCER, &["--sticky", "--sticky-secret", short], None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("at least 16"), "{err}");
    assert!(!err.contains(short), "{err}");
    let (code, err) = run(PHASE4, &[], Some(("LB_STICKY_SECRET", short)));
    assert_eq!(code, Some(2), "{err}");
    assert!(!err.contains(short), "{err}");

    let (code, err) = run(LOADBALANCER, &["--sticky-secret", SECRET], None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("needs --sticky"), "{err}");
    assert!(!err.contains(SECRET), "{err}");
    let (code, err) = run(LOADBALANCER, &[], Some(("LB_STICKY_SECRET", SECRET)));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("needs --sticky"), "{err}");

    // There is no table to bound.
    let (code, err) = run(
        PHASE4,
        &["--sticky-secret", SECRET, "--max-sessions", "5"],
        None,
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--max-sessions"), "{err}");

    // --help names the variable but never shows its value.
    let (code, help) = run(
        LOADBALANCER,
        &["--help"],
        Some(("LB_STICKY_SECRET", SECRET)),
    );
    assert_eq!(code, Some(0), "{help}");
    assert!(help.contains("LB_STICKY_SECRET"), "{help}");
    assert!(!help.contains(SECRET), "{help}");
}

/// The backend each of the client addresses 127.0.0.1..=127.0.0.8 goes to through `lb`.
fn homes(lb: &Balancer) -> Vec<String> {
    (1..=8)
        .map(|i| backend_of(&Client::connect_from(lb.addr, &format!("127.0.0.{i}")).get("/")))
        .collect()
}

#[test]
fn hashing_agrees_across_instances() {
    let backends = three_backends();
    let specs = specs(&backends);
    for algorithm in ["ip-hash", "consistent-hash"] {
        let a = Balancer::start(LOADBALANCER, &args(&specs, &["--algorithm", algorithm]));
        let b = Balancer::start(LOADBALANCER, &args(&specs, &["--algorithm", algorithm]));
        let through_a = homes(&a);
        assert_eq!(homes(&b), through_a, "{algorithm}");
        assert_eq!(homes(&a), through_a, "{algorithm}: the same again");
        assert!(count(&through_a).len() > 1, "{algorithm}: {through_a:?}");
    }
}

#[test]
fn a_second_instance_needs_reuse_port_on_both() {
    let backends = three_backends();
    let specs = specs(&backends);
    let port = free_ports(1)[0];
    let listen = format!("127.0.0.1:{port}");
    let _first = Balancer::start(LOADBALANCER, &args(&specs, &["--listen", &listen]));
    let (code, err) = run(LOADBALANCER, &["--reuse-port", "--listen", &listen], None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--listen"), "{err}");
}

/// What the clients of the takeover test saw.
#[derive(Default)]
struct Tally {
    answered: AtomicUsize,
    /// Requests that got no answer, or an answer other than 200, with what happened.
    failures: Mutex<Vec<String>>,
    /// Keep-alive connections closed by the balancer between requests (not failures: a client
    /// opens a new one, as browsers and HTTP libraries do).
    reconnects: AtomicUsize,
    /// Requests sent again on a new connection because a reused one closed before answering.
    retries: AtomicUsize,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failures.lock().unwrap().push(what);
    }
}

/// A client that opens a new connection for each request until `stop`.
fn one_shot_client(addr: std::net::SocketAddr, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    while !stop.load(Ordering::SeqCst) {
        let mut client = match Client::try_connect(addr) {
            Ok(client) => client,
            Err(err) => {
                tally.fail(format!("connect: {err}"));
                continue;
            }
        };
        client.send(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        match client.try_read_response("GET") {
            Some(response) if response.status == 200 => {
                tally.answered.fetch_add(1, Ordering::SeqCst);
            }
            Some(response) => tally.fail(format!("status {}", response.status)),
            None => tally.fail("new connection: no response".to_string()),
        }
    }
}

/// A keep-alive client that reconnects when the balancer says `Connection: close`; until `stop`.
///
/// A request sent on a reused connection just as the balancer closes it for being idle gets no
/// answer; RFC 9112 §9.3.1 lets a client retry an idempotent request then, and browsers and
/// HTTP libraries do, once, on a new connection. So does this client; the same request
/// failing on a new connection is a failure.
fn keep_alive_client(addr: std::net::SocketAddr, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut client: Option<Client> = None;
    while !stop.load(Ordering::SeqCst) {
        let reused = client.is_some();
        let mut current = match client.take() {
            Some(client) => client,
            None => match Client::try_connect(addr) {
                Ok(client) => client,
                Err(err) => {
                    tally.fail(format!("connect: {err}"));
                    continue;
                }
            },
        };
        let _ = current
            .stream
            .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n");
        match current.try_read_response("GET") {
            Some(response) if response.status == 200 => {
                tally.answered.fetch_add(1, Ordering::SeqCst);
                if response.header("connection") == Some("close") {
                    tally.reconnects.fetch_add(1, Ordering::SeqCst);
                } else {
                    client = Some(current);
                }
            }
            Some(response) => tally.fail(format!("keep-alive: status {}", response.status)),
            None if reused => {
                tally.retries.fetch_add(1, Ordering::SeqCst);
            }
            None => tally.fail("keep-alive: no response on a new connection".to_string()),
        }
    }
}

#[test]
fn a_new_instance_takes_over_with_reuse_port_and_no_request_fails() {
    let backends = three_backends();
    let specs = specs(&backends);
    let port = free_ports(1)[0];
    let listen = format!("127.0.0.1:{port}");
    let flags = ["--listen", listen.as_str(), "--reuse-port"];
    let mut old = Balancer::start(LOADBALANCER, &args(&specs, &flags));
    let addr = old.addr;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let (stop, tally) = (Arc::clone(&stop), Arc::clone(&tally));
            thread::spawn(move || {
                if i % 2 == 0 {
                    one_shot_client(addr, stop, tally)
                } else {
                    keep_alive_client(addr, stop, tally)
                }
            })
        })
        .collect();
    let answered_by = |n: usize| eventually(WAIT, || tally.answered.load(Ordering::SeqCst) >= n);
    assert!(answered_by(200), "the first instance serves");

    let new = Balancer::start(LOADBALANCER, &args(&specs, &flags));
    assert_eq!(new.addr, addr);
    let before = tally.answered.load(Ordering::SeqCst);
    assert!(answered_by(before + 200), "both serve");
    old.terminate();
    assert_eq!(old.wait_exit(WAIT), Some(0), "{}", old.log());
    let after = tally.answered.load(Ordering::SeqCst);
    assert!(answered_by(after + 300), "the new instance serves alone");
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.join().unwrap();
    }
    let failures = tally.failures.lock().unwrap();
    eprintln!(
        "takeover: {} answered, {} keep-alive reconnects after Connection: close, {} retried \
         after an idle close, {} failed",
        tally.answered.load(Ordering::SeqCst),
        tally.reconnects.load(Ordering::SeqCst),
        tally.retries.load(Ordering::SeqCst),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}\nold log:\n{}",
        failures.len(),
        tally.answered.load(Ordering::SeqCst) + failures.len(),
        &failures[..failures.len().min(10)],
        old.log()
    );
}

#[test]
fn an_idle_instance_sharing_its_port_exits_promptly_on_sigterm() {
    // The connection that wakes `accept` at shutdown may reach the other instance's listener;
    // the old one must stop all the same.
    let backends = three_backends();
    let specs = specs(&backends);
    let port = free_ports(1)[0];
    let listen = format!("127.0.0.1:{port}");
    let flags = ["--listen", listen.as_str(), "--reuse-port"];
    let new = Balancer::start(LOADBALANCER, &args(&specs, &flags));
    for _ in 0..5 {
        let mut old = Balancer::start(LOADBALANCER, &args(&specs, &flags));
        old.terminate();
        assert_eq!(
            old.wait_exit(Duration::from_secs(3)),
            Some(0),
            "{}",
            old.log()
        );
    }
    assert_eq!(get(new.addr, "/").status, 200);
}
