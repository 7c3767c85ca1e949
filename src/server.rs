//! The server: the listening sockets, one thread per client connection, and graceful shutdown.
//!
//! Each client connection is served by one OS thread with blocking I/O, as in the chapter.
//! The threads also accept for themselves, in the leader/followers pattern of Apache's worker
//! MPM: idle threads block in `accept` on the listener, the kernel hands each new connection to
//! one of them, and that thread serves it, then goes back to `accept`. Nothing is handed from
//! an accepting thread to a serving one, so a new connection wakes one thread, not two.
//!
//! Three things make that design hold up under load. Finished threads are kept for the next
//! connection instead of being ended and created again, because creating a thread costs more
//! than a whole keep-alive request; the pool grows by one thread when the last idle one takes
//! a connection, and shrinks when threads have been idle for a while. `--max-connections`
//! bounds the threads, so it bounds the clients served at once exactly: when every thread is
//! busy, nobody accepts, and new clients wait in the kernel's listen queue, which is made much
//! longer than the chapter's 5 so that bursts of connections are not dropped.
//!
//! A client connection costs one file descriptor, its socket: the server remembers each open
//! socket's descriptor number (not a duplicate of it) so that shutdown can reach it. When the
//! process runs out of descriptors anyway, accepting pauses for a moment, as nginx does, rather
//! than accepting clients it could not serve.
//!
//! With `--tls-listen`, a second listener serves HTTPS beside the plain one, accepted by the
//! same pool of threads under the same `--max-connections`: a thread going back to `accept`
//! goes where fewest threads wait. Each thread performs its own connection's TLS handshake,
//! bounded as a whole by `--client-timeout`, so a client that never finishes it holds a thread
//! for that long at most.
//!
//! Shutdown (Ctrl-C or SIGTERM) stops accepting, accepts what is already in the listen queues
//! (closing a listener would reset those connections), closes connections that are idle
//! between requests, and lets requests in flight finish for up to ten seconds.

use std::collections::HashMap;
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

/// How long a client thread waits in `accept` before it ends (unless it is the last one
/// waiting on its listener).
const THREAD_KEEP: Duration = Duration::from_secs(30);

/// The most threads the pool grows by at once (see `Shared::end_accept_and_grow`).
const GROWTH_STEP: usize = 16;

/// How long requests in flight may take to finish once shutdown begins.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// How often a thread blocked in `accept` looks whether shutdown began. Connecting to the
/// listener would wake it at once, but not with `--reuse-port` (the connection may go to the
/// other instance) nor with connections accepted only once they carry data (see
/// `accept_when_data_arrives`).
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
}

/// State shared by the client threads, the thread running [`Server::serve`] and shutdown
/// handles.
struct Shared {
    shutdown: AtomicBool,
    max_connections: usize,
    client_timeout: Duration,
    /// Open client connections, so shutdown can find the idle ones.
    open: Mutex<Connections>,
    /// Signalled whenever a connection closes (or shutdown begins).
    closed: Condvar,
    /// The client threads, and which of them wait in `accept`.
    pool: Mutex<Pool>,
    /// Signalled when shutdown begins and when a thread leaves the pool during shutdown.
    pool_changed: Condvar,
}

#[derive(Default)]
struct Connections {
    next_id: u64,
    by_id: HashMap<u64, OpenConnection>,
    /// How many threads (accepting or the drain) wait for a connection to close.
    waiting: usize,
}

/// An open client connection as shutdown sees it. The descriptor stays open while it is listed:
/// a client thread takes its connection off the list before it closes the socket.
struct OpenConnection {
    fd: RawFd,
    state: Arc<ConnectionState>,
}

#[derive(Default)]
struct Pool {
    /// Client threads alive; never more than `--max-connections`.
    threads: usize,
    /// For each listener, the threads blocked in its `accept`.
    accepting: Vec<usize>,
    /// Threads started to accept that have not reached `accept` yet; while there are any, the
    /// pool does not grow again.
    starting: usize,
    /// Where the next thread goes when listeners have equally many waiting.
    rotation: usize,
    /// Whether accepting was ever paused by `--max-connections` (it is logged once).
    paused_before: bool,
}

