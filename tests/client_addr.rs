//! The client's address behind another proxy, over real sockets: PROXY protocol headers
//! (version 1 and 2, whole or split across packets, before TLS) and trusted `X-Forwarded-For`.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::net::{Ipv6Addr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const LB: &str = env!("CARGO_BIN_EXE_loadbalancer");

/// Three backends that answer with the request's header fields and say which they are.
fn named_echoes() -> Vec<RawBackend> {
    vec![
        header_echo_with("X-Backend: a\r\n"),
        header_echo_with("X-Backend: b\r\n"),
        header_echo_with("X-Backend: c\r\n"),
    ]
}

/// A balancer hashing client addresses, saying why (`--explain`), with `extra` flags.
fn ip_hash(backends: &[RawBackend], extra: &[&str]) -> Balancer {
    let specs: Vec<String> = backends.iter().map(RawBackend::spec).collect();
    let mut args = vec![
        "--algorithm",
        "ip-hash",
        "--explain",
        "--health-check",
        "none",
    ];
    for spec in &specs {
        args.extend(["--backend", spec.as_str()]);
    }
    args.extend(extra);
    Balancer::start(LB, &args)
}

/// The value of `name` among the header fields the echo backend got.
fn received(response: &Response, name: &str) -> Option<String> {
    let prefix = format!("{name}: ");
    response
        .text()
        .lines()
        .find_map(|line| line.strip_prefix(&prefix).map(str::to_string))
}

fn v1(source: &str) -> Vec<u8> {
    let family = if source.contains(':') { "TCP6" } else { "TCP4" };
    let destination = if source.contains(':') {
        "::1"
    } else {
        "127.0.0.1"
    };
    format!("PROXY {family} {source} {destination} 40000 80\r\n").into_bytes()
}

fn v2(source: &str) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n\x21".to_vec();
    match source.parse::<std::net::IpAddr>().unwrap() {
        std::net::IpAddr::V4(ip) => {
            header.extend([0x11, 0, 12]);
            header.extend(ip.octets());
            header.extend([127, 0, 0, 1]);
        }
        std::net::IpAddr::V6(ip) => {
            header.extend([0x21, 0, 36]);
            header.extend(ip.octets());
            header.extend(Ipv6Addr::LOCALHOST.octets());
        }
    }
    header.extend(40000u16.to_be_bytes());
    header.extend(80u16.to_be_bytes());
    header
}

/// One request on a new connection that starts with `header`, sent in `parts` pieces with a
/// pause between them so that the balancer reads them separately.
fn request_after(lb: &Balancer, header: &[u8], parts: usize) -> Option<Response> {
    let mut client = Client::connect(lb.addr);
    let mut bytes = header.to_vec();
    bytes.extend_from_slice(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
    let step = header.len().div_ceil(parts);
    for (i, piece) in bytes[..header.len()].chunks(step).enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
        client.send(piece);
    }
    client.send(&bytes[header.len()..]);
    client.try_read_response("GET")
}

/// The client address IP hash hashed, from `X-Lb-Decision`.
fn hashed(response: &Response) -> String {
    let decision = response.header("x-lb-decision").expect("--explain");
    let start = decision.find("md5(\"").expect("an ip-hash reason") + 5;
    decision[start..start + decision[start..].find('"').unwrap()].to_string()
}

#[test]
fn proxy_headers_of_both_versions_set_the_client_address() {
    let backends = named_echoes();
    let lb = ip_hash(&backends, &["--accept-proxy"]);
    let mut chosen: HashMap<String, String> = HashMap::new();
    for i in 1..=24 {
        let source = format!("203.0.113.{i}");
        for header in [v1(&source), v2(&source)] {
            let response = request_after(&lb, &header, 1).expect("an answer");
            assert_eq!(response.status, 200);
            assert_eq!(
                received(&response, "x-forwarded-for").as_deref(),
                Some(&*source)
            );
            assert_eq!(hashed(&response), source);
            let backend = backend_of(&response);
            // The same client, by either version, always goes to the same backend.
            assert_eq!(
                chosen.entry(source.clone()).or_insert(backend.clone()),
                &backend
            );
        }
    }
    let used: std::collections::HashSet<&String> = chosen.values().collect();
    assert!(
        used.len() > 1,
        "clients from one peer spread by their own addresses"
    );
    for header in [v1("2001:db8::7"), v2("2001:db8::7")] {
        let response = request_after(&lb, &header, 1).expect("an answer");
        assert_eq!(
            received(&response, "x-forwarded-for").as_deref(),
            Some("2001:db8::7")
        );
    }
}

