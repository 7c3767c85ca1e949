//! Start-up: wiring the parts together and running until Ctrl-C.
//!
//! Every phase binary builds its [`LoadBalancer`] (which algorithm, which health checks) and
//! hands it to [`run`], which does what all phases share: bind the port, start demo backends
//! when asked, log the statistics periodically, reload on SIGHUP, and shut down gracefully on
//! SIGINT or SIGTERM.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::admin::{self, AdminServer};
use crate::cli::{AdminAddr, CommonArgs, TlsArgs};
use crate::demo::{self, DemoBackend};
use crate::descriptors::{self, Budget};
use crate::error::StartError;
use crate::proxy::LoadBalancer;
use crate::reload::{Rebuild, Reloader};
use crate::report;
use crate::server::Server;
use crate::settings::Settings;
use crate::signals;
use crate::stats::events::EventKind;
use crate::tls;

/// Serves clients with `lb` until Ctrl-C or SIGTERM, then logs the final statistics. `phase`
/// is the binary's one line on which phase of the chapter it is, logged before the banner.
/// SIGHUP and `POST /reload` build the balancer again with `rebuild` and apply it.
pub fn run(
    phase: &str,
    lb: LoadBalancer,
    args: &CommonArgs,
    rebuild: Rebuild,
) -> Result<(), StartError> {
    tune_allocator();
    let _demo_certificate = DemoCertificateFile(
        (args.demo && args.tls.tls_cert.is_empty()).then(demo_certificate_path),
    );
    args.check_listeners()?;
    let lb = with_access_log(lb, args)?;
    let mut settings = lb.startup_settings().clone();
    let budget = descriptor_budget(&lb, args.demo);
    if let Some(budget) = &budget {
        settings.max_connections = budget.fit(settings.max_connections);
    }
    let (server, certificates) = bind(&settings, &args.tls, args.demo)?;
    let _demo_backends = args.demo.then(|| start_demo_backends(&lb)).transpose()?;
    let lb = Arc::new(lb);
    let reloader = Arc::new(Reloader::new(rebuild, args.clone()).with_certificates(certificates));
    reloader.install(&lb);
    handle_signals(&server, &lb)?;

    // The admin port is bound before anything is announced, so that a port in use is the one
    // line the user sees.
    let admin = admin_listener(args, &lb)?;
    if let Some(budget) = budget.filter(|_| settings.max_connections < args.max_connections) {
        log::warn!("{}", budget.lowered_warning(args.max_connections));
    }
    log_banner(phase, &lb, &server);
    let (stop_stats, stats_stopped) = mpsc::channel::<()>();
    let stats_logger = start_housekeeping(Arc::clone(&lb), settings.stats_interval, stats_stopped);
    reloader
        .restart_checks(&lb.backends(), lb.health_config().active.as_ref())
        .map_err(|err| StartError(format!("cannot start health checks: {err}")))?;
    reloader
        .watch_names(&lb)
        .map_err(|err| StartError(format!("cannot start resolving names: {err}")))?;

    server.serve(Arc::clone(&lb));

    reloader.stop_checks();
    drop(stop_stats);
    if let Some(admin) = admin {
        admin.stop();
    }
    if let Some(logger) = stats_logger {
        let _ = logger.join();
    }
    if let Some(access_log) = lb.access_log() {
        access_log.stop();
    }
    log::info!("{}", report::summary(&lb));
    log::info!("stopped");
    Ok(())
}

/// The balancer with its access log opened, when `--access-log` asks for one: a file that
/// cannot be opened stops the start with one line.
fn with_access_log(lb: LoadBalancer, args: &CommonArgs) -> Result<LoadBalancer, StartError> {
    Ok(match args.access_log.open()? {
        Some(log) => lb.with_access_log(log),
        None => lb,
    })
}

