//! The file-descriptor budget: how many clients the process can serve with the descriptors the
//! system lets it open.
//!
//! Every socket is a file descriptor, and a process may open only `ulimit -n` of them (1024 on
//! most desktops). Each client connection takes one, and each request in flight takes one more
//! for its backend connection (two with `--demo`, whose backends run in the same process). A
//! balancer that accepts more clients than it has descriptors for fails in the worst way: the
//! clients are accepted, then their requests find no descriptor for a backend connection.
//!
//! So at start-up the balancer does what servers that run unattended do. It raises its soft
//! limit to the hard limit (as Go's runtime does), keeps a reserve for the listeners, the
//! statistics port, the logs and the health checks, and lets clients take at most as many
//! descriptors as leave room for half of them to be in flight at once. A `--max-connections`
//! over that is lowered, with one warning saying how to raise the limit (HAProxy derives its
//! `maxconn` from the limit the same way).

use std::io;

/// Descriptors kept for everything that is not a client or backend connection: standard
/// streams, the listeners, the statistics port and its clients, the wake-up connection.
const BASE_RESERVE: u64 = 64;

/// What the process may open, and how much of it is for clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The soft `RLIMIT_NOFILE` in force (after raising it).
    pub limit: u64,
    /// Descriptors kept for listeners, statistics, logs and health checks.
    pub reserve: u64,
    /// The most client connections that fit.
    pub clients: usize,
}

impl Budget {
    /// The budget under `limit` for a balancer with `backends` backends; `demo` when the demo
    /// backends run in the same process, so that a backend connection costs two descriptors.
    pub fn new(limit: u64, backends: usize, demo: bool) -> Budget {
        // Each backend has a health check in flight at times, and with `--demo` a listener.
        let per_backend = if demo { 2 } else { 1 };
        let reserve = BASE_RESERVE + per_backend * backends as u64;
        let backend_cost = if demo { 2 } else { 1 };
        // A client costs 1, and half the clients in flight cost `backend_cost / 2` each.
        let clients = limit.saturating_sub(reserve) / (2 + backend_cost) * 2;
        Budget {
            limit,
            reserve,
            clients: usize::try_from(clients).unwrap_or(usize::MAX).max(1),
        }
    }

    /// `max_connections` when it fits the budget, else the most clients that do.
    pub fn fit(&self, max_connections: usize) -> usize {
        max_connections.min(self.clients)
    }

    /// The one warning line for a `--max-connections` of `asked` that was lowered to fit:
    /// the numbers, and the way out.
    pub fn lowered_warning(&self, asked: usize) -> String {
        format!(
            "--max-connections {asked} does not fit the open-files limit of {} ({} kept for \
             listeners, statistics and health checks, the rest for clients and their backend \
             connections): serving at most {} clients at once; raise the limit (ulimit -n, or \
             LimitNOFILE= under systemd) to serve more",
            self.limit, self.reserve, self.clients
        )
    }
}

/// Raises the soft limit on open files to the hard limit and returns the limit in force. A
/// limit that cannot be raised is kept as it is.
pub fn raise_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the valid, exclusively borrowed struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the valid struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    // An unlimited hard limit reads as RLIM_INFINITY (the largest number), which the budget
    // treats as plenty; the kernel's own cap on open files applies then.
    Ok(limit.rlim_cur)
}

/// Whether `err` says the process (EMFILE) or the whole system (ENFILE) is out of descriptors.
pub fn is_exhausted(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_desktop_limit_carries_600_clients() {
        let budget = Budget::new(1024, 3, false);
        assert_eq!(budget.reserve, 67);
        assert_eq!(budget.clients, 638);
    }

    #[test]
    fn demo_backends_cost_twice() {
        let budget = Budget::new(1024, 3, true);
        assert_eq!(budget.reserve, 70);
        assert_eq!(budget.clients, 476);
    }

    #[test]
    fn an_unlimited_limit_does_not_overflow() {
        assert!(Budget::new(u64::MAX, 3, true).clients > 1_000_000);
    }

    #[test]
    fn a_tiny_limit_still_serves_one_client() {
        assert_eq!(Budget::new(10, 3, false).clients, 1);
    }

    #[test]
    fn max_connections_is_lowered_only_when_it_does_not_fit() {
        let budget = Budget::new(1024, 3, false);
        assert_eq!(budget.fit(100), 100);
        assert_eq!(budget.fit(budget.clients), budget.clients);
        assert_eq!(budget.fit(10_000), budget.clients);
        let warning = budget.lowered_warning(10_000);
        assert!(warning.contains("10000") && warning.contains("1024"));
        assert!(warning.contains(&budget.clients.to_string()));
    }

    #[test]
    fn exhaustion_is_told_from_other_errors() {
        assert!(is_exhausted(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(is_exhausted(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(!is_exhausted(&io::Error::from_raw_os_error(
            libc::ECONNREFUSED
        )));
    }
}
