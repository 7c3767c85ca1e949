//! HTTPS over real sockets: TLS ends at the balancer, the backends get plain HTTP/1.1 with
//! `X-Forwarded-Proto`, and whatever a client does wrong during the handshake stays inside its
//! own connection. Certificates are made in the test with `rcgen`; the client is `rustls`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::HandshakeKind;

use common::*;

const LOADBALANCER: &str = env!("CARGO_BIN_EXE_loadbalancer");
const PHASE1: &str = env!("CARGO_BIN_EXE_phase1_rr");

/// A balancer (`bin`) over one header-echoing backend, with an HTTPS listener showing `cert`.
fn start_https(
    bin: &str,
    cert: &TestCertificate,
    extra: &[&str],
) -> (Balancer, RawBackend, std::net::SocketAddr) {
    let backend = header_echo_with("");
    let spec = backend.spec();
    let mut args = vec!["--backend", &spec];
    args.extend(cert.tls_flags("127.0.0.1:0"));
    args.extend_from_slice(extra);
    let lb = Balancer::start(bin, &args);
    let tls_addr = lb
        .tls_addr
        .expect("the start-up line names the HTTPS address");
    (lb, backend, tls_addr)
}

#[test]
fn a_request_over_https_reaches_the_backend_as_plain_http_marked_https() {
    let cert = TestCertificate::new(&["localhost"]);
    let (lb, _backend, tls_addr) = start_https(LOADBALANCER, &cert, &[]);
    let mut client = Client::connect_tls(tls_addr, "localhost", &[&cert.cert_pem]);
    // Keep-alive: both requests on one TLS connection.
    for _ in 0..2 {
        let response = client.get("/over-tls");
        assert_eq!(response.status, 200);
        let seen = response.text();
        assert!(seen.contains("x-forwarded-proto: https\n"), "{seen}");
        assert!(seen.contains("x-forwarded-for: 127.0.0.1\n"), "{seen}");
    }
    assert_eq!(
        client.stream.conn.alpn_protocol(),
        Some(&b"http/1.1"[..]),
        "ALPN offers http/1.1"
    );
    // The plain listener keeps working, marked http, whatever the client claims.
    let plain = get_with(lb.addr, "X-Forwarded-Proto: https\r\n");
    assert_eq!(plain.status, 200);
    let seen = plain.text();
    assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
    assert!(!seen.contains("https"), "{seen}");
}

#[test]
fn a_returning_client_resumes_its_session_with_a_ticket_from_its_first_connection() {
    let cert = TestCertificate::new(&["localhost"]);
    let (_lb, _backend, tls_addr) = start_https(LOADBALANCER, &cert, &[]);
    let config = tls_client_config(&[&cert.cert_pem]);
    let connect = || {
        let connection = tls_client_with(Arc::clone(&config), "localhost");
        Client::try_connect_tls_with(tls_addr, connection).expect("TLS handshake")
    };
    let mut first = connect();
    assert_eq!(
        first.stream.conn.handshake_kind(),
        Some(HandshakeKind::Full)
    );
    // The session tickets travel with the first response.
    assert_eq!(first.get("/first").status, 200);
    drop(first);
    let mut second = connect();
    assert_eq!(
        second.stream.conn.handshake_kind(),
        Some(HandshakeKind::Resumed)
    );
    let response = second.get("/second");
    assert_eq!(response.status, 200);
    assert!(response.text().contains("x-forwarded-proto: https\n"));
}

