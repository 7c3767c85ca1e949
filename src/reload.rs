//! Reload: the configuration read again and applied without a restart (`SIGHUP`,
//! `POST /reload`), the way nginx reloads: check everything first, apply only what is valid,
//! keep the old configuration when the new one is wrong.
//!
//! The new configuration is built exactly as at start-up (the binary's own `build`, over the
//! flags and the file as they are now), which checks every value. Only then is it applied, as
//! one step: a new [`BackendSet`] replaces the current one. Backends that stay (the same
//! address) are the very same objects, so their statistics, health, pooled connections and
//! sticky sessions carry over; added ones wait for their first passing active check when active
//! checks run; removed ones drain (requests and tunnels that hold them finish). What cannot
//! change without a restart (addresses, thread limits) is a warning naming the setting.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::Duration;

use crate::backend::Backend;
use crate::cli::{self, CommonArgs};
use crate::error::StartError;
use crate::health::ActiveChecker;
use crate::proxy::{BackendSet, LoadBalancer};
use crate::settings::Settings;
use crate::stats::events::EventKind;
use crate::sticky::Sticky;
use crate::tls;

/// Builds the balancer again from the command line and the configuration file as they are now,
/// with the command-line arguments it was built from; `Err` is one line saying why not.
pub type Rebuild = Box<dyn Fn() -> Result<(LoadBalancer, CommonArgs), String> + Send + Sync>;

/// A [`Rebuild`] for a binary whose flags are `A` and whose balancer `build` makes.
pub fn rebuild<A: clap::Parser + 'static>(
    build: impl Fn(&A) -> Result<(LoadBalancer, CommonArgs), StartError> + Send + Sync + 'static,
) -> Rebuild {
    Box::new(move || {
        let (args, _) = cli::parse_again::<A>().map_err(|err| err.to_string())?;
        build(&args).map_err(|err| err.to_string())
    })
}

/// What reloads need beyond the balancer: how to build it again, the flags it started with,
/// and the active checker (which a reload restarts over the new backends).
pub struct Reloader {
    rebuild: Rebuild,
    started_with: CommonArgs,
    /// The flags of the configuration in use: the names to resolve again.
    in_use: Mutex<CommonArgs>,
    checker: Mutex<Option<ActiveChecker>>,
    /// The HTTPS listener's certificates, which a reload reads again.
    certificates: Option<Arc<tls::Certificates>>,
    /// Dropped to stop the thread that resolves names again.
    stop_watching: Mutex<Option<mpsc::Sender<()>>>,
    /// One reload at a time (a `SIGHUP` and a `POST /reload` together).
    one_at_a_time: Mutex<()>,
}

impl Reloader {
    /// A reloader for a balancer started with `started_with`.
    pub fn new(rebuild: Rebuild, started_with: CommonArgs) -> Self {
        Reloader {
            rebuild,
            in_use: Mutex::new(started_with.clone()),
            started_with,
            checker: Mutex::new(None),
            stop_watching: Mutex::new(None),
            one_at_a_time: Mutex::new(()),
            certificates: None,
        }
    }

    /// The same reloader, reading the HTTPS listener's certificates again at each reload.
    pub fn with_certificates(mut self, certificates: Option<Arc<tls::Certificates>>) -> Self {
        self.certificates = certificates;
        self
    }

    /// Makes `lb.reload()` (SIGHUP, `POST /reload`) reload with this reloader.
    pub fn install(self: &Arc<Self>, lb: &Arc<LoadBalancer>) {
        let (reloader, weak) = (Arc::clone(self), Arc::downgrade(lb));
        lb.set_reload(Box::new(move || match weak.upgrade() {
            Some(lb) => reloader.reload(&lb),
            None => Err("shutting down".to_string()),
        }));
    }

    /// Reads the configuration again and applies it to `lb`; logs the outcome in one line,
    /// records it as an event and in the reload counters. `Ok` says what changed, `Err` why the
    /// old configuration stays.
    pub fn reload(&self, lb: &LoadBalancer) -> Result<String, String> {
        let _one = lock(&self.one_at_a_time);
        let outcome = (self.rebuild)().and_then(|(new, args)| self.apply(lb, new, &args));
        // Counted before it is logged, so that whoever reads the log line finds it counted.
        lb.stats()
            .reloads()
            .record(outcome.is_ok(), outcome.as_ref().unwrap_or_else(|e| e));
        match &outcome {
            Ok(changes) => {
                let message = format!("reloaded: {changes}");
                lb.stats().push_event(EventKind::Reload, message.clone());
                log::info!("{message}");
            }
            Err(why) => {
                let message = format!("reload refused, the configuration in use stays: {why}");
                lb.stats().push_event(EventKind::Reload, message.clone());
                log::error!("{message}");
            }
        }
        outcome
    }