/// What a client thread holds: the shared state, the listeners and the balancer.
#[derive(Clone)]
struct Context {
    shared: Arc<Shared>,
    listeners: Arc<[Listener]>,
    lb: Arc<LoadBalancer>,
}

/// A connection accepted on the listener of that index, not yet served.
type Accepted = (TcpStream, SocketAddr, usize);

/// What a new client thread does first: start more threads (already counted in the pool),
/// then serve a connection accepted for it, if any, before it goes to `accept`.
struct FirstTasks {
    more_threads: usize,
    accepted: Option<Accepted>,
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
            pool: Mutex::new(Pool::default()),
            pool_changed: Condvar::new(),
        };
        Ok(Server {
            listeners,
            shared: Arc::new(shared),
        })
    }

    /// Binds a second listening socket on `addr`, whose clients speak TLS with `config`.
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
        Ok(ShutdownHandle {
            shared: Arc::clone(&self.shared),
        })
    }

    /// Serves clients until shut down, then lets requests in flight finish. The calling thread
    /// starts one client thread per listener (the pool grows from there) and waits for
    /// shutdown; then it waits for the threads in `accept` to leave it, accepts what is still
    /// queued and waits for the connections to close.
    pub fn serve(self, lb: Arc<LoadBalancer>) {
        let context = Context {
            shared: self.shared,
            listeners: self.listeners.into(),
            lb,
        };
        context.shared.pool().accepting = vec![0; context.listeners.len()];
        for _ in 0..context.listeners.len() {
            if context.shared.reserve_thread() {
                context.spawn(FirstTasks {
                    more_threads: 0,
                    accepted: None,
                });
            }
        }
        context.shared.wait_for_shutdown();
        context.wait_for_acceptors();
        for index in 0..context.listeners.len() {
            context.accept_queued(index);
        }
        context.shared.drain(&context.lb);
    }
}

impl Context {
    /// Starts a client thread, its place in the pool already reserved.
    fn spawn(&self, first: FirstTasks) {
        let reserved = 1 + first.more_threads;
        let starting = first.accepted.is_none();
        let context = self.clone();
        let spawned = thread::Builder::new()
            .name("client".into())
            .stack_size(CLIENT_STACK)
            .spawn(move || context.client_thread(first));
        if let Err(err) = spawned {
            self.shared.threads_ended(reserved, starting);
            NO_THREAD.warn(format_args!(
                "cannot start a client thread: {err}; the busy ones accept when they finish"
            ));
        }
    }