#[test]
fn a_tls_1_2_client_keeps_its_connection_and_resumes_its_session() {
    let cert = TestCertificate::new(&["localhost"]);
    let (lb, _backend, tls_addr) = start_https(LOADBALANCER, &cert, &["--admin", "127.0.0.1:0"]);
    let config = tls_client_config_for(&[&cert.cert_pem], &[&rustls::version::TLS12]);
    let connect = || {
        let connection = tls_client_with(Arc::clone(&config), "localhost");
        Client::try_connect_tls_with(tls_addr, connection).expect("a TLS 1.2 handshake")
    };
    let mut first = connect();
    assert_eq!(
        first.stream.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    assert_eq!(
        first.stream.conn.handshake_kind(),
        Some(HandshakeKind::Full)
    );
    for n in 0..3 {
        let response = first.get(&format!("/keep-alive/{n}"));
        assert_eq!(response.status, 200);
        assert!(response.text().contains("x-forwarded-proto: https\n"));
    }
    drop(first);
    let mut second = connect();
    assert_eq!(
        second.stream.conn.handshake_kind(),
        Some(HandshakeKind::Resumed)
    );
    assert_eq!(second.get("/resumed").status, 200);
    assert!(eventually(WAIT, || {
        stats_json(&lb)["tls"]["versions"]["TLSv1.2"] == 2
    }));
    let metrics = get(lb.admin.unwrap(), "/metrics").text();
    assert!(
        metrics.contains("lb_tls_handshakes_total{version=\"1.2\"} 2"),
        "{metrics}"
    );
}

/// The median time from connecting to the first answer over ten new connections, each kept open,
/// from a client with Nagle's algorithm on (the default of most client libraries). Connections
/// after the first resume the session, as a returning client's do.
fn median_first_answer_with_nagle(
    tls_addr: std::net::SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> Duration {
    let mut held = Vec::new();
    let mut times = Vec::new();
    for n in 0..10 {
        let started = Instant::now();
        let socket = TcpStream::connect_timeout(&tls_addr, WAIT).unwrap();
        let connection = tls_client_with(Arc::clone(config), "localhost");
        let mut client = Client::over_tls(socket, connection).expect("a handshake");
        assert_eq!(client.get(&format!("/{n}")).status, 200);
        times.push(started.elapsed());
        held.push(client);
    }
    times.sort();
    times[times.len() / 2]
}

#[test]
fn a_new_connection_from_a_client_with_nagle_on_is_answered_without_a_delayed_ack() {
    let cert = TestCertificate::new(&["localhost"]);
    let (_lb, _backend, tls_addr) = start_https(LOADBALANCER, &cert, &[]);
    for (name, version) in [
        ("TLS 1.3", &rustls::version::TLS13),
        ("TLS 1.2", &rustls::version::TLS12),
    ] {
        let config = tls_client_config_for(&[&cert.cert_pem], &[version]);
        let median = median_first_answer_with_nagle(tls_addr, &config);
        // A delayed acknowledgement takes 40 ms on Linux; without one, a few milliseconds.
        assert!(
            median < Duration::from_millis(25),
            "{name}: median {median:?} to the first answer"
        );
    }
}

/// Runs `scripts/bench/first_answer.py`: Python's `ssl` (OpenSSL, not rustls) with Nagle's
/// algorithm on, ten connections held open, the first with three requests, the rest resuming its
/// session.
fn python_tls_client(
    tls_addr: std::net::SocketAddr,
    cert: &TestCertificate,
    version: &str,
) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench/first_answer.py");
    let output = std::process::Command::new("python3")
        .arg(script)
        .arg(tls_addr.ip().to_string())
        .arg(tls_addr.port().to_string())
        .arg(&cert.cert_path)
        .arg(version)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&stdout).expect("one JSON line")
}

#[test]
fn python_ssl_with_nagle_on_gets_prompt_answers_and_resumes_in_tls_1_2_and_1_3() {
    let cert = TestCertificate::new(&["localhost"]);
    let (_lb, _backend, tls_addr) = start_https(LOADBALANCER, &cert, &[]);
    for (version, name) in [("1.2", "TLSv1.2"), ("1.3", "TLSv1.3")] {
        let run = python_tls_client(tls_addr, &cert, version);
        assert_eq!(run["version"], name, "{run}");
        let statuses = run["statuses"].as_array().unwrap();
        assert_eq!(statuses.len(), 12, "{run}");
        assert!(statuses.iter().all(|status| status == 200), "{run}");
        let resumed = run["resumed"].as_array().unwrap();
        assert!(resumed.iter().all(|r| r == true), "{name}: {run}");
        // A delayed acknowledgement takes 40 ms on Linux; without one, a few milliseconds.
        assert!(run["median_ms"].as_f64().unwrap() < 25.0, "{name}: {run}");
    }
}

#[test]
fn every_phase_binary_serves_https() {
    let cert = TestCertificate::new(&["localhost"]);
    let (_lb, _backend, tls_addr) = start_https(PHASE1, &cert, &[]);
    let mut client = Client::connect_tls(tls_addr, "localhost", &[&cert.cert_pem]);
    let response = client.get("/");
    assert_eq!(response.status, 200);
    assert!(response.text().contains("x-forwarded-proto: https\n"));
}