/// The statistics listener: at `--admin ADDR`, none with `--admin off`, else on 8404 or the
/// next free port.
fn admin_listener(
    args: &CommonArgs,
    lb: &Arc<LoadBalancer>,
) -> Result<Option<AdminServer>, StartError> {
    Ok(match args.admin {
        Some(AdminAddr(Some(addr))) => Some(start_admin(addr, Arc::clone(lb))?),
        Some(AdminAddr(None)) => None,
        None => start_default_admin(Arc::clone(lb)),
    })
}

/// Binds the listeners. Certificates are read before any port is bound: a bad file is the one
/// line the user sees.
fn bind(
    settings: &Settings,
    tls: &TlsArgs,
    demo: bool,
) -> Result<(Server, Option<Arc<tls::Certificates>>), StartError> {
    let tls = match tls.tls_listen {
        Some(addr) => Some((addr, tls_config(tls, demo, addr)?)),
        None => None,
    };
    let mut server = Server::bind(settings).map_err(|err| {
        let listen = settings.listen.map(|a| a.to_string()).unwrap_or_default();
        StartError(format!("--listen {listen}: {err}"))
    })?;
    let mut certificates = None;
    if let Some((addr, (config, store))) = tls {
        server
            .add_tls_listener(addr, config, settings)
            .map_err(|err| StartError(format!("--tls-listen {addr}: {err}")))?;
        certificates = Some(store);
    }
    Ok((server, certificates))
}

/// SIGINT (Ctrl-C) and SIGTERM begin a graceful shutdown of `server`; SIGHUP reloads the
/// configuration (and never exits); SIGUSR1 would reopen the access log, of which there is none
/// yet, so it is only logged. Each is one line of the list below.
fn handle_signals(server: &Server, lb: &Arc<LoadBalancer>) -> Result<(), StartError> {
    let on_signal = server
        .shutdown_handle()
        .map_err(|err| StartError(err.to_string()))?;
    let stopping = Arc::clone(lb);
    let stop: signals::Action = Box::new(move || {
        let message = "shutting down: no new connections, letting requests in flight finish";
        log::info!("{message}");
        stopping
            .stats()
            .push_event(EventKind::Stop, message.to_string());
        on_signal.shutdown();
    });
    let stop = Arc::new(stop);
    let on_term = Arc::clone(&stop);
    let reloading = Arc::clone(lb);
    let reopening = Arc::clone(lb);
    signals::start(vec![
        (signals::SIGINT, Box::new(move || stop())),
        (signals::SIGTERM, Box::new(move || on_term())),
        (
            signals::SIGHUP,
            Box::new(move || {
                log::info!("SIGHUP: reloading the configuration");
                // The outcome is logged, counted and shown by the reload itself.
                let _ = reloading.reload();
            }),
        ),
        (
            signals::SIGUSR1,
            Box::new(move || {
                if reopening.reopen_access_log() {
                    log::info!("SIGUSR1: reopening the access log");
                } else {
                    log::info!("SIGUSR1: no access log to reopen; ignored");
                }
            }),
        ),
    ])
    .map(drop)
    .map_err(|err| StartError(format!("cannot handle signals: {err}")))
}

/// Logs which phase this is, then where the balancer listens and over which backends (also the
/// statistics page's first event). Both come after every port is bound, so that a port in use
/// stays the one line the user sees.
fn log_banner(phase: &str, lb: &LoadBalancer, server: &Server) {
    log::info!("{phase}");
    let listen = server
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let backends: Vec<String> = lb
        .backends()
        .iter()
        .map(|b| {
            if b.weight() == 1 {
                b.name().to_string()
            } else {
                format!("{}={}", b.name(), b.weight())
            }
        })
        .collect();
    let https = match server.tls_local_addr() {
        Some(_) if !server.has_plain_listener() => " (HTTPS only)".to_string(),
        Some(addr) => format!(" (HTTPS on {addr})"),
        None => String::new(),
    };
    let message = format!(
        "load balancer listening on {listen}{https}, {} over {} backend{}: {}",
        lb.snapshot().balancer().name(),
        backends.len(),
        if backends.len() == 1 { "" } else { "s" },
        backends.join(", ")
    );
    // The event first: whoever reads the log line to know the balancer is up finds it listed.
    lb.stats().push_event(EventKind::Start, message.clone());
    log::info!("{message}");
}

