//! Command-line flags shared by every balancer binary, and the small parsers behind them.
//!
//! Each phase binary flattens [`CommonArgs`] into its own clap struct, so every phase accepts the same
//! flags and a learner can compare two phase files and see only what the phase adds. The value parsers
//! are plain functions, unit-tested below, and every error they return names the offending input.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::access_log::{AccessLog, Format as AccessLogFormat, Target as AccessLogTarget};
use crate::backend::Backend;
use crate::client_addr::Cidr;
use crate::dns::{self, Resolver};
use crate::error::StartError;
use crate::health::{ActivePolicy, HealthConfig, HealthMode, PassivePolicy};
use crate::plural;
use crate::settings::{AdminToken, CpuScheduling, Settings};
use crate::sticky::signed::{Secret, SignedCookies, MIN_SECRET_LEN};
use crate::sticky::SessionTable;

mod parse;
mod values;

pub use parse::*;
pub use values::*;

/// The backends used when no `--backend` is given: the three demo backends of `scripts/backends.sh`.
pub const DEFAULT_BACKENDS: [&str; 3] = ["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"];

/// Flags common to every load-balancer binary (see the contract's table).
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// A TOML file of settings under the flags' own names (see docs/config.md); flags given on
    /// the command line win over it. SIGHUP or POST /reload reads it again.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Where clients connect; `off` for HTTPS only (with --tls-listen).
    #[arg(
        long,
        value_name = "ADDR|off",
        default_value = "0.0.0.0:8080",
        value_parser = parse_listen,
    )]
    pub listen: ListenAddr,

    /// A backend as HOST:PORT[=WEIGHT]; repeat the flag for each one
    /// [default: 127.0.0.1:8001, 127.0.0.1:8002, 127.0.0.1:8003].
    #[arg(long = "backend", value_name = "HOST:PORT[=WEIGHT]", value_parser = parse_backend_spec)]
    pub backends: Vec<BackendSpec>,

    /// A backup backend as HOST:PORT[=WEIGHT]; repeat the flag for each one. Backups take
    /// requests only while no --backend is in rotation, with the same algorithm.
    #[arg(long = "backup", value_name = "HOST:PORT[=WEIGHT]", value_parser = parse_backend_spec)]
    pub backups: Vec<BackendSpec>,

    /// When fewer than PERCENT of the backends are in rotation, balance over all of them as if
    /// all were healthy (a failed connection goes on to the next); 0 is off.
    #[arg(
        long,
        value_name = "PERCENT",
        default_value_t = 0,
        value_parser = clap::value_parser!(u8).range(0..=100)
    )]
    pub panic_threshold: u8,

    /// A backend coming back into rotation (recovered, made ready, added) ramps from a small
    /// share of new requests to its full share over this long; 0 is off.
    #[arg(long, value_name = "DUR", default_value = "0", value_parser = parse_duration)]
    pub slow_start: Duration,

    /// Start demo backends in-process on the --backend addresses.
    #[arg(long)]
    pub demo: bool,

    /// How often backends given by name are resolved again (each address is a backend); 0
    /// resolves them at start-up (and reload) only.
    #[arg(
        long,
        value_name = "DUR",
        allow_negative_numbers = true,
        default_value = "30s",
        value_parser = parse_duration,
    )]
    pub resolve_interval: Duration,

    /// Resolves backend names: the system's resolver, or a test's.
    #[arg(skip)]
    pub resolver: Resolver,

    /// Statistics listener address, or `off` [default: 127.0.0.1:8404, or the next free port up
    /// to 8413 when it is in use].
    // No clap default: `None` means the flag was not given, and only then may a busy port be
    // replaced by another (an address the user chose stays an error when it is in use).
    #[arg(long, value_name = "ADDR|off", value_parser = parse_admin)]
    pub admin: Option<AdminAddr>,

    /// Token every write to the admin listener (drain, weight, reload) must carry as
    /// `Authorization: Bearer TOKEN`, from any address; without it, writes are taken from
    /// loopback clients only. Prefer the environment variable, which `ps` does not show.
    // Never shown in `--help` (hide_env_values) nor in a `Debug` print.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "LB_ADMIN_TOKEN",
        hide_env_values = true,
        value_parser = AdminToken::new
    )]
    pub admin_token: Option<AdminToken>,

    /// How often statistics are logged; 0 turns the periodic log off.
    #[arg(
        long,
        value_name = "DUR",
        allow_negative_numbers = true,
        default_value = "30s",
        value_parser = parse_duration,
    )]
    pub stats_interval: Duration,

    /// Client connections served at once; beyond it, accepting pauses.
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        default_value_t = 1024,
        value_parser = parse_positive,
    )]
    pub max_connections: usize,

    /// Time allowed for connecting to a backend.
    #[arg(
        long,
        value_name = "DUR",
        allow_negative_numbers = true,
        default_value = "2s",
        value_parser = parse_nonzero_duration,
    )]
    pub connect_timeout: Duration,

    /// Time allowed for a backend to answer (and between its bytes).
    #[arg(
        long,
        value_name = "DUR",
        allow_negative_numbers = true,
        default_value = "30s",
        value_parser = parse_nonzero_duration,
    )]
    pub backend_timeout: Duration,

    /// A whole request head must arrive within it; also the idle keep-alive limit.
    #[arg(
        long,
        value_name = "DUR",
        allow_negative_numbers = true,
        default_value = "30s",
        value_parser = parse_nonzero_duration,
    )]
    pub client_timeout: Duration,

    /// A tunnel (after 101 Switching Protocols, e.g. a WebSocket) with no bytes in either
    /// direction for this long is closed.
    #[arg(
        long,
        value_name = "DUR",
        allow_negative_numbers = true,
        default_value = "1h",
        value_parser = parse_nonzero_duration,
    )]
    pub tunnel_timeout: Duration,

    /// The most requests in flight on each backend at once; more wait in a queue, first come
    /// first served, for --queue-timeout (a backend's `max_conns` in the configuration file
    /// wins) [default: no limit].
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub backend_max_conns: Option<u32>,

    /// How long a request waits in the queue of a backend at its --backend-max-conns before it
    /// gets 503; 0 answers 503 at once.
    #[arg(
        long,
        value_name = "DUR",
        allow_negative_numbers = true,
        default_value = "5s",
        value_parser = parse_duration,
    )]
    pub queue_timeout: Duration,

    /// Other backends a request may go on to when one fails it before any byte of the answer
    /// reached the client (idempotent requests only, once sent) [default: backends - 1].
    #[arg(long, value_name = "N")]
    pub retries: Option<usize>,

    /// Set SO_REUSEPORT on the listener, so that a new instance can start on the same address
    /// while this one drains after SIGTERM (a restart that loses no request).
    #[arg(long)]
    pub reuse_port: bool,

    /// Add an X-Lb-Decision response header saying why this backend was chosen.
    #[arg(long)]
    pub explain: bool,

    /// How the kernel schedules the threads that serve clients: `batch` (Linux SCHED_BATCH; a
    /// woken thread does not preempt the running program: more throughput) or `normal` (less
    /// latency when other programs keep the CPUs busy).
    #[arg(
        long,
        value_name = "batch|normal",
        default_value = "batch",
        hide_possible_values = true
    )]
    pub cpu_scheduling: CpuScheduling,

    /// HTTPS: where TLS clients connect, and the certificates they are shown.
    #[command(flatten)]
    pub tls: TlsArgs,

    /// The access log: where, and in which format.
    #[command(flatten)]
    pub access_log: AccessLogArgs,

    /// Who the client is behind another proxy: the PROXY protocol, trusted proxies.
    #[command(flatten)]
    pub client_addr: ClientAddrArgs,

    /// Log at debug level (one line per request); RUST_LOG overrides.
    #[arg(short, long)]
    pub verbose: bool,
}