#[test]
fn a_large_body_goes_both_ways_over_https() {
    let cert = TestCertificate::new(&["localhost"]);
    let backend = responder(|request| (200, String::new(), request.body.clone()));
    let spec = backend.spec();
    let lb = Balancer::start(
        LOADBALANCER,
        &[&["--backend", &spec][..], &cert.tls_flags("127.0.0.1:0")].concat(),
    );
    let mut client = Client::connect_tls(lb.tls_addr.unwrap(), "localhost", &[&cert.cert_pem]);
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    client.send(head.as_bytes());
    client.send(&body);
    let response = client.read_response("POST");
    assert_eq!(response.status, 200);
    assert_eq!(md5_hex(&response.body), md5_hex(&body));
}

#[test]
fn a_plain_http_client_on_the_https_port_is_dropped_and_the_port_keeps_serving() {
    let cert = TestCertificate::new(&["localhost"]);
    let (lb, _backend, tls_addr) = start_https(LOADBALANCER, &cert, &[]);
    let mut plain = TcpStream::connect(tls_addr).unwrap();
    plain.set_read_timeout(Some(WAIT)).unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    // A TLS alert at most, then the end of the stream (or a reset): never an HTTP answer.
    let _ = plain.read_to_end(&mut answer);
    assert!(started.elapsed() < WAIT, "dropped at once");
    assert!(!answer.starts_with(b"HTTP/"), "{answer:?}");
    let mut client = Client::connect_tls(tls_addr, "localhost", &[&cert.cert_pem]);
    assert_eq!(client.get("/").status, 200);
    assert!(lb.log().contains("TLS handshake failed"));
    assert!(!lb.log().contains("WARN"), "{}", lb.log());
}

/// A TLS 1.3 ClientHello naming `host` in its server name (SNI) extension, with one cipher suite
/// and nothing else a handshake needs: enough for the server to read the name.
fn client_hello_with_server_name(host: &str) -> Vec<u8> {
    let name = host.as_bytes();
    let mut sni = vec![0, 0]; // extension type: server_name
    let list_len = name.len() + 3;
    sni.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
    sni.extend_from_slice(&(list_len as u16).to_be_bytes());
    sni.push(0); // host_name
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name);
    let mut hello = vec![3, 3]; // legacy version TLS 1.2
    hello.extend_from_slice(&[7; 32]); // random
    hello.push(0); // no session id
    hello.extend_from_slice(&[0, 2, 0x13, 0x01]); // TLS_AES_128_GCM_SHA256
    hello.extend_from_slice(&[1, 0]); // no compression
    hello.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    hello.extend_from_slice(&sni);
    let mut handshake = vec![1]; // client_hello
    handshake.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 3, 1];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

#[test]
fn a_client_naming_an_ip_address_in_sni_costs_no_warning() {
    // wrk and some other clients send the IP address they connect to as the server name, which
    // TLS does not allow; rustls ignores it and says so at warn level, once per connection.
    let cert = TestCertificate::new(&["localhost"]);
    let (lb, _backend, tls_addr) = start_https(LOADBALANCER, &cert, &[]);
    for _ in 0..3 {
        let mut client = TcpStream::connect(tls_addr).unwrap();
        client.set_read_timeout(Some(WAIT)).unwrap();
        client
            .write_all(&client_hello_with_server_name("127.0.0.1"))
            .unwrap();
        let _ = client.read_to_end(&mut Vec::new());
    }
    let mut client = Client::connect_tls(tls_addr, "localhost", &[&cert.cert_pem]);
    assert_eq!(client.get("/").status, 200);
    assert!(lb.log().contains("TLS handshake failed"), "{}", lb.log());
    assert!(!lb.log().contains("WARN"), "{}", lb.log());
}