/// Keeps resident memory flat over hours. Left to itself, glibc's allocator keeps up to eight
/// arenas per core and raises its threshold for `mmap` each time a large block is freed; with a
/// thread per client and 64 KiB buffers for long bodies, the soak test (`scripts/soak.sh`) saw
/// resident memory creep up by 7 to 16 % over minutes of uploads. Two arenas and a fixed 64 KiB
/// threshold (so long-body buffers go back to the system when freed) kept it within 1 %, with no
/// measurable change in throughput. `MALLOC_ARENA_MAX` or `MALLOC_MMAP_THRESHOLD_` in the
/// environment still win, as glibc documents.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_set = |name: &str| std::env::var_os(name).is_some();
        // SAFETY: mallopt only sets the allocator's parameters, and it runs before this process
        // starts any thread of its own.
        unsafe {
            if !user_set("MALLOC_ARENA_MAX") {
                libc::mallopt(libc::M_ARENA_MAX, 2);
            }
            if !user_set("MALLOC_MMAP_THRESHOLD_") {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
            }
        }
    }
}

/// The TLS configuration of `--tls-listen`: each `--tls-cert` with the `--tls-key` in the same
/// position, read and checked now so that a bad file stops the start with one line naming it.
///
/// With `--demo` and no certificate, a self-signed one is made for `localhost` and `127.0.0.1`,
/// and the log says how to trust it.
fn tls_config(
    args: &TlsArgs,
    demo: bool,
    addr: SocketAddr,
) -> Result<(Arc<rustls::ServerConfig>, Arc<tls::Certificates>), StartError> {
    if args.tls_cert.is_empty() && args.tls_key.is_empty() && demo {
        let path = demo_certificate_path();
        let certificate = tls::self_signed(&path)?;
        log::info!(
            "--demo: a self-signed certificate for localhost and 127.0.0.1 is in {path}; \
             trust it with `curl --cacert {path} https://localhost:{port}/`, or skip the check \
             for the demo with `curl -k https://localhost:{port}/`",
            path = path.display(),
            port = addr.port()
        );
        return tls::server_config_with_store(vec![certificate]);
    }
    tls::server_config_with_store(tls::load_all(&args.tls_cert, &args.tls_key)?)
}

/// Where `--demo` writes its self-signed certificate, for clients to trust while it runs.
fn demo_certificate_path() -> PathBuf {
    std::env::temp_dir().join(format!("lb-demo-{}.pem", std::process::id()))
}

/// Removes the demo certificate's file when the balancer stops, or fails to start: it is made
/// anew at every start, so one left behind would only pile up in the temporary directory.
struct DemoCertificateFile(Option<PathBuf>);

