//! Active health checks: one checker thread per backend, each probing `GET --health-path`
//! every `--health-interval` through `ureq`, every probe bounded by `--health-timeout`.
//!
//! The chapter probes the backends one after another from a single thread, so one hung backend
//! delays the verdict on all the others; here each backend has its own thread. Between probes a
//! thread waits on a condition variable rather than sleeping, so shutdown stops every checker at
//! once instead of after a whole interval.

use std::error::Error as _;
use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::admin_state::AdminState;
use crate::backend::{report_health, Backend};
use crate::health::ActivePolicy;

/// How often a waiting checker looks whether a probe is asked for sooner.
const CHECK_SOON_POLL: Duration = Duration::from_millis(100);

/// The running checker threads; [`ActiveChecker::stop`] ends them.
#[derive(Debug)]
pub struct ActiveChecker {
    stop: Arc<StopSignal>,
    threads: Vec<JoinHandle<()>>,
}

/// A flag the checkers wait on between probes.
#[derive(Debug, Default)]
struct StopSignal {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl StopSignal {
    /// Waits `interval` or until stopped; true when stopped.
    fn wait(&self, interval: Duration) -> bool {
        let stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        let (stopped, _) = self
            .wake
            .wait_timeout_while(stopped, interval, |stopped| !*stopped)
            .unwrap_or_else(|e| e.into_inner());
        *stopped
    }

    fn stop(&self) {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.wake.notify_all();
    }
}

impl ActiveChecker {
    /// Starts one checker thread per backend; the first probe of each goes out at once.
    pub fn start(backends: &[Arc<Backend>], policy: &ActivePolicy) -> io::Result<ActiveChecker> {
        let all: Arc<[Arc<Backend>]> = backends.into();
        let mut checker = ActiveChecker {
            stop: Arc::new(StopSignal::default()),
            threads: Vec::with_capacity(all.len()),
        };
        for index in 0..all.len() {
            let (all, stop, policy) = (Arc::clone(&all), Arc::clone(&checker.stop), policy.clone());
            let spawned = thread::Builder::new()
                .name(format!("health-{index}"))
                .spawn(move || check_until_stopped(&all, index, &policy, &stop));
            match spawned {
                Ok(thread) => checker.threads.push(thread),
                Err(err) => {
                    checker.stop();
                    return Err(err);
                }
            }
        }
        log::info!(
            "active health checks: GET {} every {:?} (timeout {:?}, rise {}, fall {})",
            policy.path,
            policy.interval,
            policy.timeout,
            policy.rise,
            policy.fall
        );
        Ok(checker)
    }

    /// Stops every checker and waits for them; a probe in progress ends within its timeout.
    pub fn stop(self) {
        self.stop.stop();
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// One backend's checker: probe, judge, wait, until stopped.
fn check_until_stopped(
    all: &[Arc<Backend>],
    index: usize,
    policy: &ActivePolicy,
    stop: &StopSignal,
) {
    let backend = &all[index];
    // A 3xx is an answer to judge (not 2xx, so a failure), not a place to go.
    let agent = ureq::AgentBuilder::new()
        .timeout(policy.timeout)
        .redirects(0)
        .build();
    let url = format!("http://{}{}", backend.addr(), policy.path);
    loop {
        // In maintenance nothing is checked (the backend may be stopped on purpose).
        if backend.admin_state() == AdminState::Maint {
            if wait_for_next_check(backend, policy.interval, stop) {
                return;
            }
            continue;
        }
        let (passed, result) = probe(&agent, &url);
        log::debug!("health check of {}: {result}", backend.name());
        backend.health().expect_check_in(policy.interval);
        if let Some(change) = backend.health().observe_check(passed, &result) {
            report_health(all, backend, &change);
        }
        if wait_for_next_check(backend, policy.interval, stop) {
            return;
        }
    }
}

/// Waits `interval` before the next probe, or less when one is asked for sooner: a backend that
/// leaves maintenance is held out until a check passes, which should not take a whole interval.
/// True when the checker is stopped.
fn wait_for_next_check(backend: &Backend, interval: Duration, stop: &StopSignal) -> bool {
    let until = Instant::now() + interval;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || backend.health().take_check_soon() {
            return false;
        }
        if stop.wait(left.min(CHECK_SOON_POLL)) {
            return true;
        }
    }
}

/// One probe: whether it passed (a 2xx answer), and what it got in a word or a status code.
fn probe(agent: &ureq::Agent, url: &str) -> (bool, String) {
    match agent.get(url).call() {
        Ok(response) => {
            let status = response.status();
            ((200..300).contains(&status), status.to_string())
        }
        Err(ureq::Error::Status(status, _)) => (false, status.to_string()),
        Err(ureq::Error::Transport(transport)) => (false, transport_failure(&transport)),
    }
}

/// Names a failure to get any answer the way an operator says it: refused, timeout, reset.
fn transport_failure(transport: &ureq::Transport) -> String {
    let mut source = transport.source();
    while let Some(err) = source {
        if let Some(io_err) = err.downcast_ref::<io::Error>() {
            return match io_err.kind() {
                io::ErrorKind::ConnectionRefused => "refused".into(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timeout".into(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => "reset".into(),
                io::ErrorKind::UnexpectedEof => "closed".into(),
                _ => io_err.to_string(),
            };
        }
        source = err.source();
    }
    transport.kind().to_string()
}
