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
//! | `checks.rs` | what is refused before a backend is chosen: `CONNECT`, a bad target or `Host`, ambiguous framing |
//! | `request.rs` | the heads each side sees: the request head the backend gets, the response head the client gets |
//! | `exchange.rs` | one try against one backend: connect or reuse, send, read and relay the response, release |
//! | `outcome.rs` | how a request, a try and an exchange end (`Flow`, `Failure`, `TryError`, `ExchangeError`), and what each failure means |
//! | `session.rs` | the sticky-session view of a request (phase 4) |
//! | `queue.rs` | a backend at its connection limit: waiting in its queue, or another backend with room |
//! | `tunnel.rs` | after `101 Switching Protocols`: bytes both ways until either side closes |
//! | `access.rs` | who sent the request (behind a trusted proxy) and what became of it, for the access log |
//!
//! To follow one request, read `connection.rs` (`serve`, `handle`, `forward`, `next_attempt`,
//! `choose`), then `exchange.rs` (`try_backend`, `open_connection`, `connect`, `request_bytes`,
//! `exchange`, `read_response`, `relay_response`, `client_response_head`, `release`) with
//! `request.rs` for the heads it writes; `src/lib.rs` lists the whole walk, and the side rooms
//! it skips. [`ClientConnection`] is declared in `connection.rs`; `exchange.rs` (one try) and
//! `tunnel.rs` (after a `101`) continue its `impl`, each with the steps of its own part of the
//! path. They share no types but the connection and `outcome.rs`, so none of the three imports
//! another that imports it back.

mod access;
mod checks;
mod connection;
mod exchange;
mod notes;
mod outcome;
mod queue;
mod request;
mod session;
mod tunnel;

pub use connection::ClientConnection;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use std::time::Duration;

use crate::access_log::AccessLog;
use crate::backend::Backend;
use crate::balance::Balancer;
use crate::client_addr::ClientAddresses;
use crate::eligibility::{self, Admission, Candidates};
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

/// The `Retry-After` of a 503 when every backend is drained, in maintenance or of weight 0.
const OPERATOR_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Everything client connections share: the backends, the algorithm, statistics and settings.
/// This is the chapter's `LoadBalancer` class.
///
/// What a reload may change (the backends, the algorithm, sessions, timeouts) is one
/// [`BackendSet`], swapped whole: each request reads the current set once and uses it to the
/// end, so it never sees half a reload. Statistics and buffers live on across reloads.
pub struct LoadBalancer {
    current: ArcSwap<BackendSet>,
    stats: Arc<Stats>,
    buffers: BufferPool,
    /// The settings at start-up: what a reload cannot change (addresses, thread limits) is
    /// read from here. (Named so that code reading `lb.settings` for a request fails to
    /// compile: a request reads its [`BackendSet`]'s.)
    startup_settings: Settings,
    reload: OnceLock<Box<ReloadFn>>,
    access_log: Option<AccessLog>,
    client_addresses: ClientAddresses,
}

/// What `SIGHUP` and `POST /reload` call: reads the configuration again and applies it, or
/// says why not.
pub type ReloadFn = dyn Fn() -> Result<String, String> + Send + Sync;

/// The backends and everything that goes with them, as one reload leaves them: a request reads
/// the current set once (see [`LoadBalancer::snapshot`]) and uses it to the end.
pub struct BackendSet {
    pub(crate) backends: Vec<Arc<Backend>>,
    pub(crate) balancer: Box<dyn Balancer>,
    pub(crate) settings: Settings,
    pub(crate) health: HealthConfig,
    pub(crate) sticky: Option<Sticky>,
    /// Whether any backend has a connection limit: without one, choosing a backend never looks
    /// for room (`queue.rs`).
    pub(crate) limited: bool,
}

impl BackendSet {
    /// The backends, in the order they were given.
    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// The balancing algorithm.
    pub fn balancer(&self) -> &dyn Balancer {
        self.balancer.as_ref()
    }

