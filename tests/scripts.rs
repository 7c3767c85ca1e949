//! The scripts in `scripts/` over real processes and sockets: `scripts/backends.sh` stops its
//! backends on SIGINT and SIGTERM, also when another script started it in the background (where
//! bash starts it with SIGINT ignored).
//!
//! The script takes its ports as arguments and the backend binary from `BACKEND_BIN`, so the
//! tests use free ports and the binary Cargo built for them.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/backends.sh");
const BACKEND: &str = env!("CARGO_BIN_EXE_backend");

/// How the script is started from a non-interactive shell.
#[derive(Debug, Clone, Copy)]
enum Start {
    /// `scripts/backends.sh PORT... &`, as a script starting backends before a balancer would.
    Background,
    /// `scripts/backends.sh PORT...`, as the last command of the shell.
    Foreground,
}

/// `scripts/backends.sh` running under `bash -c`, with the process ids it announced.
struct Backends {
    shell: Child,
    script: u32,
    backends: Vec<u32>,
}

impl Backends {
    /// Starts the script on `ports` and waits until it announced every backend and each port
    /// accepts connections.
    fn start(how: Start, ports: &[u16]) -> Backends {
        // `$0` and `$@` are the script and its ports, passed as arguments rather than spliced
        // into the command. The shell exits with the script's status.
        let command = match how {
            Start::Background => r#""$0" "$@" & pid=$!; echo "script pid $pid"; wait "$pid""#,
            Start::Foreground => r#"echo "script pid $$"; exec "$0" "$@""#,
        };
        let mut shell = Command::new("bash")
            .arg("-c")
            .arg(command)
            .arg(SCRIPT)
            .args(ports.iter().map(u16::to_string))
            .env("BACKEND_BIN", BACKEND)
            .env_remove("BACKENDS_SIGINT_RESTORED")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("bash starts");
        let stdout = shell.stdout.take().expect("stdout is piped");
        let (said, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = said.send(line);
            }
        });

        let mut started = Backends {
            shell,
            script: 0,
            backends: Vec::new(),
        };
        let deadline = Instant::now() + WAIT;
        while started.script == 0 || started.backends.len() < ports.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("the script did not start {} backends", ports.len()));
            if let Some(pid) = line.strip_prefix("script pid ") {
                started.script = pid.trim().parse().expect("a process id");
            } else if let Some(pid) = pid_in(&line, "started backend-") {
                started.backends.push(pid);
            }
        }
        for &port in ports {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let listening = eventually(WAIT, || {
                TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
            });
            assert!(listening, "a backend listens on {addr}");
        }
        started
    }

    /// Sends `signal` (`INT`, `TERM`) to the script itself, not to its process group.
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.script.to_string()])
            .status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} works");
    }

    /// Waits (at most [`WAIT`]) for the shell to exit; returns its exit code, which is the
    /// script's.
    fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.shell.try_wait() {
                return status.code();
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        for pid in self.backends.iter().chain([&self.script]) {
            if is_running(*pid) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
        let _ = self.shell.kill();
        let _ = self.shell.wait();
    }
}

/// The process id in a line `{marker}… (pid N)`.
fn pid_in(line: &str, marker: &str) -> Option<u32> {
    let rest = line.strip_prefix(marker)?;
    let pid = rest.rsplit_once("(pid ")?.1.strip_suffix(')')?;
    pid.parse().ok()
}

/// Whether process `pid` exists and has not exited (a zombie has exited: it holds no port).
fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// Starts the script on three free ports, sends it `signal`, and checks that it exits with
/// `expected_code`, its backends are gone and their ports are free again.
fn stops_its_backends(how: Start, signal: &str, expected_code: i32) {
    let ports = free_ports(3);
    let mut backends = Backends::start(how, &ports);
    assert_eq!(backends.backends.len(), 3);

    backends.signal(signal);
    assert_eq!(
        backends.wait_exit(),
        Some(expected_code),
        "{how:?}: the script exits on SIG{signal}"
    );
    for &pid in &backends.backends {
        let gone = eventually(WAIT, || !is_running(pid));
        assert!(gone, "{how:?}, SIG{signal}: backend pid {pid} still runs");
    }
    for &port in &ports {
        let free = eventually(WAIT, || TcpListener::bind(("127.0.0.1", port)).is_ok());
        assert!(free, "{how:?}, SIG{signal}: port {port} is still taken");
    }
}

#[test]
fn backends_sh_in_the_background_of_a_script_stops_its_backends_on_sigint() {
    stops_its_backends(Start::Background, "INT", 130);
}

#[test]
fn backends_sh_in_the_background_of_a_script_stops_its_backends_on_sigterm() {
    stops_its_backends(Start::Background, "TERM", 143);
}

#[test]
fn backends_sh_in_the_foreground_stops_its_backends_on_sigint() {
    stops_its_backends(Start::Foreground, "INT", 130);
}

#[test]
fn backends_sh_keeps_the_others_running_when_one_backend_is_killed() {
    let ports = free_ports(3);
    let mut backends = Backends::start(Start::Background, &ports);
    let killed = backends.backends[1];
    let _ = Command::new("kill")
        .args(["-KILL", &killed.to_string()])
        .status();
    let port_freed = eventually(WAIT, || TcpListener::bind(("127.0.0.1", ports[1])).is_ok());
    assert!(port_freed, "the killed backend's port is free");
    // The script used to stop every backend as soon as one exited: give it the time it took
    // then, and more, to show that it no longer does.
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        assert!(is_running(backends.script), "the script goes on");
        for port in [ports[0], ports[2]] {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            assert!(
                TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok(),
                "the backend on {port} still listens"
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    backends.signal("TERM");
    assert_eq!(backends.wait_exit(), Some(143));
    for &pid in &backends.backends {
        assert!(eventually(WAIT, || !is_running(pid)), "pid {pid} stopped");
    }
}
