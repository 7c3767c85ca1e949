//! Reload without a restart, over real sockets: `SIGHUP` and `POST /reload` read the
//! configuration file again; added backends get requests, removed ones finish theirs, a broken
//! file keeps the old configuration, and the process stays the same one.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{count, eventually, get, stats_json, Balancer, Client, DemoBackend, WAIT};

/// A configuration file for this test, which the test rewrites to reload.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(name: &str, text: &str) -> ConfigFile {
        let path =
            std::env::temp_dir().join(format!("lb-reload-{}-{name}.toml", std::process::id()));
        let file = ConfigFile(path);
        file.write(text);
        file
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.0, text).expect("config written");
    }

    fn backends(&self, backends: &[&DemoBackend]) {
        let list: Vec<String> = backends.iter().map(|b| format!("{:?}", b.spec())).collect();
        self.write(&format!("backend = [{}]\n", list.join(", ")));
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn lb_bin() -> &'static str {
    env!("CARGO_BIN_EXE_loadbalancer")
}

/// Sends `signal` (`HUP`, `USR1`, ...) to the balancer.
fn send(lb: &Balancer, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &lb.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal}");
}

/// `POST /reload` on the admin listener, with `extra` header lines; the status and body.
fn post_reload(admin: SocketAddr, extra: &str) -> (u16, serde_json::Value) {
    let mut stream = TcpStream::connect(admin).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "POST /reload HTTP/1.1\r\nHost: {admin}\r\n{extra}Content-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    (status, serde_json::from_str(body).unwrap_or_default())
}

/// Clients sending keep-alive requests in a loop until stopped: the backends that answered
/// and the requests that failed.
struct Load {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicUsize>,
    threads: Vec<thread::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicUsize::new(0));
        let threads = (0..clients)
            .map(|_| {
                let (stop, failed) = (Arc::clone(&stop), Arc::clone(&failed));
                thread::spawn(move || {
                    let mut hit = Vec::new();
                    let mut client = Client::connect(addr);
                    while !stop.load(Ordering::Relaxed) && hit.len() < 100_000 {
                        let response = client.get("/");
                        if response.status != 200 {
                            failed.fetch_add(1, Ordering::Relaxed);
                            client = Client::connect(addr);
                        }
                        hit.push(response.header("x-backend").unwrap_or("none").to_string());
                    }
                    hit
                })
            })
            .collect();
        Load {
            stop,
            failed,
            threads,
        }
    }

    /// Stops the clients: every backend name answered, and the failed requests.
    fn finish(self) -> (Vec<String>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let hits = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        (hits, self.failed.load(Ordering::Relaxed))
    }
}

#[test]
fn sighup_adds_a_backend_under_load_without_a_failed_request_in_the_same_process() {
    let a = DemoBackend::start("a");
    let b = DemoBackend::start("b");
    let config = ConfigFile::new("add", "");
    config.backends(&[&a]);
    let mut lb = Balancer::start(
        lb_bin(),
        &["--config", config.path(), "--health-check", "none"],
    );
    let pid = lb.pid();
    let load = Load::start(lb.addr, 4);
    assert!(eventually(WAIT, || lb.log().contains("GET /")), "load runs");
    config.backends(&[&a, &b]);
    send(&lb, "HUP");
    assert!(
        eventually(WAIT, || lb.log().contains(&format!("added {}", b.spec()))),
        "{}",
        lb.log()
    );
    // Keep-alive connections reach the new backend at their next request.
    assert!(eventually(WAIT, || count(&common::backends_hit(
        lb.addr, 4
    ))
    .contains_key("b")));
    let (hits, failed) = load.finish();
    assert_eq!(failed, 0, "no request failed");
    assert!(
        count(&hits).get("b").copied().unwrap_or(0) > 0,
        "b got requests under load"
    );
    assert_eq!(lb.pid(), pid);
    assert_eq!(
        lb.wait_exit(Duration::from_millis(100)),
        None,
        "SIGHUP never exits"
    );
    // SIGUSR1 (no access log yet) is logged and ignored.
    send(&lb, "USR1");
    assert!(eventually(WAIT, || lb.log().contains("SIGUSR1")));
    assert_eq!(get(lb.addr, "/").status, 200);
    // SIGTERM still drains and exits 0.
    lb.terminate();
    assert_eq!(lb.wait_exit(WAIT), Some(0));
}