impl CommonArgs {
    /// The backends to balance over: the `--backend` flags, or the three defaults with
    /// `default_weights` (phase 2's weighted binary uses 5, 3, 2 as the chapter does).
    ///
    /// A backend given by name is one backend per address the name resolves to, shown as
    /// `app:8000 (10.0.0.3)`; a name that does not resolve now is left out with a warning (the
    /// names are resolved again every `--resolve-interval`).
    ///
    /// The backups (`--backup`) come after them, marked as such.
    pub fn backends(&self, default_weights: &[u32; 3]) -> Vec<Backend> {
        let primaries = self.backend_specs(default_weights);
        let primaries = primaries.iter().flat_map(|spec| self.resolve(spec));
        let backups = self
            .backups
            .iter()
            .flat_map(|spec| self.resolve(spec))
            .map(Backend::as_backup);
        primaries.chain(backups).collect()
    }

    /// The backends `spec` stands for now: one, or one per address its name resolves to, each
    /// with the connection limit the spec or `--backend-max-conns` gives.
    fn resolve(&self, spec: &BackendSpec) -> Vec<Backend> {
        let max_conns = spec.max_conns.or(self.backend_max_conns);
        let new = |name, addr| Backend::new(name, addr, spec.weight).with_max_conns(max_conns);
        match self.addresses(spec) {
            Ok(addrs) if spec.addr.is_some() => addrs
                .into_iter()
                .map(|addr| new(spec.name.clone(), addr))
                .collect(),
            Ok(addrs) => addrs
                .into_iter()
                .map(|addr| new(dns::display_name(&spec.name, addr), addr))
                .collect(),
            Err(err) => {
                log::warn!(
                    "backend {} does not resolve ({err}); it is left out until it does",
                    spec.name
                );
                Vec::new()
            }
        }
    }

