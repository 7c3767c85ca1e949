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
//! With `--tls-listen`, a second listener serves HTTPS beside the plain one. It has its own
//! accepting thread, and its connections count against the same `--max-connections` and are
//! served by the same client threads; each client thread performs its own connection's TLS
//! handshake, bounded as a whole by `--client-timeout`, so a client that never finishes it
//! holds a slot for that long at most and never blocks the accepting thread.
//!
//! Shutdown (Ctrl-C or SIGTERM) stops accepting, accepts what is already in the listen queues
//! (closing a listener would reset those connections), closes connections that are idle
//! between requests, and lets requests in flight finish for up to ten seconds.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use rustls::{ServerConfig, ServerConnection, StreamOwned};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::descriptors;
use crate::proxy::{ClientConnection, ConnectionState, LoadBalancer};
use crate::settings::Settings;
use crate::stream::ClientStream;
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

/// With `--reuse-port`, how often a thread blocked in `accept` looks whether shutdown began.
const ACCEPT_TICK: Duration = Duration::from_millis(100);

/// How long accepting pauses when the process is out of file descriptors (or a connection
/// closes first, giving one back).
const EXHAUSTED_PAUSE: Duration = Duration::from_millis(100);

static ACCEPT_FAILED: RepeatedWarning = RepeatedWarning::new(module_path!());
static NO_THREAD: RepeatedWarning = RepeatedWarning::new(module_path!());

/// Bound listening sockets (plain HTTP, and HTTPS with `--tls-listen`), ready to serve.
pub struct Server {
    listeners: Vec<Listener>,
    shared: Arc<Shared>,
}

/// One listening socket, and the TLS configuration of its connections when it serves HTTPS.
struct Listener {
    socket: TcpListener,
    tls: Option<Arc<ServerConfig>>,
}

/// A handle that stops a running server from another thread (the Ctrl-C handler, a test).
#[derive(Clone)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
    wake_addrs: Vec<SocketAddr>,
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
    /// How many accepting threads (or the drain) wait for a connection to close.
    waiting: usize,
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
    /// For HTTPS: the TLS configuration, and when the connection was accepted (the handshake
    /// must be done within `--client-timeout` of it).
    tls: Option<(Arc<ServerConfig>, Instant)>,
}

impl Server {
    /// Binds the listening socket (none with `--listen off`: then [`Server::add_tls_listener`]
    /// adds the only one). A port already in use is reported here, before anything runs.
    pub fn bind(settings: &Settings) -> io::Result<Server> {
        let listeners = match settings.listen {
            Some(addr) => vec![Listener {
                socket: listen_socket(addr, settings)?,
                tls: None,
            }],
            None => Vec::new(),
        };
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
            listeners,
            shared: Arc::new(shared),
        })
    }

    /// Binds a second listening socket on `addr`, whose clients speak TLS with `config` (before
    /// any shutdown handle is taken, so that shutdown wakes it too).
    pub fn add_tls_listener(
        &mut self,
        addr: SocketAddr,
        config: Arc<ServerConfig>,
        settings: &Settings,
    ) -> io::Result<()> {
        let socket = listen_socket(addr, settings)?;
        self.listeners.push(Listener {
            socket,
            tls: Some(config),
        });
        Ok(())
    }

    /// The address the server listens on (with the real port when bound to port 0): the plain
    /// listener's, or with `--listen off` the HTTPS listener's.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self.listeners.first() {
            Some(listener) => listener.socket.local_addr(),
            None => Err(io::Error::new(io::ErrorKind::NotFound, "no listener")),
        }
    }

    /// Whether the server has a plain-HTTP listener (not `--listen off`).
    pub fn has_plain_listener(&self) -> bool {
        self.listeners.iter().any(|listener| listener.tls.is_none())
    }

    /// The address of the HTTPS listener, when there is one.
    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|listener| listener.tls.is_some())
            .and_then(|listener| listener.socket.local_addr().ok())
    }

    /// A handle that stops this server.
    pub fn shutdown_handle(&self) -> io::Result<ShutdownHandle> {
        let wake_addrs = self
            .listeners
            .iter()
            .map(|listener| listener.socket.local_addr().map(wake_address))
            .collect::<io::Result<_>>()?;
        Ok(ShutdownHandle {
            shared: Arc::clone(&self.shared),
            wake_addrs,
        })
    }

    /// Accepts and serves clients until shut down, then lets requests in flight finish. Each
    /// listener after the first has an accepting thread of its own.
    pub fn serve(self, lb: Arc<LoadBalancer>) {
        let shared = &self.shared;
        let lb = &lb;
        thread::scope(|scope| {
            let mut listeners = self.listeners.into_iter();
            let first = listeners.next();
            for listener in listeners {
                let spawned = thread::Builder::new()
                    .name("accept".into())
                    .spawn_scoped(scope, move || shared.accept_loop(listener, lb));
                if let Err(err) = spawned {
                    log::error!("cannot start an accepting thread: {err}");
                }
            }
            if let Some(first) = first {
                shared.accept_loop(first, lb);
            }
        });
        self.shared.drain(lb);
    }
}

