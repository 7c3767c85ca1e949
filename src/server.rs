//! The server: the listening socket, one thread per client connection, and graceful shutdown.
//!
//! Each client connection is served by one OS thread with blocking I/O, as in the chapter. Two
//! things make that design hold up under load. Finished threads are kept and handed the next
//! connection instead of being ended and created again, because creating a thread costs more
//! than a whole keep-alive request. And `--max-connections` bounds how many are served at once:
//! beyond it, accepting pauses and new clients wait in the kernel's listen queue, which is made
//! much longer than the chapter's 5 so that bursts of connections are not dropped.
//!
//! A client connection costs one file descriptor, its socket: the server remembers each open
//! socket's descriptor number (not a duplicate of it) so that shutdown can reach it. When the
//! process runs out of descriptors anyway, accepting pauses for a moment, as nginx does, rather
//! than accepting clients it could not serve.
//!
//! Shutdown (Ctrl-C or SIGTERM) stops accepting, closes connections that are idle between
//! requests, and lets requests in flight finish for up to ten seconds.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::descriptors;
use crate::proxy::{ClientConnection, ConnectionState, LoadBalancer};
use crate::settings::Settings;
use crate::warnings::RepeatedWarning;

/// Length of the kernel's queue of connections not yet accepted (the kernel may cap it).
pub(crate) const LISTEN_BACKLOG: i32 = 4096;

/// Stack size of a client thread. Buffers live on the heap, so a small stack is plenty, and an
/// idle client costs only the pages it touched.
const CLIENT_STACK: usize = 256 * 1024;

/// How long a finished client thread waits for a next connection before it ends.
const THREAD_KEEP: Duration = Duration::from_secs(30);

/// How long requests in flight may take to finish once shutdown begins.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// How long accepting pauses when the process is out of file descriptors (or a connection
/// closes first, giving one back).
const EXHAUSTED_PAUSE: Duration = Duration::from_millis(100);

static ACCEPT_FAILED: RepeatedWarning = RepeatedWarning::new(module_path!());
static NO_THREAD: RepeatedWarning = RepeatedWarning::new(module_path!());

/// A bound listening socket, ready to serve.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
}

/// A handle that stops a running server from another thread (the Ctrl-C handler, a test).
#[derive(Clone)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
    wake_addr: SocketAddr,
}

/// State shared by the accepting thread, the client threads and shutdown handles.
struct Shared {
    shutdown: AtomicBool,
    max_connections: usize,
    client_timeout: Duration,
    /// Open client connections, so shutdown can find the idle ones.
    open: Mutex<Connections>,
    /// Signalled whenever a connection closes (or shutdown begins).
    closed: Condvar,
    /// Client threads waiting for a connection to serve.
    idle: Mutex<IdleThreads>,
    work: Condvar,
}

#[derive(Default)]
struct Connections {
    next_id: u64,
    by_id: HashMap<u64, OpenConnection>,
    /// Whether accepting was ever paused by `--max-connections` (it is logged once).
    paused_before: bool,
    /// Whether the accepting thread (or the drain) waits for a connection to close.
    someone_waits: bool,
}

/// An open client connection as shutdown sees it. The descriptor stays open while it is listed:
/// a client thread takes its connection off the list before it closes the socket.
struct OpenConnection {
    fd: RawFd,
    state: Arc<ConnectionState>,
}

#[derive(Default)]
struct IdleThreads {
    /// Client threads blocked waiting for a job.
    waiting: usize,
    /// Accepted connections no thread has taken yet.
    queue: VecDeque<Job>,
}

/// An accepted connection on its way to a client thread.
struct Job {
    id: u64,
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<ConnectionState>,
}

