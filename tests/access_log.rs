//! The access log over real sockets: each format read back by a strict parser, failures that
//! say so, a writer that cannot keep up, and a file that cannot be opened.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use regex::Regex;

const LB: &str = env!("CARGO_BIN_EXE_loadbalancer");

/// A directory of its own for one test's log files, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("lb-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The log's lines once it holds `n` of them (the writer flushes within a second).
fn lines(path: &Path, n: usize) -> Vec<String> {
    let mut found = Vec::new();
    let ok = eventually(WAIT, || {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        found = text.lines().map(str::to_string).collect();
        found.len() >= n
    });
    assert!(ok, "{n} lines expected in the access log, found {found:?}");
    assert_eq!(found.len(), n, "{found:#?}");
    found
}

/// nginx's combined format, then the backend, the request time, the backend's time, the
/// request id, the retry count and what went wrong.
fn combined() -> Regex {
    Regex::new(concat!(
        r#"^(?P<client>[0-9a-f.:]+) - - \[(?P<time>\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} \+0000)\] "#,
        r#""(?P<request>[^"]*)" (?P<status>\d{3}|-) (?P<bytes>\d+) "(?P<referer>[^"]*)" "(?P<agent>[^"]*)" "#,
        r#"(?P<backend>[0-9.:]+|-) (?P<time_s>\d+\.\d{3}) (?P<backend_s>\d+\.\d{3}|-) (?P<id>\S+) (?P<retries>\d+) "#,
        r#""(?P<error>[^"]*)"$"#,
    ))
    .unwrap()
}

/// A backend that answers with the request's header fields, so the test sees the request id
/// the balancer sent.
fn echo() -> RawBackend {
    header_echo_with("")
}

#[test]
fn combined_lines_give_status_bytes_backend_and_request_id_of_each_request() {
    let dir = TempDir::new("combined");
    let log = dir.path("access.log");
    let (a, b) = (echo(), echo());
    let lb = Balancer::start(
        LB,
        &[
            "--backend",
            &a.spec(),
            "--backend",
            &b.spec(),
            "--access-log",
            log.to_str().unwrap(),
        ],
    );
    let mut client = Client::connect(lb.addr);
    let mut expected = Vec::new();
    for i in 0..6 {
        let own_id = if i % 2 == 0 {
            format!("\r\nX-Request-Id: mine-{i}")
        } else {
            String::new()
        };
        client.send(
            format!("GET /page/{i}?q=1 HTTP/1.1\r\nHost: t\r\nUser-Agent: test/{i}{own_id}\r\nReferer: http://r/{i}\r\n\r\n")
                .as_bytes(),
        );
        let response = client.read_response("GET");
        assert_eq!(response.status, 200);
        let text = response.text();
        let id = text
            .lines()
            .find_map(|line| line.strip_prefix("x-request-id: "))
            .expect("the backend got a request id")
            .to_string();
        expected.push((i, response.body.len(), id));
    }
    let pattern = combined();
    let lines = lines(&log, 6);
    let backends = [a.spec(), b.spec()];
    let mut used = std::collections::HashSet::new();
    for (line, (i, bytes, id)) in lines.iter().zip(&expected) {
        let fields = pattern
            .captures(line)
            .unwrap_or_else(|| panic!("not combined: {line}"));
        assert_eq!(&fields["client"], "127.0.0.1");
        assert_eq!(&fields["request"], format!("GET /page/{i}?q=1 HTTP/1.1"));
        assert_eq!(&fields["status"], "200");
        assert_eq!(fields["bytes"].parse::<usize>().unwrap(), *bytes, "{line}");
        assert_eq!(&fields["referer"], format!("http://r/{i}"));
        assert_eq!(&fields["agent"], format!("test/{i}"));
        assert!(backends.contains(&fields["backend"].to_string()), "{line}");
        used.insert(fields["backend"].to_string());
        assert_ne!(&fields["backend_s"], "-");
        assert_eq!(&fields["id"], id.as_str(), "{line}");
        if i % 2 == 0 {
            assert_eq!(id, &format!("mine-{i}"));
        } else {
            assert_eq!(id.len(), 36, "a UUID: {id}");
        }
        assert_eq!(&fields["retries"], "0");
        assert_eq!(&fields["error"], "-");
    }
    assert_eq!(used.len(), 2, "round robin used both backends");
}

/// The JSON line's fields, each of the type it must have.
fn check_json_types(value: &serde_json::Value) {
    let object = value.as_object().expect("an object");
    let keys: Vec<&str> = object.keys().map(String::as_str).collect();
    let mut expected = vec![
        "backend",
        "backend_time",
        "body_bytes",
        "client",
        "error",
        "method",
        "protocol",
        "referer",
        "request_id",
        "request_time",
        "retries",
        "status",
        "sticky",
        "target",
        "time",
        "tls",
        "tunnel",
        "user_agent",
    ];
    expected.sort();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(sorted, expected);
    assert!(value["time"].as_str().unwrap().ends_with('Z'));
    assert!(value["status"].is_u64() || value["status"].is_null());
    assert!(value["body_bytes"].is_u64());
    assert!(value["request_time"].is_f64() || value["request_time"].is_u64());
    assert!(value["retries"].is_u64());
}

