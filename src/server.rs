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
//! than a whole keep-alive request: a few wait in `accept`, the rest on standby, and they end
//! after a while unused. The pool grows only when connections would otherwise wait in the
//! listen queue for more than a millisecond (`Context::watch_until_shutdown`), so that under
//! many short connections a thread that finishes one finds the next already queued and takes
//! it without going to sleep. `--max-connections`
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
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use rustls::{ServerConfig, ServerConnection, StreamOwned};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::descriptors;
use crate::proxy::{ClientConnection, ConnectionState, LoadBalancer};
use crate::settings::{CpuScheduling, Settings};
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

/// The most threads the pool grows by at once where the kernel does not say how many
/// connections wait in the listen queue (see `Context::grow`).
const GROWTH_STEP: usize = 16;

/// How often the pool looks at a listener that has no thread in `accept`.
const WATCH_TICK: Duration = Duration::from_millis(2);

/// Looks in a row at empty listen queues after which the pool stops looking and waits in `poll`
/// for a connection to arrive: keep-alive clients holding every thread would otherwise wake it
/// 500 times a second for nothing.
const QUIET_TICKS: u32 = 8;

/// How long connections may wait in the listen queue, by the pool's estimate, before it grows.
const QUEUE_WAIT: Duration = Duration::from_millis(1);

/// Threads coming back from a connection that may wait in `accept` on one listener; the others
/// wait on standby until the pool needs them. More than one, so that a short lull in arrivals
/// does not send the threads that keep up with them to standby.
const ACCEPTORS: usize = 4;

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
    cpu_scheduling: CpuScheduling,
    /// Open client connections, so shutdown can find the idle ones.
    open: Mutex<Connections>,
    /// Signalled whenever a connection closes (or shutdown begins).
    closed: Condvar,
    /// The client threads, and which of them wait in `accept`.
    pool: Mutex<Pool>,
    /// Signalled when shutdown begins, when a thread leaves the pool during shutdown, and when a
    /// listener is left without an acceptor while nobody watched.
    pool_changed: Condvar,
    /// Signalled to call standby threads back to `accept` (and at shutdown).
    standby: Condvar,
    /// Wakes the thread running `serve` from `poll` (see `Context::wait_for_a_connection`).
    bell: Bell,
}