    /// The backends as given (`--backend`, or the three defaults with `default_weights`).
    pub fn backend_specs(&self, default_weights: &[u32; 3]) -> Vec<BackendSpec> {
        if self.backends.is_empty() {
            DEFAULT_BACKENDS
                .iter()
                .zip(default_weights)
                .filter_map(|(addr, &weight)| {
                    let spec = parse_backend_spec(addr).ok()?;
                    Some(BackendSpec { weight, ..spec })
                })
                .collect()
        } else {
            self.backends.clone()
        }
    }

    /// The addresses `spec` stands for now: its own, or those its name resolves to.
    pub fn addresses(&self, spec: &BackendSpec) -> std::io::Result<Vec<SocketAddr>> {
        match spec.addr {
            Some(addr) => Ok(vec![addr]),
            None => self.resolver.addresses(&spec.host, spec.port),
        }
    }

    /// The names among the backends given that resolve to nothing now.
    pub fn unresolved(&self) -> Vec<String> {
        self.backends
            .iter()
            .chain(&self.backups)
            .filter(|spec| self.addresses(spec).is_err())
            .map(|spec| spec.name.clone())
            .collect()
    }

    /// How many other backends a request may go on to, by default: one less than the
    /// backends given (backups included), or, when a name stands for as many backends as it
    /// has addresses, each backend once (the proxy never tries one twice).
    fn default_retries(&self) -> usize {
        let all = || self.backends.iter().chain(&self.backups);
        if self.backends.is_empty() {
            DEFAULT_BACKENDS.len() + self.backups.len() - 1
        } else if all().all(|spec| spec.addr.is_some()) {
            all().count() - 1
        } else {
            usize::MAX
        }
    }

    /// The run-time settings the proxy and server read on every connection.
    pub fn settings(&self) -> Settings {
        Settings {
            listen: self.listen.0,
            max_connections: self.max_connections,
            connect_timeout: self.connect_timeout,
            backend_timeout: self.backend_timeout,
            client_timeout: self.client_timeout,
            tunnel_timeout: self.tunnel_timeout,
            retries: self.retries.unwrap_or_else(|| self.default_retries()),
            queue_timeout: self.queue_timeout,
            stats_interval: self.stats_interval,
            explain: self.explain,
            accept_proxy: self.client_addr.accept_proxy,
            trusted_proxies: self.client_addr.trusted_proxies.clone(),
            reuse_port: self.reuse_port,
            admin_token: self.admin_token.clone(),
            panic_threshold: self.panic_threshold,
            slow_start: self.slow_start,
            redirect_https: self
                .tls
                .tls_listen
                .filter(|_| self.tls.redirect_https)
                .map(|addr| addr.port()),
            cpu_scheduling: self.cpu_scheduling,
        }
    }