#[test]
fn json_lines_give_the_same_fields_and_sticky_sessions() {
    let dir = TempDir::new("json");
    let log = dir.path("access.json");
    let (a, b) = (echo(), echo());
    let lb = Balancer::start(
        LB,
        &[
            "--backend",
            &a.spec(),
            "--backend",
            &b.spec(),
            "--sticky",
            "--access-log",
            log.to_str().unwrap(),
            "--access-log-format",
            "json",
        ],
    );
    let first = get(lb.addr, "/one");
    let cookie = session_cookie(&first).expect("a session cookie");
    let second = get_with(lb.addr, &format!("Cookie: SESSION_ID={cookie}\r\n"));
    let lines = lines(&log, 2);
    let values: Vec<serde_json::Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect();
    for (value, response) in values.iter().zip([&first, &second]) {
        check_json_types(value);
        assert_eq!(value["status"], 200);
        assert_eq!(value["body_bytes"], response.body.len());
        assert_eq!(value["client"], "127.0.0.1");
        assert_eq!(value["method"], "GET");
        assert_eq!(value["protocol"], "HTTP/1.1");
        let id = response
            .text()
            .lines()
            .find_map(|line| line.strip_prefix("x-request-id: ").map(str::to_string))
            .unwrap();
        assert_eq!(value["request_id"], id.as_str());
        assert_eq!(value["tls"], serde_json::Value::Null);
        assert_eq!(value["tunnel"], serde_json::Value::Null);
    }
    assert_eq!(values[0]["target"], "/one");
    assert_eq!(values[0]["sticky"], "new");
    assert_eq!(values[1]["sticky"], "kept");
    assert_eq!(values[0]["backend"], values[1]["backend"]);
}

#[test]
fn a_502_a_503_and_a_client_gone_mid_response_each_give_a_line_that_says_so() {
    let dir = TempDir::new("failures");
    let log = dir.path("access.log");
    // A backend that reads the request and closes without a word: 502.
    let broken = RawBackend::start(|stream| {
        let mut conn = ServerConn::new(stream);
        let _ = conn.read_request();
    });
    // A backend that sends a long body, for a client that leaves halfway.
    let long = RawBackend::start(|stream| {
        let mut conn = ServerConn::new(stream);
        if conn.read_request().is_some() {
            let _ = conn
                .stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n");
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..1526 {
                if conn.stream.write_all(&chunk).is_err() {
                    break;
                }
            }
        }
    });
    let nobody = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = nobody.local_addr().unwrap().to_string();
    drop(nobody);

    let start = |backend: &str, log: &Path| {
        Balancer::start(
            LB,
            &[
                "--backend",
                backend,
                "--health-check",
                "none",
                "--access-log",
                log.to_str().unwrap(),
            ],
        )
    };
    let lb = start(&broken.spec(), &log);
    assert_eq!(get(lb.addr, "/broken").status, 502);
    let mut malformed = Client::connect(lb.addr);
    malformed.send(b"NOT HTTP AT ALL\r\n\r\n");
    assert_eq!(malformed.read_response("GET").status, 400);
    let lb_down = start(&closed, &dir.path("down.log"));
    assert_eq!(get(lb_down.addr, "/down").status, 503);
    let lb_long = start(&long.spec(), &dir.path("long.log"));
    let mut client = Client::connect(lb_long.addr);
    client.send(b"GET /long HTTP/1.1\r\nHost: t\r\n\r\n");
    let mut some = vec![0u8; 1024];
    client.stream.read_exact(&mut some).unwrap();
    drop(client);

    let pattern = combined();
    let both = lines(&log, 2);
    let bad_gateway = &both[0];
    let fields = pattern.captures(bad_gateway).expect("combined");
    assert_eq!(&fields["status"], "502");
    assert_eq!(&fields["backend"], broken.spec());
    assert!(fields["error"].contains("the backend"), "{bad_gateway}");

    // A head that could not be read has no request line, and says why it was refused.
    let fields = pattern.captures(&both[1]).expect("combined");
    assert_eq!(&fields["request"], "-");
    assert_eq!(&fields["status"], "400");
    assert_eq!(&fields["backend"], "-");
    assert!(fields["error"].contains("malformed request"), "{}", both[1]);

    let down = &lines(&dir.path("down.log"), 1)[0];
    let fields = pattern.captures(down).expect("combined");
    assert_eq!(&fields["status"], "503");
    assert!(fields["error"].contains("no backend"), "{down}");

    let gone = &lines(&dir.path("long.log"), 1)[0];
    let fields = pattern.captures(gone).expect("combined");
    // The head was sent, so its status is logged, with the part of the body that went out and
    // why the rest did not.
    assert_eq!(&fields["status"], "200");
    assert!(
        fields["bytes"].parse::<u64>().unwrap() < 100_000_000,
        "{gone}"
    );
    assert!(fields["error"].contains("writing the response"), "{gone}");
}