    /// The settings the proxy reads per request (timeouts, retries, `--explain`).
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Which health checks run, and how.
    pub fn health_config(&self) -> &HealthConfig {
        &self.health
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

    /// The same set with `backends` in place of its own (a reload's kept backends, which the
    /// balancer and sessions built for the new list by address treat as their own).
    pub fn with_backends(mut self, backends: Vec<Arc<Backend>>) -> Self {
        self.limited = any_limited(&backends);
        self.backends = backends;
        self
    }

    /// The backends a request that already tried `tried` may go to now (`eligibility.rs`).
    pub fn candidates<'a>(&'a self, tried: &'a [usize], stats: &Stats) -> Candidates<'a> {
        Candidates::of(&self.backends, &self.settings, self.limited, tried, stats)
    }

    /// How long until some backend could take requests again: the `Retry-After` of a 503.
    /// Backends the operator took out (drain, maint, weight 0) come back when told, which no
    /// clock says: when they are all there is, clients are asked to come back in
    /// [`OPERATOR_RETRY_AFTER`].
    fn retry_after(&self) -> Duration {
        if self.backends.is_empty() {
            return Duration::from_secs(1);
        }
        self.backends
            .iter()
            .filter(|b| eligibility::admits_by_admin(b, Admission::New))
            .map(|b| b.health().available_in())
            .min()
            .unwrap_or(OPERATOR_RETRY_AFTER)
    }
}

impl LoadBalancer {
    /// A balancer over `backends` that chooses with `balancer`.
    pub fn new(backends: Vec<Backend>, balancer: Box<dyn Balancer>, settings: Settings) -> Self {
        let backends: Vec<Arc<Backend>> = backends.into_iter().map(Arc::new).collect();
        LoadBalancer {
            current: ArcSwap::from_pointee(BackendSet {
                limited: any_limited(&backends),
                backends,
                balancer,
                settings: settings.clone(),
                health: HealthConfig::default(),
                sticky: None,
            }),
            stats: Arc::new(Stats::new()),
            buffers: BufferPool::new(BUFFER_SIZE, SPARE_BUFFERS),
            client_addresses: ClientAddresses::new(
                settings.accept_proxy,
                &settings.trusted_proxies,
            ),
            access_log: None,
            startup_settings: settings,
            reload: OnceLock::new(),
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

    /// Turns on the health checks of `config` for every backend (phase 3). Without it, every
    /// backend is always considered healthy. Call it before the balancer starts serving.
    pub fn with_health(self, config: HealthConfig) -> Self {
        self.edit(|set| {
            for backend in &set.backends {
                backend.health().configure(config.clone());
            }
            set.health = config;
        })
    }

    /// The same balancer with sticky sessions: a client that sends back its session cookie
    /// goes to its session's backend while that backend is available.
    pub fn with_sessions(self, sessions: SessionTable) -> Self {
        self.edit(|set| set.sticky = Some(Sticky::Table(sessions)))
    }

    /// The same balancer with sticky sessions kept in signed cookies instead of a table
    /// (`--sticky-secret`): every balancer with the same secret and backends honours them.
    pub fn with_signed_sessions(self, cookies: SignedCookies) -> Self {
        self.edit(|set| set.sticky = Some(Sticky::Signed(cookies)))
    }

    /// Changes the backend set while building, before anyone else holds it.
    fn edit(self, change: impl FnOnce(&mut BackendSet)) -> Self {
        let mut set = unshared(self.current);
        change(&mut set);
        LoadBalancer {
            current: ArcSwap::from_pointee(set),
            ..self
        }
    }

    /// The backend set this balancer was built with, for a reload to apply to the running one.
    pub fn into_set(self) -> BackendSet {
        unshared(self.current)
    }

    /// The current backend set: read it once per request and use it to the end.
    pub fn snapshot(&self) -> Arc<BackendSet> {
        self.current.load_full()
    }

    /// Brings a connection's `set` up to date with the current one, at the start of a request.
    /// While nothing was reloaded this only compares two pointers (an `ArcSwap` load, no write
    /// to the set's shared reference count, which every client thread would contend for).
    pub fn refresh(&self, set: &mut Arc<BackendSet>) {
        let current = self.current.load();
        if !Arc::ptr_eq(set, &current) {
            *set = arc_swap::Guard::into_inner(current);
        }
    }

    /// Makes `set` the current backend set, as one step: requests already running keep the set
    /// they read (and the backends in it: a removed backend lives on while they hold it).
    pub fn replace(&self, set: BackendSet) -> Arc<BackendSet> {
        self.current.swap(Arc::new(set))
    }

    /// Which health checks run, and how (the current set's).
    pub fn health_config(&self) -> HealthConfig {
        self.snapshot().health.clone()
    }

    /// The backends of the current set, in the order they were given.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.snapshot().backends.clone()
    }

    /// The bytes of the spare read buffers kept for reuse (at most 256 of them, 1 MiB):
    /// part of the heap in use, on purpose.
    pub fn spare_buffer_bytes(&self) -> usize {
        self.buffers.spare_bytes()
    }

    /// The balancer's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The balancer's counters, for a thread that outlives a borrow of the balancer.
    pub fn stats_handle(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// The settings at start-up (where to listen, how many clients): a request reads the
    /// current ones from its [`BackendSet`].
    pub fn startup_settings(&self) -> &Settings {
        &self.startup_settings
    }

    /// Sets what a reload does (start-up sets it, once).
    pub fn set_reload(&self, reload: Box<ReloadFn>) {
        let _ = self.reload.set(reload);
    }

    /// Reads the configuration again and applies it: `Ok` with what changed, or `Err` with
    /// why nothing did. Without a way to reload (a balancer built by a test), an error.
    pub fn reload(&self) -> Result<String, String> {
        // The access log is reopened whatever the configuration says, as nginx does on a
        // reload: a rotated file is let go of either way.
        self.reopen_access_log();
        match self.reload.get() {
            Some(reload) => reload(),
            None => Err("this balancer cannot reload".to_string()),
        }
    }

    /// Reopens the access log at its path, for log rotation (`SIGUSR1`, and every reload);
    /// false when there is no access log.
    pub fn reopen_access_log(&self) -> bool {
        match &self.access_log {
            Some(log) => {
                log.reopen();
                true
            }
            None => false,
        }
    }

    /// Closes one idle pooled connection per backend, giving descriptors back to clients (the
    /// budget keeps them for clients first); false when no connection was idle.
    pub fn give_back_descriptors(&self) -> bool {
        let mut closed = false;
        for backend in &self.snapshot().backends {
            closed |= backend.close_one_idle();
        }
        closed
    }
}

/// Whether any of `backends` has a connection limit.
fn any_limited(backends: &[Arc<Backend>]) -> bool {
    backends.iter().any(|b| b.limit().max().is_some())
}

/// The set of a balancer still being built, which no request has read.
fn unshared(current: ArcSwap<BackendSet>) -> BackendSet {
    Arc::try_unwrap(current.into_inner())
        .unwrap_or_else(|_| panic!("a balancer being built shares its backend set with no one"))
}

/// Flags a client connection shares with the server, which reads them to shut down gracefully.
#[derive(Debug, Default)]
pub struct ConnectionState {
    /// True while the connection waits for a next request, so shutting down may close it at once.
    pub idle: AtomicBool,
}
