//! `loadbalancer ctl` against a real balancer over real sockets: `list`, the state changes and
//! `weight` print what changed, `drain --wait` returns once the last request or tunnel is done
//! (and exits 1 naming what is still open after its timeout), and each failure (an unknown
//! backend, a weight the balancer refuses, a missing token, no balancer at all, a bad command
//! line) is one line on standard error with its exit code.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{eventually, free_ports, get, Balancer, DemoBackend, WAIT};

const LOADBALANCER: &str = env!("CARGO_BIN_EXE_loadbalancer");

/// How long one `ctl` run may take before the test kills it: more than any `--timeout` here.
const CTL_LIMIT: Duration = Duration::from_secs(30);

/// What one `loadbalancer ctl` run printed, and its exit code.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// A child process killed when the test lets go of it, even by panicking.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `loadbalancer ctl --admin ADMIN ARGS`, with no admin token in its environment.
fn ctl(admin: SocketAddr, args: &[&str]) -> Run {
    ctl_with_env(admin, args, &[])
}

/// `loadbalancer ctl --admin ADMIN ARGS` with `env` added to its environment, killed after
/// [`CTL_LIMIT`].
fn ctl_with_env(admin: SocketAddr, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut command = Command::new(LOADBALANCER);
    command
        .args(["ctl", "--admin", &admin.to_string()])
        .args(args)
        .env_remove("LB_ADMIN_TOKEN")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = Killed(command.spawn().expect("loadbalancer ctl starts"));
    let stdout = read_on_a_thread(child.0.stdout.take());
    let stderr = read_on_a_thread(child.0.stderr.take());
    let deadline = Instant::now() + CTL_LIMIT;
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("ctl can be waited for") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "ctl {args:?} still runs after {CTL_LIMIT:?}"
        );
        thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code(),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Reads `pipe` to its end on a thread of its own, so that a child filling one pipe cannot
/// stall while the test waits for it to exit.
fn read_on_a_thread<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

/// `loadbalancer` in front of `backends` with its admin listener on a port of its own and
/// `extra` flags, with no admin token from the test's environment.
fn start(backends: &[&str], extra: &[&str]) -> Balancer {
    let mut args = vec!["--admin", "127.0.0.1:0"];
    for spec in backends {
        args.extend(["--backend", spec]);
    }
    args.extend_from_slice(extra);
    Balancer::start_with(LOADBALANCER, &args, |command| {
        command.env_remove("LB_ADMIN_TOKEN");
    })
}

/// The backend named `name` in the balancer's `GET /backends`, if it is there.
fn backend_json(admin: SocketAddr, name: &str) -> Option<serde_json::Value> {
    let listed: serde_json::Value = serde_json::from_slice(&get(admin, "/backends").body).ok()?;
    listed["backends"]
        .as_array()?
        .iter()
        .find(|backend| backend["name"] == name)
        .cloned()
}

/// Waits until `field` of backend `name` is `value`; whether it came to be.
fn until_field(admin: SocketAddr, name: &str, field: &str, value: u64) -> bool {
    eventually(WAIT, || {
        backend_json(admin, name).is_some_and(|backend| backend[field] == value)
    })
}

/// `POST path` to the admin listener with a form `body`: the status and the JSON answer.
fn post_form(admin: SocketAddr, path: &str, body: &str) -> (u16, serde_json::Value) {
    let mut stream = TcpStream::connect_timeout(&admin, WAIT).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {admin}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let json = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    (status, serde_json::from_str(json).unwrap_or_default())
}

/// The line of `table` that starts with `name`.
fn row<'t>(table: &'t str, name: &str) -> &'t str {
    table
        .lines()
        .find(|line| line.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no row for {name} in\n{table}"))
}

