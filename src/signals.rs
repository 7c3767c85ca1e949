//! Signals: what `SIGINT`, `SIGTERM`, `SIGHUP` and `SIGUSR1` do.
//!
//! A signal handler may do almost nothing safely (no lock, no allocation, no log line), so the
//! handlers `signal-hook` installs only note the signal, and one thread of ours takes the
//! signals in turn and calls plain functions: a shutdown, a reload, reopening a log. Each
//! signal's action is one entry of the list handed to [`start`], so a new one is one line.
//!
//! Before this module, the `ctrlc` crate (with its `termination` feature) turned `SIGHUP` into
//! a shutdown too: `kill -HUP`, which nginx and HAProxy users send to reload, stopped the
//! balancer. Here `SIGHUP` reloads and never exits.

use std::io;
use std::thread::{self, JoinHandle};

pub use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

/// What one signal does, on the signals thread.
pub type Action = Box<dyn Fn() + Send + Sync + 'static>;

/// The name of a signal, for the log.
pub fn name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP",
        SIGUSR1 => "SIGUSR1",
        _ => "a signal",
    }
}

/// Takes each signal of `actions` from now on and runs its action on a thread of its own (one
/// at a time, in the order the signals came). The thread lives as long as the process.
pub fn start(actions: Vec<(i32, Action)>) -> io::Result<JoinHandle<()>> {
    let numbers: Vec<i32> = actions.iter().map(|(signal, _)| *signal).collect();
    let mut signals = Signals::new(&numbers)?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if let Some((_, action)) = actions.iter().find(|(s, _)| *s == signal) {
                    action();
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn a_signal_runs_its_action_on_the_signals_thread() {
        let (sent, received) = mpsc::channel();
        let sent = std::sync::Mutex::new(sent);
        start(vec![(
            SIGUSR1,
            Box::new(move || {
                let _ = sent
                    .lock()
                    .unwrap()
                    .send(thread::current().name().map(String::from));
            }),
        )])
        .unwrap();
        // SAFETY: raise only sends this process a signal that a handler is installed for.
        unsafe { libc::raise(SIGUSR1) };
        let name = received.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(name.as_deref(), Some("signals"));
    }
}