    /// Applies a balancer built from the new configuration to the running one, as one step.
    fn apply(
        &self,
        lb: &LoadBalancer,
        new: LoadBalancer,
        args: &CommonArgs,
    ) -> Result<String, String> {
        // Everything is read and checked before anything changes.
        let certificates = match &self.certificates {
            Some(_) if !args.tls.tls_cert.is_empty() => {
                Some(tls::load_all(&args.tls.tls_cert, &args.tls.tls_key).map_err(|e| e.0)?)
            }
            _ => None,
        };
        let mut changes = self.restart_only(args);
        let old = lb.snapshot();
        let fresh = new.into_set();
        changes.extend(setting_changes(&old, &fresh));
        let (backends, old_index_to_new) = merge_backends(&old, &fresh, &mut changes);
        let set = fresh.with_backends(backends);
        carry_sessions(&old, &set, &old_index_to_new);
        let removed: Vec<Arc<Backend>> = old
            .backends()
            .iter()
            .enumerate()
            .filter(|(i, _)| old_index_to_new[*i].is_none())
            .map(|(_, b)| Arc::clone(b))
            .collect();
        let policy = set.health_config().active.clone();
        let backends = set.backends().to_vec();
        drop(old);
        lb.replace(set);
        for backend in &removed {
            // Requests and tunnels holding it finish; pooled connections would only wait.
            backend.close_idle();
            changes.push(format!(
                "removed {} (draining {} in flight)",
                backend.name(),
                backend.stats().active()
            ));
        }
        watch_drain(removed, lb.stats_handle());
        self.restart_checks(&backends, policy.as_ref())
            .map_err(|err| format!("cannot restart health checks: {err}"))?;
        lb.stats().set_unresolved(args.unresolved());
        *lock(&self.in_use) = args.clone();
        if let (Some(store), Some(certificates)) = (&self.certificates, certificates) {
            // New handshakes get them; open connections keep the certificate they were shown.
            store.replace(certificates);
            changes.push("certificates read again".to_string());
        }
        if changes.is_empty() {
            return Ok("nothing changed".to_string());
        }
        Ok(changes.join("; "))
    }

    /// Warnings for the settings that take a restart to change; the rest of the reload applies.
    fn restart_only(&self, new: &CommonArgs) -> Vec<String> {
        let old = &self.started_with;
        let differs = [
            ("listen", old.listen != new.listen),
            ("admin", old.admin != new.admin),
            (
                "max-connections",
                old.max_connections != new.max_connections,
            ),
            ("reuse-port", old.reuse_port != new.reuse_port),
            ("cpu-scheduling", old.cpu_scheduling != new.cpu_scheduling),
            ("tls-listen", old.tls.tls_listen != new.tls.tls_listen),
            ("demo", old.demo != new.demo),
            ("stats-interval", old.stats_interval != new.stats_interval),
            (
                "access-log",
                old.access_log.access_log != new.access_log.access_log,
            ),
            (
                "access-log-format",
                old.access_log.access_log_format != new.access_log.access_log_format,
            ),
            (
                "accept-proxy",
                old.client_addr.accept_proxy != new.client_addr.accept_proxy,
            ),
            (
                "trusted-proxy",
                old.client_addr.trusted_proxies != new.client_addr.trusted_proxies,
            ),
        ];
        differs
            .into_iter()
            .filter(|(_, changed)| *changed)
            .map(|(name, _)| {
                let message = format!("--{name} changed: it takes a restart, the rest applies");
                log::warn!("reload: {message}");
                format!("{name} unchanged (takes a restart)")
            })
            .collect()
    }

    /// Starts the active checks over `backends` (at start-up and after each reload), stopping
    /// the checks running before.
    pub fn restart_checks(
        &self,
        backends: &[Arc<Backend>],
        policy: Option<&crate::health::ActivePolicy>,
    ) -> std::io::Result<()> {
        let mut checker = lock(&self.checker);
        if let Some(running) = checker.take() {
            running.stop();
        }
        if let Some(policy) = policy {
            *checker = Some(ActiveChecker::start(backends, policy)?);
        }
        Ok(())
    }