#[test]
fn a_writer_that_cannot_keep_up_drops_lines_and_never_slows_requests() {
    let backend = DemoBackend::start("fast");
    // Standard output is a pipe nobody reads: once it is full, the writer blocks for good.
    let lb = Balancer::start_with(
        LB,
        &[
            "--backend",
            &backend.spec(),
            "--admin",
            "127.0.0.1:0",
            "--access-log",
            "-",
        ],
        |command| {
            command.stdout(Stdio::piped());
        },
    );
    let mut client = Client::connect(lb.addr);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut slowest = Duration::ZERO;
    let mut sent = 0;
    // The pipe (64 KiB), the writer's buffer (64 KiB) and the channel (4096 lines) fill up
    // within 6000 requests; every one after that is a drop.
    while sent < 8000 && Instant::now() < deadline {
        let began = Instant::now();
        assert_eq!(client.get("/").status, 200);
        slowest = slowest.max(began.elapsed());
        sent += 1;
    }
    assert_eq!(sent, 8000, "requests went on");
    assert!(
        slowest < Duration::from_secs(2),
        "a request waited {slowest:?}"
    );
    let stats = stats_json(&lb);
    let dropped = stats["access_log_dropped"].as_u64().unwrap();
    assert!(dropped > 0, "{stats}");
    let metrics = get(lb.admin.unwrap(), "/metrics").text();
    assert!(
        metrics.contains(&format!("\nlb_access_log_dropped_total {dropped}")),
        "{metrics}"
    );
}

#[test]
fn a_log_file_that_cannot_be_opened_stops_the_start_with_one_line() {
    let output = Command::new(LB)
        .args(["--listen", "127.0.0.1:0", "--admin", "off", "--access-log"])
        .arg("/nonexistent-dir/for-sure/access.log")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("error: --access-log /nonexistent-dir/for-sure/access.log: "));
}

#[test]
fn sigusr1_after_renaming_the_file_sends_new_lines_to_a_new_file_at_the_old_path() {
    rotate_with("-USR1");
}

#[test]
fn a_reload_reopens_the_access_log_too() {
    rotate_with("-HUP");
}

/// Renames the access log, sends `signal` (`kill`'s spelling), and checks that the next line
/// goes to a new file at the old path while the renamed file keeps the earlier one.
fn rotate_with(signal: &str) {
    let dir = TempDir::new("rotate");
    let log = dir.path("access.log");
    let backend = DemoBackend::start("a");
    let lb = Balancer::start(
        LB,
        &[
            "--backend",
            &backend.spec(),
            "--access-log",
            log.to_str().unwrap(),
        ],
    );
    assert_eq!(get(lb.addr, "/before").status, 200);
    lines(&log, 1);
    let rotated = dir.path("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    let status = Command::new("kill")
        .args([signal, &lb.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        eventually(WAIT, || log.exists()),
        "a new file at the old path"
    );
    assert_eq!(get(lb.addr, "/after").status, 200);
    let new = lines(&log, 1);
    assert!(new[0].contains("GET /after "), "{new:?}");
    let old = lines(&rotated, 1);
    assert!(old[0].contains("GET /before "), "{old:?}");
}

#[test]
fn an_upgraded_connection_s_json_line_gives_the_tunnel_s_duration_and_bytes() {
    let dir = TempDir::new("tunnel");
    let log = dir.path("access.json");
    // Switches protocols, then echoes every byte until the client closes.
    let backend = RawBackend::start(|stream| {
        let mut conn = ServerConn::new(stream);
        if conn.read_request().is_none() {
            return;
        }
        conn.send(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
        );
        let mut buf = [0u8; 1024];
        while let Ok(n) = conn.stream.read(&mut buf) {
            if n == 0 || conn.stream.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let lb = Balancer::start(
        LB,
        &[
            "--backend",
            &backend.spec(),
            "--health-check",
            "none",
            "--access-log-format",
            "json",
            "--access-log",
            log.to_str().unwrap(),
        ],
    );
    let mut client = Client::connect(lb.addr);
    client.send(b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        client.stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101 "));
    client.send(b"hello, tunnel");
    let mut echoed = [0u8; 13];
    client.stream.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"hello, tunnel");
    drop(client);
    let line = &lines(&log, 1)[0];
    let value: serde_json::Value = serde_json::from_str(line).unwrap();
    check_json_types(&value);
    assert_eq!(value["status"], 101);
    assert_eq!(value["tunnel"]["bytes_up"], 13, "{line}");
    assert_eq!(value["tunnel"]["bytes_down"], 13, "{line}");
    assert!(value["tunnel"]["duration"].as_f64().unwrap() >= 0.0);
}