impl Server {
    /// Binds the listening socket. A port already in use is reported here, before anything runs.
    pub fn bind(settings: &Settings) -> io::Result<Server> {
        let addr = settings.listen;
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        // Linux copies these options from the listening socket to every accepted one, which
        // saves two system calls per client connection (`prepare` sets them itself on other
        // systems). Small messages must not wait for Nagle's algorithm, and the timeout bounds
        // every write to a client. The read timeout is set on each accepted socket instead:
        // on the listener it would also make `accept` give up every `--client-timeout`.
        socket.set_nodelay(true)?;
        socket.set_write_timeout(Some(settings.client_timeout))?;
        socket.bind(&addr.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        let shared = Shared {
            shutdown: AtomicBool::new(false),
            max_connections: settings.max_connections.max(1),
            client_timeout: settings.client_timeout,
            open: Mutex::new(Connections::default()),
            closed: Condvar::new(),
            idle: Mutex::new(IdleThreads::default()),
            work: Condvar::new(),
        };
        Ok(Server {
            listener: socket.into(),
            shared: Arc::new(shared),
        })
    }

    /// The address the server listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A handle that stops this server.
    pub fn shutdown_handle(&self) -> io::Result<ShutdownHandle> {
        let wake_addr = wake_address(self.local_addr()?);
        Ok(ShutdownHandle {
            shared: Arc::clone(&self.shared),
            wake_addr,
        })
    }

    /// Accepts and serves clients until shut down, then lets requests in flight finish.
    pub fn serve(self, lb: Arc<LoadBalancer>) {
        while !self.shared.is_shutting_down() {
            self.shared.wait_for_a_free_slot();
            if self.shared.is_shutting_down() {
                break;
            }
            match self.listener.accept() {
                Ok((stream, peer)) if !self.shared.is_shutting_down() => {
                    self.shared.start(&lb, stream, peer)
                }
                Ok(_) => break,
                Err(err) => self.shared.accept_failed(&err, &lb),
            }
        }
        drop(self.listener);
        self.shared.drain(&lb);
    }
}

/// The address to connect to in order to wake a thread blocked in `accept` on `addr`: the
/// listener's own, with a wildcard IP (0.0.0.0 or ::) replaced by loopback, since connecting to a
/// wildcard address is not portable.
pub fn wake_address(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

impl ShutdownHandle {
    /// Begins a graceful shutdown: the server stops accepting and `serve` returns once requests
    /// in flight are done (ten seconds at most).
    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.closed.notify_all();
        self.shared.work.notify_all();
        // `accept` blocks until a client arrives, so become that client.
        let _ = TcpStream::connect_timeout(&self.wake_addr, Duration::from_secs(1));
    }
}

impl Shared {
    fn is_shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    fn open(&self) -> MutexGuard<'_, Connections> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn idle(&self) -> MutexGuard<'_, IdleThreads> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pauses accepting while `--max-connections` clients are being served.
    fn wait_for_a_free_slot(&self) {
        let mut open = self.open();
        if open.by_id.len() < self.max_connections || self.is_shutting_down() {
            return;
        }
        // Said once at warn: under sustained load this happens for every new client.
        if open.paused_before {
            log::debug!("--max-connections reached: accepting paused");
        } else {
            log::warn!(
                "{} connections open (--max-connections): accepting paused until one closes",
                self.max_connections
            );
            open.paused_before = true;
        }
        while open.by_id.len() >= self.max_connections && !self.is_shutting_down() {
            open.someone_waits = true;
            open = self.closed.wait(open).unwrap_or_else(|e| e.into_inner());
        }
        open.someone_waits = false;
    }

    /// Out of descriptors, while under `--max-connections`: backend connections idle in the
    /// pools have taken the clients' share, so some are closed and accepting goes on at once.
    /// With none idle (or out of kernel memory), accepting pauses until a connection closes or
    /// for a moment, so clients wait in the listen queue instead of being accepted and dropped.
    /// Other failures concern one client that gave up while queued, and accepting goes on.
    fn accept_failed(&self, err: &io::Error, lb: &LoadBalancer) {
        if descriptors::is_exhausted(err) && lb.give_back_descriptors() {
            return log::debug!("accept failed: {err}; closed idle backend connections");
        }
        let out_of_resources = descriptors::is_exhausted(err)
            || matches!(err.raw_os_error(), Some(libc::ENOBUFS | libc::ENOMEM));
        if !out_of_resources {
            return log::debug!("accept failed: {err}");
        }
        ACCEPT_FAILED.warn(format_args!(
            "accept failed: {err}; accepting paused until a connection closes (at most {EXHAUSTED_PAUSE:?})"
        ));
        let mut open = self.open();
        open.someone_waits = true;
        open = self
            .closed
            .wait_timeout(open, EXHAUSTED_PAUSE)
            .unwrap_or_else(|e| e.into_inner())
            .0;
        open.someone_waits = false;
    }

    /// Registers an accepted connection and hands it to an idle client thread, or a new one.
    fn start(self: &Arc<Self>, lb: &Arc<LoadBalancer>, stream: TcpStream, peer: SocketAddr) {
        if let Err(err) = self.prepare(&stream) {
            return log::debug!("client {peer} gone before serving: {err}");
        }
        let state = Arc::new(ConnectionState::default());
        let id = {
            let mut open = self.open();
            open.next_id += 1;
            let id = open.next_id;
            open.by_id.insert(
                id,
                OpenConnection {
                    fd: stream.as_raw_fd(),
                    state: Arc::clone(&state),
                },
            );
            id
        };
        let job = Job {
            id,
            stream,
            peer,
            state,
        };
        // The job waits in the queue for an idle client thread; a new thread is started when
        // there are more jobs queued than threads waiting.
        let mut idle = self.idle();
        idle.queue.push_back(job);
        let taken = idle.waiting >= idle.queue.len();
        drop(idle);
        if taken {
            self.work.notify_one();
            return;
        }
        let shared = Arc::clone(self);
        let lb = Arc::clone(lb);
        let spawned = thread::Builder::new()
            .name("client".into())
            .stack_size(CLIENT_STACK)
            .spawn(move || shared.client_thread(&lb));
        if let Err(err) = spawned {
            // The connection stays queued until a busy thread finishes and takes it.
            NO_THREAD.warn(format_args!(
                "cannot start a thread for {peer}: {err}; it waits for a busy one"
            ));
        }
    }