    /// Stops the active checks and the resolving of names (shutting down).
    pub fn stop_checks(&self) {
        if let Some(running) = lock(&self.checker).take() {
            running.stop();
        }
        lock(&self.stop_watching).take();
    }

    /// Resolves the backend names again every `--resolve-interval` on a thread of its own (a
    /// slow resolver stalls nobody), and reloads when the addresses changed: new ones become
    /// backends, those gone drain. Nothing to do when no backend is given by name or the
    /// interval is 0.
    pub fn watch_names(self: &Arc<Self>, lb: &Arc<LoadBalancer>) -> std::io::Result<()> {
        let args = lock(&self.in_use).clone();
        let (mut seen, unresolved) = resolve_names(&args);
        lb.stats().set_unresolved(unresolved);
        let interval = args.resolve_interval;
        if interval.is_zero() || args.backends.iter().all(|spec| spec.addr.is_some()) {
            return Ok(());
        }
        let (stop, stopped) = mpsc::channel::<()>();
        *lock(&self.stop_watching) = Some(stop);
        let (reloader, lb) = (Arc::clone(self), Arc::downgrade(lb));
        thread::Builder::new()
            .name("resolve".into())
            .spawn(move || reloader.resolve_every(interval, &lb, &stopped, &mut seen))
            .map(drop)
    }

    fn resolve_every(
        &self,
        interval: Duration,
        lb: &Weak<LoadBalancer>,
        stopped: &mpsc::Receiver<()>,
        seen: &mut Vec<(String, Vec<SocketAddr>)>,
    ) {
        while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
            let Some(lb) = lb.upgrade() else {
                return;
            };
            let args = lock(&self.in_use).clone();
            let (mut now, unresolved) = resolve_names(&args);
            // A name that fails to resolve keeps the addresses it had: a resolver out for a
            // moment must not empty the list (a reload during the outage does leave it out).
            for (name, addrs) in &mut now {
                if addrs.is_empty() {
                    if let Some((_, before)) = seen.iter().find(|(n, _)| n == name) {
                        addrs.clone_from(before);
                    }
                }
            }
            lb.stats().set_unresolved(unresolved);
            if now != *seen {
                log::info!("backend names resolve to other addresses now: reloading");
                if lb.reload().is_ok() {
                    *seen = now;
                }
            }
        }
    }
}

/// Each backend name of `args` with the addresses it resolves to now (none when it does not),
/// and the names that do not resolve.
fn resolve_names(args: &CommonArgs) -> (Vec<(String, Vec<SocketAddr>)>, Vec<String>) {
    let mut unresolved = Vec::new();
    let resolved = args
        .backends
        .iter()
        .filter(|spec| spec.addr.is_none())
        .map(|spec| {
            let addrs = args.addresses(spec).unwrap_or_else(|_| {
                unresolved.push(spec.name.clone());
                Vec::new()
            });
            (spec.name.clone(), addrs)
        })
        .collect();
    (resolved, unresolved)
}

/// How often a removed backend is looked at until its last request or tunnel ends.
const DRAIN_POLL: Duration = Duration::from_millis(100);

/// Says (in the log and the events) when each of the `removed` backends has no request or
/// tunnel left, on a thread of its own that looks every [`DRAIN_POLL`]; it ends then, or when
/// nothing but it holds them any more (the requests holding them ended with a failure).
fn watch_drain(removed: Vec<Arc<Backend>>, stats: Arc<crate::stats::Stats>) {
    if removed.is_empty() {
        return;
    }
    let spawned = thread::Builder::new().name("drain".into()).spawn(move || {
        let mut left = removed;
        while !left.is_empty() {
            left.retain(|backend| {
                let busy = backend.stats().active() > 0 || backend.stats().tunnels().active() > 0;
                if busy && Arc::strong_count(backend) > 1 {
                    return true;
                }
                let message = format!("removed backend {} drained: dropped", backend.name());
                log::info!("{message}");
                stats.push_event(EventKind::Reload, message);
                false
            });
            thread::sleep(DRAIN_POLL);
        }
    });
    if let Err(err) = spawned {
        log::warn!("removed backends are dropped without a word when drained: {err}");
    }
}