#[test]
fn list_shows_every_backend_and_each_state_change_is_one_line() {
    let (a, b) = (DemoBackend::start("a"), DemoBackend::start("b"));
    let lb = start(&[&a.spec(), &b.spec()], &[]);
    let admin = lb.admin.unwrap();

    let list = ctl(admin, &["list"]);
    assert_eq!(list.code, Some(0), "{list:?}");
    let header: Vec<&str> = list.stdout.lines().next().unwrap().split("  ").collect();
    let header: Vec<&str> = header
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(
        header,
        ["NAME", "STATE", "HEALTH", "WEIGHT", "IN FLIGHT", "TUNNELS"]
    );
    for name in [a.spec(), b.spec()] {
        let cells: Vec<&str> = row(&list.stdout, &name).split_whitespace().collect();
        assert_eq!(
            cells,
            [name.as_str(), "ready", "up", "1", "0", "0"],
            "{list:?}"
        );
    }

    let maint = ctl(admin, &["maint", &a.spec()]);
    assert_eq!(maint.code, Some(0), "{maint:?}");
    assert_eq!(maint.stdout, format!("{}: ready -> maint\n", a.spec()));
    let list = ctl(admin, &["list"]).stdout;
    assert!(row(&list, &a.spec()).contains(" maint "), "{list}");
    assert!(row(&list, &b.spec()).contains(" ready "), "{list}");

    let again = ctl(admin, &["maint", &a.spec()]);
    assert_eq!(again.stdout, format!("{}: maint (unchanged)\n", a.spec()));
    let ready = ctl(admin, &["ready", &a.spec()]);
    assert_eq!(ready.stdout, format!("{}: maint -> ready\n", a.spec()));
    let drain = ctl(admin, &["drain", &a.spec()]);
    assert_eq!(drain.code, Some(0), "{drain:?}");
    assert_eq!(drain.stdout, format!("{}: ready -> drain\n", a.spec()));
    assert!(row(&ctl(admin, &["list"]).stdout, &a.spec()).contains(" drain "));
}

#[test]
fn weight_prints_the_old_and_the_new_and_a_refused_weight_the_balancers_why() {
    let a = DemoBackend::start("a");
    let lb = start(&[&format!("{}=3", a.spec())], &["--algorithm", "weighted"]);
    let admin = lb.admin.unwrap();

    let zero = ctl(admin, &["weight", &a.spec(), "0"]);
    assert_eq!(zero.code, Some(0), "{zero:?}");
    assert_eq!(
        zero.stdout,
        format!("{}: weight 3 -> 0 (configured 3)\n", a.spec())
    );
    let list = ctl(admin, &["list"]).stdout;
    assert!(
        row(&list, &a.spec()).contains(" 0 (configured 3) "),
        "{list}"
    );
    let back = ctl(admin, &["weight", &a.spec(), "3"]);
    assert_eq!(back.stdout, format!("{}: weight 0 -> 3\n", a.spec()));

    let too_heavy = ctl(admin, &["weight", &a.spec(), "300"]);
    assert_eq!(too_heavy.code, Some(1), "{too_heavy:?}");
    assert_eq!(too_heavy.stdout, "");
    // The message is the balancer's own, as it answers the same request sent by hand.
    let path = format!("/backends/{}/weight", a.spec());
    let (status, answer) = post_form(admin, &path, "weight=300");
    assert_eq!(status, 400, "{answer}");
    let why = answer["error"].as_str().expect("an error message");
    assert_eq!(too_heavy.stderr, format!("error: {why} (HTTP 400)\n"));
}

#[test]
fn an_unknown_backend_exits_1_naming_the_known_ones() {
    let (a, b) = (DemoBackend::start("a"), DemoBackend::start("b"));
    let lb = start(&[&a.spec(), &b.spec()], &[]);
    let admin = lb.admin.unwrap();
    let known = format!("known backends: {}, {}\n", a.spec(), b.spec());

    let ready = ctl(admin, &["ready", "127.0.0.1:1"]);
    assert_eq!(ready.code, Some(1), "{ready:?}");
    assert_eq!(ready.stdout, "");
    assert!(ready.stderr.starts_with("error: "), "{ready:?}");
    assert!(ready.stderr.contains("(HTTP 404)"), "{ready:?}");
    assert!(ready.stderr.ends_with(&known), "{ready:?}");

    let weight = ctl(admin, &["weight", "127.0.0.1:1", "2"]);
    assert_eq!(weight.code, Some(1), "{weight:?}");
    assert_eq!(weight.stdout, "");
    assert_eq!(
        weight.stderr,
        format!("error: no backend named '127.0.0.1:1' (HTTP 404); {known}")
    );
}