/// A socket pair whose one end the thread running `serve` polls beside the listeners, so that
/// writing a byte to the other wakes it.
struct Bell {
    ringer: UnixStream,
    ear: UnixStream,
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
    /// For each listener, the connections accepted since the pool last looked.
    accepted: Vec<usize>,
    /// Idle threads waiting on standby.
    standby: usize,
    /// Standby threads called back to `accept` that have not got there yet.
    called: usize,
    /// Whether the thread running `serve` watches for a listener left without an acceptor (it
    /// sleeps until told otherwise).
    watching: bool,
    /// Whether it waits in `poll` for a connection (the bell wakes it).
    polling: bool,
    /// Threads started to accept that have not reached `accept` yet: when the pool grows, they
    /// count as on their way to the connections queued.
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

/// What a client thread does next.
enum Step {
    /// Wait in `accept` on the listener of that index.
    Accept(usize),
    /// Wait on standby: enough threads wait in `accept`.
    Standby,
    /// End: shutdown began.
    Leave,
}

/// Whether the pool sent a thread to `accept`, rather than the thread coming back by itself.
#[derive(PartialEq)]
enum Sent {
    No,
    /// A thread just started (counted among the `starting` ones).
    New,
    /// A standby thread called back.
    Called,
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
            cpu_scheduling: settings.cpu_scheduling,
            open: Mutex::new(Connections::default()),
            closed: Condvar::new(),
            pool: Mutex::new(Pool::default()),
            pool_changed: Condvar::new(),
            standby: Condvar::new(),
            bell: Bell::new()?,
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
        {
            let mut pool = context.shared.pool();
            pool.accepting = vec![0; context.listeners.len()];
            pool.accepted = vec![0; context.listeners.len()];
        }
        for _ in 0..context.listeners.len() {
            if context.shared.reserve_thread() {
                context.spawn(FirstTasks {
                    more_threads: 0,
                    accepted: None,
                });
            }
        }
        context.watch_until_shutdown();
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
        if self.shared.cpu_scheduling == CpuScheduling::Batch {
            schedule_as_batch();
        }
        // Each thread started here starts half of those left in turn, so that hundreds start
        // in a few rounds rather than one after another.
        let mut left = first.more_threads;
        while left > 0 {
            let share = left / 2;
            self.spawn(FirstTasks {
                more_threads: share,
                accepted: None,
            });
            left -= 1 + share;
        }
        // A new thread, or one called back from standby, was sent to `accept` by the pool.
        let mut sent = if first.accepted.is_none() {
            Sent::New
        } else {
            Sent::No
        };
        if let Some((stream, peer, index)) = first.accepted {
            self.serve_one(stream, peer, index);
        }
        let mut idle_since = Instant::now();
        loop {
            let index = match self
                .shared
                .next_step(std::mem::replace(&mut sent, Sent::No))
            {
                Step::Accept(index) => index,
                Step::Standby if self.shared.stand_by() => {
                    sent = Sent::Called;
                    continue;
                }
                Step::Standby | Step::Leave => return,
            };
            match self.listeners[index].socket.accept() {
                // A connection accepted as shutdown begins is served all the same.
                Ok((stream, peer)) => {
                    self.shared.took_connection(index);
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

    /// The thread running `serve`, until shutdown: while a listener has no thread in `accept`,
    /// looks every `WATCH_TICK` at its listen queue and grows the pool when connections would
    /// wait there longer than `QUEUE_WAIT` (see `Context::grow`).
    ///
    /// The pool does not grow the moment its last waiting thread takes a connection. Under a
    /// load of short connections the threads that finish one come back to `accept` within
    /// microseconds and find the next connection already in the listen queue, so they take it
    /// without sleeping, the way an event loop finds several sockets ready at once; a pool that
    /// always kept a thread waiting in `accept` made every new connection wake a sleeping thread
    /// instead (2.1 context switches per `Connection: close` request then, 1.2 now). Nothing on
    /// a connection's path wakes this thread: it is told once when a listener loses its last
    /// acceptor while it was not watching, and then ticks until every listener has one again.
    /// When keep-alive clients hold every thread, that could be for hours with nothing queued:
    /// after `QUIET_TICKS` empty looks it waits in `poll` for the next connection instead.
    fn watch_until_shutdown(&self) {
        let mut pool = self.shared.pool();
        let mut quiet_ticks = 0;
        while !self.shared.is_shutting_down() {
            let mut watching = false;
            let mut quiet = true;
            for index in 0..self.listeners.len() {
                let accepted = std::mem::take(&mut pool.accepted[index]);
                if pool.accepting[index] > 0 {
                    continue;
                }
                watching = true;
                let queued = queued_connections(&self.listeners[index].socket);
                quiet &= queued == Some(0);
                let new = self.grow(&mut pool, queued, accepted);
                if new > 0 {
                    // Started without the lock: a thread that cannot start gives its place
                    // back, which takes the lock.
                    drop(pool);
                    self.spawn(FirstTasks {
                        more_threads: new - 1,
                        accepted: None,
                    });
                    pool = self.shared.pool();
                }
            }
            pool.watching = watching;
            quiet_ticks = if watching && quiet {
                quiet_ticks + 1
            } else {
                0
            };
            pool = if quiet_ticks >= QUIET_TICKS {
                self.wait_for_a_connection(pool)
            } else if watching {
                self.shared
                    .pool_changed
                    .wait_timeout(pool, WATCH_TICK)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            } else {
                self.shared
                    .pool_changed
                    .wait(pool)
                    .unwrap_or_else(|e| e.into_inner())
            };
        }
    }

    /// Waits in `poll` until a connection arrives on a listener that no thread accepts on, for
    /// `ACCEPT_TICK` at most. The bell cuts it short when another listener loses its last
    /// acceptor meanwhile, and at shutdown.
    fn wait_for_a_connection<'a>(&'a self, mut pool: MutexGuard<'a, Pool>) -> MutexGuard<'a, Pool> {
        let mut fds: Vec<libc::pollfd> = (0..self.listeners.len())
            .filter(|&index| pool.accepting[index] == 0)
            .map(|index| self.listeners[index].socket.as_raw_fd())
            .chain([self.shared.bell.ear.as_raw_fd()])
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        pool.polling = true;
        drop(pool);
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures, alive for the call,
        // and the descriptors in it stay open meanwhile (listeners and bell live as long as
        // `self`).
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                ACCEPT_TICK.as_millis() as libc::c_int,
            );
        }
        self.shared.bell.silence();
        let mut pool = self.shared.pool();
        pool.polling = false;
        pool
    }

    /// Sends threads to `accept` on a listener that has none, for the connections waiting in its
    /// queue (`queued`, when the kernel says) that the threads would not take within
    /// `QUEUE_WAIT` at the rate they took them during the last tick (`accepted`): all of them
    /// when every thread is busy with slow requests or keep-alive clients (none accepted), none
    /// while the threads keep up. Threads already on their way to `accept` count. Standby
    /// threads go first, then new ones, up to `--max-connections`. Returns how many new threads
    /// to start (counted in already).
    fn grow(
        &self,
        pool: &mut MutexGuard<'_, Pool>,
        queued: Option<usize>,
        accepted: usize,
    ) -> usize {
        let queued = queued.unwrap_or_else(|| pool.threads.min(GROWTH_STEP));
        // What the threads accepted during the tick, they take off the queue within
        // `QUEUE_WAIT`; a thread for each connection beyond that.
        let drained = accepted * QUEUE_WAIT.as_micros() as usize / WATCH_TICK.as_micros() as usize;
        // Threads still starting, or called back from standby, are on their way to `accept`.
        let on_the_way = pool.starting + pool.called;
        let wanted = queued.saturating_sub(drained + on_the_way);
        if wanted == 0 {
            return 0;
        }
        let call = wanted.min(pool.standby - pool.called);
        pool.called += call;
        for _ in 0..call {
            self.shared.standby.notify_one();
        }
        let new = (wanted - call).min(self.shared.max_connections - pool.threads);
        pool.threads += new;
        pool.starting += new;
        if call + new == 0 && pool.accepting.iter().all(|&n| n == 0) {
            // Said once at warn: under sustained load this happens for every new client.
            if pool.paused_before {
                log::debug!("--max-connections reached: accepting paused");
            } else {
                log::warn!(
                    "{} connections open (--max-connections): accepting paused until one closes",
                    self.shared.max_connections
                );
                pool.paused_before = true;
            }
        }
        new
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
        // Stops listening now rather than at exit (on Linux `shutdown` does that to a listening
        // socket): a client connecting while requests in flight finish is refused at once, as
        // by nginx, instead of waiting in a queue nobody takes and being reset at exit.
        let _ = SockRef::from(listener).shutdown(Shutdown::Both);
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

/// How many connections wait in `listener`'s queue, as the kernel counts them (`TCP_INFO` of a
/// listening socket gives its accept queue's length).
#[cfg(target_os = "linux")]
fn queued_connections(listener: &TcpListener) -> Option<usize> {
    // SAFETY: `tcp_info` is plain data, valid when zeroed.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, alive for the call.
    let done = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (done == 0).then_some(info.tcpi_unacked as usize)
}

/// Elsewhere the queue's length is not known: the pool grows by steps.
#[cfg(not(target_os = "linux"))]
fn queued_connections(_listener: &TcpListener) -> Option<usize> {
    None
}

/// Tells the kernel's scheduler that the calling thread is batch work (`SCHED_BATCH`): woken by
/// a packet, it no longer preempts the program running on that CPU but waits until that one
/// sleeps or its time slice ends. Every keep-alive request wakes a client thread twice; with
/// as many runnable threads as connections, preempting on each wake-up interrupts wrk, the
/// backends and the other client threads before they have handled what they have ready, so the
/// machine switches more and batches less. Not preempting lets them finish their batch first,
/// as an event loop does on its own. The price is latency when the CPUs are busy with other
/// programs (see `--cpu-scheduling` in the README).
#[cfg(target_os = "linux")]
fn schedule_as_batch() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is alive for the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        log::debug!(
            "client thread stays in the normal scheduling class: {}",
            io::Error::last_os_error()
        );
    }
}

/// Elsewhere threads keep the system's usual scheduling.
#[cfg(not(target_os = "linux"))]
fn schedule_as_batch() {}

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
        self.shared.standby.notify_all();
        self.shared.closed.notify_all();
        self.shared.bell.ring();
    }
}