/// The new list of backends: each backend of `fresh` that `old` already has is the old one
/// (its weight and health settings updated), the others are new. Also returns, for each old
/// backend, its position in the new list, if it stays.
fn merge_backends(
    old: &BackendSet,
    fresh: &BackendSet,
    changes: &mut Vec<String>,
) -> (Vec<Arc<Backend>>, Vec<Option<usize>>) {
    let mut old_index_to_new = vec![None; old.backends().len()];
    let active = fresh.health_config().active.is_some();
    let backends = fresh
        .backends()
        .iter()
        .enumerate()
        .map(|(new_index, backend)| {
            let kept = old.backends().iter().position(|b| b.is_same(backend));
            let Some(old_index) = kept else {
                if active {
                    backend.health().hold_until_checked();
                }
                // A new backend comes into rotation: with --slow-start, gradually.
                backend.ramp().start();
                changes.push(format!("added {}", backend.name()));
                return Arc::clone(backend);
            };
            old_index_to_new[old_index] = Some(new_index);
            let kept = &old.backends()[old_index];
            // A weight set at run time (the admin API) stays until the file changes this one.
            if kept.configured_weight() != backend.weight() {
                changes.push(format!(
                    "weight of {} {} -> {}",
                    kept.name(),
                    kept.configured_weight(),
                    backend.weight()
                ));
                kept.set_weight(backend.weight());
            }
            carry_limit(kept, backend, changes);
            kept.health().configure(fresh.health_config().clone());
            Arc::clone(kept)
        })
        .collect();
    (backends, old_index_to_new)
}

/// A kept backend takes the connection limit the new configuration gives it; requests in
/// flight keep their slots, and a higher limit lets waiting requests in.
fn carry_limit(kept: &Backend, fresh: &Backend, changes: &mut Vec<String>) {
    let (before, after) = (kept.limit().max(), fresh.limit().max());
    if before != after {
        let text = |max: Option<u32>| max.map_or("none".to_string(), |n| n.to_string());
        changes.push(format!(
            "max_conns of {} {} -> {}",
            kept.name(),
            text(before),
            text(after)
        ));
        kept.limit().set_max(after);
    }
}

/// Sessions kept in a table follow their backends to their new positions; those of removed
/// backends are forgotten (their next request is balanced anew). Signed cookies name their
/// backend by address, so they need nothing.
fn carry_sessions(old: &BackendSet, new: &BackendSet, old_index_to_new: &[Option<usize>]) {
    if let (Some(Sticky::Table(before)), Some(Sticky::Table(after))) = (old.sticky(), new.sticky())
    {
        after.carry_over(before, |i| old_index_to_new.get(i).copied().flatten());
    }
}

/// What a reload changes besides the backends: the algorithm, timeouts, health checks.
fn setting_changes(old: &BackendSet, new: &BackendSet) -> Vec<String> {
    let mut changes = Vec::new();
    if old.balancer().name() != new.balancer().name() {
        changes.push(format!(
            "algorithm {} -> {}",
            old.balancer().name(),
            new.balancer().name()
        ));
    }
    let (a, b): (&Settings, &Settings) = (old.settings(), new.settings());
    let durations = [
        ("connect-timeout", a.connect_timeout, b.connect_timeout),
        ("backend-timeout", a.backend_timeout, b.backend_timeout),
        ("client-timeout", a.client_timeout, b.client_timeout),
        ("tunnel-timeout", a.tunnel_timeout, b.tunnel_timeout),
        ("queue-timeout", a.queue_timeout, b.queue_timeout),
    ];
    for (name, before, after) in durations {
        if before != after {
            changes.push(format!("{name} {before:?} -> {after:?}"));
        }
    }
    if a.retries != b.retries && a.retries.max(b.retries) != usize::MAX {
        changes.push(format!("retries {} -> {}", a.retries, b.retries));
    }
    if a.explain != b.explain {
        changes.push(format!("explain {} -> {}", a.explain, b.explain));
    }
    if old.health_config() != new.health_config() {
        changes.push(format!(
            "health checks {} -> {}",
            old.health_config().mode(),
            new.health_config().mode()
        ));
    }
    changes
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(max_conns: Option<u32>) -> Backend {
        Backend::new("b".into(), ([127, 0, 0, 1], 9).into(), 1).with_max_conns(max_conns)
    }

    #[test]
    fn a_kept_backend_takes_its_new_connection_limit() {
        let kept = backend(Some(2));
        let mut changes = Vec::new();
        carry_limit(&kept, &backend(Some(2)), &mut changes);
        assert!(changes.is_empty());
        carry_limit(&kept, &backend(Some(5)), &mut changes);
        carry_limit(&kept, &backend(None), &mut changes);
        assert_eq!(
            changes,
            ["max_conns of b 2 -> 5", "max_conns of b 5 -> none"]
        );
        assert_eq!(kept.limit().max(), None);
    }
}