#[test]
fn a_header_split_across_reads_is_read_whole() {
    let backends = named_echoes();
    let lb = ip_hash(&backends, &["--accept-proxy"]);
    for header in [v1("198.51.100.7"), v2("198.51.100.7")] {
        let response = request_after(&lb, &header, 3).expect("an answer");
        assert_eq!(
            received(&response, "x-forwarded-for").as_deref(),
            Some("198.51.100.7")
        );
    }
}

#[test]
fn garbage_instead_of_a_header_is_closed_without_reaching_a_backend() {
    let reached = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&reached);
    let backend = responder(move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
        (200, String::new(), b"ok".to_vec())
    });
    let lb = Balancer::start(
        LB,
        &[
            "--backend",
            &backend.spec(),
            "--accept-proxy",
            "--health-check",
            "none",
            "--admin",
            "127.0.0.1:0",
        ],
    );
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"[..],
        b"PROXY TCP4 not-an-address 127.0.0.1 1 2\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n",
        b"\r\n\r\n\0\r\nQUIT\n\x99\x11\0\x0c",
    ] {
        let mut client = Client::connect(lb.addr);
        client.send(garbage);
        assert!(
            client.try_read_response("GET").is_none(),
            "closed without an answer"
        );
    }
    assert_eq!(stats_json(&lb)["proxy_headers_rejected"], 3);
    assert_eq!(reached.load(Ordering::SeqCst), 0);
    // A valid header on the next connection is served.
    let response = request_after(&lb, &v1("192.0.2.1"), 1).expect("an answer");
    assert_eq!(response.status, 200);
    assert_eq!(reached.load(Ordering::SeqCst), 1);
}

#[test]
fn the_header_comes_before_tls_on_the_https_listener() {
    let backends = named_echoes();
    let cert = TestCertificate::new(&["localhost"]);
    let log = std::env::temp_dir().join(format!("lb-proxy-tls-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let mut flags = vec![
        "--accept-proxy",
        "--access-log-format",
        "json",
        "--access-log",
    ];
    flags.push(log.to_str().unwrap());
    flags.extend(cert.tls_flags("127.0.0.1:0"));
    let lb = ip_hash(&backends, &flags);
    let mut socket = TcpStream::connect_timeout(&lb.tls_addr.unwrap(), WAIT).unwrap();
    socket.write_all(&v2("192.0.2.44")).unwrap();
    let connection = tls_client("localhost", &[&cert.cert_pem]);
    let mut client = Client::over_tls(socket, connection).expect("a handshake after the header");
    let response = client.get("/");
    assert_eq!(response.status, 200);
    assert_eq!(
        received(&response, "x-forwarded-for").as_deref(),
        Some("192.0.2.44")
    );
    assert_eq!(hashed(&response), "192.0.2.44");
    // The access log names the same client, and the TLS version.
    let mut line = String::new();
    let written = eventually(WAIT, || {
        line = std::fs::read_to_string(&log).unwrap_or_default();
        line.ends_with('\n')
    });
    let _ = std::fs::remove_file(&log);
    assert!(written, "a line in the access log");
    let value: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
    assert_eq!(value["client"], "192.0.2.44");
    assert_eq!(value["tls"], "TLSv1.3");
}

#[test]
fn a_trusted_peer_s_forwarded_for_is_believed_past_trusted_hops() {
    let backends = named_echoes();
    let lb = ip_hash(
        &backends,
        &[
            "--trusted-proxy",
            "127.0.0.0/8",
            "--trusted-proxy",
            "10.0.0.0/8",
        ],
    );
    let forwarded = "X-Forwarded-For: 198.51.100.1, 203.0.113.9\r\nX-Forwarded-For: 10.1.2.3\r\n";
    let response = get_with(lb.addr, forwarded);
    assert_eq!(response.status, 200);
    assert_eq!(hashed(&response), "203.0.113.9");
    // The list goes on as it came, with the peer that connected appended.
    assert_eq!(
        received(&response, "x-forwarded-for").as_deref(),
        Some("198.51.100.1, 203.0.113.9, 10.1.2.3, 127.0.0.1")
    );
}

#[test]
fn an_untrusted_peer_s_forwarded_for_is_not_believed() {
    let backends = named_echoes();
    let lb = ip_hash(&backends, &["--trusted-proxy", "10.0.0.0/8"]);
    let response = get_with(lb.addr, "X-Forwarded-For: 203.0.113.9\r\n");
    assert_eq!(hashed(&response), "127.0.0.1");
    // Nor without the flag.
    let plain = ip_hash(&backends, &[]);
    assert_eq!(
        hashed(&get_with(plain.addr, "X-Forwarded-For: 203.0.113.9\r\n")),
        "127.0.0.1"
    );
}