#[test]
fn drain_wait_returns_at_once_when_nothing_is_open() {
    let a = DemoBackend::start("a");
    let lb = start(&[&a.spec()], &[]);
    let drain = ctl(lb.admin.unwrap(), &["drain", &a.spec(), "--wait"]);
    assert_eq!(drain.code, Some(0), "{drain:?}");
    let expected = format!(
        "{0}: ready -> drain\n{0} drained: nothing in flight, no tunnel open\n",
        a.spec()
    );
    assert_eq!(drain.stdout, expected);
}

/// How long the slow backend of the drain tests takes to answer.
const SLOW: Duration = Duration::from_secs(3);

/// A request in flight on a backend answering after [`SLOW`], through its balancer.
struct InFlight {
    slow: DemoBackend,
    lb: Balancer,
    /// When the request was sent.
    sent: Instant,
    /// The request's thread, which returns its status.
    request: thread::JoinHandle<u16>,
}

/// A balancer over a slow backend, once the request sent on a thread of its own is in flight.
fn request_in_flight() -> InFlight {
    let slow = DemoBackend::with_delay("slow", SLOW);
    let lb = start(&[&slow.spec()], &[]);
    let addr = lb.addr;
    let sent = Instant::now();
    let request = thread::spawn(move || get(addr, "/").status);
    assert!(until_field(lb.admin.unwrap(), &slow.spec(), "in_flight", 1));
    InFlight {
        slow,
        lb,
        sent,
        request,
    }
}

#[test]
fn drain_wait_returns_once_the_request_in_flight_has_finished() {
    let held = request_in_flight();
    let (slow, admin, sent) = (&held.slow, held.lb.admin.unwrap(), held.sent);

    let drain = ctl(
        admin,
        &["drain", &slow.spec(), "--wait", "--timeout", "20s"],
    );
    assert!(sent.elapsed() >= SLOW, "ctl returned before the answer");
    assert_eq!(drain.code, Some(0), "{drain:?}");
    let expected = format!(
        "{0}: ready -> drain\n{0}: 1 request in flight, no tunnel open\n\
         {0} drained: nothing in flight, no tunnel open\n",
        slow.spec()
    );
    assert_eq!(drain.stdout, expected);
    assert_eq!(
        held.request.join().unwrap(),
        200,
        "the drained request is answered"
    );
}

#[test]
fn drain_wait_exits_1_after_its_timeout_naming_what_is_open() {
    let held = request_in_flight();
    let (slow, admin, sent) = (&held.slow, held.lb.admin.unwrap(), held.sent);

    let drain = ctl(
        admin,
        &["drain", &slow.spec(), "--wait", "--timeout", "300ms"],
    );
    assert!(sent.elapsed() < SLOW, "ctl waited for the answer");
    assert_eq!(drain.code, Some(1), "{drain:?}");
    assert!(
        drain.stdout.ends_with(&format!(
            "{}: 1 request in flight, no tunnel open\n",
            slow.spec()
        )),
        "{drain:?}"
    );
    let expected = format!(
        "error: {} is not drained after 300ms: 1 request in flight, no tunnel open\n",
        slow.spec()
    );
    assert_eq!(drain.stderr, expected);
    assert_eq!(held.request.join().unwrap(), 200);
}

/// A WebSocket to the demo backend's `/ws` through the balancer, open once this returns.
fn open_tunnel(lb: &Balancer) -> TcpStream {
    let mut stream = TcpStream::connect_timeout(&lb.addr, WAIT).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        stream.read_exact(&mut byte).expect("the 101 head");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101 "),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream
}

#[test]
fn drain_wait_waits_for_an_open_tunnel() {
    let a = DemoBackend::start("a");
    let lb = start(&[&a.spec()], &[]);
    let admin = lb.admin.unwrap();
    let tunnel = open_tunnel(&lb);
    assert!(until_field(admin, &a.spec(), "tunnels", 1));

    let held = ctl(admin, &["drain", &a.spec(), "--wait", "--timeout", "300ms"]);
    assert_eq!(held.code, Some(1), "{held:?}");
    assert!(held.stdout.contains(", 1 tunnel open\n"), "{held:?}");
    assert!(held.stderr.ends_with(", 1 tunnel open\n"), "{held:?}");

    drop(tunnel);
    let drained = ctl(admin, &["drain", &a.spec(), "--wait", "--timeout", "20s"]);
    assert_eq!(drained.code, Some(0), "{drained:?}");
    let last = format!("{} drained: nothing in flight, no tunnel open\n", a.spec());
    assert!(drained.stdout.ends_with(&last), "{drained:?}");
}