/// With `--reuse-port`, makes the newest listener on the address take every new connection.
///
/// Linux spreads new connections over the listeners sharing a port by a hash, and a listener
/// that closes resets the connections in its queue. A takeover loses nothing only if the old
/// instance gets none once the new one listens; then it empties its queue and closes it.
/// One classic BPF instruction, attached to the group of listeners, says so: `ret #1`, the
/// second listener of the group, which is the one that joined last. When it is alone (index 1
/// does not exist), the kernel falls back to the hash, which has only it to choose from; when
/// the old one closes, the new one takes its place as the first. (nginx and HAProxy avoid the
/// same loss by handing the listening socket itself to the new process.)
#[cfg(target_os = "linux")]
fn newest_takes_new_connections(socket: &Socket) -> io::Result<()> {
    let program = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 1,
    }];
    let filter = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `filter` points to `program`, both alive for the call; the kernel copies them.
    let done = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&filter as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Elsewhere the kernel's own spreading stays; the old instance's queue is still emptied.
#[cfg(not(target_os = "linux"))]
fn newest_takes_new_connections(_socket: &Socket) -> io::Result<()> {
    Ok(())
}

/// A listening socket on `addr`, with the options every client socket inherits.
fn listen_socket(addr: SocketAddr, settings: &Settings) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    // `--reuse-port`: a second balancer may listen on the same address (a new version taking
    // over while this one drains); see `newest_takes_new_connections` for which one gets
    // the new connections. The other listener may also take the connection `ShutdownHandle`
    // makes to wake `accept`, so `accept` here gives up every `ACCEPT_TICK` to look at the
    // shutdown flag. (Accepted sockets get their own read timeout in `prepare`.)
    if settings.reuse_port {
        socket.set_reuse_port(true)?;
        socket.set_read_timeout(Some(ACCEPT_TICK))?;
    }
    // Linux copies these options from the listening socket to every accepted one, which
    // saves two system calls per client connection (`prepare` sets them itself on other
    // systems). Small messages must not wait for Nagle's algorithm, and the timeout bounds
    // every write to a client. The read timeout is set on each accepted socket instead:
    // on the listener it would also make `accept` give up every `--client-timeout`.
    socket.set_nodelay(true)?;
    socket.set_write_timeout(Some(settings.client_timeout))?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    if settings.reuse_port {
        if let Err(err) = newest_takes_new_connections(&socket) {
            log::warn!(
                "--reuse-port: new connections will be spread over every instance on {addr}: {err}"
            );
        }
    }
    Ok(socket.into())
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
        // `accept` blocks until a client arrives, so become that client (of every listener).
        for addr in &self.wake_addrs {
            let _ = TcpStream::connect_timeout(addr, Duration::from_secs(1));
        }
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

    /// Accepts on `listener` and hands each connection to a client thread until shutdown.
    fn accept_loop(self: &Arc<Self>, listener: Listener, lb: &Arc<LoadBalancer>) {
        while !self.is_shutting_down() {
            drop(self.wait_for_a_free_slot());
            if self.is_shutting_down() {
                break;
            }
            match listener.socket.accept() {
                // A connection accepted as shutdown begins is served all the same.
                Ok((stream, peer)) => self.start(lb, stream, peer, listener.tls.as_ref()),
                // `ACCEPT_TICK` passed (with `--reuse-port`).
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(err) => self.accept_failed(&err, lb),
            }
        }
        self.accept_queued(&listener, lb);
    }

    /// Accepts the connections still waiting in `listener`'s queue, before it closes: the
    /// kernel completed their handshakes, their requests are on the way, and closing the
    /// listener would reset them. This is what lets a `--reuse-port` takeover lose nothing:
    /// the old instance's queue is emptied, not dropped. Each is served its first request
    /// (with `Connection: close`); `--max-connections` still holds, within the drain's limit.
    fn accept_queued(self: &Arc<Self>, listener: &Listener, lb: &Arc<LoadBalancer>) {
        if let Err(err) = listener.socket.set_nonblocking(true) {
            return log::warn!("cannot empty the listen queue before closing it: {err}");
        }
        let deadline = Instant::now() + DRAIN_LIMIT;
        let mut taken = 0;
        while self.wait_for_a_slot_until(deadline) {
            let Ok((stream, peer)) = listener.socket.accept() else {
                break;
            };
            // Accepted sockets do not inherit non-blocking mode on Linux; elsewhere they may.
            if stream.set_nonblocking(false).is_ok() {
                self.start(lb, stream, peer, listener.tls.as_ref());
                taken += 1;
            }
        }
        if taken > 0 {
            log::info!("accepted {taken} connections still queued when shutdown began");
        }
    }

    /// Pauses accepting while `--max-connections` clients are being served; returns the list of
    /// open connections, locked, with room for one more (or at shutdown).
    fn wait_for_a_free_slot(&self) -> MutexGuard<'_, Connections> {
        let mut open = self.open();
        if open.by_id.len() < self.max_connections || self.is_shutting_down() {
            return open;
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
        open.waiting += 1;
        while open.by_id.len() >= self.max_connections && !self.is_shutting_down() {
            open = self.closed.wait(open).unwrap_or_else(|e| e.into_inner());
        }
        open.waiting -= 1;
        open
    }

    /// At shutdown: waits until fewer than `--max-connections` clients are served, or
    /// `deadline`; whether a slot is free.
    fn wait_for_a_slot_until(&self, deadline: Instant) -> bool {
        let mut open = self.open();
        open.waiting += 1;
        while open.by_id.len() >= self.max_connections {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            open = self
                .closed
                .wait_timeout(open, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        open.waiting -= 1;
        open.by_id.len() < self.max_connections
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
        open.waiting += 1;
        open = self
            .closed
            .wait_timeout(open, EXHAUSTED_PAUSE)
            .unwrap_or_else(|e| e.into_inner())
            .0;
        open.waiting -= 1;
    }

    /// Registers an accepted connection and hands it to an idle client thread, or a new one.
    ///
    /// With two listeners, both accepting threads may have seen the last free slot before
    /// `accept`; the one that registers second waits here, holding its client, until a slot
    /// frees, so that no more than `--max-connections` are ever served at once.
    fn start(
        self: &Arc<Self>,
        lb: &Arc<LoadBalancer>,
        stream: TcpStream,
        peer: SocketAddr,
        tls: Option<&Arc<ServerConfig>>,
    ) {
        if let Err(err) = self.prepare(&stream) {
            return log::debug!("client {peer} gone before serving: {err}");
        }
        let state = Arc::new(ConnectionState::default());
        let id = {
            let mut open = self.wait_for_a_free_slot();
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
            tls: tls.map(|config| (Arc::clone(config), Instant::now())),
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
        let stream = match self.client_stream(lb, job.stream, job.tls, job.peer) {
            Ok(stream) => stream,
            Err(stream) => {
                self.finish(job.id);
                drop(stream);
                return;
            }
        };
        let mut connection =
            ClientConnection::new(lb, stream, job.peer, &job.state, &self.shutdown);
        // A panic unwinds only what the request owned; the connection itself survives it.
        let served = panic::catch_unwind(AssertUnwindSafe(|| connection.serve()));
        if served.is_err() {
            // The panic message was already printed by the panic hook; the server goes on.
            log::error!(
                "the thread serving {} panicked; its connection was closed",
                job.peer
            );
        }
        let stream = connection.into_stream();
        self.finish(job.id);
        drop(stream);
    }

    /// The client's stream: the socket itself, or a TLS connection over it once the handshake
    /// is done. A failed handshake gives the socket back (to be closed after `finish`).
    fn client_stream(
        &self,
        lb: &LoadBalancer,
        socket: TcpStream,
        tls: Option<(Arc<ServerConfig>, Instant)>,
        peer: SocketAddr,
    ) -> Result<ClientStream, TcpStream> {
        let Some((config, accepted)) = tls else {
            return Ok(ClientStream::Plain(socket));
        };
        let connection = match ServerConnection::new(config) {
            Ok(connection) => connection,
            Err(err) => {
                log::debug!("client {peer}: no TLS connection: {err}");
                return Err(socket);
            }
        };
        let mut stream = ClientStream::Tls(Box::new(StreamOwned::new(connection, socket)));
        let deadline = accepted + self.client_timeout;
        match stream.handshake(deadline, self.client_timeout) {
            Ok(()) => {
                lb.stats()
                    .tls()
                    .handshake(stream.tls().and_then(|tls| tls.protocol_version()));
                Ok(stream)
            }
            Err(err) => {
                lb.stats().tls().failed();
                // Scanners and plain-HTTP clients fail handshakes all day: one debug line each.
                log::debug!("client {peer}: TLS handshake failed: {err}");
                Err(stream.into_tcp())
            }
        }
    }

    /// Forgets a closed connection and wakes whoever waits for a free slot or for the drain.
    fn finish(&self, id: u64) {
        let mut open = self.open();
        open.by_id.remove(&id);
        let wake = open.waiting > 0;
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
        open.waiting += 1;
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