    /// A client thread: accepts a connection, serves it, and goes back to `accept`, until
    /// shutdown or until it has waited `THREAD_KEEP` while others wait on the same listener.
    fn client_thread(&self, first: FirstTasks) {
        for _ in 0..first.more_threads {
            self.spawn(FirstTasks {
                more_threads: 0,
                accepted: None,
            });
        }
        let mut starting = first.accepted.is_none();
        if let Some((stream, peer, index)) = first.accepted {
            self.serve_one(stream, peer, index);
        }
        let mut idle_since = Instant::now();
        while let Some(index) = self.shared.begin_accept(std::mem::take(&mut starting)) {
            match self.listeners[index].socket.accept() {
                // A connection accepted as shutdown begins is served all the same.
                Ok((stream, peer)) => {
                    let grow = self.shared.end_accept_and_grow(index);
                    if grow > 0 {
                        self.spawn(FirstTasks {
                            more_threads: grow - 1,
                            accepted: None,
                        });
                    }
                    self.serve_one(stream, peer, index);
                    idle_since = Instant::now();
                }
                // The listener's timeout, `ACCEPT_TICK`: a look at the shutdown flag and the
                // time this thread has waited.
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.shared.end_accept_idle(index, idle_since.elapsed()) {
                        return;
                    }
                }
                Err(err) => {
                    self.shared.end_accept(index);
                    self.shared.accept_failed(&err, &self.lb);
                }
            }
        }
    }

    /// Serves one connection accepted on listener `index`, then takes it off the list of open
    /// ones before closing its socket, so that shutdown never touches a descriptor number that
    /// was reused meanwhile.
    fn serve_one(&self, stream: TcpStream, peer: SocketAddr, index: usize) {
        let accepted = Instant::now();
        let shared = &self.shared;
        let lb = &self.lb;
        if let Err(err) = shared.prepare(&stream) {
            return log::debug!("client {peer} gone before serving: {err}");
        }
        let state = Arc::new(ConnectionState::default());
        let id = shared.register(&stream, &state);
        let _open = lb.stats().open_connection();
        let tls = self.listeners[index].tls.as_ref();
        let stream = match shared.client_stream(lb, stream, tls, accepted, peer) {
            Ok(stream) => stream,
            Err(stream) => {
                shared.finish(id);
                drop(stream);
                return;
            }
        };
        let mut connection = ClientConnection::new(lb, stream, peer, &state, &shared.shutdown);
        // A panic unwinds only what the request owned; the connection itself survives it.
        let served = panic::catch_unwind(AssertUnwindSafe(|| connection.serve()));
        if served.is_err() {
            // The panic message was already printed by the panic hook; the server goes on.
            log::error!("the thread serving {peer} panicked; its connection was closed");
        }
        let stream = connection.into_stream();
        shared.finish(id);
        drop(stream);
    }

    /// At shutdown: waits until no thread is blocked in `accept` any more (each sees the flag
    /// within `ACCEPT_TICK`), so that the queues can be emptied.
    fn wait_for_acceptors(&self) {
        let mut pool = self.shared.pool();
        while pool.accepting.iter().any(|&n| n > 0) {
            pool = self
                .shared
                .pool_changed
                .wait_timeout(pool, ACCEPT_TICK)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Accepts the connections still waiting in listener `index`'s queue, before it closes:
    /// the kernel completed their handshakes, their requests are on the way, and closing the
    /// listener would reset them. This is what lets a `--reuse-port` takeover lose nothing:
    /// the old instance's queue is emptied, not dropped. Each gets a thread of its own and is
    /// served its first request (with `Connection: close`); `--max-connections` still holds,
    /// within the drain's limit.
    fn accept_queued(&self, index: usize) {
        let listener = &self.listeners[index].socket;
        if let Err(err) = listener.set_nonblocking(true) {
            return log::warn!("cannot empty the listen queue before closing it: {err}");
        }
        let deadline = Instant::now() + DRAIN_LIMIT;
        let mut taken = 0;
        while self.shared.reserve_thread_until(deadline) {
            let Ok((stream, peer)) = listener.accept() else {
                self.shared.threads_ended(1, false);
                break;
            };
            // Accepted sockets do not inherit non-blocking mode on Linux; elsewhere they may.
            if stream.set_nonblocking(false).is_ok() {
                self.spawn(FirstTasks {
                    more_threads: 0,
                    accepted: Some((stream, peer, index)),
                });
                taken += 1;
            } else {
                self.shared.threads_ended(1, false);
            }
        }
        if taken > 0 {
            log::info!("accepted {taken} connections still queued when shutdown began");
        }
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
    // `filter` points to `program`, both alive for the call; the kernel copies them.
    set_option(
        socket,
        libc::SOL_SOCKET,
        libc::SO_ATTACH_REUSEPORT_CBPF,
        &filter,
    )
}

/// Elsewhere the kernel's own spreading stays; the old instance's queue is still emptied.
#[cfg(not(target_os = "linux"))]
fn newest_takes_new_connections(_socket: &Socket) -> io::Result<()> {
    Ok(())
}

/// Makes `accept` return a connection only once its first bytes (a request head, a TLS
/// ClientHello) have arrived, as nginx's `listen ... deferred` and HAProxy's `defer-accept` do.
/// The thread that accepts then reads them at once instead of going back to sleep until they
/// come: one context switch less per new connection, which is a third of those a
/// `Connection: close` request costs. A client that connects and sends nothing is accepted
/// anyway a few seconds later, and `--client-timeout` runs from then.
#[cfg(target_os = "linux")]
fn accept_when_data_arrives(socket: &Socket) -> io::Result<()> {
    let seconds: libc::c_int = 1;
    set_option(socket, libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, &seconds)
}

/// Sets a socket option that `socket2` does not offer.
#[cfg(target_os = "linux")]
fn set_option<T>(
    socket: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` is a live `T` for the whole call and its size is given; the kernel copies
    // what it needs.
    let done = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Elsewhere connections are accepted as soon as they are made.
#[cfg(not(target_os = "linux"))]
fn accept_when_data_arrives(_socket: &Socket) -> io::Result<()> {
    Ok(())
}

/// A listening socket on `addr`, with the options every client socket inherits.
fn listen_socket(addr: SocketAddr, settings: &Settings) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    // `--reuse-port`: a second balancer may listen on the same address (a new version taking
    // over while this one drains); see `newest_takes_new_connections` for which one gets
    // the new connections.
    if settings.reuse_port {
        socket.set_reuse_port(true)?;
    }
    // `accept` gives up every `ACCEPT_TICK`, so that a waiting thread sees shutdown begin
    // and, after `THREAD_KEEP` without a client, ends.
    socket.set_read_timeout(Some(ACCEPT_TICK))?;
    // Linux copies these options from the listening socket to every accepted one, which
    // saves two system calls per client connection (`prepare` sets them itself on other
    // systems). Small messages must not wait for Nagle's algorithm, and the timeout bounds
    // every write to a client. (The read timeout is copied too; `prepare` replaces it with
    // `--client-timeout`.)
    socket.set_nodelay(true)?;
    socket.set_write_timeout(Some(settings.client_timeout))?;
    socket.bind(&addr.into())?;
    if let Err(err) = accept_when_data_arrives(&socket) {
        log::debug!("{addr}: connections are accepted before their first bytes: {err}");
    }
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
        let pool = self.shared.pool();
        self.shared.shutdown.store(true, Ordering::SeqCst);
        drop(pool);
        self.shared.pool_changed.notify_all();
        self.shared.closed.notify_all();
    }
}

impl Shared {
    fn is_shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    fn open(&self) -> MutexGuard<'_, Connections> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pool(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks the thread running `serve` until shutdown begins.
    fn wait_for_shutdown(&self) {
        let mut pool = self.pool();
        while !self.is_shutting_down() {
            pool = self
                .pool_changed
                .wait(pool)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Counts a new client thread in the pool, if `--max-connections` leaves room for it.
    fn reserve_thread(&self) -> bool {
        let mut pool = self.pool();
        if pool.threads >= self.max_connections {
            return false;
        }
        pool.threads += 1;
        pool.starting += 1;
        true
    }

    /// At shutdown: waits until the pool has room for one more thread, or `deadline`; counts
    /// the thread in when there is room.
    fn reserve_thread_until(&self, deadline: Instant) -> bool {
        let mut pool = self.pool();
        while pool.threads >= self.max_connections {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            pool = self
                .pool_changed
                .wait_timeout(pool, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        pool.threads += 1;
        true
    }

    /// `count` client threads leave the pool (`starting`: before they reached `accept`).
    fn threads_ended(&self, count: usize, starting: bool) {
        let mut pool = self.pool();
        pool.threads -= count;
        if starting {
            pool.starting -= count;
        }
        drop(pool);
        if self.is_shutting_down() {
            self.pool_changed.notify_all();
        }
    }

    /// A thread is about to block in `accept` (for the first time: `starting`): returns the
    /// listener where fewest threads wait (taking turns among equals, so that no listener is
    /// left without). `None` once shutdown began: the thread leaves the pool.
    fn begin_accept(&self, starting: bool) -> Option<usize> {
        let mut pool = self.pool();
        if starting {
            pool.starting -= 1;
        }
        if self.is_shutting_down() {
            pool.threads -= 1;
            drop(pool);
            self.pool_changed.notify_all();
            return None;
        }
        let count = pool.accepting.len();
        pool.rotation = pool.rotation.wrapping_add(1);
        let start = pool.rotation;
        let index = (0..count)
            .map(|i| (start + i) % count)
            .min_by_key(|&i| pool.accepting[i])?;
        pool.accepting[index] += 1;
        Some(index)
    }

    /// A thread came back from `accept` with a failure.
    fn end_accept(&self, index: usize) {
        self.pool().accepting[index] -= 1;
    }

    /// A thread came back from `accept` with a connection. Returns how many threads to start
    /// (counted in already): none while other threads wait on that listener; else as many as
    /// there are now, at most `GROWTH_STEP`, up to `--max-connections`. Growing by more than one
    /// matters when hundreds of clients connect at once: each new thread waits its turn on a
    /// busy CPU before it reaches `accept`, and a chain of one new thread per client would make
    /// the last client wait for hundreds of those turns. The cap keeps the threads left idle
    /// after a burst (they end after `THREAD_KEEP`) to a few.
    fn end_accept_and_grow(&self, index: usize) -> usize {
        let mut pool = self.pool();
        pool.accepting[index] -= 1;
        if pool.accepting[index] > 0 || pool.starting > 0 {
            return 0;
        }
        let grow = pool
            .threads
            .min(GROWTH_STEP)
            .min(self.max_connections - pool.threads);
        if grow > 0 {
            pool.threads += grow;
            pool.starting += grow;
            return grow;
        }
        if pool.accepting.iter().all(|&n| n == 0) {
            // Said once at warn: under sustained load this happens for every new client.
            if pool.paused_before {
                log::debug!("--max-connections reached: accepting paused");
            } else {
                log::warn!(
                    "{} connections open (--max-connections): accepting paused until one closes",
                    self.max_connections
                );
                pool.paused_before = true;
            }
        }
        0
    }

    /// A thread's `accept` timed out after it waited `idle` in all. It ends (returns true) once
    /// it has waited `THREAD_KEEP`, unless it is the last one waiting on its listener.
    fn end_accept_idle(&self, index: usize, idle: Duration) -> bool {
        let mut pool = self.pool();
        pool.accepting[index] -= 1;
        if idle < THREAD_KEEP || pool.accepting[index] == 0 {
            return false;
        }
        pool.threads -= 1;
        true
    }

    /// Out of descriptors: backend connections idle in the pools have taken the clients'
    /// share, so some are closed and accepting goes on at once. With none idle (or out of
    /// kernel memory), this thread pauses until a connection closes or for a moment, so clients
    /// wait in the listen queue instead of being accepted and dropped. Other failures concern
    /// one client that gave up while queued, and accepting goes on.
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

    /// Lists an accepted connection among the open ones, so shutdown can reach it.
    fn register(&self, stream: &TcpStream, state: &Arc<ConnectionState>) -> u64 {
        let mut open = self.open();
        open.next_id += 1;
        let id = open.next_id;
        open.by_id.insert(
            id,
            OpenConnection {
                fd: stream.as_raw_fd(),
                state: Arc::clone(state),
            },
        );
        id
    }

    /// The client's stream: the socket itself, or a TLS connection over it once the handshake
    /// is done (within `--client-timeout` of `accepted`). A failed handshake gives the socket
    /// back (to be closed after `finish`).
    fn client_stream(
        &self,
        lb: &LoadBalancer,
        socket: TcpStream,
        tls: Option<&Arc<ServerConfig>>,
        accepted: Instant,
        peer: SocketAddr,
    ) -> Result<ClientStream, TcpStream> {
        match tls {
            None => Ok(ClientStream::Plain(socket)),
            Some(config) => self.tls_handshake(lb, socket, config, accepted, peer),
        }
    }

    /// The TLS half of [`Shared::client_stream`], kept out of line: rustls's connection state
    /// is large while it is built on the stack, and inlined into the client thread's frame it
    /// made every thread, TLS or not, touch one more page of stack (4 KiB per idle client).
    #[inline(never)]
    fn tls_handshake(
        &self,
        lb: &LoadBalancer,
        socket: TcpStream,
        config: &Arc<ServerConfig>,
        accepted: Instant,
        peer: SocketAddr,
    ) -> Result<ClientStream, TcpStream> {
        let connection = match ServerConnection::new(Arc::clone(config)) {
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

    /// Forgets a closed connection and wakes whoever waits for the drain or for a descriptor.
    fn finish(&self, id: u64) {
        let mut open = self.open();
        open.by_id.remove(&id);
        let wake = open.waiting > 0;
        drop(open);
        // Waking costs a system call, so only when someone waits.
        if wake {
            self.closed.notify_all();
        }
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
