//! Backends named by DNS: `app:8000` stands for every address the name resolves to (IPv4 and
//! IPv6), each a backend of its own, shown as `app:8000 (10.0.0.3)`.
//!
//! Names are resolved at start-up, by every reload, and every `--resolve-interval` on a thread
//! of their own (see [`crate::reload::Reloader::watch_names`]), so a slow resolver never stalls
//! a client; when the addresses change, the change is applied as a reload is. A name that does
//! not resolve is a warning, not an exit: until it does, its backends are simply missing (with
//! no backend at all, clients get `503` with `Retry-After`).
//!
//! The resolver is a small trait, so that tests can script the answers; the real one asks the
//! system (`getaddrinfo`, through `ToSocketAddrs`), which reads `/etc/hosts` and the DNS servers
//! the machine is set up with, as every other program on it does.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};

/// Resolves a host name to addresses.
pub trait Resolve: Send + Sync {
    /// Every address of `host` with `port`, or why there is none.
    fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>>;
}

/// The system's resolver.
#[derive(Debug, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        Ok((host, port).to_socket_addrs()?.collect())
    }
}

/// A resolver whose answers a test sets: a name maps to the addresses given last, and a name
/// never given (or given none) does not resolve.
#[derive(Debug, Default)]
pub struct ScriptedResolver {
    answers: Mutex<HashMap<String, Vec<std::net::IpAddr>>>,
}

impl ScriptedResolver {
    /// From now on, `host` resolves to `addresses`.
    pub fn answer(&self, host: &str, addresses: &[&str]) {
        let addresses = addresses.iter().filter_map(|a| a.parse().ok()).collect();
        self.answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(host.to_string(), addresses);
    }
}

impl Resolve for ScriptedResolver {
    fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        let answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        match answers.get(host) {
            Some(ips) if !ips.is_empty() => {
                Ok(ips.iter().map(|&ip| SocketAddr::new(ip, port)).collect())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host} does not resolve"),
            )),
        }
    }
}

/// The resolver the flags use: the system's unless a test put in its own.
#[derive(Clone)]
pub struct Resolver(pub Arc<dyn Resolve>);

impl Default for Resolver {
    fn default() -> Self {
        Resolver(Arc::new(SystemResolver))
    }
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver")
    }
}

impl Resolver {
    /// Every address of `host:port`, sorted (so that two answers in another order are the same
    /// answer) and without repeats.
    pub fn addresses(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        let mut addrs = self.0.resolve(host, port)?;
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no address".to_string(),
            ));
        }
        Ok(addrs)
    }
}

/// How a backend resolved by name is shown: `app:8000 (10.0.0.3)`.
pub fn display_name(name: &str, addr: SocketAddr) -> String {
    format!("{name} ({})", addr.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn localhost_resolves_through_the_system() {
        let addrs = Resolver::default().addresses("localhost", 80).unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 80));
    }

    #[test]
    fn a_scripted_resolver_answers_what_it_was_told() {
        let scripted = Arc::new(ScriptedResolver::default());
        let resolver = Resolver(scripted.clone());
        assert!(resolver.addresses("app", 8000).is_err());
        scripted.answer("app", &["10.0.0.3", "10.0.0.2", "10.0.0.3", "::1"]);
        let addrs = resolver.addresses("app", 8000).unwrap();
        let shown: Vec<String> = addrs.iter().map(|a| display_name("app:8000", *a)).collect();
        assert_eq!(
            shown,
            [
                "app:8000 (10.0.0.2)",
                "app:8000 (10.0.0.3)",
                "app:8000 (::1)"
            ]
        );
        scripted.answer("app", &[]);
        assert!(resolver.addresses("app", 8000).is_err());
    }
}
