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
use crate::plural;
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
        let idle_limit = self.set.settings.tunnel_timeout;
        let carried = match self.client.get_mut() {
            ClientStream::Plain(client) => run(client, &upstream, idle_limit, self.shutdown),
            ClientStream::Tls(tls) => {
                let rustls::StreamOwned { conn, sock } = &mut **tls;
                run_tls(conn, sock, &upstream, idle_limit)
            }
        };
        log::debug!(
            "{}: tunnel to {} closed after {:?}: {} up, {} down",
            self.client_ip,
            backend.name(),
            opened.elapsed(),
            plural::count(carried.up, "byte"),
            carried.down
        );
        self.note_tunnel(opened.elapsed(), carried.up, carried.down);
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
    let mut tunnel = TlsTunnel {
        conn,
        client,
        backend,
        buffer: vec![0u8; COPY_BUFFER],
        carried: Carried { up: 0, down: 0 },
        client_open: true,
        backend_open: true,
    };
    let mut last = Instant::now();
    // Bytes the client sent right after the handshake may already wait inside rustls.
    let mut going = tunnel.pass_up();
    while going && (tunnel.client_open || tunnel.backend_open) {
        let idle = last.elapsed();
        if idle >= idle_limit {
            log::debug!("tunnel idle for {idle:?}: closed");
            break;
        }
        let wait = (idle_limit - idle).min(Duration::from_secs(1));
        let client = tunnel.client_open.then_some(&*tunnel.client);
        let backend = tunnel.backend_open.then_some(tunnel.backend);
        let Ok((client_ready, backend_ready)) = wait_readable(client, backend, wait) else {
            break;
        };
        if client_ready || backend_ready {
            last = Instant::now();
        }
        going = (!client_ready || tunnel.client_to_backend())
            && (!backend_ready || tunnel.backend_to_client());
    }
    close_both(tunnel.client, tunnel.backend);
    tunnel.carried
}

/// Both ends of a TLS client's tunnel, and which directions are still open. Each step returns
/// whether the tunnel goes on; false when a side failed.
struct TlsTunnel<'a> {
    conn: &'a mut rustls::ServerConnection,
    client: &'a mut TcpStream,
    backend: &'a TcpStream,
    buffer: Vec<u8>,
    carried: Carried,
    client_open: bool,
    backend_open: bool,
}

impl TlsTunnel<'_> {
    /// The client's socket is readable: its records are decrypted and what they hold goes to
    /// the backend. The end of the client's stream (or its close_notify) is passed on as a
    /// half-close.
    fn client_to_backend(&mut self) -> bool {
        match self.conn.read_tls(self.client) {
            Ok(0) => {
                self.client_ended();
                true
            }
            Ok(_) => {
                if self.conn.process_new_packets().is_err() {
                    // rustls queued an alert saying what went wrong.
                    let _ = self.conn.write_tls(self.client);
                    return false;
                }
                self.pass_up()
            }
            Err(err) => err.kind() == io::ErrorKind::Interrupted,
        }
    }

    /// The backend's socket is readable: what it sent goes to the client, encrypted. The end of
    /// the backend's stream becomes a close_notify and a half-close.
    fn backend_to_client(&mut self) -> bool {
        let mut reader = self.backend;
        match reader.read(&mut self.buffer) {
            Ok(0) => {
                self.backend_open = false;
                self.conn.send_close_notify();
                if flush_tls(self.conn, self.client).is_err() {
                    return false;
                }
                let _ = self.client.shutdown(Shutdown::Write);
                true
            }
            Ok(n) => {
                if self.conn.writer().write_all(&self.buffer[..n]).is_err()
                    || flush_tls(self.conn, self.client).is_err()
                {
                    return false;
                }
                self.carried.down += n as u64;
                true
            }
            Err(err) => err.kind() == io::ErrorKind::Interrupted,
        }
    }

    /// Passes the plaintext rustls holds on to the backend.
    fn pass_up(&mut self) -> bool {
        let mut writer = self.backend;
        loop {
            match self.conn.reader().read(&mut self.buffer) {
                // The client's close_notify: nothing more will come.
                Ok(0) => {
                    self.client_ended();
                    return true;
                }
                Ok(n) => {
                    if writer.write_all(&self.buffer[..n]).is_err() {
                        return false;
                    }
                    self.carried.up += n as u64;
                }
                Err(err) => return err.kind() == io::ErrorKind::WouldBlock,
            }
        }
    }

    /// The client's half is done: the backend is told so.
    fn client_ended(&mut self) {
        self.client_open = false;
        let _ = self.backend.shutdown(Shutdown::Write);
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
