//! Phase 1 over real sockets: round robin, and the HTTP/1.1 forwarding every phase builds on.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const PHASE1: &str = env!("CARGO_BIN_EXE_phase1_rr");

/// Three demo backends and a phase-1 balancer in front of them (with `extra` flags).
fn three_backends(extra: &[&str]) -> (Vec<DemoBackend>, Balancer) {
    let backends: Vec<DemoBackend> = ["a", "b", "c"]
        .iter()
        .map(|n| DemoBackend::start(n))
        .collect();
    let mut args: Vec<String> = Vec::new();
    for b in &backends {
        args.push("--backend".into());
        args.push(b.spec());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let lb = Balancer::start(PHASE1, &args);
    (backends, lb)
}

/// A balancer in front of one raw backend.
fn in_front_of(backend: &RawBackend, extra: &[&str]) -> Balancer {
    let spec = backend.spec();
    let mut args = vec!["--backend", spec.as_str()];
    args.extend_from_slice(extra);
    Balancer::start(PHASE1, &args)
}

#[test]
fn round_robin_visits_backends_in_order() {
    let (_backends, lb) = three_backends(&[]);
    assert_eq!(
        backends_hit(lb.addr, 7),
        ["a", "b", "c", "a", "b", "c", "a"]
    );
    let response = get(lb.addr, "/hello");
    assert!(
        response.text().starts_with("Hello from b"),
        "{}",
        response.text()
    );
    assert!(response.text().ends_with("GET /hello\n"));
}

#[test]
fn fifty_requests_share_one_keep_alive_connection() {
    let (_backends, lb) = three_backends(&[]);
    let mut client = Client::connect(lb.addr);
    let names: Vec<String> = (0..50)
        .map(|i| {
            client
                .get(&format!("/{i}"))
                .header("x-backend")
                .unwrap()
                .to_string()
        })
        .collect();
    let counts = count(&names);
    assert_eq!((counts["a"], counts["b"], counts["c"]), (17, 17, 16));
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let (_backends, lb) = three_backends(&[]);
    let mut client = Client::connect(lb.addr);
    let batch: String = (1..=5)
        .map(|i| format!("GET /p{i} HTTP/1.1\r\nHost: t\r\n\r\n"))
        .collect();
    client.send(batch.as_bytes());
    for i in 1..=5 {
        let response = client.read_response("GET");
        assert!(
            response.text().ends_with(&format!("GET /p{i}\n")),
            "{}",
            response.text()
        );
    }
}

#[test]
fn a_head_sent_one_byte_at_a_time_is_understood() {
    let (_backends, lb) = three_backends(&[]);
    let mut client = Client::connect(lb.addr);
    for byte in b"GET /slowly HTTP/1.1\r\nHost: t\r\nX-A: b\r\n\r\n" {
        client.send(&[*byte]);
    }
    let response = client.read_response("GET");
    assert_eq!(response.status, 200);
    assert!(response.text().ends_with("GET /slowly\n"));
}

/// A backend that answers with the MD5 and length of the request body it received.
fn body_hasher() -> RawBackend {
    responder(|request| {
        (
            200,
            String::new(),
            format!("{} {}", md5_hex(&request.body), request.body.len()).into_bytes(),
        )
    })
}

#[test]
fn a_five_megabyte_request_body_arrives_intact() {
    let backend = body_hasher();
    let lb = in_front_of(&backend, &[]);
    let body: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut client = Client::connect(lb.addr);
    client.send(
        format!(
            "POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    client.send(&body);
    let response = client.read_response("POST");
    assert_eq!(
        response.text(),
        format!("{} {}", md5_hex(&body), body.len())
    );
    // The connection is still in step for another request.
    client.send(b"POST /again HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc");
    assert_eq!(
        client.read_response("POST").text(),
        format!("{} 3", md5_hex(b"abc"))
    );
}

#[test]
fn a_twenty_megabyte_response_body_arrives_intact() {
    let body: Arc<Vec<u8>> = Arc::new((0..20_000_000u32).map(|i| (i * 13 % 253) as u8).collect());
    let served = Arc::clone(&body);
    let backend = responder(move |_| (200, String::new(), served.to_vec()));
    let lb = in_front_of(&backend, &[]);
    let mut client = Client::connect(lb.addr);
    let response = client.get("/big");
    assert_eq!(response.body.len(), body.len());
    assert_eq!(md5_hex(&response.body), md5_hex(&body));
    assert_eq!(client.get("/next").status, 200);
}

#[test]
fn chunked_request_and_response_bodies_arrive_intact() {
    // The backend hashes the request body and answers in chunks of its own.
    let backend = RawBackend::start(|stream| {
        let mut conn = ServerConn::new(stream);
        while let Some(request) = conn.read_request() {
            let text = format!("{} {}", md5_hex(&request.body), request.body.len());
            let (first, second) = text.split_at(10);
            conn.send(
                format!(
                    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{first}\r\n{:x};ext=1\r\n{second}\r\n0\r\nX-Trailer: yes\r\n\r\n",
                    first.len(),
                    second.len()
                )
                .as_bytes(),
            );
        }
    });
    let lb = in_front_of(&backend, &[]);
    let mut client = Client::connect(lb.addr);
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 256) as u8).collect();
    let mut request =
        b"POST /chunks HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for piece in body.chunks(70_000) {
        request.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        request.extend_from_slice(piece);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    client.send(&request);
    let response = client.read_response("POST");
    assert_eq!(response.header("transfer-encoding"), Some("chunked"));
    assert_eq!(
        response.text(),
        format!("{} {}", md5_hex(&body), body.len())
    );
    client.send(b"POST /again HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
    assert_eq!(
        client.read_response("POST").text(),
        format!("{} 3", md5_hex(b"abc"))
    );
}

#[test]
fn a_close_delimited_response_is_relayed_and_then_closed() {
    let backend = RawBackend::start(|stream| {
        let mut conn = ServerConn::new(stream);
        if conn.read_request().is_some() {
            conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end");
        }
    });
    let lb = in_front_of(&backend, &[]);
    let mut client = Client::connect(lb.addr);
    let response = client.get("/");
    assert_eq!(response.text(), "until the end");
    assert_eq!(response.header("connection"), Some("close"));
}

#[test]
fn bodiless_responses_leave_the_connection_usable() {
    let backend = responder(|request| match request.path.as_str() {
        "/204" => (204, String::new(), Vec::new()),
        "/304" => (304, "ETag: \"x\"\r\n".into(), Vec::new()),
        _ => (200, String::new(), b"full body".to_vec()),
    });
    let lb = in_front_of(&backend, &[]);
    let mut client = Client::connect(lb.addr);
    client.send(b"HEAD /head HTTP/1.1\r\nHost: t\r\n\r\n");
    let head = client.read_response("HEAD");
    assert_eq!(
        (head.status, head.header("content-length")),
        (200, Some("9"))
    );
    assert_eq!(client.get("/204").status, 204);
    assert_eq!(client.get("/304").status, 304);
    assert_eq!(client.get("/after").text(), "full body");
}

/// A backend that echoes the request's fields and answers with some hop-by-hop fields of its own.
fn header_echo() -> RawBackend {
    header_echo_with("Connection: X-Private\r\nX-Private: secret\r\nKeep-Alive: timeout=5\r\n")
}

#[test]
fn x_forwarded_for_gets_the_client_added() {
    let backend = header_echo();
    let lb = in_front_of(&backend, &[]);
    let mut client = Client::connect(lb.addr);
    let first = client.get("/");
    assert!(
        first.text().contains("x-forwarded-for: 127.0.0.1\n"),
        "{}",
        first.text()
    );
    client.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n");
    let second = client.read_response("GET");
    assert!(
        second
            .text()
            .contains("x-forwarded-for: 203.0.113.9, 127.0.0.1\n"),
        "{}",
        second.text()
    );
    assert!(second.text().contains("host: t\n"));
}

#[test]
fn hop_by_hop_headers_are_removed_both_ways() {
    let backend = header_echo();
    let lb = in_front_of(&backend, &[]);
    let mut client = Client::connect(lb.addr);
    client.send(
        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 300\r\nUpgrade: websocket\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nX-End: kept\r\n\r\n",
    );
    let response = client.read_response("GET");
    let received = response.text();
    for gone in [
        "connection:",
        "x-hop:",
        "keep-alive:",
        "upgrade:",
        "proxy-connection:",
        "te:",
    ] {
        assert!(
            !received.contains(gone),
            "{gone} was forwarded:\n{received}"
        );
    }
    assert!(received.contains("x-end: kept"));
    // And on the way back: the backend's Connection and the field it names are not relayed.
    assert_eq!(response.header("x-private"), None);
    assert_eq!(response.header("keep-alive"), None);
    assert_eq!(response.header("connection"), None);
}

#[test]
fn connection_cannot_take_host_away_and_a_request_id_named_there_is_replaced() {
    let backend = header_echo();
    let lb = in_front_of(&backend, &[]);
    let mut client = Client::connect(lb.addr);
    client.send(
        b"GET / HTTP/1.1\r\nHost: site.example\r\nConnection: Host, X-Request-Id\r\nX-Request-Id: mine\r\n\r\n",
    );
    let received = client.read_response("GET").text();
    assert!(received.contains("host: site.example\n"), "{received}");
    assert!(!received.contains("x-request-id: mine"), "{received}");
    assert!(received.contains("x-request-id: "), "a new id: {received}");
}

#[test]
fn an_absolute_form_target_reaches_the_backend_as_a_path_with_its_host() {
    let backend = responder(|request| {
        let host = request.header("host").unwrap_or("none").to_string();
        (
            200,
            String::new(),
            format!("{} {host}", request.path).into_bytes(),
        )
    });
    let lb = in_front_of(&backend, &[]);
    let mut client = Client::connect(lb.addr);
    for (target, seen) in [
        ("http://example.com/abs?q=1", "/abs?q=1 example.com"),
        ("HTTP://example.com:8080", "/ example.com:8080"),
        ("http://example.com?q", "/?q example.com"),
    ] {
        client.send(format!("GET {target} HTTP/1.1\r\nHost: other\r\n\r\n").as_bytes());
        assert_eq!(client.read_response("GET").text(), seen, "{target}");
    }
    client.send(b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(client.read_response("OPTIONS").text(), "* t");
}

#[test]
fn bad_requests_get_their_status_and_the_next_connection_works() {
    let (_backends, lb) = three_backends(&[]);
    let too_large = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let too_long = format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(70 * 1024));
    let cases: [(&str, &[u8], u16); 11] = [
        ("garbage", b"NOT HTTP AT ALL\r\n\r\n", 400),
        ("too large", too_large.as_bytes(), 431),
        ("a target too long", too_long.as_bytes(), 414),
        ("two hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        ("a host with a space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
        ("an empty host", b"GET / HTTP/1.1\r\nHost:\r\n\r\n", 400),
        ("a target that is not a path", b"GET x HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        ("a user in an absolute target", b"GET http://u@t/ HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        ("length and chunked", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc", 400),
        ("conflicting lengths", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
        ("no host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ];
    for (what, request, status) in cases {
        let mut client = Client::connect(lb.addr);
        let _ = client.stream.write_all(request);
        let response = client
            .try_read_response("GET")
            .unwrap_or_else(|| panic!("{what}: no response"));
        assert_eq!(response.status, status, "{what}");
        assert_eq!(
            response.header("content-type"),
            Some("text/plain; charset=utf-8"),
            "{what}"
        );
        assert_eq!(response.header("connection"), Some("close"), "{what}");
        assert!(client.is_closed(), "{what}: the connection is closed");
        assert_eq!(get(lb.addr, "/").status, 200, "after {what}");
    }
}

#[test]
fn a_request_refused_for_its_framing_closes_the_connection_so_its_body_is_never_a_request() {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = Arc::clone(&seen);
    let backend = RawBackend::start(move |stream| {
        let mut conn = ServerConn::new(stream);
        while let Some(request) = conn.read_request() {
            log.lock().unwrap().push(request.path.clone());
            conn.respond(200, "", b"ok");
        }
    });
    let lb = in_front_of(&backend, &[]);
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n";
    let framings = [
        format!(
            "Content-Length: {}\r\nTransfer-Encoding: chunked",
            smuggled.len()
        ),
        format!("Content-Length: 0\r\nContent-Length: {}", smuggled.len()),
        "Transfer-Encoding: gzip".to_string(),
    ];
    for framing in framings {
        let mut client = Client::connect(lb.addr);
        client
            .send(format!("POST / HTTP/1.1\r\nHost: t\r\n{framing}\r\n\r\n{smuggled}").as_bytes());
        let response = client.read_response("POST");
        assert_eq!(response.status, 400, "{framing}");
        assert!(client.is_closed(), "{framing}: the connection is closed");
    }
    // A request on a connection of its own still gets through, and nothing else did.
    assert_eq!(get(lb.addr, "/after").status, 200);
    assert_eq!(*seen.lock().unwrap(), ["/after"]);
}

#[test]
fn a_killed_backend_is_skipped_without_a_failed_request() {
    let (mut backends, lb) = three_backends(&[]);
    assert_eq!(backends_hit(lb.addr, 3), ["a", "b", "c"]);
    backends[1].stop();
    let names = backends_hit(lb.addr, 12);
    assert!(!names.contains(&"b".to_string()));
    assert!(names.iter().all(|n| n == "a" || n == "c"), "{names:?}");
}

#[test]
fn all_backends_down_gives_503_quickly() {
    let (mut backends, lb) = three_backends(&[]);
    for backend in &mut backends {
        backend.stop();
    }
    let started = Instant::now();
    let response = get(lb.addr, "/");
    assert_eq!(response.status, 503);
    assert!(response
        .header("retry-after")
        .is_some_and(|s| s.parse::<u64>().is_ok()));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_backend_that_never_answers_gives_504() {
    let backend = RawBackend::start(|stream| {
        let mut conn = ServerConn::new(stream);
        while conn.read_request().is_some() {}
    });
    let lb = in_front_of(&backend, &["--backend-timeout", "500ms"]);
    let started = Instant::now();
    let response = get(lb.addr, "/");
    assert_eq!(response.status, 504);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[test]
fn a_response_cut_short_before_its_head_gives_502() {
    let backend = RawBackend::start(|stream| {
        let mut conn = ServerConn::new(stream);
        if conn.read_request().is_some() {
            conn.send(b"HTTP/1.1 200 OK\r\nContent-Le");
        }
    });
    let lb = in_front_of(&backend, &[]);
    assert_eq!(get(lb.addr, "/").status, 502);
}

#[test]
fn a_response_cut_short_after_its_head_ends_the_client_connection_with_a_reset() {
    // A chunked response without its last chunk: an HTTP/1.0 client gets it de-chunked and
    // delimited by the end of the connection, so only a reset tells it the body is not whole.
    let backend = RawBackend::start(|stream| {
        let mut conn = ServerConn::new(stream);
        if conn.read_request().is_some() {
            conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n");
        }
    });
    let lb = in_front_of(&backend, &[]);
    let mut client = TcpStream::connect(lb.addr).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    client.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut received = Vec::new();
    let end = std::io::Read::read_to_end(&mut client, &mut received);
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let err = end.expect_err("an error, not an orderly end");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

#[test]
fn a_slow_loris_client_is_dropped_without_delaying_others() {
    let (_backends, lb) = three_backends(&["--client-timeout", "1s"]);
    let mut slow = TcpStream::connect(lb.addr).unwrap();
    slow.set_read_timeout(Some(WAIT)).unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    let trickle = thread::spawn(move || {
        let started = Instant::now();
        // One byte every 100 ms, for at most 5 s: the balancer must hang up after about 1 s.
        for _ in 0..50 {
            if slow.write_all(b"X").is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        let mut rest = Vec::new();
        let _ = std::io::Read::read_to_end(&mut slow, &mut rest);
        (
            started.elapsed(),
            String::from_utf8_lossy(&rest).into_owned(),
        )
    });
    let started = Instant::now();
    assert_eq!(get(lb.addr, "/").status, 200);
    assert!(started.elapsed() < Duration::from_millis(500));
    let (took, answer) = trickle.join().unwrap();
    assert!(
        took < Duration::from_secs(3),
        "slow client kept for {took:?}"
    );
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
}

#[test]
fn a_client_that_connects_and_sends_nothing_is_closed_too() {
    // Connections are handed over once their first bytes arrive; one that never sends any is
    // handed over anyway after about a second, and then `--client-timeout` closes it.
    let (_backends, lb) = three_backends(&["--client-timeout", "1s"]);
    let mut silent = TcpStream::connect(lb.addr).unwrap();
    silent.set_read_timeout(Some(WAIT)).unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut silent, &mut rest);
    let took = started.elapsed();
    assert!(took < WAIT, "a silent client kept for {took:?}");
    assert!(
        rest.is_empty() || rest.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
    assert_eq!(get(lb.addr, "/").status, 200);
}

#[test]
fn a_closed_pooled_connection_is_retried_on_a_fresh_one() {
    // This backend serves one request per connection and then closes it without saying so,
    // so the balancer's pooled connection is always already closed when it is reused.
    let connections = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&connections);
    let backend = RawBackend::start(move |stream| {
        seen.fetch_add(1, Ordering::SeqCst);
        let mut conn = ServerConn::new(stream);
        if conn.read_request().is_some() {
            conn.respond(200, "", b"once");
        }
    });
    let lb = in_front_of(&backend, &[]);
    for _ in 0..5 {
        assert_eq!(get(lb.addr, "/").text(), "once");
    }
    assert!(connections.load(Ordering::SeqCst) >= 5);
}

#[test]
fn a_post_does_not_go_out_on_a_pooled_connection_the_backend_has_closed() {
    // One request per connection again: the POST, which is never sent twice, must see that
    // its pooled connection was closed before it sends, and take a fresh one.
    let closed = Arc::new(AtomicUsize::new(0));
    let bodies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let (counter, log) = (Arc::clone(&closed), Arc::clone(&bodies));
    let backend = RawBackend::start(move |stream| {
        let mut conn = ServerConn::new(stream);
        if let Some(request) = conn.read_request() {
            log.lock().unwrap().push(request.body);
            conn.respond(200, "", b"once");
        }
        drop(conn);
        counter.fetch_add(1, Ordering::SeqCst);
    });
    let lb = in_front_of(&backend, &[]);
    let mut client = Client::connect(lb.addr);
    for i in 0..3 {
        let body = format!("body {i}");
        client.send(
            format!(
                "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        assert_eq!(client.read_response("POST").text(), "once", "POST {i}");
        assert!(eventually(WAIT, || closed.load(Ordering::SeqCst) == i + 1));
    }
    assert_eq!(*bodies.lock().unwrap(), [b"body 0", b"body 1", b"body 2"]);
}

#[test]
fn a_burst_of_requests_opens_a_few_backend_connections_at_once_not_one_each() {
    // The backend holds every answer until the test lets them go, so the first connections
    // stay in their first exchange and later requests must wait their turn (250 ms) before
    // opening more. Without that rule all six connections arrive together.
    const CLIENTS: usize = 6;
    const AT_ONCE: usize = 4;
    let accepted: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let (release, released) = mpsc::channel::<()>();
    let released = Arc::new(Mutex::new(released));
    let seen = Arc::clone(&accepted);
    let backend = RawBackend::start(move |stream| {
        seen.lock().unwrap().push(Instant::now());
        let mut conn = ServerConn::new(stream);
        while conn.read_request().is_some() {
            let _ = released.lock().unwrap().recv_timeout(WAIT);
            conn.respond(200, "", b"released");
        }
    });
    let lb = in_front_of(&backend, &[]);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let addr = lb.addr;
            thread::spawn(move || get(addr, "/").text())
        })
        .collect();
    let all_connected = eventually(WAIT, || accepted.lock().unwrap().len() == CLIENTS);
    let times = accepted.lock().unwrap().clone();
    for _ in 0..CLIENTS {
        release.send(()).unwrap();
    }
    for client in clients {
        assert_eq!(client.join().expect("client thread"), "released");
    }
    assert!(all_connected, "{} connections of {CLIENTS}", times.len());
    let first_wave = times[AT_ONCE - 1] - times[0];
    let before_the_next = times[AT_ONCE] - times[0];
    assert!(
        before_the_next >= Duration::from_millis(200),
        "connection {} came {before_the_next:?} after the first (the first {AT_ONCE} within {first_wave:?})",
        AT_ONCE + 1
    );
}

/// The context switches of the balancer's main thread (the one that watches the listen queue).
#[cfg(target_os = "linux")]
fn main_thread_switches(lb: &Balancer) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{0}/task/{0}/status", lb.pid()))
        .expect("the balancer's main thread");
    status
        .lines()
        .filter(|line| line.contains("ctxt_switches"))
        .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

#[cfg(target_os = "linux")]
#[test]
fn with_every_thread_held_by_a_keep_alive_client_the_pool_waits_for_connections_without_ticking() {
    let (_backends, lb) = three_backends(&[]);
    // The pool starts with one thread, and this client keeps it: nobody waits in `accept`.
    let mut holder = Client::connect(lb.addr);
    assert_eq!(holder.get("/").status, 200);
    let wchan = format!("/proc/{0}/task/{0}/wchan", lb.pid());
    let polls = eventually(WAIT, || {
        std::fs::read_to_string(&wchan).is_ok_and(|function| function.contains("poll"))
    });
    assert!(polls, "the main thread waits in poll");
    // Looking at the queue every 2 ms would be ~500 switches a second; polling, ten.
    let before = main_thread_switches(&lb);
    thread::sleep(Duration::from_secs(1));
    let switches = main_thread_switches(&lb) - before;
    assert!(switches < 60, "{switches} context switches in a second");
    // A new client wakes it, gets a thread of its own, and the first keeps its connection.
    let mut newcomer = Client::connect(lb.addr);
    assert_eq!(newcomer.get("/").status, 200);
    assert_eq!(holder.get("/").status, 200);
}

/// The name and scheduling policy (0 normal, 3 batch) of each of the balancer's threads, from
/// field 41 of `/proc/PID/task/TID/stat`.
#[cfg(target_os = "linux")]
fn thread_policies(lb: &Balancer) -> Vec<(String, u32)> {
    let tasks =
        std::fs::read_dir(format!("/proc/{}/task", lb.pid())).expect("the balancer's threads");
    tasks
        .filter_map(|task| {
            let path = task.ok()?.path();
            let name = std::fs::read_to_string(path.join("comm")).ok()?;
            let stat = std::fs::read_to_string(path.join("stat")).ok()?;
            // Fields after the name in parentheses start at field 3.
            let after_name = &stat[stat.rfind(')')? + 2..];
            let policy = after_name.split_whitespace().nth(41 - 3)?.parse().ok()?;
            Some((name.trim().to_string(), policy))
        })
        .collect()
}

#[cfg(target_os = "linux")]
#[test]
fn client_threads_are_batch_work_for_the_scheduler_unless_told_otherwise() {
    const NORMAL: u32 = 0;
    const BATCH: u32 = 3;
    for (flags, client_policy) in [
        (&[][..], BATCH),
        (&["--cpu-scheduling", "normal"][..], NORMAL),
    ] {
        let (_backends, lb) = three_backends(flags);
        let mut client = Client::connect(lb.addr);
        assert_eq!(client.get("/").status, 200);
        let threads = thread_policies(&lb);
        let clients: Vec<u32> = threads
            .iter()
            .filter(|(name, _)| name == "client")
            .map(|&(_, policy)| policy)
            .collect();
        assert!(
            !clients.is_empty(),
            "{flags:?}: no client thread in {threads:?}"
        );
        assert!(
            clients.iter().all(|&policy| policy == client_policy),
            "{flags:?}: {threads:?}"
        );
        // The other threads (the pool's, health checks, statistics) keep the usual class.
        assert!(
            threads
                .iter()
                .filter(|(name, _)| name != "client")
                .all(|&(_, policy)| policy == NORMAL),
            "{flags:?}: {threads:?}"
        );
    }
}

#[test]
fn sigint_lets_the_request_in_flight_finish_refuses_new_clients_and_exits_zero() {
    let (arrived, wait_for_arrival) = mpsc::channel();
    let arrived = Mutex::new(arrived);
    let (release, released) = mpsc::channel::<()>();
    let released = Mutex::new(released);
    let backend = RawBackend::start(move |stream| {
        let mut conn = ServerConn::new(stream);
        if conn.read_request().is_some() {
            let _ = arrived.lock().unwrap().send(());
            let _ = released.lock().unwrap().recv_timeout(WAIT);
            conn.respond(200, "", b"finished");
        }
    });
    let mut lb = in_front_of(&backend, &[]);
    let idle = Client::connect(lb.addr);
    let mut client = Client::connect(lb.addr);
    client.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
    wait_for_arrival
        .recv_timeout(WAIT)
        .expect("request reached the backend");
    lb.interrupt();
    // While the request in flight finishes, a new client is refused, not left in the queue.
    let refused = eventually(WAIT, || TcpStream::connect(lb.addr).is_err());
    release.send(()).unwrap();
    assert_eq!(client.read_response("GET").text(), "finished");
    assert!(refused, "a new connection was still accepted by the kernel");
    assert_eq!(
        lb.wait_exit(Duration::from_secs(5)),
        Some(0),
        "log:\n{}",
        lb.log()
    );
    assert!(lb.log().contains("statistics:"));
    drop(idle);
}

#[test]
fn bad_flags_give_a_one_line_error_and_exit_code_2() {
    let cases: [&[&str]; 10] = [
        &["--backend", "127.0.0.1:1=0"],
        &["--backend", "not-an-address"],
        &["--listen", "nowhere"],
        &["--connect-timeout", "soon"],
        // A zero timeout would fail every request (or drop every client) once running.
        &["--connect-timeout", "0"],
        &["--backend-timeout", "0s"],
        &["--client-timeout", "0ms"],
        &["--client-timeout", "-1"],
        &["--cpu-scheduling", "fast"],
        &["--no-such-flag"],
    ];
    for args in cases {
        let output = std::process::Command::new(PHASE1)
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        if args[0] != "--no-such-flag" {
            assert!(
                stderr.contains(args[0]),
                "{args:?} names the flag: {stderr}"
            );
        }
    }
}

#[test]
fn a_port_in_use_is_a_start_up_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = std::process::Command::new(PHASE1)
        .args(["--listen", &addr, "--admin", "off"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&format!("--listen {addr}")), "{stderr}");
}

#[test]
fn max_connections_pauses_accepting_until_a_client_leaves() {
    let (_backends, lb) = three_backends(&["--max-connections", "1"]);
    let mut first = Client::connect(lb.addr);
    assert_eq!(first.get("/").status, 200);
    // The second client's connection waits in the listen queue, unanswered, while the first
    // stays connected.
    let mut second = Client::connect(lb.addr);
    second
        .stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    second.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(
        second.try_read_response("GET").is_none(),
        "served beyond --max-connections"
    );
    assert!(eventually(WAIT, || lb.log().contains("accepting paused")));
    drop(first);
    second.stream.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(second.read_response("GET").status, 200);
}

#[test]
fn demo_starts_backends_inside_the_balancer() {
    // Free ports, found by binding port 0 and letting go.
    let ports: Vec<u16> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect();
    let specs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let lb = Balancer::start(
        PHASE1,
        &["--demo", "--backend", &specs[0], "--backend", &specs[1]],
    );
    let names = backends_hit(lb.addr, 4);
    let expected: Vec<String> = [0, 1, 0, 1]
        .iter()
        .map(|&i| format!("backend-{}", ports[i]))
        .collect();
    assert_eq!(names, expected);
}

#[test]
fn http10_closes_unless_it_asks_for_keep_alive() {
    let (_backends, lb) = three_backends(&[]);
    let mut plain = Client::connect(lb.addr);
    plain.send(b"GET /old HTTP/1.0\r\n\r\n");
    let response = plain.read_response("GET");
    assert_eq!(response.status, 200);
    assert_eq!(response.header("connection"), Some("close"));
    assert!(plain.is_closed());

    let mut kept = Client::connect(lb.addr);
    for _ in 0..2 {
        kept.send(b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        let response = kept.read_response("GET");
        assert_eq!(response.status, 200);
        assert_eq!(response.header("connection"), Some("keep-alive"));
    }
}

#[test]
fn connection_close_from_the_client_is_honoured() {
    let (_backends, lb) = three_backends(&[]);
    let mut client = Client::connect(lb.addr);
    client.send(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let response = client.read_response("GET");
    assert_eq!(response.status, 200);
    assert_eq!(response.header("connection"), Some("close"));
    assert!(client.is_closed());
}

#[test]
fn a_chunked_response_reaches_an_http10_client_as_plain_bytes() {
    let backend = RawBackend::start(|stream| {
        let mut conn = ServerConn::new(stream);
        while conn.read_request().is_some() {
            conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
        }
    });
    let lb = in_front_of(&backend, &[]);
    let mut client = Client::connect(lb.addr);
    client.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    let response = client.read_response("GET");
    assert_eq!(response.header("transfer-encoding"), None);
    assert_eq!(response.header("connection"), Some("close"));
    assert_eq!(response.text(), "hello world");
}

/// Reads raw bytes from `client` until `marker` has arrived (bounded by the read timeout).
fn read_until(client: &mut TcpStream, marker: &[u8]) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    while !seen.windows(marker.len()).any(|w| w == marker) {
        match std::io::Read::read(client, &mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&chunk[..n]),
        }
    }
    seen
}

#[test]
fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let backend = body_hasher();
    let lb = in_front_of(&backend, &[]);
    let mut client = TcpStream::connect(lb.addr).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    client
        .write_all(
            b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        )
        .unwrap();
    let interim = read_until(&mut client, b"\r\n\r\n");
    assert!(
        interim.starts_with(b"HTTP/1.1 100 Continue\r\n"),
        "{}",
        String::from_utf8_lossy(&interim)
    );
    client.write_all(b"hello").unwrap();
    let answer = read_until(&mut client, md5_hex(b"hello").as_bytes());
    assert!(String::from_utf8_lossy(&answer).contains(&format!("{} 5", md5_hex(b"hello"))));
}

#[test]
fn interim_responses_are_passed_on_before_the_final_one() {
    let backend = RawBackend::start(|stream| {
        let mut conn = ServerConn::new(stream);
        while conn.read_request().is_some() {
            conn.send(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        }
    });
    let lb = in_front_of(&backend, &[]);
    let mut client = TcpStream::connect(lb.addr).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let seen = String::from_utf8_lossy(&read_until(&mut client, b"\r\n\r\nok")).into_owned();
    assert!(
        seen.starts_with(
            "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\nHTTP/1.1 200 "
        ),
        "{seen}"
    );
}

#[test]
fn too_many_header_fields_get_431() {
    let (_backends, lb) = three_backends(&[]);
    let fields: String = (0..150).map(|i| format!("X-F{i}: v\r\n")).collect();
    let mut client = Client::connect(lb.addr);
    client.send(format!("GET / HTTP/1.1\r\nHost: t\r\n{fields}\r\n").as_bytes());
    assert_eq!(client.read_response("GET").status, 431);
}

#[test]
fn a_response_with_both_framings_is_relayed_as_chunked() {
    // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, which must not be passed on.
    let backend = RawBackend::start(|stream| {
        let mut conn = ServerConn::new(stream);
        while conn.read_request().is_some() {
            conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n");
        }
    });
    let lb = in_front_of(&backend, &[]);
    let mut client = Client::connect(lb.addr);
    let response = client.get("/");
    assert_eq!(response.header("content-length"), None);
    assert_eq!(response.text(), "ok");
    assert_eq!(client.get("/again").text(), "ok");
}

#[test]
fn a_burst_of_clients_is_served_at_once_and_the_pool_grows_only_as_needed() {
    const CLIENTS: usize = 40;
    let backend = DemoBackend::with_delay("slow", Duration::from_millis(500));
    let lb = Balancer::start(PHASE1, &["--backend", &backend.spec()]);
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let addr = lb.addr;
            thread::spawn(move || get(addr, "/").status)
        })
        .collect();
    for client in clients {
        assert_eq!(client.join().expect("client thread"), 200);
    }
    // One after another, 40 answers of 500 ms would take 20 s.
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "served one by one? {took:?}"
    );
    // A thread per client, plus at most one step of growth (16) and the balancer's own few.
    let threads = std::fs::read_dir(format!("/proc/{}/task", lb.pid()))
        .expect("the balancer's threads")
        .count();
    assert!(
        threads <= CLIENTS + 16 + 8,
        "{threads} threads for {CLIENTS} clients"
    );
    // Left idle, the pool shrinks after 30 s to the one thread waiting in `accept` (the
    // balancer's own few besides).
    let shrunk = eventually(Duration::from_secs(45), || {
        std::fs::read_dir(format!("/proc/{}/task", lb.pid()))
            .map(|tasks| tasks.count() <= 8)
            .unwrap_or(false)
    });
    assert!(shrunk, "idle threads did not end");
    assert_eq!(get(lb.addr, "/").status, 200, "and it still serves");
}