    /// Sets the timeouts that bound every read and write of a client. Linux copies the
    /// listener's options to the accepted socket; only the read timeout is left to set.
    fn prepare(&self, stream: &TcpStream) -> io::Result<()> {
        #[cfg(not(target_os = "linux"))]
        {
            stream.set_nodelay(true)?;
            stream.set_write_timeout(Some(self.client_timeout))?;
        }
        stream.set_read_timeout(Some(self.client_timeout))
    }

    /// A client thread: serves queued connections, and ends after waiting for one for a while.
    fn client_thread(&self, lb: &LoadBalancer) {
        while let Some(job) = self.next_job() {
            self.serve_one(lb, job);
        }
    }

    /// Serves one connection, then takes it off the list of open ones before closing its
    /// socket, so that shutdown never touches a descriptor number that was reused meanwhile.
    fn serve_one(&self, lb: &LoadBalancer, job: Job) {
        let _open = lb.stats().open_connection();
        let mut connection =
            ClientConnection::new(lb, job.stream, job.peer, &job.state, &self.shutdown);
        // A panic unwinds only what the request owned; the connection itself survives it.
        let served = panic::catch_unwind(AssertUnwindSafe(|| connection.serve()));
        if served.is_err() {
            // The panic message was already printed by the panic hook; the server goes on.
            log::error!(
                "the thread serving {} panicked; its connection was closed",
                job.peer
            );
        }
        let socket = connection.into_socket();
        self.finish(job.id);
        drop(socket);
    }

    /// Forgets a closed connection and wakes whoever waits for a free slot or for the drain.
    fn finish(&self, id: u64) {
        let mut open = self.open();
        open.by_id.remove(&id);
        let wake = open.someone_waits;
        drop(open);
        // Waking costs a system call, so only when the accepting thread or the drain waits.
        if wake {
            self.closed.notify_all();
        }
    }

    /// The next queued connection; `None` after `THREAD_KEEP` without one, or at shutdown.
    fn next_job(&self) -> Option<Job> {
        let mut idle = self.idle();
        idle.waiting += 1;
        let job = loop {
            if let Some(job) = idle.queue.pop_front() {
                break Some(job);
            }
            if self.is_shutting_down() {
                break None;
            }
            let (guard, wait) = self
                .work
                .wait_timeout(idle, THREAD_KEEP)
                .unwrap_or_else(|e| e.into_inner());
            idle = guard;
            if wait.timed_out() && idle.queue.is_empty() {
                break None;
            }
        };
        idle.waiting -= 1;
        job
    }

    /// Closes connections idle between requests and waits for the busy ones to finish.
    fn drain(&self, lb: &LoadBalancer) {
        let deadline = Instant::now() + DRAIN_LIMIT;
        let mut open = self.open();
        open.someone_waits = true;
        for connection in open.by_id.values() {
            if connection.state.idle.load(Ordering::SeqCst) {
                // A read blocked on this socket now sees the end of the stream.
                connection.shutdown(Shutdown::Read);
            }
        }
        if !open.by_id.is_empty() {
            log::info!(
                "waiting for {} open connections to finish",
                open.by_id.len()
            );
        }
        while !open.by_id.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!(
                    "{} connections still busy after {:?} ({} of them tunnels); closing them",
                    open.by_id.len(),
                    DRAIN_LIMIT,
                    lb.stats().tunnels().active()
                );
                for connection in open.by_id.values() {
                    connection.shutdown(Shutdown::Both);
                }
                return;
            }
            open = self
                .closed
                .wait_timeout(open, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl OpenConnection {
    /// Shuts the socket down in `how`, waking the client thread blocked on it.
    fn shutdown(&self, how: Shutdown) {
        // SAFETY: the descriptor is open: its client thread closes it only after taking the
        // connection off the list, and the caller holds the list's lock.
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
        let _ = SockRef::from(&fd).shutdown(how);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wake_address_replaces_wildcards_with_loopback() {
        let v4: SocketAddr = "0.0.0.0:8001".parse().unwrap();
        let v6: SocketAddr = "[::]:8001".parse().unwrap();
        let bound: SocketAddr = "127.0.0.2:8001".parse().unwrap();
        assert_eq!(wake_address(v4), "127.0.0.1:8001".parse().unwrap());
        assert_eq!(wake_address(v6), "[::1]:8001".parse().unwrap());
        assert_eq!(wake_address(bound), bound);
    }
}
