//! The run-time settings every part of the balancer reads: where to listen, how many clients at
//! once, and how long to wait for each party. They come from the command line (`cli`) and stay
//! fixed while the balancer runs.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::client_addr::Cidr;

/// Settings fixed at start-up and shared by the server and every client connection.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where plain-HTTP clients connect; none with `--listen off` (HTTPS only).
    pub listen: Option<SocketAddr>,
    /// Client connections served at once.
    pub max_connections: usize,
    /// Time allowed for connecting to a backend.
    pub connect_timeout: Duration,
    /// Time allowed for each read from or write to a backend.
    pub backend_timeout: Duration,
    /// Time allowed for a whole request head, and for an idle keep-alive connection.
    pub client_timeout: Duration,
    /// How long a tunnel may stay without a byte in either direction.
    pub tunnel_timeout: Duration,
    /// Other backends a request may go on to after one failed it.
    pub retries: usize,
    /// How long a request waits in the queue of a backend at its connection limit.
    pub queue_timeout: Duration,
    /// How often statistics are logged; zero for never.
    pub stats_interval: Duration,
    /// Whether responses carry an `X-Lb-Decision` header.
    pub explain: bool,
    /// Whether every client connection starts with a PROXY protocol header (`--accept-proxy`).
    pub accept_proxy: bool,
    /// Peers whose `X-Forwarded-For` names the client (`--trusted-proxy`).
    pub trusted_proxies: Vec<Cidr>,
    /// Whether the listener sets `SO_REUSEPORT`, so a new instance can take over its address.
    pub reuse_port: bool,
    /// With `--redirect-https`: the HTTPS port that plain-HTTP requests are sent to with `308`.
    pub redirect_https: Option<u16>,
    /// Below this share of the primary backends in rotation (percent; 0 is off), requests go
    /// to all of them as if all were healthy (`--panic-threshold`).
    pub panic_threshold: u8,
    /// How long a backend coming back into rotation takes to ramp up to its full share
    /// (`--slow-start`); zero is off.
    pub slow_start: Duration,
    /// The token admin writes must carry (`--admin-token`); without it, loopback clients only.
    pub admin_token: Option<AdminToken>,
    /// How the kernel schedules the client threads.
    pub cpu_scheduling: CpuScheduling,
}

/// How the kernel schedules the client threads (`--cpu-scheduling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuScheduling {
    /// Linux's `SCHED_BATCH`: a thread woken by a packet waits for the running program to sleep
    /// or use up its time slice instead of preempting it. More throughput under load; on CPUs
    /// busy with other programs, a little more latency.
    Batch,
    /// The system's usual class, where a woken thread may preempt the running one at once.
    Normal,
}

/// The bearer token that admin writes must carry (`--admin-token`, `LB_ADMIN_TOKEN`). Its
/// `Debug` print hides it, so that no log line or settings dump shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// The token, as given; empty is refused (it would let everyone in).
    pub fn new(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("the admin token is empty".to_string());
        }
        Ok(AdminToken(text.to_string()))
    }

    /// Whether `given` is the token, compared in constant time so that the time an answer
    /// takes says nothing about how much of a guess was right.
    pub(crate) fn matches(&self, given: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        expected.len() == given.len()
            && expected
                .iter()
                .zip(given)
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(hidden)")
    }
}