    /// Refuses listener flags that make no sense together, before anything is read or bound:
    /// certificates or a redirect without an HTTPS listener, or no listener at all.
    pub fn check_listeners(&self) -> Result<(), StartError> {
        if self.tls.tls_listen.is_some() {
            return Ok(());
        }
        let missing = if !self.tls.tls_cert.is_empty() || !self.tls.tls_key.is_empty() {
            "--tls-cert and --tls-key need --tls-listen ADDR"
        } else if self.tls.redirect_https {
            "--redirect-https needs --tls-listen ADDR"
        } else if self.listen.0.is_none() {
            "--listen off needs --tls-listen ADDR: there would be no listener"
        } else {
            return Ok(());
        };
        Err(StartError(missing.to_string()))
    }
}

/// The HTTPS flags of every balancer binary: a TLS listener beside the plain one.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// Where HTTPS clients connect (TLS ends here; backends get plain HTTP/1.1).
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    pub tls_listen: Option<SocketAddr>,

    /// A PEM certificate file (the end-entity certificate first, then its chain); repeat with
    /// --tls-key for each certificate; the client's SNI picks one, the first is the default.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Vec<PathBuf>,

    /// The PEM private key of the --tls-cert given in the same position.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Vec<PathBuf>,

    /// Answer every request on the plain listener with 308 to the same host and path on HTTPS
    /// (needs --tls-listen).
    #[arg(long)]
    pub redirect_https: bool,
}

/// The access-log flags of every balancer binary.
#[derive(Args, Debug, Clone, Default)]
pub struct AccessLogArgs {
    /// Write one line per request to this file (appended to; reopened on SIGUSR1), or to
    /// standard output with `-` [default: off].
    #[arg(long, value_name = "PATH|-", value_parser = AccessLogTarget::parse)]
    pub access_log: Option<AccessLogTarget>,

    /// The access log's format: combined (nginx's, then the balancer's own fields) or json.
    #[arg(
        long,
        value_name = "FORMAT",
        default_value = "combined",
        hide_possible_values = true
    )]
    pub access_log_format: AccessLogFormat,
}

impl AccessLogArgs {
    /// Opens the access log when `--access-log` is given; a file that cannot be opened is a
    /// start-up error naming it.
    pub fn open(&self) -> Result<Option<AccessLog>, StartError> {
        let Some(target) = &self.access_log else {
            return Ok(None);
        };
        AccessLog::start(target.clone(), self.access_log_format)
            .map(Some)
            .map_err(|err| match target {
                AccessLogTarget::File(path) => {
                    StartError(format!("--access-log {}: {err}", path.display()))
                }
                AccessLogTarget::Stdout => StartError(format!("--access-log -: {err}")),
            })
    }
}

/// The client-address flags of every balancer binary.
#[derive(Args, Debug, Clone, Default)]
pub struct ClientAddrArgs {
    /// Every client connection starts with a PROXY protocol header (v1 or v2, before TLS), as
    /// an L4 balancer in front sends it; its source address is the client's.
    #[arg(long)]
    pub accept_proxy: bool,

    /// Believe X-Forwarded-For from peers in this block (repeatable): the client is the
    /// rightmost address in it that is not itself trusted.
    #[arg(long = "trusted-proxy", value_name = "CIDR", value_parser = Cidr::parse)]
    pub trusted_proxies: Vec<Cidr>,
}

/// The health-check flags of the `phase3_*` binaries and `loadbalancer` (the contract's table).
#[derive(Args, Debug, Clone)]
pub struct HealthArgs {
    /// Active checks GET this path; a 2xx answer is healthy.
    #[arg(long, value_name = "PATH", default_value = "/health", value_parser = parse_health_path)]
    pub health_path: String,

    /// Time between active checks of each backend.
    #[arg(
        long,
        value_name = "DUR",
        allow_negative_numbers = true,
        default_value = "5s",
        value_parser = parse_nonzero_duration,
    )]
    pub health_interval: Duration,

    /// Time one active check may take.
    #[arg(
        long,
        value_name = "DUR",
        allow_negative_numbers = true,
        default_value = "2s",
        value_parser = parse_nonzero_duration,
    )]
    pub health_timeout: Duration,

    /// Passed checks in a row that bring a backend back.
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        default_value_t = 2,
        value_parser = parse_count,
    )]
    pub rise: u32,

    /// Failed checks in a row that take a backend down.
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        default_value_t = 3,
        value_parser = parse_count,
    )]
    pub fall: u32,

    /// Passive: failed requests in a row that take a backend out.
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        default_value_t = 3,
        value_parser = parse_count,
    )]
    pub max_fails: u32,

    /// Passive: how long a backend stays out before one trial request.
    #[arg(
        long,
        value_name = "DUR",
        allow_negative_numbers = true,
        default_value = "10s",
        value_parser = parse_duration,
    )]
    pub fail_timeout: Duration,
}

