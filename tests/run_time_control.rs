//! Run-time control of the backends (the admin API of `loadbalancer`): drain, maintenance and
//! weight while traffic flows, who may change them, and what the statistics say. Every admin
//! request here is sent by Python's `http.client`, a client that is not this project's code.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const LB: &str = env!("CARGO_BIN_EXE_loadbalancer");

/// An answer of the admin listener: status, header fields (lower-case names) and body.
struct AdminAnswer {
    status: u16,
    headers: serde_json::Value,
    body: String,
}

impl AdminAnswer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("JSON: {}", self.body))
    }
}

/// Sends one request to the admin listener with Python's `http.client`.
fn admin(
    admin: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> AdminAnswer {
    const SCRIPT: &str = r#"
import http.client, json, sys
host, port, method, path, body, headers = sys.argv[1:7]
conn = http.client.HTTPConnection(host, int(port), timeout=10)
conn.request(method, path, body=body.encode() if body else None, headers=json.loads(headers))
r = conn.getresponse()
print(r.status)
print(json.dumps({k.lower(): v for k, v in r.getheaders()}))
sys.stdout.write(r.read().decode())
"#;
    let headers: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect();
    let output = Command::new("python3")
        .args([
            "-c",
            SCRIPT,
            &admin.ip().to_string(),
            &admin.port().to_string(),
        ])
        .args([
            method,
            path,
            body,
            &serde_json::Value::Object(headers).to_string(),
        ])
        .output()
        .expect("python3 runs");
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let mut lines = text.splitn(3, '\n');
    AdminAnswer {
        status: lines.next().unwrap().parse().unwrap(),
        headers: serde_json::from_str(lines.next().unwrap()).unwrap(),
        body: lines.next().unwrap_or_default().to_string(),
    }
}

/// `POST /backends/{name}/{action}` from loopback, expecting 200; the backend as answered.
fn set(lb: &Balancer, name: &str, action: &str) -> serde_json::Value {
    let answer = admin(
        lb.admin.unwrap(),
        "POST",
        &format!("/backends/{name}/{action}"),
        &[],
        "",
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.json()
}

fn set_weight(lb: &Balancer, name: &str, weight: u32) -> serde_json::Value {
    let answer = admin(
        lb.admin.unwrap(),
        "POST",
        &format!("/backends/{name}/weight"),
        &[("Content-Type", "application/x-www-form-urlencoded")],
        &format!("weight={weight}"),
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.json()
}

/// The backend named `name` in `GET /backends`.
fn listed(lb: &Balancer, name: &str) -> serde_json::Value {
    let answer = admin(lb.admin.unwrap(), "GET", "/backends", &[], "");
    assert_eq!(answer.status, 200);
    let all = answer.json()["backends"].as_array().unwrap().clone();
    all.into_iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("{name} is listed"))
}

fn start(backends: &[&DemoBackend], extra: &[&str]) -> Balancer {
    let specs: Vec<String> = backends.iter().map(|b| b.spec()).collect();
    let mut args = vec!["--admin", "127.0.0.1:0"];
    for spec in &specs {
        args.extend(["--backend", spec]);
    }
    args.extend(extra);
    Balancer::start(LB, &args)
}

/// A GET with `cookie` (a session id, or none): the backend that answered and the session the
/// response set, if any.
fn get_session(addr: SocketAddr, cookie: Option<&str>) -> (String, Option<String>) {
    let header = cookie.map_or(String::new(), |c| format!("Cookie: SESSION_ID={c}\r\n"));
    let response = get_with(addr, &header);
    assert_eq!(response.status, 200, "{}", response.text());
    (backend_of(&response), session_cookie(&response))
}

/// A new session's cookie, from the first of at most 10 new sessions that `backend` took.
fn session_on(addr: SocketAddr, backend: &str) -> String {
    (0..10)
        .map(|_| get_session(addr, None))
        .find(|(name, _)| name == backend)
        .and_then(|(_, session)| session)
        .unwrap_or_else(|| panic!("no new session on {backend} in 10 requests"))
}

/// One request of the load: when it was sent, which backend answered, and its status (0 when
/// the connection broke).
struct Sent {
    at: Instant,
    backend: String,
    status: u16,
}

/// A keep-alive client sending GETs (or POSTs with a 64 KiB body) until `stop`, at most 2,000.
fn load_client(
    addr: SocketAddr,
    post: bool,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Vec<Sent>> {
    thread::spawn(move || {
        let mut client = Client::connect(addr);
        let body = vec![b'x'; 64 * 1024];
        let mut sent = Vec::new();
        while !stop.load(Ordering::SeqCst) && sent.len() < 2000 {
            let at = Instant::now();
            if post {
                let head = format!(
                    "POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                client.send(head.as_bytes());
                client.send(&body);
            } else {
                client.send(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n");
            }
            let method = if post { "POST" } else { "GET" };
            let Some(response) = client.try_read_response(method) else {
                sent.push(Sent {
                    at,
                    backend: String::new(),
                    status: 0,
                });
                client = Client::connect(addr);
                continue;
            };
            sent.push(Sent {
                at,
                backend: backend_of(&response),
                status: response.status,
            });
        }
        sent
    })
}

#[test]
fn draining_under_load_fails_nothing_and_keeps_only_bound_sessions() {
    let all: Vec<DemoBackend> = ["a", "b", "c"]
        .iter()
        .map(|n| DemoBackend::with_delay(n, Duration::from_millis(5)))
        .collect();
    let lb = start(&all.iter().collect::<Vec<_>>(), &["--sticky"]);
    // A session bound to the backend about to be drained.
    let (drained, session) = get_session(lb.addr, None);
    let session = session.expect("a new session gets a cookie");
    let name = all.iter().find(|b| b.name == drained).unwrap().spec();

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..6)
        .map(|i| load_client(lb.addr, i >= 4, Arc::clone(&stop)))
        .collect();
    let every_backend_busy = || {
        let stats = stats_json(&lb);
        let backends = stats["backends"].as_array().unwrap().clone();
        backends
            .iter()
            .all(|b| b["requests"].as_u64().unwrap_or(0) > 5)
    };
    assert!(
        eventually(WAIT, every_backend_busy),
        "the load reaches every backend"
    );
    let answer = set(&lb, &name, "drain");
    let drained_at = Instant::now();
    assert_eq!(answer["admin_state"], "drain");
    assert_eq!(answer["previous_state"], "ready");
    for _ in 0..10 {
        let (backend, _) = get_session(lb.addr, Some(&session));
        assert_eq!(
            backend, drained,
            "a bound session stays on its draining backend"
        );
    }
    let (other, _) = get_session(lb.addr, None);
    assert_ne!(
        other, drained,
        "a new session does not go to a draining backend"
    );
    thread::sleep(Duration::from_millis(300)); // more load after the drain
    stop.store(true, Ordering::SeqCst);
    let sent: Vec<Sent> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();

    let failed = sent.iter().filter(|s| s.status != 200).count();
    assert_eq!(failed, 0, "of {} requests", sent.len());
    let before = sent
        .iter()
        .filter(|s| s.at < drained_at && s.backend == drained)
        .count();
    assert!(before > 0, "the backend took requests before its drain");
    let after: Vec<&Sent> = sent.iter().filter(|s| s.at > drained_at).collect();
    assert!(
        after.len() > 10,
        "load went on after the drain: {}",
        after.len()
    );
    assert!(
        after.iter().all(|s| s.backend != drained),
        "no new request after the drain"
    );
    assert!(eventually(WAIT, || listed(&lb, &name)["in_flight"] == 0));
    // The change is an event and a gauge.
    let events = stats_json(&lb)["events"].to_string();
    assert!(
        events.contains(&format!("{name} set to drain from 127.0.0.1")),
        "{events}"
    );
    let metrics = get(lb.admin.unwrap(), "/metrics").text();
    assert!(metrics.contains(&format!(
        "lb_backend_admin_state{{backend=\"{name}\",state=\"drain\"}} 1\n"
    )));
    assert!(metrics.contains(&format!("lb_backend_in_flight{{backend=\"{name}\"}} 0\n")));
}

#[test]
fn signed_sessions_stay_on_a_draining_backend_too() {
    let all = [DemoBackend::start("a"), DemoBackend::start("b")];
    let lb = start(
        &all.iter().collect::<Vec<_>>(),
        &["--sticky", "--sticky-secret", "a-secret-of-20-bytes"],
    );
    let first = get_with(lb.addr, "");
    let drained = backend_of(&first);
    let cookie = session_cookie(&first).expect("a signed cookie");
    let name = all.iter().find(|b| b.name == drained).unwrap().spec();
    set(&lb, &name, "drain");
    for _ in 0..5 {
        let response = get_with(lb.addr, &format!("Cookie: SESSION_ID={cookie}\r\n"));
        assert_eq!(backend_of(&response), drained);
    }
    for _ in 0..5 {
        assert_ne!(get_session(lb.addr, None).0, drained);
    }
}

#[test]
fn a_request_in_flight_finishes_after_drain_and_idle_connections_close() {
    let slow = DemoBackend::with_delay("slow", Duration::from_millis(700));
    let lb = start(&[&slow], &[]);
    let name = slow.spec();
    let addr = lb.addr;
    let request = thread::spawn(move || get(addr, "/"));
    assert!(eventually(WAIT, || listed(&lb, &name)["in_flight"] == 1));
    set(&lb, &name, "drain");
    let response = request.join().unwrap();
    assert_eq!(response.status, 200, "the request in flight finishes");
    assert_eq!(listed(&lb, &name)["in_flight"], 0);
    assert_eq!(
        get(lb.addr, "/").status,
        503,
        "nothing else to take new requests"
    );

    // A pooled keep-alive connection to a backend is closed when it is drained, so that the
    // backend's graceful shutdown does not wait for it.
    let open = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&open);
    let keep_alive = RawBackend::start(move |stream| {
        counted.fetch_add(1, Ordering::SeqCst);
        let mut conn = ServerConn::new(stream);
        while conn.read_request().is_some() {
            conn.respond(200, "X-Backend: raw\r\n", b"ok");
        }
        counted.fetch_sub(1, Ordering::SeqCst);
    });
    let spec = keep_alive.spec();
    // (Passive checks only: active checks keep a connection of their own.)
    let lb = Balancer::start(
        LB,
        &[
            "--admin",
            "127.0.0.1:0",
            "--backend",
            &spec,
            "--health-check",
            "passive",
        ],
    );
    assert_eq!(get(lb.addr, "/").status, 200);
    assert_eq!(
        open.load(Ordering::SeqCst),
        1,
        "the balancer keeps the connection"
    );
    set(&lb, &spec, "drain");
    assert!(
        eventually(WAIT, || open.load(Ordering::SeqCst) == 0),
        "closed at the drain"
    );
}

#[test]
fn maintenance_moves_sessions_and_stops_checks_and_ready_brings_traffic_back() {
    let controls: Vec<Arc<HealthControl>> =
        (0..2).map(|_| Arc::new(HealthControl::default())).collect();
    let backends: Vec<RawBackend> = ["a", "b"]
        .iter()
        .zip(&controls)
        .map(|(name, control)| controlled(name, control))
        .collect();
    let (a, b) = (backends[0].spec(), backends[1].spec());
    let lb = Balancer::start(
        LB,
        &[
            "--admin",
            "127.0.0.1:0",
            "--backend",
            &a,
            "--backend",
            &b,
            "--sticky",
            "--health-check",
            "active",
            "--health-interval",
            "1s",
        ],
    );
    // A session on a.
    let session = session_on(lb.addr, "a");
    set(&lb, &a, "maint");
    let (moved, _) = get_session(lb.addr, Some(&session));
    assert_eq!(moved, "b", "a session of a backend in maintenance moves");
    assert!(backends_hit(lb.addr, 6).iter().all(|name| name == "b"));

    // No checks in maintenance (one may have been on its way).
    let probes = controls[0].probes.load(Ordering::SeqCst);
    thread::sleep(Duration::from_millis(1500));
    assert!(controls[0].probes.load(Ordering::SeqCst) <= probes + 1);

    // Ready again: out until a check passes, which goes out at once, not an interval later.
    let ready_at = Instant::now();
    set(&lb, &a, "ready");
    assert!(eventually(WAIT, || listed(&lb, &a)["healthy"] == true));
    assert!(
        ready_at.elapsed() < Duration::from_millis(900),
        "{:?}",
        ready_at.elapsed()
    );
    assert!(
        backends_hit(lb.addr, 6).contains(&"a".to_string()),
        "traffic is back"
    );
    let (stays, _) = get_session(lb.addr, Some(&session));
    assert_eq!(stays, "b", "the moved session stays where it went");
}

#[test]
fn weight_zero_takes_no_new_request_with_every_algorithm() {
    let all = [
        DemoBackend::start("a"),
        DemoBackend::start("b"),
        DemoBackend::start("c"),
    ];
    let name = all[0].spec();
    for algorithm in ALGORITHMS {
        let lb = start(&all.iter().collect::<Vec<_>>(), &["--algorithm", algorithm]);
        let from_many = |lb: &Balancer| -> Vec<String> {
            (1..=40)
                .map(|n| {
                    backend_of(&Client::connect_from(lb.addr, &format!("127.0.0.{n}")).get("/"))
                })
                .collect()
        };
        let before = from_many(&lb);
        assert!(
            before.contains(&"a".to_string()),
            "{algorithm}: a has clients"
        );
        let answer = set_weight(&lb, &name, 0);
        assert_eq!(
            (answer["weight"].clone(), answer["previous_weight"].clone()),
            (0.into(), 1.into())
        );
        assert!(
            !from_many(&lb).contains(&"a".to_string()),
            "{algorithm}: weight 0"
        );
        set_weight(&lb, &name, 1);
        let after = from_many(&lb);
        assert!(after.contains(&"a".to_string()), "{algorithm}: back");
        if algorithm.ends_with("hash") {
            assert_eq!(before, after, "{algorithm}: every client back where it was");
        }
    }
}

#[test]
fn a_weight_set_at_run_time_sets_the_share_and_bound_sessions_survive_weight_zero() {
    let all = [DemoBackend::start("a"), DemoBackend::start("b")];
    let lb = start(
        &all.iter().collect::<Vec<_>>(),
        &["--algorithm", "weighted", "--sticky"],
    );
    let name = all[0].spec();
    set_weight(&lb, &name, 3);
    let hits = count(&backends_hit(lb.addr, 40));
    assert_eq!(
        (hits["a"], hits["b"]),
        (30, 10),
        "smooth weighted: 3 to 1 exactly"
    );
    assert_eq!(listed(&lb, &name)["configured_weight"], 1);

    let session = session_on(lb.addr, "a");
    set_weight(&lb, &name, 0);
    assert_eq!(
        get_session(lb.addr, Some(&session)).0,
        "a",
        "weight 0 keeps bound sessions"
    );
    assert!(backends_hit(lb.addr, 6).iter().all(|name| name == "b"));
}

#[test]
fn with_every_backend_drained_or_in_maintenance_clients_get_503_with_retry_after() {
    let all = [DemoBackend::start("a"), DemoBackend::start("b")];
    let lb = start(&all.iter().collect::<Vec<_>>(), &["--health-check", "both"]);
    set(&lb, &all[0].spec(), "drain");
    set(&lb, &all[1].spec(), "maint");
    let response = get(lb.addr, "/");
    assert_eq!(response.status, 503);
    assert_eq!(response.header("retry-after"), Some("5"));
    set(&lb, &all[1].spec(), "ready");
    assert!(eventually(WAIT, || get(lb.addr, "/").status == 200));
}

#[test]
fn writes_are_refused_to_strangers_and_wrong_values_are_named() {
    let all = [DemoBackend::start("a")];
    let name = all[0].spec();
    let lb = start(&all.iter().collect::<Vec<_>>(), &[]);
    let at = lb.admin.unwrap();
    let path = format!("/backends/{name}/drain");

    let foreign = admin(at, "POST", &path, &[("Origin", "http://evil.example")], "");
    assert_eq!(foreign.status, 403, "{}", foreign.body);
    assert!(foreign.json()["error"].as_str().unwrap().contains("Origin"));
    let unknown = admin(at, "POST", "/backends/127.0.0.1:1/drain", &[], "");
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["known"], serde_json::json!([name]));
    let weight = admin(
        at,
        "POST",
        &format!("/backends/{name}/weight?weight=257"),
        &[],
        "",
    );
    assert_eq!(weight.status, 400);
    assert!(weight.json()["error"]
        .as_str()
        .unwrap()
        .contains("0 to 256"));
    let state = admin(at, "POST", &format!("/backends/{name}/down"), &[], "");
    assert_eq!(state.status, 400);
    assert!(state.json()["error"]
        .as_str()
        .unwrap()
        .contains("ready, drain, maint or weight"));
    assert_eq!(
        listed(&lb, &name)["admin_state"],
        "ready",
        "nothing changed"
    );

    // The page's form: same origin, a browser asking for HTML, sent back to the page.
    let own = format!("http://{at}");
    let form = admin(
        at,
        "POST",
        &path,
        &[
            ("Origin", own.as_str()),
            ("Accept", "text/html,application/xhtml+xml"),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        "",
    );
    assert_eq!(form.status, 303);
    assert_eq!(form.headers["location"], "/stats");
    let page = get(at, "/stats").text();
    assert!(
        page.contains("<td class=\"drain\">drain (up)</td>"),
        "{page}"
    );
}

#[test]
fn with_an_admin_token_every_write_carries_it() {
    let all = [DemoBackend::start("a")];
    let name = all[0].spec();
    let specs = all[0].spec();
    let lb = Balancer::start_with(
        LB,
        &["--admin", "127.0.0.1:0", "--backend", &specs],
        |command| {
            command.env("LB_ADMIN_TOKEN", "t0ken");
        },
    );
    let at = lb.admin.unwrap();
    let path = format!("/backends/{name}/maint");
    let none = admin(at, "POST", &path, &[], "");
    assert_eq!(none.status, 403);
    assert!(none.json()["error"].as_str().unwrap().contains("token"));
    let wrong = admin(at, "POST", &path, &[("Authorization", "Bearer t0ke")], "");
    assert_eq!(wrong.status, 403);
    let reload = admin(at, "POST", "/reload", &[], "");
    assert_eq!(reload.status, 403, "reload is a write too");
    assert_eq!(listed(&lb, &name)["admin_state"], "ready");
    let right = admin(at, "POST", &path, &[("Authorization", "Bearer t0ken")], "");
    assert_eq!(right.status, 200, "{}", right.body);
    assert_eq!(listed(&lb, &name)["admin_state"], "maint");
    // Reading stays open, and the token is nowhere in the log or the page.
    let page = get(at, "/stats").text();
    assert!(
        page.contains("name=\"token\""),
        "the forms ask for the token"
    );
    assert!(!page.contains("t0ken") && !lb.log().contains("t0ken"));
}

/// The admin listener reads a write's body whole, however it arrives.
#[test]
fn a_weight_in_a_body_sent_in_pieces_is_read() {
    let all = [DemoBackend::start("a")];
    let name = all[0].spec();
    let lb = start(&all.iter().collect::<Vec<_>>(), &[]);
    let mut stream = TcpStream::connect(lb.admin.unwrap()).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let head = format!(
        "POST /backends/{name}/weight HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\
         Content-Type: application/x-www-form-urlencoded\r\n\r\nweig"
    );
    stream.write_all(head.as_bytes()).unwrap();
    thread::sleep(Duration::from_millis(100)); // the rest in another segment
    stream.write_all(b"ht=7").unwrap();
    stream.write_all(b"\n").unwrap();
    let mut status = String::new();
    BufReader::new(stream).read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(listed(&lb, &name)["weight"], 7);
}

/// A reload keeps what the operator set for the backends that stay; a weight the file changes
/// is the file's.
#[test]
fn a_reload_keeps_the_state_and_run_time_weight_until_the_file_changes_them() {
    let all = [DemoBackend::start("a"), DemoBackend::start("b")];
    let (a, b) = (all[0].spec(), all[1].spec());
    let path = std::env::temp_dir().join(format!("lb-control-{}.toml", std::process::id()));
    let write = |weight_of_a: u32| {
        let text = format!("backend = [\"{a}={weight_of_a}\", \"{b}\"]\n");
        std::fs::write(&path, text).unwrap();
    };
    write(1);
    let config = path.to_str().unwrap().to_string();
    let lb = Balancer::start(LB, &["--admin", "127.0.0.1:0", "--config", &config]);
    set(&lb, &b, "drain");
    set_weight(&lb, &a, 0);
    let reload = || {
        let answer = admin(lb.admin.unwrap(), "POST", "/reload", &[], "");
        assert_eq!(answer.status, 200, "{}", answer.body);
    };
    reload();
    assert_eq!(listed(&lb, &b)["admin_state"], "drain");
    assert_eq!(listed(&lb, &a)["weight"], 0, "the run-time weight stays");
    write(4);
    reload();
    let a_now = listed(&lb, &a);
    assert_eq!(
        (a_now["weight"].clone(), a_now["configured_weight"].clone()),
        (4.into(), 4.into())
    );
    let _ = std::fs::remove_file(&path);
}

/// A write's body must say its length and stay small: a chunked one gets 411, a large one 413,
/// and nothing changes.
#[test]
fn a_write_without_a_length_or_too_large_is_refused() {
    let all = [DemoBackend::start("a")];
    let name = all[0].spec();
    let lb = start(&all.iter().collect::<Vec<_>>(), &[]);
    let path = format!("/backends/{name}/weight");
    let send = |head: String| {
        let mut client = Client::connect(lb.admin.unwrap());
        client.send(head.as_bytes());
        client.read_response("POST").status
    };
    let chunked = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n8\r\nweight=0\r\n0\r\n\r\n"
    );
    assert_eq!(send(chunked), 411);
    let large = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n");
    assert_eq!(send(large), 413);
    assert_eq!(listed(&lb, &name)["weight"], 1, "nothing changed");
    // The statistics say what the allocator holds.
    let heap = &stats_json(&lb)["heap"];
    assert!(heap["in_use_bytes"].as_u64().unwrap() > 0, "{heap}");
    assert!(heap["spare_buffer_bytes"].is_u64(), "{heap}");
}
