//! After `101 Switching Protocols`: the connection is no longer HTTP, and the balancer copies
//! bytes both ways until either side closes.
//!
//! A WebSocket (or any protocol reached with `Upgrade`) is balanced once, by its handshake;
//! from then on the balancer knows nothing of the protocol and only moves bytes, as nginx and
//! HAProxy do. With one thread per connection that is two loops: the client's thread copies
//! client to backend, and one helper thread copies backend to client. Each socket is read by
//! one thread only, so each loop can wait on its own read timeout.
//!
//! - A side that closes its writing half (a read returns end of stream) is passed on as a
//!   half-close to the other side, whose bytes may still flow the other way.
//! - A side that fails (a reset, a write that cannot go through) ends the tunnel both ways.
//! - With no byte in either direction for `--tunnel-timeout`, the tunnel is closed
//!   (HAProxy's `timeout tunnel`); `--client-timeout` does not apply inside a tunnel.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::http;

use super::connection::ClientConnection;

/// The buffer each direction copies through.
const COPY_BUFFER: usize = 16 * 1024;

/// Stack of the helper thread: its buffer is on the heap.
const HELPER_STACK: usize = 64 * 1024;

/// Bytes carried each way, for the debug log.
struct Carried {
    up: u64,
    down: u64,
}

impl ClientConnection<'_> {
    /// Tunnels the client's connection to `upstream`, the backend connection that switched
    /// protocols, until either side closes or the tunnel stays idle too long.
    pub(super) fn tunnel(&mut self, backend: &Backend, upstream: TcpStream) {
        let _open = self.lb.stats().tunnels().open();
        let _to_backend = backend.stats().tunnels().open();
        let opened = Instant::now();
        log::debug!("{}: tunnel to {} open", self.client_ip, backend.name());
        let carried = run(
            self.client.socket(),
            &upstream,
            self.lb.settings().tunnel_timeout,
            self.shutdown,
        );
        log::debug!(
            "{}: tunnel to {} closed after {:?}: {} bytes up, {} down",
            self.client_ip,
            backend.name(),
            opened.elapsed(),
            carried.up,
            carried.down
        );
    }
}

/// When a byte last went through, in either direction.
struct Activity {
    since: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            since: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(now, Ordering::Relaxed);
    }

    fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.since.elapsed().saturating_sub(last)
    }
}

/// Copies bytes both ways between `client` and `backend` until both directions ended.
fn run(
    client: &TcpStream,
    backend: &TcpStream,
    idle_limit: Duration,
    shutdown: &AtomicBool,
) -> Carried {
    let activity = Activity::new();
    thread::scope(|scope| {
        let helper = thread::Builder::new()
            .name("tunnel".into())
            .stack_size(HELPER_STACK)
            .spawn_scoped(scope, || {
                copy(backend, client, &activity, idle_limit, shutdown)
            });
        let down = match helper {
            Ok(helper) => helper,
            Err(err) => {
                log::warn!("cannot start a tunnel thread: {err}; the tunnel is closed");
                close_both(client, backend);
                return Carried { up: 0, down: 0 };
            }
        };
        let up = copy(client, backend, &activity, idle_limit, shutdown);
        Carried {
            up,
            // A panicking helper has already been reported by the panic hook.
            down: down.join().unwrap_or(0),
        }
    })
}

/// Copies from `from` to `to` until `from` ends, a side fails, or the tunnel is idle for
/// `idle_limit`; returns the bytes copied.
fn copy(
    from: &TcpStream,
    to: &TcpStream,
    activity: &Activity,
    idle_limit: Duration,
    shutdown: &AtomicBool,
) -> u64 {
    let mut buffer = vec![0u8; COPY_BUFFER];
    let mut copied = 0;
    let mut reader = from;
    let mut writer = to;
    if from.set_read_timeout(Some(idle_limit)).is_err() {
        close_both(from, to);
        return 0;
    }
    loop {
        match reader.read(&mut buffer) {
            Ok(0) => {
                // A half-close, passed on. At shutdown there is no waiting for the other half.
                if shutdown.load(Ordering::SeqCst) {
                    close_both(from, to);
                } else {
                    let _ = to.shutdown(Shutdown::Write);
                }
                return copied;
            }
            Ok(n) => {
                activity.touch();
                if writer.write_all(&buffer[..n]).is_err() {
                    close_both(from, to);
                    return copied;
                }
                copied += n as u64;
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) if http::is_timeout(&err) => {
                // Quiet this way; the other way may not have been.
                let idle = activity.idle();
                if idle >= idle_limit {
                    log::debug!("tunnel idle for {idle:?}: closed");
                    close_both(from, to);
                    return copied;
                }
                let left = (idle_limit - idle).max(Duration::from_millis(1));
                if from.set_read_timeout(Some(left)).is_err() {
                    close_both(from, to);
                    return copied;
                }
            }
            Err(_) => {
                close_both(from, to);
                return copied;
            }
        }
    }
}

/// Ends the tunnel both ways; the other direction's blocked read then returns.
fn close_both(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}
