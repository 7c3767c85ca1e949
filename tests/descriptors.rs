//! The file-descriptor budget, with the open-files limit set for the balancer's process as
//! `ulimit -n` would: 600 keep-alive clients under a desktop's 1024, the soft limit raised to
//! the hard one, and a 503 (never a reset) for a request that finds no descriptor left.

mod common;

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use common::*;

const PHASE1: &str = env!("CARGO_BIN_EXE_phase1_rr");

/// Sets the soft and hard limits on open files for the process `command` starts.
fn limit_open_files(command: &mut Command, soft: u64, hard: u64) {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: the closure runs in the child between fork and exec and only calls setrlimit,
    // which is async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// The test process itself opens a socket per client and per backend connection.
fn raise_own_limit() {
    lb::descriptors::raise_limit().expect("the test can read its own limit");
}

/// What happened to one client's requests.
#[derive(Default)]
struct Outcome {
    ok: usize,
    failures: Vec<String>,
}

#[test]
fn six_hundred_keep_alive_clients_under_a_limit_of_1024() {
    raise_own_limit();
    let backends: Vec<DemoBackend> = ["a", "b", "c"]
        .into_iter()
        .map(DemoBackend::start)
        .collect();
    let specs: Vec<String> = backends.iter().map(DemoBackend::spec).collect();
    let mut args = vec!["--client-timeout", "20s"];
    for spec in &specs {
        args.extend(["--backend", spec.as_str()]);
    }
    // The soft limit starts at 256: the balancer raises it to the hard limit itself.
    let lb = Balancer::start_with(PHASE1, &args, |command| {
        command.env("RUST_LOG", "info");
        limit_open_files(command, 256, 1024);
    });

    const CLIENTS: usize = 600;
    const REQUESTS: usize = 10;
    // Every client holds its connection until all have had a first answer, so the 600 are
    // served at the same time, not one after another.
    let all_answered_once = Arc::new(Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let barrier = Arc::clone(&all_answered_once);
            let addr = lb.addr;
            thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || {
                    let mut outcome = Outcome::default();
                    let mut client = Client::connect(addr);
                    for i in 0..REQUESTS {
                        client.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
                        match client.try_read_response("GET") {
                            Some(response) if response.status == 200 => outcome.ok += 1,
                            Some(response) => outcome.failures.push(response.text()),
                            None => outcome.failures.push("no answer".into()),
                        }
                        if i == 0 {
                            barrier.wait();
                        }
                    }
                    outcome
                })
                .expect("client thread starts")
        })
        .collect();
    let outcomes: Vec<Outcome> = clients
        .into_iter()
        .map(|c| c.join().expect("client thread"))
        .collect();

    let ok: usize = outcomes.iter().map(|o| o.ok).sum();
    let failures: Vec<&String> = outcomes.iter().flat_map(|o| &o.failures).collect();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(ok, CLIENTS * REQUESTS);
    let log = lb.log();
    let lines: Vec<&str> = log.lines().collect();
    assert!(
        lines.len() < 20,
        "a quiet log: {} lines\n{log}",
        lines.len()
    );
    // 1024 after raising the soft limit of 256; the default --max-connections 1024 is lowered.
    assert!(
        log.contains("does not fit the open-files limit of 1024")
            && log.contains("serving at most 638 clients"),
        "{log}"
    );
}

#[test]
fn a_request_that_finds_no_descriptor_gets_503_with_retry_after() {
    raise_own_limit();
    // Slow answers keep every backend connection open while the others are opened.
    let backend = DemoBackend::with_delay("slow", Duration::from_secs(3));
    let spec = backend.spec();
    // Under a limit of 300, 156 clients fit, but not 156 clients and their 156 backend
    // connections at once.
    let lb = Balancer::start_with(
        PHASE1,
        &["--backend", &spec, "--connect-timeout", "300ms"],
        |command| limit_open_files(command, 300, 300),
    );
    assert!(
        lb.log().contains("serving at most 156 clients"),
        "{}",
        lb.log()
    );

    const CLIENTS: usize = 156;
    let open_descriptors = || {
        std::fs::read_dir(format!("/proc/{}/fd", lb.pid()))
            .map(|fds| fds.count())
            .unwrap_or(0)
    };
    let before = open_descriptors();
    // The clients and this thread, which lets them go on once the balancer holds them all.
    let connected = Arc::new(Barrier::new(CLIENTS + 1));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let barrier = Arc::clone(&connected);
            let addr = lb.addr;
            thread::spawn(move || {
                let mut client = Client::connect(addr);
                // The request line now: the balancer accepts a connection once bytes arrive.
                client.send(b"GET / HTTP/1.1\r\n");
                barrier.wait();
                client.send(b"Host: t\r\nConnection: close\r\n\r\n");
                client.try_read_response("GET")
            })
        })
        .collect();
    // Every client accepted (a descriptor each) before any request is complete.
    assert!(
        eventually(WAIT, || open_descriptors() >= before + CLIENTS),
        "{} descriptors open, {before} before the clients",
        open_descriptors()
    );
    connected.wait();
    let responses: Vec<Option<Response>> = clients
        .into_iter()
        .map(|c| c.join().expect("client thread"))
        .collect();

    let mut out_of_descriptors = 0;
    for response in &responses {
        let response = response
            .as_ref()
            .expect("every client is answered, none reset");
        match response.status {
            200 => {}
            503 => {
                assert_eq!(response.header("retry-after"), Some("1"));
                assert!(
                    response.text().contains("file descriptors"),
                    "{}",
                    response.text()
                );
                out_of_descriptors += 1;
            }
            other => panic!("unexpected {other}: {}", response.text()),
        }
    }
    assert!(out_of_descriptors > 0, "some requests found no descriptor");
    let log = lb.log();
    let warnings = log
        .lines()
        .filter(|line| line.contains("no file descriptor left"))
        .count();
    assert!(
        (1..=3).contains(&warnings),
        "the warning is rate-limited: {warnings}\n{log}"
    );
    // The backend is not to blame: it was never counted as failed.
    assert!(!log.contains("unreachable"), "{log}");
    eprintln!("{out_of_descriptors} of {CLIENTS} found no descriptor");
}