#[test]
fn a_stalled_handshake_is_dropped_after_the_client_timeout_and_holds_a_slot_meanwhile() {
    let cert = TestCertificate::new(&["localhost"]);
    let (lb, _backend, tls_addr) = start_https(
        LOADBALANCER,
        &cert,
        &[
            "--client-timeout",
            "1s",
            "--max-connections",
            "1",
            "--admin",
            "127.0.0.1:0",
        ],
    );
    let mut stalled = TcpStream::connect(tls_addr).unwrap();
    stalled.set_read_timeout(Some(WAIT)).unwrap();
    // Half a ClientHello's record header: the handshake has begun and never goes on.
    stalled.write_all(&[0x16, 0x03]).unwrap();
    let started = Instant::now();
    assert!(eventually(WAIT, || stats_json(&lb)["active_connections"] == 1));
    // The one slot is taken: a plain request waits until the stalled handshake is dropped.
    let response = get(lb.addr, "/");
    assert_eq!(response.status, 200);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500),
        "served after {waited:?}"
    );
    let mut rest = Vec::new();
    let _ = stalled.read_to_end(&mut rest);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(lb.log().contains("TLS handshake failed"), "{}", lb.log());
}

#[test]
fn a_handshake_trickled_byte_by_byte_is_still_bounded_by_the_client_timeout() {
    let cert = TestCertificate::new(&["localhost"]);
    let (_lb, _backend, tls_addr) =
        start_https(LOADBALANCER, &cert, &["--client-timeout", "600ms"]);
    let mut slow = TcpStream::connect(tls_addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let started = Instant::now();
    // A record header announcing a long ClientHello, then one byte every 100 ms.
    let _ = slow.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]);
    let closed = loop {
        if started.elapsed() > Duration::from_secs(5) {
            break false;
        }
        if slow.write_all(&[0x01]).is_err() {
            break true;
        }
        let mut byte = [0u8; 64];
        match slow.read(&mut byte) {
            Ok(_) => break true,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(err) if err.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break true,
        }
    };
    assert!(closed, "the trickling client is dropped");
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// Runs the balancer with `args` and returns its exit code and standard error.
fn start_up_error(args: &[&str]) -> (Option<i32>, String) {
    let output = std::process::Command::new(LOADBALANCER)
        .args(["--listen", "127.0.0.1:0", "--admin", "off"])
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn each_bad_tls_configuration_is_a_one_line_error_naming_the_file() {
    let good = TestCertificate::new(&["localhost"]);
    let other = TestCertificate::new(&["localhost"]);
    let not_pem = TestCertificate::write("hello\n".into(), "world\n".into());
    let missing = good.cert_path.with_file_name("missing.pem");
    let missing = missing.to_str().unwrap();
    let tls = ["--tls-listen", "127.0.0.1:0"];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--tls-cert", missing, "--tls-key", good.key()],
            missing,
        ),
        (
            vec!["--tls-cert", good.cert(), "--tls-key", missing],
            missing,
        ),
        (
            vec!["--tls-cert", not_pem.cert(), "--tls-key", good.key()],
            not_pem.cert(),
        ),
        (
            vec!["--tls-cert", good.cert(), "--tls-key", not_pem.key()],
            not_pem.key(),
        ),
        // The key of another certificate.
        (
            vec!["--tls-cert", good.cert(), "--tls-key", other.key()],
            other.key(),
        ),
        (vec![], "--tls-cert"),
        (vec!["--tls-cert", good.cert()], "--tls-key"),
    ];
    for (args, named) in cases {
        let (code, stderr) = start_up_error(&[&tls[..], &args].concat());
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
    }
    // Certificates without a TLS listener are a mistake too.
    let (code, stderr) = start_up_error(&["--tls-cert", good.cert(), "--tls-key", good.key()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--tls-listen"), "{stderr}");
}

#[test]
fn sni_picks_the_certificate_and_the_first_is_the_default() {
    let a = TestCertificate::new(&["a.test"]);
    let b = TestCertificate::new(&["b.test"]);
    let (_lb, _backend, tls_addr) = start_https(
        LOADBALANCER,
        &a,
        &["--tls-cert", b.cert(), "--tls-key", b.key()],
    );
    // Each client trusts only the certificate it expects, so a wrong pick fails the handshake.
    for (name, cert) in [("a.test", &a), ("b.test", &b), ("a.test", &a)] {
        let mut client = Client::connect_tls(tls_addr, name, &[&cert.cert_pem]);
        assert_eq!(client.get("/").status, 200, "{name}");
    }
    // A name no certificate covers gets the first one (which this client then refuses).
    assert!(Client::try_connect_tls(tls_addr, "c.test", &[&b.cert_pem]).is_err());
    let wrong = Client::try_connect_tls(tls_addr, "c.test", &[&a.cert_pem]);
    let err = wrong
        .err()
        .expect("the default certificate does not cover c.test");
    // Refused for its name, not for its issuer: it was certificate a.
    assert!(err.to_string().contains("certificate"), "{err}");
    assert!(!err.to_string().contains("UnknownIssuer"), "{err}");
}

#[test]
fn a_websocket_over_tls_echoes_both_ways_and_closes() {
    websocket_over_tls_echoes(&rustls::version::TLS13);
}

#[test]
fn a_websocket_over_tls_1_2_echoes_both_ways_and_closes() {
    websocket_over_tls_echoes(&rustls::version::TLS12);
}

/// A balancer over one demo backend (its WebSocket echo at `/ws`), with an HTTPS listener
/// showing `cert`.
fn https_over_a_demo_backend(cert: &TestCertificate) -> (Balancer, DemoBackend) {
    let backend = DemoBackend::start("a");
    let mut args = vec!["--backend".to_string(), backend.spec()];
    args.extend(cert.tls_flags("127.0.0.1:0").map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (Balancer::start(LOADBALANCER, &args), backend)
}

fn websocket_over_tls_echoes(version: &'static rustls::SupportedProtocolVersion) {
    use tungstenite::handshake::client::{generate_key, Request};
    use tungstenite::Message;
    let cert = TestCertificate::new(&["localhost"]);
    let (lb, _backend) = https_over_a_demo_backend(&cert);
    let config = tls_client_config_for(&[&cert.cert_pem], &[version]);
    let connection = tls_client_with(config, "localhost");
    let client = Client::try_connect_tls_with(lb.tls_addr.unwrap(), connection).unwrap();
    assert_eq!(client.stream.conn.protocol_version(), Some(version.version));
    let request = Request::builder()
        .uri("wss://localhost/ws")
        .header("Host", "localhost")
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", generate_key())
        .body(())
        .unwrap();
    let (mut socket, response) =
        tungstenite::client::client(request, client.stream).expect("the handshake succeeds");
    assert_eq!(response.status(), 101);
    let greeting = socket.read().expect("a greeting");
    assert!(
        greeting.to_string().starts_with("connected to "),
        "{greeting}"
    );
    for size in [5, 20_000, 200_000] {
        let sent = Message::binary(vec![7u8; size]);
        socket.send(sent.clone()).expect("sends");
        assert_eq!(socket.read().expect("an echo"), sent, "{size} bytes");
    }
    socket.close(None).expect("closes");
    let closed = loop {
        match socket.read() {
            Ok(Message::Close(_)) => continue,
            Ok(_) => continue,
            Err(err) => break err,
        }
    };
    assert!(
        matches!(closed, tungstenite::Error::ConnectionClosed),
        "{closed:?}"
    );
    drop(socket);
    assert!(eventually(WAIT, || lb.log().contains("tunnel to")
        && lb.log().contains("closed after")));
}

/// A masked client text frame (RFC 6455 §5.2), for payloads under 126 bytes.
fn client_text_frame(text: &str) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x81, 0x80 | u8::try_from(text.len()).unwrap()];
    frame.extend_from_slice(&mask);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// What a Socket.IO client does over HTTPS, with Nagle's algorithm on: long-polling requests on
/// one keep-alive connection while a second connection upgrades to a WebSocket, sending its first
/// small frames in the same write as the upgrade request (before the `101` came back), then bursts
/// of small frames before reading their echoes.
fn socket_io_like_mix(version: &'static rustls::SupportedProtocolVersion) {
    use tungstenite::protocol::Role;
    use tungstenite::Message;
    let cert = TestCertificate::new(&["localhost"]);
    let (lb, _backend) = https_over_a_demo_backend(&cert);
    let tls_addr = lb.tls_addr.unwrap();
    let config = tls_client_config_for(&[&cert.cert_pem], &[version]);
    let connect = || {
        let socket = TcpStream::connect_timeout(&tls_addr, WAIT).unwrap();
        let connection = tls_client_with(Arc::clone(&config), "localhost");
        Client::over_tls(socket, connection).expect("a handshake")
    };
    let mut polling = connect();
    assert_eq!(polling.get("/socket.io/?transport=polling").status, 200);
    let mut upgraded = connect().stream;
    let mut first_write = b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n\
        Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        .to_vec();
    for text in ["2probe", "5", "early"] {
        first_write.extend(client_text_frame(text));
    }
    upgraded.write_all(&first_write).unwrap();
    upgraded.flush().unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        upgraded.read_exact(&mut byte).expect("the 101 response");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101 "),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let mut socket = tungstenite::WebSocket::from_raw_socket(upgraded, Role::Client, None);
    let greeting = socket.read().expect("the greeting");
    assert!(
        greeting.to_string().starts_with("connected to "),
        "{greeting}"
    );
    for text in ["2probe", "5", "early"] {
        assert_eq!(socket.read().expect("an echo").to_string(), text);
    }
    for round in 0..5 {
        // The polling connection goes on beside the WebSocket.
        assert_eq!(polling.get(&format!("/socket.io/?n={round}")).status, 200);
        let burst: Vec<String> = (0..3)
            .map(|n| format!("42[\"call\",{round},{n}]"))
            .collect();
        for text in &burst {
            socket.write(Message::text(text.as_str())).unwrap();
        }
        socket.flush().unwrap();
        for text in &burst {
            assert_eq!(
                &socket.read().expect("an echo").to_string(),
                text,
                "round {round}"
            );
        }
    }
    socket.close(None).expect("closes");
    while let Ok(message) = socket.read() {
        assert!(message.is_close(), "{message:?}");
    }
}

#[test]
fn a_socket_io_like_mix_of_polling_and_websocket_works_over_tls_1_3() {
    socket_io_like_mix(&rustls::version::TLS13);
}

#[test]
fn a_socket_io_like_mix_of_polling_and_websocket_works_over_tls_1_2() {
    socket_io_like_mix(&rustls::version::TLS12);
}

#[test]
fn redirect_https_answers_308_to_the_same_host_and_path() {
    let cert = TestCertificate::new(&["localhost"]);
    let port = free_ports(1)[0];
    let tls_listen = format!("127.0.0.1:{port}");
    let backend = header_echo_with("");
    let lb = Balancer::start(
        LOADBALANCER,
        &[
            &["--backend", &backend.spec(), "--redirect-https"][..],
            &cert.tls_flags(&tls_listen),
        ]
        .concat(),
    );
    let mut client = Client::connect(lb.addr);
    client.send(b"GET /a/b?c=d HTTP/1.1\r\nHost: example.com:8080\r\n\r\n");
    let response = client.read_response("GET");
    assert_eq!(response.status, 308);
    assert_eq!(
        response.header("location"),
        Some(format!("https://example.com:{port}/a/b?c=d").as_str())
    );
    // Keep-alive goes on; a request with a body is answered, then the connection closes.
    client.send(b"POST /form HTTP/1.1\r\nHost: example.com\r\nContent-Length: 3\r\n\r\nabc");
    let response = client.read_response("POST");
    assert_eq!(response.status, 308);
    assert_eq!(
        response.header("location"),
        Some(format!("https://example.com:{port}/form").as_str())
    );
    assert_eq!(response.header("connection"), Some("close"));
    // HTTPS itself is served.
    let mut tls = Client::connect_tls(lb.tls_addr.unwrap(), "localhost", &[&cert.cert_pem]);
    assert_eq!(tls.get("/").status, 200);
}

#[test]
fn redirect_https_needs_a_tls_listener() {
    let (code, stderr) = start_up_error(&["--redirect-https"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--tls-listen"), "{stderr}");
}

#[test]
fn handshakes_failures_and_versions_are_in_the_statistics() {
    let cert = TestCertificate::new(&["localhost"]);
    let (lb, _backend, tls_addr) = start_https(LOADBALANCER, &cert, &["--admin", "127.0.0.1:0"]);
    let mut client = Client::connect_tls(tls_addr, "localhost", &[&cert.cert_pem]);
    assert_eq!(client.get("/").status, 200);
    let mut plain = TcpStream::connect(tls_addr).unwrap();
    plain.set_read_timeout(Some(WAIT)).unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let _ = plain.read_to_end(&mut Vec::new());
    assert!(eventually(WAIT, || {
        stats_json(&lb)["tls"]["handshake_failures"] == 1
    }));
    let stats = stats_json(&lb);
    assert_eq!(stats["tls"]["handshakes"], 1, "{stats}");
    assert_eq!(stats["tls"]["versions"]["TLSv1.3"], 1, "{stats}");
    let metrics = get(lb.admin.unwrap(), "/metrics").text();
    assert!(
        metrics.contains("lb_tls_handshakes_total{version=\"1.3\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lb_tls_handshake_failures_total 1"),
        "{metrics}"
    );
}

#[test]
fn demo_without_a_certificate_makes_a_self_signed_one_and_says_how_to_trust_it() {
    let port = free_ports(1)[0];
    let backend = format!("127.0.0.1:{port}");
    let mut lb = Balancer::start(
        LOADBALANCER,
        &[
            "--demo",
            "--backend",
            &backend,
            "--tls-listen",
            "127.0.0.1:0",
        ],
    );
    let log = lb.log();
    let line = log
        .lines()
        .find(|line| line.contains("self-signed"))
        .expect("the log says where the certificate is");
    assert!(
        line.contains("curl --cacert") && line.contains("curl -k"),
        "{line}"
    );
    let path = line
        .split("--cacert ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("a path after --cacert");
    let pem = std::fs::read_to_string(path).expect("the certificate file");
    for name in ["localhost", "127.0.0.1"] {
        let mut client = Client::connect_tls(lb.tls_addr.unwrap(), name, &[&pem]);
        let response = client.get("/");
        assert_eq!(response.status, 200, "{name}");
        assert!(response.text().contains("Hello from"), "{name}");
    }
    // The file goes when the balancer does: each start makes a new one.
    lb.interrupt();
    assert_eq!(lb.wait_exit(WAIT), Some(0));
    assert!(
        !std::path::Path::new(path).exists(),
        "{path} is left behind"
    );
}

#[test]
fn a_demo_that_cannot_start_leaves_no_certificate_behind() {
    // Its backend's port is taken, so --demo stops at start-up, after the certificate was made.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = taken.local_addr().unwrap().to_string();
    let output = std::process::Command::new(LOADBALANCER)
        .args(["--demo", "--backend", &backend, "--listen", "127.0.0.1:0"])
        .args(["--tls-listen", "127.0.0.1:0", "--admin", "off"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let path = stderr
        .split("--cacert ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the log names the certificate");
    assert!(
        !std::path::Path::new(path).exists(),
        "{path} is left behind"
    );
}

#[test]
fn an_expired_certificate_is_a_warning_and_the_balancer_starts() {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let expired = TestCertificate::write(cert.pem(), key.serialize_pem());
    let (lb, _backend, _tls_addr) = start_https(LOADBALANCER, &expired, &[]);
    let log = lb.log();
    let warning = log
        .lines()
        .find(|line| line.contains("WARN"))
        .expect("a warning");
    assert!(
        warning.contains(expired.cert()) && warning.contains("expired on 2021-01-01"),
        "{warning}"
    );
    assert_eq!(get(lb.addr, "/").status, 200);
}

#[test]
fn listen_off_serves_https_only() {
    use std::io::BufRead;
    let cert = TestCertificate::new(&["localhost"]);
    let backend = header_echo_with("");
    let mut child = std::process::Command::new(LOADBALANCER)
        .args([
            "--listen",
            "off",
            "--admin",
            "off",
            "--backend",
            &backend.spec(),
        ])
        .args(cert.tls_flags("127.0.0.1:0"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let line = std::io::BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .find(|line| line.contains("listening on"))
        .expect("a start-up line");
    assert!(line.contains("(HTTPS only)"), "{line}");
    let addr: std::net::SocketAddr = line
        .split("listening on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|addr| addr.parse().ok())
        .expect("the HTTPS address");
    let mut client = Client::connect_tls(addr, "localhost", &[&cert.cert_pem]);
    let response = client.get("/");
    let _ = child.kill();
    let _ = child.wait();
    assert!(response.text().contains("x-forwarded-proto: https\n"));
    let output = std::process::Command::new(LOADBALANCER)
        .args(["--listen", "off", "--admin", "off"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("--listen off needs --tls-listen"),
        "{stderr}"
    );
}