#[test]
fn a_removed_backend_finishes_its_slow_requests_then_gets_no_more() {
    let slow = DemoBackend::with_delay("slow", Duration::from_millis(1500));
    let fast = DemoBackend::start("fast");
    let config = ConfigFile::new("remove", "");
    config.backends(&[&slow]);
    let lb = Balancer::start(
        lb_bin(),
        &[
            "--config",
            config.path(),
            "--admin",
            "127.0.0.1:0",
            "--health-check",
            "none",
        ],
    );
    let admin = lb.admin.unwrap();
    let in_flight: Vec<_> = (0..3)
        .map(|_| {
            let addr = lb.addr;
            thread::spawn(move || get(addr, "/"))
        })
        .collect();
    assert!(eventually(WAIT, || {
        stats_json(&lb)["backends"][0]["active_connections"].as_u64() == Some(3)
    }));
    config.backends(&[&fast]);
    let (status, body) = post_reload(admin, "");
    assert_eq!(status, 200, "{body}");
    let changes = body["changes"].as_str().unwrap();
    assert!(
        changes.contains(&format!("added {}", fast.spec())),
        "{changes}"
    );
    assert!(
        changes.contains(&format!("removed {} (draining 3 in flight)", slow.spec())),
        "{changes}"
    );
    for request in in_flight {
        let response = request.join().unwrap();
        assert_eq!(response.status, 200, "a request in flight finished");
        assert_eq!(response.header("x-backend"), Some("slow"));
    }
    assert_eq!(common::backends_hit(lb.addr, 3), ["fast", "fast", "fast"]);
    assert!(eventually(WAIT, || lb
        .log()
        .contains(&format!("removed backend {} drained", slow.spec()))));
    let stats = stats_json(&lb);
    assert_eq!(stats["config_reloads"]["ok"], 1);
    assert_eq!(stats["last_reload"]["result"], "ok");
}

#[test]
fn a_broken_file_keeps_the_old_configuration_and_says_where() {
    let a = DemoBackend::start("a");
    let config = ConfigFile::new("broken", "");
    config.backends(&[&a]);
    let lb = Balancer::start(
        lb_bin(),
        &["--config", config.path(), "--admin", "127.0.0.1:0"],
    );
    let admin = lb.admin.unwrap();
    let cases = [
        ("backend = [\"127.0.0.1:1\"\n", ":1:"),
        (
            "\nbackends = [\"127.0.0.1:1\"]\n",
            ":2:1: unknown key 'backends'",
        ),
        (
            "backend = [\"127.0.0.1:1\", \"no-port\"]\n",
            ":1:27: invalid value 'no-port'",
        ),
    ];
    for (round, (text, expected)) in cases.into_iter().enumerate() {
        config.write(text);
        let (status, body) = post_reload(admin, "");
        assert_eq!(status, 422, "{body}");
        let error = body["error"].as_str().unwrap();
        assert!(
            error.contains(&format!("{}{expected}", config.path())),
            "{error}"
        );
        assert_eq!(
            common::backends_hit(lb.addr, 2),
            ["a", "a"],
            "the old backends serve"
        );
        let stats = stats_json(&lb);
        assert_eq!(stats["config_reloads"]["error"], round as u64 + 1);
        assert_eq!(stats["last_reload"]["result"], "error");
        let events = stats["events"].as_array().unwrap();
        assert!(events
            .iter()
            .any(|e| e["kind"] == "reload" && e["message"].as_str().unwrap().contains(expected)));
    }
    // SIGHUP with a broken file: one error line, and the balancer goes on.
    send(&lb, "HUP");
    assert!(eventually(WAIT, || lb
        .log()
        .matches("reload refused")
        .count()
        == 4));
    let metrics = get(admin, "/metrics").text();
    assert!(
        metrics.contains("lb_config_reloads_total{result=\"error\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lb_config_last_reload_successful 0"),
        "{metrics}"
    );
    assert!(get(admin, "/stats").text().contains("last reload: refused"));
    assert_eq!(get(lb.addr, "/").status, 200);
}