impl HealthArgs {
    /// The health configuration for `mode`, to hand to `LoadBalancer::with_health`.
    pub fn config(&self, mode: HealthMode) -> HealthConfig {
        HealthConfig {
            active: mode.is_active().then(|| ActivePolicy {
                path: self.health_path.clone(),
                interval: self.health_interval,
                timeout: self.health_timeout,
                rise: self.rise,
                fall: self.fall,
            }),
            passive: mode.is_passive().then_some(PassivePolicy {
                max_fails: self.max_fails,
                fail_timeout: self.fail_timeout,
            }),
        }
    }
}

/// The `loadbalancer` binary's `--health-check` flag, to flatten beside [`HealthArgs`].
#[derive(Args, Debug, Clone)]
pub struct HealthCheckArgs {
    /// Which health checks run.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = HealthMode::Both)]
    pub health_check: HealthMode,
}

/// The sticky-session flags of `loadbalancer`: `--sticky` turns sessions on.
#[derive(Args, Debug, Clone)]
pub struct StickyArgs {
    /// Keep each client on one backend with a session cookie.
    #[arg(long)]
    pub sticky: bool,

    /// How the session table is set up.
    #[command(flatten)]
    pub session: SessionArgs,
}

impl StickyArgs {
    /// The session table when `--sticky` is on, else none.
    pub fn session_table(&self) -> Option<SessionTable> {
        self.sticky.then(|| self.session.session_table())
    }
}

/// The session-table flags, shared by `phase4_sticky` (always sticky) and `loadbalancer --sticky`.
#[derive(Args, Debug, Clone)]
pub struct SessionArgs {
    /// Name of the session cookie.
    #[arg(
        long,
        value_name = "NAME",
        default_value = crate::sticky::DEFAULT_COOKIE,
        value_parser = parse_cookie_name,
    )]
    pub cookie_name: String,

    /// Forget a session after this long without a request.
    #[arg(
        long,
        value_name = "DUR",
        allow_negative_numbers = true,
        default_value = "30m",
        value_parser = parse_duration,
    )]
    pub session_ttl: Duration,

    /// The most sessions remembered; the least recently used is forgotten first.
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        default_value_t = 100_000,
        value_parser = parse_positive,
    )]
    pub max_sessions: usize,

    /// Keep sessions in signed cookies instead of a table (HMAC-SHA256, at least 16 bytes):
    /// every balancer with the same secret and backends honours them, across restarts. Prefer
    /// the environment variable, which `ps` does not show.
    // The secret's value never appears in `--help` (hide_env_values), nor in a `Debug` print.
    #[arg(
        long,
        value_name = "SECRET",
        env = "LB_STICKY_SECRET",
        hide_env_values = true,
        value_parser = parse_secret,
        conflicts_with = "max_sessions"
    )]
    pub sticky_secret: Option<Secret>,
}

impl SessionArgs {
    /// A session table with these settings.
    pub fn session_table(&self) -> SessionTable {
        SessionTable::new(&self.cookie_name, self.session_ttl, self.max_sessions)
    }