impl Drop for DemoCertificateFile {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Raises the open-files limit as far as allowed and says how many clients it carries; `None`
/// (and `--max-connections` as given) when the limit cannot be read.
fn descriptor_budget(lb: &LoadBalancer, demo: bool) -> Option<Budget> {
    match descriptors::raise_limit() {
        Ok(limit) => Some(Budget::new(limit, lb.backends().len(), demo)),
        Err(err) => {
            log::warn!("cannot read the open-files limit: {err}");
            None
        }
    }
}

/// Starts the statistics listener and says where it is.
fn start_admin(
    addr: std::net::SocketAddr,
    lb: Arc<LoadBalancer>,
) -> Result<AdminServer, StartError> {
    let admin =
        AdminServer::start(addr, lb).map_err(|err| StartError(format!("--admin {addr}: {err}")))?;
    log_statistics_address(admin.local_addr());
    Ok(admin)
}

/// Says where the statistics page is (tests read the address from this line, up to the first
/// `/`), and points readers of the Korean chapter to the guide that follows it in Korean.
fn log_statistics_address(addr: SocketAddr) {
    log::info!("statistics on http://{addr}/stats (한국어 안내: docs/ko/README.md)");
}

/// Starts the statistics listener when `--admin` was not given. That port was never asked for,
/// so a busy one must not stop the balancer: a second balancer beside the first (a learner
/// comparing two phases) takes the next free port of [`admin::DEFAULT_PORTS`] and says which;
/// when none is free, statistics are off and one warning line says how to choose an address.
fn start_default_admin(lb: Arc<LoadBalancer>) -> Option<AdminServer> {
    let (ip, ports) = (admin::DEFAULT_IP, admin::DEFAULT_PORTS);
    let default = SocketAddr::new(ip, *ports.start());
    let started = admin::bind_first_free(ip, ports.clone())
        .and_then(|listener| AdminServer::start_on(listener, lb));
    match started {
        Ok(admin) => {
            if admin.local_addr() != default {
                log::warn!(
                    "statistics: {default} is in use (another balancer?), so they are on {} \
                     instead; choose an address with --admin ADDR",
                    admin.local_addr()
                );
            }
            log_statistics_address(admin.local_addr());
            Some(admin)
        }
        Err(err) if err.kind() == io::ErrorKind::AddrInUse => {
            log::warn!(
                "statistics off: ports {}-{} on {ip} are all in use; choose an address with \
                 --admin ADDR",
                ports.start(),
                ports.end()
            );
            None
        }
        Err(err) => {
            log::warn!("statistics off: {default}: {err}; choose an address with --admin ADDR");
            None
        }
    }
}

/// Starts one demo backend on each backend address, named after its port as
/// `scripts/backends.sh` names them.
fn start_demo_backends(lb: &LoadBalancer) -> Result<Vec<DemoBackend>, StartError> {
    lb.backends()
        .iter()
        .map(|backend| {
            let addr = backend.addr();
            let listener = std::net::TcpListener::bind(addr)
                .map_err(|err| StartError(format!("--demo: cannot listen on {addr}: {err}")))?;
            let name = format!("backend-{}", addr.port());
            log::info!("demo backend {name} listening on {addr}");
            demo::start(listener, name, Duration::ZERO)
                .map_err(|err| StartError(format!("--demo: {err}")))
        })
        .collect()
}

/// How often idle backend connections past their time are closed.
const POOL_SWEEP: Duration = Duration::from_secs(5);

/// Until `stop` is dropped: logs the statistics every `stats_interval` (never when it is 0), and
/// closes pooled backend connections idle for too long, which nothing else would close while
/// no request comes (backends close theirs after a while, and the balancer would hold the dead
/// ends).
fn start_housekeeping(
    lb: Arc<LoadBalancer>,
    stats_interval: Duration,
    stop: mpsc::Receiver<()>,
) -> Option<thread::JoinHandle<()>> {
    let spawned = thread::Builder::new()
        .name("housekeeping".into())
        .spawn(move || {
            let mut next_stats = Instant::now() + stats_interval;
            loop {
                let tick = if stats_interval.is_zero() {
                    POOL_SWEEP
                } else {
                    POOL_SWEEP.min(next_stats.saturating_duration_since(Instant::now()))
                };
                if let Err(mpsc::RecvTimeoutError::Disconnected) = stop.recv_timeout(tick) {
                    return;
                }
                for backend in lb.backends() {
                    backend.close_expired_idle();
                }
                if !stats_interval.is_zero() && Instant::now() >= next_stats {
                    log::info!("{}", report::summary(&lb));
                    next_stats += stats_interval;
                }
            }
        });
    spawned
        .map_err(|err| log::warn!("no periodic statistics or pool sweeping: {err}"))
        .ok()
}
