//! WebSocket and every `Upgrade` over real sockets: the handshake is balanced like a request,
//! a `101` turns the connection into a tunnel that carries bytes both ways, and everything else
//! stays HTTP.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use tungstenite::client::client;
use tungstenite::handshake::client::Request;
use tungstenite::{Message, WebSocket};

const PHASE1: &str = env!("CARGO_BIN_EXE_phase1_rr");
const LOADBALANCER: &str = env!("CARGO_BIN_EXE_loadbalancer");
const LEAST_CONN: &str = env!("CARGO_BIN_EXE_phase2_least_conn");

type Socket = WebSocket<TcpStream>;

/// Opens a WebSocket to `/ws` through the balancer at `addr`, with `cookie` if given; returns
/// the socket, the handshake's response fields, and the backend named in the greeting.
fn open_ws(addr: SocketAddr, cookie: Option<&str>) -> (Socket, Vec<(String, String)>, String) {
    let stream = TcpStream::connect(addr).expect("connects");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut request = Request::builder()
        .uri(format!("ws://{addr}/ws"))
        .header("Host", addr.to_string())
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header(
            "Sec-WebSocket-Key",
            tungstenite::handshake::client::generate_key(),
        );
    if let Some(cookie) = cookie {
        request = request.header("Cookie", cookie);
    }
    let (mut socket, response) =
        client(request.body(()).unwrap(), stream).expect("the WebSocket handshake succeeds");
    assert_eq!(response.status(), 101);
    let fields = response
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let greeting = match socket.read().expect("a greeting") {
        Message::Text(text) => text.to_string(),
        other => panic!("greeting expected, got {other:?}"),
    };
    let backend = greeting
        .strip_prefix("connected to ")
        .expect("the greeting names the backend")
        .to_string();
    (socket, fields, backend)
}

/// Message `i` of a client: text or binary, from a few bytes to 100 KB.
fn message(client: usize, i: usize) -> Message {
    let sizes = [1, 10, 125, 126, 1000, 65_535, 65_536, 100_000];
    let size = sizes[(client + i) % sizes.len()];
    let byte = b'a' + ((client * 7 + i) % 26) as u8;
    if i.is_multiple_of(2) {
        Message::text(String::from_utf8(vec![byte; size]).unwrap())
    } else {
        Message::binary(vec![byte; size])
    }
}

/// 50 clients at once, 20 messages each, every echo compared.
fn fifty_clients_echo(addr: SocketAddr) {
    const CLIENTS: usize = 50;
    let start = Arc::new(Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let start = Arc::clone(&start);
            thread::spawn(move || {
                let (mut socket, _, backend) = open_ws(addr, None);
                start.wait();
                for i in 0..20 {
                    let sent = message(c, i);
                    socket.send(sent.clone()).expect("sends");
                    let echoed = socket.read().expect("an echo");
                    assert_eq!(echoed, sent, "client {c} message {i}");
                }
                socket.close(None).expect("closes");
                while socket.read().is_ok() {}
                backend
            })
        })
        .collect();
    let backends: Vec<String> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let spread = count(&backends);
    assert!(spread.len() >= 2, "balanced over the backends: {spread:?}");
}

fn three_demo_backends() -> (Vec<DemoBackend>, Vec<String>) {
    let backends: Vec<DemoBackend> = ["a", "b", "c"]
        .into_iter()
        .map(DemoBackend::start)
        .collect();
    let specs = backends.iter().map(DemoBackend::spec).collect();
    (backends, specs)
}

fn backend_args(specs: &[String]) -> Vec<&str> {
    specs
        .iter()
        .flat_map(|s| ["--backend", s.as_str()])
        .collect()
}

#[test]
fn fifty_websocket_clients_echo_through_phase1() {
    let (_backends, specs) = three_demo_backends();
    let lb = Balancer::start(PHASE1, &backend_args(&specs));
    fifty_clients_echo(lb.addr);
}

#[test]
fn fifty_websocket_clients_echo_through_sticky_sessions_and_a_cookie_keeps_the_backend() {
    let (_backends, specs) = three_demo_backends();
    let mut args = backend_args(&specs);
    args.extend(["--sticky", "--explain"]);
    let lb = Balancer::start(LOADBALANCER, &args);
    fifty_clients_echo(lb.addr);

    // The balancer's cookie and decision ride on the 101.
    let (_first, fields, backend) = open_ws(lb.addr, None);
    let field = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let cookie = field("set-cookie").expect("a new session's cookie on the 101");
    let cookie = cookie.split(';').next().unwrap().to_string();
    assert!(field("x-lb-decision").is_some_and(|d| d.contains("sticky miss")));
    for _ in 0..5 {
        let (_again, fields, again) = open_ws(lb.addr, Some(&cookie));
        assert_eq!(again, backend, "the session's socket stays on its backend");
        assert!(fields
            .iter()
            .all(|(n, _)| !n.eq_ignore_ascii_case("set-cookie")));
    }
}

