//! The proxy: what happens on one client connection, request after request.
//!
//! A client connection is a loop over requests (HTTP/1.1 keep-alive). Each request goes through
//! a few named steps: read the head, check its framing, choose a backend, send the request,
//! relay the response, or write an error. The chapter's Python handled one `recv(4096)` per
//! connection and closed it; this loop serves as many requests as the client sends, streams
//! bodies of any size both ways, and answers each kind of failure with its own status.
//!
//! Each file is one part of a request's path, in the order a request meets them:
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | [`LoadBalancer`], what every connection shares: backends, algorithm, sessions, settings |
//! | `connection.rs` | [`ClientConnection`]: the loop over requests, choosing a backend, retries, error answers |
//! | `request.rs` | checking a request and writing the heads the backend and the client see |
//! | `exchange.rs` | one try against one backend: connect or reuse, send, read and relay the response, release |
//! | `outcome.rs` | how a request, a try and an exchange end: `Flow`, `Failure`, `TryError`, `ExchangeError` |
//! | `session.rs` | the sticky-session view of a request (phase 4) |
//! | `tunnel.rs` | after `101 Switching Protocols`: bytes both ways until either side closes |
//! | `access.rs` | who sent the request (behind a trusted proxy) and what became of it, for the access log |
//!
//! To follow one request, read `connection.rs` from `serve` to `forward`, then `request.rs`
//! (`check_request`, `write_request_head`), then `exchange.rs` from `try_backend` to
//! `relay_response`. [`ClientConnection`] is declared in `connection.rs`; `exchange.rs` (one
//! try) and `tunnel.rs` (after a `101`) continue its `impl`, each with the steps of its own part
//! of the path. They share no types but the connection and `outcome.rs`, so none of the three
//! imports another that imports it back.

mod access;
mod connection;
mod exchange;
mod outcome;
mod request;
mod session;
mod tunnel;

pub use connection::ClientConnection;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use crate::access_log::AccessLog;
use crate::backend::Backend;
use crate::balance::Balancer;
use crate::client_addr::ClientAddresses;
use crate::health::HealthConfig;
use crate::http::BufferPool;
use crate::settings::Settings;
use crate::stats::Stats;
use crate::sticky::signed::SignedCookies;
use crate::sticky::{SessionTable, Sticky};

/// The size of a read buffer, for a client or a backend connection: enough for the head and body
/// of most small messages. A buffer grows only for a large head or a long body.
const BUFFER_SIZE: usize = 4 * 1024;

/// Spare read buffers kept for reuse (at most 1 MiB of them).
const SPARE_BUFFERS: usize = 256;

/// Everything client connections share: the backends, the algorithm, statistics and settings.
/// This is the chapter's `LoadBalancer` class.
pub struct LoadBalancer {
    backends: Vec<Arc<Backend>>,
    balancer: Box<dyn Balancer>,
    stats: Stats,
    settings: Settings,
    buffers: BufferPool,
    health: HealthConfig,
    sticky: Option<Sticky>,
    access_log: Option<AccessLog>,
    client_addresses: ClientAddresses,
}

impl LoadBalancer {
    /// A balancer over `backends` that chooses with `balancer`.
    pub fn new(backends: Vec<Backend>, balancer: Box<dyn Balancer>, settings: Settings) -> Self {
        LoadBalancer {
            backends: backends.into_iter().map(Arc::new).collect(),
            balancer,
            stats: Stats::new(),
            buffers: BufferPool::new(BUFFER_SIZE, SPARE_BUFFERS),
            client_addresses: ClientAddresses::new(
                settings.accept_proxy,
                &settings.trusted_proxies,
            ),
            access_log: None,
            settings,
            health: HealthConfig::default(),
            sticky: None,
        }
    }

    /// Turns on the health checks of `config` for every backend (phase 3). Without it, every
    /// backend is always considered healthy. Call it before the balancer starts serving.
    pub fn with_health(mut self, config: HealthConfig) -> Self {
        for backend in &self.backends {
            backend.health().configure(config.clone());
        }
        self.health = config;
        self
    }

    /// Which health checks run, and how.
    pub fn health_config(&self) -> &HealthConfig {
        &self.health
    }

    /// The same balancer with sticky sessions: a client that sends back its session cookie
    /// goes to its session's backend while that backend is available.
    pub fn with_sessions(mut self, sessions: SessionTable) -> Self {
        self.sticky = Some(Sticky::Table(sessions));
        self
    }

    /// The same balancer with sticky sessions kept in signed cookies instead of a table
    /// (`--sticky-secret`): every balancer with the same secret and backends honours them.
    pub fn with_signed_sessions(mut self, cookies: SignedCookies) -> Self {
        self.sticky = Some(Sticky::Signed(cookies));
        self
    }

    /// How sticky sessions are kept, when they are on.
    pub fn sticky(&self) -> Option<&Sticky> {
        self.sticky.as_ref()
    }

    /// The sticky-session table, when sessions are on and kept in a table.
    pub fn sessions(&self) -> Option<&SessionTable> {
        match &self.sticky {
            Some(Sticky::Table(table)) => Some(table),
            _ => None,
        }
    }

    /// The same balancer writing one line per request to `log` (`--access-log`).
    pub fn with_access_log(mut self, log: AccessLog) -> Self {
        self.access_log = Some(log);
        self
    }

    /// The access log, when it is on. On `SIGUSR1`, call its [`AccessLog::reopen`].
    pub fn access_log(&self) -> Option<&AccessLog> {
        self.access_log.as_ref()
    }

    /// How client addresses are found (`--accept-proxy`, `--trusted-proxy`).
    pub fn client_addresses(&self) -> &ClientAddresses {
        &self.client_addresses
    }

    /// The backends, in the order they were given.
    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// The balancing algorithm.
    pub fn balancer(&self) -> &dyn Balancer {
        self.balancer.as_ref()
    }

    /// The balancer's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The run-time settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Closes one idle pooled connection per backend, giving descriptors back to clients (the
    /// budget keeps them for clients first); false when no connection was idle.
    pub fn give_back_descriptors(&self) -> bool {
        let mut closed = false;
        for backend in &self.backends {
            closed |= backend.close_one_idle();
        }
        closed
    }

    /// How long until some backend could take requests again: the `Retry-After` of a 503.
    fn retry_after(&self) -> Duration {
        self.backends
            .iter()
            .map(|b| b.health().available_in())
            .min()
            .unwrap_or(Duration::from_secs(1))
    }
}

/// Flags a client connection shares with the server, which reads them to shut down gracefully.
#[derive(Debug, Default)]
pub struct ConnectionState {
    /// True while the connection waits for a next request, so shutting down may close it at once.
    pub idle: AtomicBool,
}
