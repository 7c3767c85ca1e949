//! Protocol versions over real sockets (RFC 9112 §2.3, RFC 9110 §2.5 and §15.6.6): a later
//! HTTP/1 minor version is served as HTTP/1.1; another major version, the HTTP/2 connection
//! preface and an HTTP/0.9 line get `505 HTTP Version Not Supported` and a closed connection,
//! from the balancer and from the demo backend alike.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::sync::{mpsc, Mutex};

use common::*;

const PHASE1: &str = env!("CARGO_BIN_EXE_phase1_rr");

/// Requests whose version this server does not speak, each answered 505.
const UNSUPPORTED: [(&str, &[u8]); 6] = [
    ("HTTP/2.0", b"GET / HTTP/2.0\r\nHost: t\r\n\r\n"),
    ("HTTP/3.0", b"GET / HTTP/3.0\r\nHost: t\r\n\r\n"),
    ("HTTP/0.9 line", b"GET /\r\n\r\n"),
    // An HTTP/0.9 client sends one line and waits for the answer.
    ("HTTP/0.9 line alone", b"GET /index.html\r\n"),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    ("HTTP/0.9 version", b"GET / HTTP/0.9\r\n\r\n"),
];

/// Sends `request` on a new connection and reads everything until the server closes it.
fn exchange_until_close(addr: SocketAddr, request: &[u8]) -> String {
    exchange_until_close_on(&mut Client::connect(addr), request)
}

/// Checks a 505 answer: status line, one-line body, `Connection: close`.
fn assert_505(answer: &str, what: &str) {
    assert!(
        answer.starts_with("HTTP/1.1 505 HTTP Version Not Supported\r\n"),
        "{what}: {answer:?}"
    );
    let (head, body) = answer.split_once("\r\n\r\n").expect("a whole response");
    assert!(head.contains("Connection: close"), "{what}: {answer:?}");
    assert!(
        head.contains(&format!("Content-Length: {}", body.len())),
        "{what}: {answer:?}"
    );
    assert_eq!(body.lines().count(), 1, "{what}: {body:?}");
}

#[test]
fn the_balancer_serves_http_1_2_as_http_1_1() {
    // A backend that reports the request line it received.
    let (lines_tx, lines_rx) = mpsc::channel();
    let lines_tx = Mutex::new(lines_tx);
    let backend = RawBackend::start(move |stream| {
        let mut conn = ServerConn::new(stream);
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if conn.stream.read(&mut byte).unwrap_or(0) == 0 {
                return;
            }
            head.push(byte[0]);
        }
        let line = String::from_utf8_lossy(&head)
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        let _ = lines_tx.lock().unwrap().send(line);
        conn.respond(200, "", b"hello\n");
    });
    let lb = Balancer::start(PHASE1, &["--backend", &backend.spec()]);

    let mut client = Client::connect(lb.addr);
    client.send(b"GET /minor HTTP/1.2\r\nHost: t\r\n\r\n");
    let response = client.read_response("GET");
    assert_eq!(
        (response.status, response.text().as_str()),
        (200, "hello\n")
    );
    assert_eq!(lines_rx.recv_timeout(WAIT).unwrap(), "GET /minor HTTP/1.1");
    // Kept alive as HTTP/1.1 is; the answer's status line says HTTP/1.1.
    let answer = exchange_until_close_on(
        &mut client,
        b"GET /again HTTP/1.9\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
    assert_eq!(lines_rx.recv_timeout(WAIT).unwrap(), "GET /again HTTP/1.1");
}

/// Sends `request` on an open connection and reads until the server closes it.
fn exchange_until_close_on(client: &mut Client, request: &[u8]) -> String {
    client.send(request);
    let mut answer = Vec::new();
    client
        .stream
        .read_to_end(&mut answer)
        .expect("the server closes the connection");
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn the_balancer_answers_other_versions_505_and_closes() {
    let backend = DemoBackend::start("a");
    let lb = Balancer::start(PHASE1, &["--backend", &backend.spec()]);
    for (what, request) in UNSUPPORTED {
        let answer = exchange_until_close(lb.addr, request);
        assert_505(&answer, what);
    }
    // The balancer is still serving.
    assert_eq!(get(lb.addr, "/").status, 200);
}

#[test]
fn what_is_not_a_version_is_still_400() {
    let backend = DemoBackend::start("a");
    let lb = Balancer::start(PHASE1, &["--backend", &backend.spec()]);
    for request in [
        &b"GET / HTTP/1.10\r\nHost: t\r\n\r\n"[..],
        b"GET / HTTP/2\r\nHost: t\r\n\r\n",
        b"GET / http/1.1\r\nHost: t\r\n\r\n",
    ] {
        let answer = exchange_until_close(lb.addr, request);
        assert!(
            answer.starts_with("HTTP/1.1 400 "),
            "{request:?}: {answer:?}"
        );
    }
}

#[test]
fn the_demo_backend_serves_http_1_2_as_http_1_1() {
    let backend = DemoBackend::start("a");
    let mut client = Client::connect(backend.addr);
    client.send(b"GET /x HTTP/1.2\r\nHost: t\r\n\r\n");
    let response = client.read_response("GET");
    assert_eq!(response.status, 200);
    assert!(
        response.text().ends_with(": GET /x\n"),
        "{}",
        response.text()
    );
    // Keep-alive, as for HTTP/1.1.
    let answer =
        exchange_until_close_on(&mut client, b"GET /y HTTP/1.2\r\nConnection: close\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer:?}");
}

#[test]
fn the_demo_backend_answers_other_versions_505_and_closes() {
    let backend = DemoBackend::start("a");
    for (what, request) in UNSUPPORTED {
        let answer = exchange_until_close(backend.addr, request);
        assert_505(&answer, what);
    }
}
