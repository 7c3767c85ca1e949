//! The run-time settings every part of the balancer reads: where to listen, how many clients at
//! once, and how long to wait for each party. They come from the command line (`cli`) and stay
//! fixed while the balancer runs.

use std::net::SocketAddr;
use std::time::Duration;

use crate::admin::AdminToken;
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