/// Reads a request head from `stream` and answers it with a 101 followed, in the same write, by
/// `early` bytes of the new protocol; returns the reader for what comes next.
fn switch_protocols(stream: &TcpStream, early: &[u8]) -> BufReader<TcpStream> {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
        line.clear();
    }
    let mut answer =
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: demo\r\nConnection: Upgrade\r\n\r\n"
            .to_vec();
    answer.extend_from_slice(early);
    let _ = (&*stream).write_all(&answer);
    reader
}

/// A backend that answers an upgrade request with a 101 and, in the same write, bytes of the
/// new protocol; then reports what it receives until the client closes.
fn raw_upgrading_backend(received: mpsc::Sender<Vec<u8>>) -> RawBackend {
    let received = std::sync::Mutex::new(received);
    RawBackend::start(move |stream| {
        let mut reader = switch_protocols(&stream, b"EARLY");
        let sender = received.lock().unwrap().clone();
        let mut buf = [0u8; 1024];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = sender.send(b"<closed>".to_vec());
                    return;
                }
                Ok(n) => {
                    let _ = sender.send(buf[..n].to_vec());
                }
            }
        }
    })
}

const UPGRADE: &[u8] =
    b"GET /tunnel HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: demo\r\n\r\n";

/// Reads from `stream` until `want` has arrived (bounded by the stream's read timeout).
fn read_until(stream: &mut TcpStream, want: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(want.len()).any(|w| w == want) {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got
}

#[test]
fn bytes_right_after_the_101_and_right_after_the_request_are_not_lost() {
    let (sender, received) = mpsc::channel();
    let backend = raw_upgrading_backend(sender);
    let lb = Balancer::start(PHASE1, &["--backend", &backend.spec()]);

    let mut stream = TcpStream::connect(lb.addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    // The request and the first bytes of the new protocol in one write.
    stream.write_all(&[UPGRADE, b"PIPELINED"].concat()).unwrap();
    let got = read_until(&mut stream, b"EARLY");
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{text}"
    );
    assert!(text.contains("\r\nUpgrade: demo\r\n"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("\r\nconnection: upgrade\r\n"),
        "{text}"
    );
    assert!(text.ends_with("\r\n\r\nEARLY"), "{text}");
    let first = received.recv_timeout(WAIT).expect("the backend got bytes");
    assert_eq!(first, b"PIPELINED");

    // Both ways, then the client's close reaches the backend.
    stream.write_all(b"more").unwrap();
    assert_eq!(received.recv_timeout(WAIT).unwrap(), b"more");
    stream.shutdown(Shutdown::Write).unwrap();
    assert_eq!(received.recv_timeout(WAIT).unwrap(), b"<closed>");
}

#[test]
fn a_backend_that_closes_ends_the_clients_side() {
    let backend = RawBackend::start(|stream| {
        switch_protocols(&stream, b"bye");
        // Dropping the stream closes the backend's side.
    });
    let lb = Balancer::start(PHASE1, &["--backend", &backend.spec()]);
    let mut stream = TcpStream::connect(lb.addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(UPGRADE).unwrap();
    let mut all = Vec::new();
    stream
        .read_to_end(&mut all)
        .expect("the tunnel ends with the backend's close");
    assert!(String::from_utf8_lossy(&all).ends_with("\r\n\r\nbye"));
}

#[test]
fn a_quiet_tunnel_is_closed_after_the_tunnel_timeout_and_a_busy_one_is_not() {
    let (sender, received) = mpsc::channel();
    let backend = raw_upgrading_backend(sender);
    let lb = Balancer::start(
        PHASE1,
        &[
            "--backend",
            &backend.spec(),
            "--tunnel-timeout",
            "400ms",
            "--client-timeout",
            "200ms",
        ],
    );
    let mut stream = TcpStream::connect(lb.addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(UPGRADE).unwrap();
    read_until(&mut stream, b"EARLY");

    // Bytes every 100 ms for a second: longer than both timeouts, never idle for either.
    let busy_until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < busy_until {
        stream.write_all(b"x").unwrap();
        assert_eq!(received.recv_timeout(WAIT).unwrap(), b"x");
        thread::sleep(Duration::from_millis(100));
    }
    // Then quiet: closed within the tunnel timeout (and some slack), not kept open.
    let quiet = Instant::now();
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .expect("closed, not timed out");
    let waited = quiet.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert_eq!(received.recv_timeout(WAIT).unwrap(), b"<closed>");
}

#[test]
fn statistics_and_metrics_count_tunnels() {
    let (_backends, specs) = three_demo_backends();
    let mut args = backend_args(&specs);
    args.extend(["--admin", "127.0.0.1:0"]);
    let lb = Balancer::start(PHASE1, &args);

    let (mut socket, _, backend_name) = open_ws(lb.addr, None);
    let index = ["a", "b", "c"]
        .iter()
        .position(|n| *n == backend_name)
        .unwrap();
    // The 101 and the backend's greeting may reach the client a moment before the balancer's
    // thread counts the tunnel open.
    assert!(eventually(WAIT, || stats_json(&lb)["tunnels"] == 1));
    let stats = stats_json(&lb);
    assert_eq!(stats["tunnels"], 1, "{stats}");
    assert_eq!(stats["tunnels_total"], 1, "{stats}");
    assert_eq!(stats["backends"][index]["tunnels"], 1, "{stats}");
    let metrics = get(lb.admin.unwrap(), "/metrics").text();
    assert!(metrics.contains("\nlb_tunnels_active 1\n"), "{metrics}");
    let page = get(lb.admin.unwrap(), "/stats").text();
    assert!(
        page.contains("1&nbsp;tunnel &middot;"),
        "the summary counts it"
    );
    assert!(
        page.contains("1 (1&nbsp;tunnel)</td>"),
        "its backend's row says so"
    );
    assert!(metrics.contains(&format!(
        "lb_tunnels_active{{backend=\"{}\"}} 1\n",
        specs[index]
    )));

    socket.close(None).unwrap();
    while socket.read().is_ok() {}
    drop(socket);
    assert!(eventually(WAIT, || stats_json(&lb)["tunnels"] == 0));
    let stats = stats_json(&lb);
    assert_eq!(stats["tunnels_total"], 1, "{stats}");
    let metrics = get(lb.admin.unwrap(), "/metrics").text();
    assert!(metrics.contains("\nlb_tunnels_total 1\n"), "{metrics}");
}

#[test]
fn a_backend_that_answers_200_to_an_upgrade_keeps_the_connection_http() {
    let backend = DemoBackend::start("a");
    let lb = Balancer::start(PHASE1, &["--backend", &backend.spec()]);
    let mut client = Client::connect(lb.addr);
    // Not a WebSocket handshake (no key, not /ws): the demo backend answers it as HTTP.
    client.send(
        b"GET /page HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    );
    let first = client.read_response("GET");
    assert_eq!(first.status, 200);
    assert!(first.text().contains("GET /page"));
    let second = client.get("/next");
    assert_eq!(second.status, 200, "the same connection goes on as HTTP");
    assert!(second.text().contains("GET /next"));
}

#[test]
fn upgrade_fields_reach_the_backend_only_when_connection_names_upgrade() {
    let echo = header_echo_with("");
    let lb = Balancer::start(PHASE1, &["--backend", &echo.spec()]);

    // h2c is forwarded like any protocol name; the balancer does not speak HTTP/2 itself.
    let switching = get_with(
        lb.addr,
        "Connection: keep-alive, Upgrade\r\nUpgrade: h2c\r\n",
    );
    let seen = switching.text().to_ascii_lowercase();
    assert!(seen.contains("upgrade: h2c\n"), "{seen}");
    assert!(seen.contains("connection: upgrade\n"), "{seen}");

    let not_named = get_with(lb.addr, "Upgrade: websocket\r\n");
    let seen = not_named.text().to_ascii_lowercase();
    assert!(
        !seen.contains("upgrade"),
        "a hop-by-hop field, dropped: {seen}"
    );
}

#[test]
fn least_connections_counts_an_open_tunnel_as_in_flight() {
    let a = DemoBackend::start("a");
    let b = DemoBackend::start("b");
    let lb = Balancer::start(
        LEAST_CONN,
        &[
            "--backend",
            &a.spec(),
            "--backend",
            &b.spec(),
            "--admin",
            "127.0.0.1:0",
        ],
    );
    let (_socket, _, holder) = open_ws(lb.addr, None);
    let other = if holder == "a" { "b" } else { "a" };
    // A request counts as in flight until its thread has written the last byte of the answer,
    // a moment after the client may already have read it; so each GET starts once the
    // statistics show the previous one over, and only the tunnel is in flight.
    let only_the_tunnel = || {
        let stats = stats_json(&lb);
        let active: Vec<u64> = stats["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["active_connections"].as_u64().unwrap())
            .collect();
        active.iter().sum::<u64>() == 1
    };
    for _ in 0..5 {
        assert!(eventually(Duration::from_secs(5), only_the_tunnel));
        assert_eq!(backend_of(&get(lb.addr, "/")), other);
    }
}

#[test]
fn ctrl_c_with_an_open_tunnel_exits_within_the_drain_deadline() {
    let backend = DemoBackend::start("a");
    let mut lb = Balancer::start(PHASE1, &["--backend", &backend.spec()]);
    let (_socket, _, _) = open_ws(lb.addr, None);
    let asked = Instant::now();
    lb.interrupt();
    assert_eq!(lb.wait_exit(Duration::from_secs(15)), Some(0));
    assert!(
        asked.elapsed() < Duration::from_secs(13),
        "{:?}",
        asked.elapsed()
    );
    assert!(
        lb.log().contains("(1 of them tunnels); closing them"),
        "{}",
        lb.log()
    );
}

#[test]
fn the_demo_backends_chat_page_opens_its_websocket() {
    let backend = DemoBackend::start("a");
    let lb = Balancer::start(PHASE1, &["--backend", &backend.spec()]);
    let page = get(lb.addr, "/chat");
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let html = page.text();
    assert!(
        html.contains("new WebSocket(") && html.contains("/ws"),
        "{html}"
    );
    assert!(html.contains("<b>a</b>"), "the page names its backend");
}
