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
//!
//! A TLS client connection cannot be split between two threads: reading and writing both change
//! the one `rustls` state. Its tunnel is one loop in the client's thread that waits with
//! `poll(2)` on both sockets and moves whatever arrives, decrypting or encrypting on the way.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::http;
use crate::stream::ClientStream;

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
        let idle_limit = self.lb.settings().tunnel_timeout;
        let carried = match self.client.get_mut() {
            ClientStream::Plain(client) => run(client, &upstream, idle_limit, self.shutdown),
            ClientStream::Tls(tls) => {
                let rustls::StreamOwned { conn, sock } = &mut **tls;
                run_tls(conn, sock, &upstream, idle_limit)
            }
        };
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

/// The tunnel of a TLS client: one loop that waits on both sockets with `poll(2)` and moves what
/// arrives, until both directions ended, a side failed, or nothing moved for `idle_limit`. At
/// shutdown the server shuts the client's socket down, which ends the loop.
fn run_tls(
    conn: &mut rustls::ServerConnection,
    client: &mut TcpStream,
    backend: &TcpStream,
    idle_limit: Duration,
) -> Carried {
    let mut carried = Carried { up: 0, down: 0 };
    let mut buffer = vec![0u8; COPY_BUFFER];
    let (mut client_open, mut backend_open) = (true, true);
    let mut last = Instant::now();
    // Bytes the client sent right after the handshake may already wait inside rustls.
    if pass_up(conn, backend, &mut buffer, &mut carried).is_err() {
        close_both(client, backend);
        return carried;
    }
    while client_open || backend_open {
        let idle = last.elapsed();
        if idle >= idle_limit {
            log::debug!("tunnel idle for {idle:?}: closed");
            break;
        }
        let wait = (idle_limit - idle).min(Duration::from_secs(1));
        let (client_ready, backend_ready) = match wait_readable(
            client_open.then_some(&*client),
            backend_open.then_some(backend),
            wait,
        ) {
            Ok(ready) => ready,
            Err(_) => break,
        };
        if client_ready {
            last = Instant::now();
            match conn.read_tls(client) {
                Ok(0) => {
                    client_open = false;
                    let _ = backend.shutdown(Shutdown::Write);
                }
                Ok(_) => {
                    if conn.process_new_packets().is_err() {
                        let _ = conn.write_tls(client);
                        break;
                    }
                    match pass_up(conn, backend, &mut buffer, &mut carried) {
                        Ok(true) => {}
                        // The client's close_notify: its half is done.
                        Ok(false) => {
                            client_open = false;
                            let _ = backend.shutdown(Shutdown::Write);
                        }
                        Err(_) => break,
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if backend_ready {
            last = Instant::now();
            let mut reader = backend;
            match reader.read(&mut buffer) {
                Ok(0) => {
                    backend_open = false;
                    conn.send_close_notify();
                    if flush_tls(conn, client).is_err() {
                        break;
                    }
                    let _ = client.shutdown(Shutdown::Write);
                }
                Ok(n) => {
                    if conn.writer().write_all(&buffer[..n]).is_err()
                        || flush_tls(conn, client).is_err()
                    {
                        break;
                    }
                    carried.down += n as u64;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
    close_both(client, backend);
    carried
}

/// Passes the plaintext rustls holds on to the backend; false once the client's close_notify
/// came (nothing more will).
fn pass_up(
    conn: &mut rustls::ServerConnection,
    backend: &TcpStream,
    buffer: &mut [u8],
    carried: &mut Carried,
) -> io::Result<bool> {
    let mut writer = backend;
    loop {
        match conn.reader().read(buffer) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                writer.write_all(&buffer[..n])?;
                carried.up += n as u64;
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(err) => return Err(err),
        }
    }
}

/// Writes out everything rustls has queued for the client.
fn flush_tls(conn: &mut rustls::ServerConnection, client: &mut TcpStream) -> io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(client)?;
    }
    Ok(())
}

/// Waits up to `wait` for either socket (those given) to be readable, or closed, or failed.
fn wait_readable(
    client: Option<&TcpStream>,
    backend: Option<&TcpStream>,
    wait: Duration,
) -> io::Result<(bool, bool)> {
    let watch = |socket: Option<&TcpStream>| libc::pollfd {
        // A negative descriptor is skipped by poll(2).
        fd: socket.map_or(-1, |s| s.as_raw_fd()),
        events: libc::POLLIN,
        revents: 0,
    };
    let mut fds = [watch(client), watch(backend)];
    let millis = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fds` is a valid array of two pollfd entries for the duration of the call.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, millis) };
    if ready < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::Interrupted {
            Ok((false, false))
        } else {
            Err(err)
        };
    }
    let is_ready = |fd: &libc::pollfd| fd.fd >= 0 && fd.revents != 0;
    Ok((is_ready(&fds[0]), is_ready(&fds[1])))
}