impl Bell {
    fn new() -> io::Result<Bell> {
        let (ringer, ear) = UnixStream::pair()?;
        ringer.set_nonblocking(true)?;
        ear.set_nonblocking(true)?;
        Ok(Bell { ringer, ear })
    }

    /// Wakes the thread polling the ear (or makes its next `poll` return at once). A full
    /// buffer means it is already ringing.
    fn ring(&self) {
        let _ = (&self.ringer).write(&[1]);
    }

    /// Reads whatever rang, so that the next `poll` sleeps.
    fn silence(&self) {
        let mut rung = [0; 64];
        while matches!((&self.ear).read(&mut rung), Ok(n) if n > 0) {}
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

    /// What a thread does next: wait in `accept` on the listener where fewest threads wait
    /// (taking turns among equals, so that no listener is left without), unless `ACCEPTORS`
    /// already wait on each and the pool did not send it; then standby. Once shutdown began,
    /// the thread leaves the pool.
    fn next_step(&self, sent: Sent) -> Step {
        let mut pool = self.pool();
        if sent == Sent::New {
            pool.starting -= 1;
        }
        if self.is_shutting_down() {
            pool.threads -= 1;
            drop(pool);
            self.pool_changed.notify_all();
            return Step::Leave;
        }
        let count = pool.accepting.len();
        pool.rotation = pool.rotation.wrapping_add(1);
        let start = pool.rotation;
        let Some(index) = (0..count)
            .map(|i| (start + i) % count)
            .min_by_key(|&i| pool.accepting[i])
        else {
            return Step::Leave;
        };
        if pool.accepting[index] >= ACCEPTORS && sent == Sent::No {
            return Step::Standby;
        }
        pool.accepting[index] += 1;
        Step::Accept(index)
    }

    /// Waits on standby until the pool calls this thread back to `accept` (returns true), for
    /// `THREAD_KEEP` at most: then, or at shutdown, the thread leaves the pool.
    fn stand_by(&self) -> bool {
        let deadline = Instant::now() + THREAD_KEEP;
        let mut pool = self.pool();
        pool.standby += 1;
        loop {
            if pool.called > 0 {
                pool.called -= 1;
                pool.standby -= 1;
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.is_shutting_down() {
                pool.standby -= 1;
                pool.threads -= 1;
                drop(pool);
                self.pool_changed.notify_all();
                return false;
            }
            pool = self
                .standby
                .wait_timeout(pool, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// A thread came back from `accept` with a failure.
    fn end_accept(&self, index: usize) {
        self.pool().accepting[index] -= 1;
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

    /// A thread came back from `accept` with a connection. When it was the last one waiting
    /// there, the listener has no acceptor until a thread comes back from a connection; the
    /// thread running `serve` is told to watch (`Context::watch_until_shutdown`).
    fn took_connection(&self, index: usize) {
        let mut pool = self.pool();
        pool.accepting[index] -= 1;
        pool.accepted[index] += 1;
        if pool.accepting[index] > 0 {
            return;
        }
        if !pool.watching {
            pool.watching = true;
            drop(pool);
            self.pool_changed.notify_all();
        } else if pool.polling {
            // It polls only the listeners that had no acceptor then.
            pool.polling = false;
            drop(pool);
            self.bell.ring();
        }
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