#[test]
fn writes_need_the_token_of_a_balancer_started_with_one() {
    let a = DemoBackend::start("a");
    let lb = start(&[&a.spec()], &["--admin-token", "secret"]);
    let admin = lb.admin.unwrap();

    let name = a.spec();
    for args in [&["maint", &name][..], &["--token", "wrong", "maint", &name]] {
        let refused = ctl(admin, args);
        assert_eq!(refused.code, Some(1), "{refused:?}");
        assert_eq!(refused.stdout, "");
        assert!(refused.stderr.contains("(HTTP 403)"), "{refused:?}");
        assert!(refused.stderr.contains("token"), "{refused:?}");
    }
    assert!(row(
        &ctl(admin, &["--token", "secret", "list"]).stdout,
        &a.spec()
    )
    .contains(" ready "));

    let with_flag = ctl(admin, &["--token", "secret", "maint", &a.spec()]);
    assert_eq!(with_flag.code, Some(0), "{with_flag:?}");
    assert_eq!(with_flag.stdout, format!("{}: ready -> maint\n", a.spec()));
    let from_env = ctl_with_env(
        admin,
        &["ready", &a.spec()],
        &[("LB_ADMIN_TOKEN", "secret")],
    );
    assert_eq!(from_env.code, Some(0), "{from_env:?}");
    assert_eq!(from_env.stdout, format!("{}: maint -> ready\n", a.spec()));
}

#[test]
fn an_ipv6_backend_is_named_as_the_list_shows_it() {
    // A machine without IPv6 on loopback has nothing to test here.
    let Ok(listener) = TcpListener::bind("[::1]:0") else {
        eprintln!("no IPv6 loopback: skipped");
        return;
    };
    let name = listener.local_addr().unwrap().to_string();
    let _backend = lb::demo::start(listener, "v6".into(), Duration::ZERO).unwrap();
    let lb = start(&[&name], &[]);
    let admin = lb.admin.unwrap();

    let list = ctl(admin, &["list"]);
    assert_eq!(list.code, Some(0), "{list:?}");
    assert!(row(&list.stdout, &name).contains(" ready "), "{list:?}");
    let maint = ctl(admin, &["maint", &name]);
    assert_eq!(maint.code, Some(0), "{maint:?}");
    assert_eq!(maint.stdout, format!("{name}: ready -> maint\n"));
}

#[test]
fn no_balancer_at_the_address_exits_1_suggesting_admin() {
    let port = free_ports(1)[0];
    let admin: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let run = ctl(admin, &["list"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.stdout, "");
    let start = format!("error: cannot reach the admin listener at {admin}: connection refused");
    assert!(run.stderr.starts_with(&start), "{run:?}");
    assert!(run.stderr.contains("--admin"), "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
}

#[test]
fn a_bad_command_line_exits_2_before_any_request() {
    // Nothing listens there: a usage error must come before any attempt to connect.
    let admin: SocketAddr = format!("127.0.0.1:{}", free_ports(1)[0]).parse().unwrap();
    let cases: [&[&str]; 6] = [
        &[],
        &["drain", "127.0.0.1:8001", "--timeout", "5s"],
        &["maint", "127.0.0.1:8001", "--wait"],
        &["weight", "127.0.0.1:8001", "many"],
        &["drain", "127.0.0.1:8001", "--wait", "--timeout", "soon"],
        &["restart", "127.0.0.1:8001"],
    ];
    for args in cases {
        let run = ctl(admin, args);
        assert_eq!(run.code, Some(2), "{args:?}: {run:?}");
        assert!(run.stderr.starts_with("error: "), "{args:?}: {run:?}");
        assert_eq!(run.stderr.lines().count(), 1, "{args:?}: {run:?}");
    }
}