    /// Signed session cookies for `backends` when `--sticky-secret` (or `LB_STICKY_SECRET`) is
    /// given, else none. A secret shorter than [`MIN_SECRET_LEN`] bytes is refused: one cookie
    /// would be enough to guess it offline. The error never repeats the secret.
    pub fn signed_cookies(
        &self,
        backends: &[Backend],
    ) -> Result<Option<SignedCookies>, StartError> {
        let Some(secret) = &self.sticky_secret else {
            return Ok(None);
        };
        if secret.len() < MIN_SECRET_LEN {
            return Err(StartError(format!(
                "--sticky-secret (or LB_STICKY_SECRET) is {}; it must be at least \
                 {MIN_SECRET_LEN} (try: openssl rand -hex 16)",
                plural::count(secret.len() as u64, "byte")
            )));
        }
        let addrs: Vec<SocketAddr> = backends.iter().map(Backend::addr).collect();
        Ok(Some(SignedCookies::new(
            &self.cookie_name,
            self.session_ttl,
            secret,
            &addrs,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn durations_take_units_or_bare_seconds() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("+1s").is_err());
        assert!(parse_duration("1.5s").is_err());
    }

    #[test]
    fn backend_specs_take_an_optional_weight() {
        let spec = parse_backend_spec("127.0.0.1:8001=5").unwrap();
        assert_eq!(spec.addr, Some("127.0.0.1:8001".parse().unwrap()));
        assert_eq!(spec.weight, 5);
        assert_eq!(spec.name, "127.0.0.1:8001");
        assert_eq!(parse_backend_spec("127.0.0.1:8002").unwrap().weight, 1);
        assert!(parse_backend_spec("127.0.0.1:8001=0")
            .unwrap_err()
            .contains("at least 1"));
        assert!(parse_backend_spec("127.0.0.1:8001=x").is_err());
        assert!(parse_backend_spec("nonsense").is_err());
        assert!(parse_backend_spec("127.0.0.1:99999").is_err());
        // The configuration file's form of a backend with a limit of its own.
        let spec = parse_backend_spec("app:8000,max_conns=4").unwrap();
        assert_eq!(
            (spec.name.as_str(), spec.weight, spec.max_conns),
            ("app:8000", 1, Some(4))
        );
        assert!(parse_backend_spec("127.0.0.1:8001=2,max_conns=0")
            .unwrap_err()
            .contains("max_conns"));
    }

    #[test]
    fn connection_limits_apply_to_every_backend_unless_it_has_its_own() {
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            common: CommonArgs,
        }
        let parse = |args: &[&str]| {
            let argv = std::iter::once("test").chain(args.iter().copied());
            Flags::try_parse_from(argv).map(|flags| flags.common)
        };
        let off = parse(&[]).unwrap();
        assert_eq!(off.queue_timeout, Duration::from_secs(5));
        assert!(off
            .backends(&[1, 1, 1])
            .iter()
            .all(|b| b.limit().max().is_none()));
        let common = parse(&[
            "--backend-max-conns",
            "2",
            "--queue-timeout",
            "300ms",
            "--backend",
            "127.0.0.1:8001",
            "--backend",
            "127.0.0.1:8002,max_conns=7",
        ])
        .unwrap();
        let limits: Vec<_> = common
            .backends(&[1, 1, 1])
            .iter()
            .map(|b| b.limit().max())
            .collect();
        assert_eq!(limits, [Some(2), Some(7)]);
        assert_eq!(common.settings().queue_timeout, Duration::from_millis(300));
        assert!(parse(&["--backend-max-conns", "0"]).is_err());
    }

    #[test]
    fn admin_can_be_off() {
        assert_eq!(parse_admin("off"), Ok(AdminAddr(None)));
        assert_eq!(
            parse_admin("127.0.0.1:9000"),
            Ok(AdminAddr(Some("127.0.0.1:9000".parse().unwrap())))
        );
        assert!(parse_admin("nowhere").is_err());
    }

    #[test]
    fn admin_not_given_is_told_apart_from_admin_given() {
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            common: CommonArgs,
        }
        let admin = |args: &[&str]| {
            let argv = std::iter::once("test").chain(args.iter().copied());
            Flags::try_parse_from(argv).unwrap().common.admin
        };
        assert_eq!(admin(&[]), None);
        assert_eq!(admin(&["--admin", "off"]), Some(AdminAddr(None)));
        assert_eq!(
            admin(&["--admin", "127.0.0.1:8404"]),
            Some(AdminAddr(Some("127.0.0.1:8404".parse().unwrap())))
        );
    }

    #[test]
    fn health_values_are_checked() {
        assert_eq!(parse_count("2"), Ok(2));
        assert!(parse_count("0").is_err());
        assert_eq!(
            parse_nonzero_duration("100ms"),
            Ok(Duration::from_millis(100))
        );
        assert!(parse_nonzero_duration("0").is_err());
        assert_eq!(parse_health_path("/healthz"), Ok("/healthz".to_string()));
        assert!(parse_health_path("health").is_err());
        assert!(parse_health_path("/a b").is_err());
    }