#[test]
fn reload_writes_come_from_this_machine_and_its_own_pages_only() {
    let a = DemoBackend::start("a");
    let lb = Balancer::start(
        lb_bin(),
        &["--backend", &a.spec(), "--admin", "127.0.0.1:0"],
    );
    let admin = lb.admin.unwrap();
    let (status, body) = post_reload(admin, "Origin: http://evil.example\r\n");
    assert_eq!(status, 403, "{body}");
    let (status, body) = post_reload(admin, &format!("Origin: http://{admin}\r\n"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changes"], "nothing changed");
    let (status, _) = post_reload(admin, "");
    assert_eq!(status, 200);
}

#[test]
fn a_certificate_replaced_on_disk_is_shown_to_new_connections_after_a_reload() {
    let a = DemoBackend::start("a");
    let old = common::TestCertificate::new(&["localhost"]);
    let config = ConfigFile::new(
        "tls",
        &format!(
            "backend = [{:?}]\ntls-listen = \"127.0.0.1:0\"\ntls-cert = [{:?}]\ntls-key = [{:?}]\n",
            a.spec(),
            old.cert(),
            old.key()
        ),
    );
    let lb = Balancer::start(lb_bin(), &["--config", config.path()]);
    let tls_addr = lb.tls_addr.expect("HTTPS listener");
    let mut open = Client::connect_tls(tls_addr, "localhost", &[&old.cert_pem]);
    assert_eq!(open.get("/").status, 200);

    // The same files, a new certificate and key in them.
    let new = common::TestCertificate::new(&["localhost"]);
    std::fs::write(&old.cert_path, &new.cert_pem).unwrap();
    std::fs::write(&old.key_path, &new.key_pem).unwrap();
    send(&lb, "HUP");
    assert!(
        eventually(WAIT, || lb.log().contains("certificates read again")),
        "{}",
        lb.log()
    );

    let mut fresh = Client::connect_tls(tls_addr, "localhost", &[&new.cert_pem]);
    assert_eq!(fresh.get("/").status, 200);
    assert!(
        Client::try_connect_tls(tls_addr, "localhost", &[&old.cert_pem]).is_err(),
        "the old certificate is no longer shown"
    );
    assert_eq!(
        open.get("/").status,
        200,
        "an open keep-alive connection keeps working"
    );
}

#[test]
fn sessions_stay_an_added_backend_waits_for_its_check_and_the_algorithm_changes() {
    let a = DemoBackend::start("a");
    let b = DemoBackend::start("b");
    let settings = "sticky = true\nhealth-check = \"active\"\nhealth-interval = \"100ms\"\n";
    let config = ConfigFile::new(
        "sessions",
        &format!("{settings}backend = [{:?}]\n", a.spec()),
    );
    let lb = Balancer::start(
        lb_bin(),
        &["--config", config.path(), "--admin", "127.0.0.1:0"],
    );
    let first = get(lb.addr, "/");
    let cookie = common::session_cookie(&first).expect("a session cookie");
    assert_eq!(first.header("x-backend"), Some("a"));

    config.write(&format!(
        "{settings}algorithm = \"least-conn\"\nbackend = [{:?}, {:?}]\n",
        b.spec(),
        a.spec()
    ));
    let (status, body) = post_reload(lb.admin.unwrap(), "");
    assert_eq!(status, 200, "{body}");
    let changes = body["changes"].as_str().unwrap();
    assert!(
        changes.contains("algorithm round-robin -> least-conn"),
        "{changes}"
    );
    // Added while active checks run: out of rotation until its first check passes.
    assert!(
        eventually(WAIT, || lb
            .log()
            .contains(&format!("backend {} is back", b.spec()))),
        "{}",
        lb.log()
    );
    assert!(eventually(WAIT, || count(&common::backends_hit(
        lb.addr, 4
    ))
    .contains_key("b")));
    // The session made before the reload still goes to its backend, now second in the list.
    for _ in 0..4 {
        let response = common::get_with(lb.addr, &format!("Cookie: SESSION_ID={cookie}\r\n"));
        assert_eq!(response.header("x-backend"), Some("a"));
    }
}

#[test]
fn weights_and_timeouts_change_and_what_takes_a_restart_is_named() {
    let a = DemoBackend::start("a");
    let config = ConfigFile::new(
        "weights",
        &format!("algorithm = \"weighted\"\nbackend = [\"{}=1\"]\n", a.spec()),
    );
    let lb = Balancer::start(
        lb_bin(),
        &["--config", config.path(), "--admin", "127.0.0.1:0"],
    );
    config.write(&format!(
        "algorithm = \"weighted\"\nbackend = [\"{}=4\"]\nconnect-timeout = \"1s\"\nmax-connections = 7\n",
        a.spec()
    ));
    let (status, body) = post_reload(lb.admin.unwrap(), "");
    assert_eq!(status, 200, "{body}");
    let changes = body["changes"].as_str().unwrap();
    assert!(
        changes.contains(&format!("weight of {} 1 -> 4", a.spec())),
        "{changes}"
    );
    assert!(changes.contains("connect-timeout 2s -> 1s"), "{changes}");
    assert!(
        changes.contains("max-connections unchanged (takes a restart)"),
        "{changes}"
    );
    assert!(lb
        .log()
        .contains("--max-connections changed: it takes a restart"));
    assert_eq!(stats_json(&lb)["backends"][0]["weight"], 4);
    assert_eq!(get(lb.addr, "/").status, 200);
}
