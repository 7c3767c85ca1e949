//! The server: accept a client, and a thread serves it.
//!
//! This is the chapter's loop, the whole of the thread-per-client model:
//!
//! ```text
//! loop {
//!     let (client, peer) = listener.accept()?;
//!     thread::spawn(move || serve_one(client, peer));
//! }
//! ```
//!
//! Here each client thread runs the loop itself (`Context::client_thread`) and goes back to
//! `accept` after serving its client: nothing is handed from one thread to another. The rest of
//! the folder, how threads are kept and reused and how they stop, a first reading skips:
//! `pool.rs` (which thread waits in `accept`, growth, idle threads ending), `socket.rs` (what
//! the kernel is told) and `drain.rs` (graceful stop).

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::{ServerConfig, ServerConnection, StreamOwned};

use crate::proxy::{ClientConnection, ConnectionState, LoadBalancer};
use crate::settings::{CpuScheduling, Settings};
use crate::stream::ClientStream;

mod drain;
mod pool;
mod socket;

pub use socket::wake_address;
pub(crate) use socket::LISTEN_BACKLOG;

use drain::Registry;
use pool::{FirstTasks, Sent, ThreadPool};
use socket::{listen_socket, pause_after_failed_accept, prepare_client_socket, schedule_as_batch};

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
    client_timeout: Duration,
    cpu_scheduling: CpuScheduling,
    /// The client threads, and which of them wait in `accept` (and the shutdown flag).
    pool: ThreadPool,
    /// Open client connections, so shutdown can find the idle ones.
    open: Registry,
}

/// What a client thread holds: the shared state, the listeners and the balancer.
#[derive(Clone)]
struct Context {
    shared: Arc<Shared>,
    listeners: Arc<[Listener]>,
    lb: Arc<LoadBalancer>,
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
            client_timeout: settings.client_timeout,
            cpu_scheduling: settings.cpu_scheduling,
            pool: ThreadPool::new(settings.max_connections.max(1))?,
            open: Registry::new(),
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
        let pool = &context.shared.pool;
        pool.listen_on(context.listeners.len());
        for _ in 0..context.listeners.len() {
            if pool.reserve_thread() {
                context.spawn(FirstTasks {
                    more_threads: 0,
                    accepted: None,
                });
            }
        }
        context.watch_until_shutdown();
        pool.wait_for_acceptors();
        for index in 0..context.listeners.len() {
            context.accept_queued(index);
        }
        context.shared.open.drain(&context.lb);
    }
}

impl Context {
    /// A client thread: accepts a connection, serves it, and goes back to `accept`, until
    /// shutdown or until it has waited `THREAD_KEEP` while others wait on the same listener.
    fn client_thread(&self, first: FirstTasks) {
        let mut sent = self.begin_thread(first);
        let pool = &self.shared.pool;
        let mut idle_since = Instant::now();
        while let Some(index) = pool.next_listener(std::mem::replace(&mut sent, Sent::No)) {
            match self.listeners[index].socket.accept() {
                // A connection accepted as shutdown begins is served all the same.
                Ok((stream, peer)) => {
                    pool.took_connection(index);
                    self.serve_one(stream, peer, index);
                    idle_since = Instant::now();
                }
                Err(err) if self.accept_failed(index, &err, idle_since) => return,
                Err(_) => {}
            }
        }
    }

    /// A new thread's first tasks, given by the pool: more threads to start, and a connection
    /// accepted for it at shutdown. Says whether the pool sent it to `accept` (a thread started
    /// for such a connection was not).
    fn begin_thread(&self, first: FirstTasks) -> Sent {
        if self.shared.cpu_scheduling == CpuScheduling::Batch {
            schedule_as_batch();
        }
        self.start_threads(first.more_threads);
        let Some((stream, peer, index)) = first.accepted else {
            return Sent::New;
        };
        self.serve_one(stream, peer, index);
        Sent::No
    }

    /// After `accept` on listener `index` gave no connection: whether the thread ends, having
    /// waited `THREAD_KEEP` while others wait on the same listener.
    fn accept_failed(&self, index: usize, err: &io::Error, idle_since: Instant) -> bool {
        let pool = &self.shared.pool;
        // The listener's timeout, `ACCEPT_TICK`: a look at the shutdown flag and the time this
        // thread has waited.
        if matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            return pool.end_accept_idle(index, idle_since.elapsed());
        }
        pool.end_accept(index);
        if let Some(pause) = pause_after_failed_accept(err, &self.lb) {
            self.shared.open.wait_for_a_close(pause);
        }
        false
    }

    /// Serves one connection accepted on listener `index`, then takes it off the list of open
    /// ones before closing its socket, so that shutdown never touches a descriptor number that
    /// was reused meanwhile.
    fn serve_one(&self, stream: TcpStream, peer: SocketAddr, index: usize) {
        let accepted = Instant::now();
        let shared = &self.shared;
        let lb = &self.lb;
        if let Err(err) = prepare_client_socket(&stream, shared.client_timeout) {
            return log::debug!("client {peer} gone before serving: {err}");
        }
        let state = Arc::new(ConnectionState::default());
        let id = shared.open.register(&stream, &state);
        let _open = lb.stats().open_connection();
        // The PROXY protocol header comes first, before TLS (`--accept-proxy`).
        let deadline = accepted + shared.client_timeout;
        let Some(peer) = lb.client_addresses().of_connection(&stream, peer, deadline) else {
            return shared.open.finish(id);
        };
        let tls = self.listeners[index].tls.as_ref();
        let stream = match shared.client_stream(lb, stream, tls, accepted, peer) {
            Ok(stream) => {
                let shutdown = shared.pool.shutdown_flag();
                let mut connection = ClientConnection::new(lb, stream, peer, &state, shutdown);
                contain_panic(peer, || connection.serve());
                connection.into_stream()
            }
            // A failed TLS handshake gave the socket back.
            Err(socket) => ClientStream::Plain(socket),
        };
        shared.open.finish(id);
        drop(stream);
    }
}

/// Runs `serve`, and when it panics, logs it and goes on: a panic unwinds only what the request
/// owned, the connection itself survives it, and the server goes on.
fn contain_panic(peer: SocketAddr, serve: impl FnOnce()) {
    if panic::catch_unwind(AssertUnwindSafe(serve)).is_err() {
        // The panic message was already printed by the panic hook.
        log::error!("the thread serving {peer} panicked; its connection was closed");
    }
}

impl ShutdownHandle {
    /// Begins a graceful shutdown: the server stops accepting and `serve` returns once requests
    /// in flight are done (ten seconds at most).
    pub fn shutdown(&self) {
        self.shared.pool.begin_shutdown();
        self.shared.open.wake_all();
        self.shared.pool.ring_bell();
    }
}

impl Shared {
    /// The client's stream: the socket itself, or a TLS connection over it once the handshake
    /// is done (within `--client-timeout` of `accepted`). Each thread performs its own client's
    /// handshake, bounded as a whole, so a client that never finishes it holds a thread for
    /// that long at most. A failed handshake gives the socket back (to be closed after `finish`).
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
}