    #[test]
    fn health_args_build_the_chosen_checks() {
        #[derive(Parser)]
        struct Test {
            #[command(flatten)]
            health: HealthArgs,
            #[command(flatten)]
            check: HealthCheckArgs,
        }
        let parsed = Test::try_parse_from(["test", "--rise", "4", "--fail-timeout", "1m"]).unwrap();
        assert_eq!(parsed.check.health_check, HealthMode::Both);
        let config = parsed.health.config(parsed.check.health_check);
        let active = config.active.expect("active checks on");
        assert_eq!(active.path, "/health");
        assert_eq!(active.interval, Duration::from_secs(5));
        assert_eq!(active.timeout, Duration::from_secs(2));
        assert_eq!((active.rise, active.fall), (4, 3));
        let passive = config.passive.expect("passive checks on");
        assert_eq!(passive.max_fails, 3);
        assert_eq!(passive.fail_timeout, Duration::from_secs(60));

        let parsed = Test::try_parse_from(["test", "--health-check", "passive"]).unwrap();
        assert_eq!(
            parsed.health.config(parsed.check.health_check).mode(),
            HealthMode::Passive
        );
        let parsed = Test::try_parse_from(["test", "--health-check", "none"]).unwrap();
        assert_eq!(
            parsed.health.config(parsed.check.health_check),
            HealthConfig::default()
        );
        assert!(Test::try_parse_from(["test", "--health-check", "sometimes"]).is_err());
        assert!(Test::try_parse_from(["test", "--fall", "0"]).is_err());
    }

    #[test]
    fn sticky_flags_build_a_table_only_with_sticky() {
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            sticky: StickyArgs,
        }
        let off = Flags::try_parse_from(["lb"]).unwrap();
        assert!(off.sticky.session_table().is_none());
        let on = Flags::try_parse_from([
            "lb",
            "--sticky",
            "--cookie-name",
            "SID",
            "--max-sessions",
            "7",
        ])
        .unwrap();
        let table = on.sticky.session_table().expect("a table with --sticky");
        assert_eq!(table.cookie_name(), "SID");
        assert_eq!(table.max_sessions(), 7);
        assert_eq!(on.sticky.session.session_ttl, Duration::from_secs(30 * 60));
        assert!(Flags::try_parse_from(["lb", "--max-sessions", "0"]).is_err());
        assert!(Flags::try_parse_from(["lb", "--cookie-name", "a=b"]).is_err());
    }

    #[test]
    fn cookie_names_are_tokens() {
        assert_eq!(parse_cookie_name("SESSION_ID"), Ok("SESSION_ID".into()));
        assert!(parse_cookie_name("").is_err());
        assert!(parse_cookie_name("a=b").is_err());
        assert!(parse_cookie_name("a b").is_err());
        assert!(parse_cookie_name("a;b").is_err());
    }

    #[test]
    fn the_backend_help_shows_the_default_weights() {
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            common: CommonArgs,
        }
        let help = |weights| {
            command_with_default_weights::<Flags>(weights).debug_assert();
            command_with_default_weights::<Flags>(weights)
                .render_help()
                .to_string()
        };
        let weighted = help(&[5, 3, 2]);
        assert!(
            weighted.contains("[default: 127.0.0.1:8001=5, 127.0.0.1:8002=3, 127.0.0.1:8003=2]"),
            "{weighted}"
        );
        // With weights of 1 the help says what the doc comment says.
        let plain = help(&[1, 1, 1]);
        assert!(
            plain.contains("[default: 127.0.0.1:8001, 127.0.0.1:8002, 127.0.0.1:8003]"),
            "{plain}"
        );
        assert_eq!(
            plain,
            <Flags as clap::CommandFactory>::command()
                .render_help()
                .to_string()
        );
    }

    #[test]
    fn positive_numbers_exclude_zero() {
        assert_eq!(parse_positive("3"), Ok(3));
        assert!(parse_positive("0").is_err());
        assert!(parse_positive("-2").is_err());
    }
}
