//! Backends: the servers behind the balancer, each with its statistics, its health and a pool of
//! idle keep-alive connections.
//!
//! The pool is shared by all client threads rather than kept per thread: a connection freed by
//! one client is reused by the next request of any client, which keeps the number of backend
//! connections near the number of requests in flight. (Measured on a prototype of this design, a
//! shared pool gave a p99 of 14 ms at 256 clients where per-thread caches gave 99 ms.) Opening a
//! connection per request, as the chapter does, costs a TCP handshake each time and halves
//! throughput or worse.

use std::collections::VecDeque;
use std::io;
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use socket2::SockRef;

use crate::admin_state::AdminState;
use crate::health::{Health, Transition};
use crate::limit::ConnectionLimit;
use crate::slow_start::Ramp;
use crate::stats::events::EventKind;
use crate::stats::BackendStats;

/// Idle connections kept per backend; more are closed when they come back.
const MAX_IDLE_CONNECTIONS: usize = 256;

/// A pooled connection idle longer than this is closed rather than reused: many servers close
/// idle keep-alive connections after a while, and a connection they already closed would cost
/// a retry.
const MAX_IDLE_TIME: Duration = Duration::from_secs(30);

/// New connections to one backend that may be in their first exchange at once before a request
/// that finds no idle connection waits for one to come back (see [`Backend::connection`]).
/// Such a connection is *opening*: until it has answered, nothing says the backend even
/// accepted it.
const MAX_OPENING: usize = 4;

/// How long such a request waits before it opens a connection all the same.
const OPENING_WAIT: Duration = Duration::from_millis(250);

/// How long a new connection counts as opening at most: a first exchange longer than this is a
/// slow request (a long poll, a download), not a backend that has yet to accept the connection.
const OPENING_TIME: Duration = Duration::from_secs(1);

/// One server behind the balancer.
#[derive(Debug)]
pub struct Backend {
    name: String,
    addr: SocketAddr,
    /// The weight balancing uses: the configured one, unless the operator set another at run
    /// time (0 to 256). Atomics, so that a reload or an admin write keeps the backend (and its
    /// statistics).
    weight: AtomicU32,
    /// The weight the flags or the configuration file gave (at least 1).
    configured_weight: AtomicU32,
    /// The [`AdminState`] the operator set, as a byte.
    admin: AtomicU8,
    /// A backup (`--backup`): it takes requests only while no primary backend can.
    backup: bool,
    /// Slow start's ramp after the backend comes back into rotation.
    ramp: Ramp,
    stats: BackendStats,
    health: Health,
    /// The most requests in flight at once, and the queue of those waiting for room.
    limit: ConnectionLimit,
    pool: Mutex<Pool>,
    /// How long a request waits for its turn to open a connection: `OPENING_WAIT` (a test
    /// lengthens it, so that what it checks does not depend on the machine's speed).
    opening_wait: Duration,
}

/// Idle keep-alive connections, the requests waiting for one, and the new connections still in
/// their first exchange.
#[derive(Debug, Default)]
struct Pool {
    idle: Vec<IdleConnection>,
    /// First come, first served: a connection given back while requests wait goes to the one
    /// waiting longest, never to a request that has just arrived (as HAProxy's server queue).
    /// Otherwise the thread that gives a connection back, whose client's next request follows
    /// within microseconds, takes it again before the woken request runs, and a waiting
    /// request can be passed over until it gives up.
    queue: VecDeque<Waiter>,
    next_ticket: u64,
    /// When each opening connection was opened, oldest first; forgotten after `OPENING_TIME`.
    opening: Vec<Instant>,
}

/// A request in the queue, and what it was given while it slept.
#[derive(Debug)]
struct Waiter {
    ticket: u64,
    /// Whether a turn to open a connection is of use to it (not to one out of descriptors).
    takes_turn: bool,
    wake: Arc<Condvar>,
    given: Option<Given>,
}

#[derive(Debug)]
enum Given {
    Connection(TcpStream),
    /// A turn to open a connection, already counted among the opening ones.
    Turn,
}

/// A request's place in its backend's queue; leaving it (dropping it) passes on whatever it
/// was given too late.
pub struct Place<'a> {
    backend: &'a Backend,
    ticket: u64,
}

#[derive(Debug)]
struct IdleConnection {
    stream: TcpStream,
    since: Instant,
}

/// A connection to a backend, and whether it came from the idle pool (so the backend may have
/// closed it meanwhile).
#[derive(Debug)]
pub struct Connection {
    /// The socket, with timeouts already set.
    pub stream: TcpStream,
    /// True when taken from the idle pool, false when freshly connected.
    pub reused: bool,
    /// True when counted among the backend's opening connections, until the
    /// [`FirstExchange`] made of it is dropped.
    pub opening: bool,
}

impl Connection {
    /// For a pooled connection: whether the backend closed it (or sent bytes nobody asked for)
    /// while it sat idle, as a peek that does not wait sees it. A request that cannot be sent
    /// twice (a POST with its body) looks before it goes out on a pooled connection: one the
    /// backend closed when its keep-alive timeout ran out would lose the request, where a
    /// fresh connection delivers it. A backend closing at the very moment is still possible.
    pub fn closed_while_idle(&self) -> bool {
        let mut byte = [MaybeUninit::uninit()];
        let peeked = SockRef::from(&self.stream)
            .recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT);
        // Nothing to read yet is the only sign of a connection still open and quiet.
        !matches!(peeked, Err(err) if err.kind() == io::ErrorKind::WouldBlock)
    }
}

/// What a request that needs a connection to a backend gets from its pool.
enum Turn {
    /// An idle connection to reuse.
    Idle(TcpStream),
    /// Its turn to open a new one: counted among the opening ones, or not when it waited
    /// `OPENING_WAIT` in vain.
    Open { counted: bool },
}

/// A new connection counted among its backend's opening ones until this is dropped, when its
/// first exchange ends: its answer relayed and the connection back in the pool, or failed.
pub struct FirstExchange<'a>(Option<&'a Backend>);

impl<'a> FirstExchange<'a> {
    /// For a connection of `backend`: counts nothing unless the connection is `opening`.
    pub fn new(backend: &'a Backend, connection: &Connection) -> Self {
        FirstExchange(connection.opening.then_some(backend))
    }
}

impl Drop for FirstExchange<'_> {
    fn drop(&mut self) {
        if let Some(backend) = self.0 {
            backend.first_exchange_ended();
        }
    }
}

impl Backend {
    /// A backend called `name` (as the user wrote it) at `addr`, with a weight of at least 1.
    pub fn new(name: String, addr: SocketAddr, weight: u32) -> Self {
        Backend {
            name,
            addr,
            weight: AtomicU32::new(weight.max(1)),
            configured_weight: AtomicU32::new(weight.max(1)),
            admin: AtomicU8::new(AdminState::Ready.as_byte()),
            backup: false,
            ramp: Ramp::default(),
            stats: BackendStats::default(),
            health: Health::default(),
            limit: ConnectionLimit::default(),
            pool: Mutex::new(Pool::default()),
            opening_wait: OPENING_WAIT,
        }
    }

    /// The same backend as a backup (`--backup`).
    pub fn as_backup(mut self) -> Self {
        self.backup = true;
        self
    }

    /// Whether it is a backup, used only while no primary backend can take requests.
    pub fn is_backup(&self) -> bool {
        self.backup
    }

    /// Slow start's ramp: started when the backend comes back into rotation.
    pub fn ramp(&self) -> &Ramp {
        &self.ramp
    }

    /// The same backend with at most `max` requests in flight at once (`--backend-max-conns`,
    /// `max_conns`), or no limit.
    pub fn with_max_conns(self, max: Option<u32>) -> Self {
        self.limit.set_max(max);
        self
    }

    /// The address as the user wrote it, e.g. `127.0.0.1:8001`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The resolved socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The backend's relative share of traffic for weighted algorithms; 0 takes no new
    /// request (see [`crate::eligibility`]).
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// The weight the configuration gave, whatever the operator set since.
    pub fn configured_weight(&self) -> u32 {
        self.configured_weight.load(Ordering::Relaxed)
    }

    /// Changes the configured weight (a reload that changes it), and the weight in use with it.
    pub fn set_weight(&self, weight: u32) {
        self.configured_weight
            .store(weight.max(1), Ordering::Relaxed);
        self.weight.store(weight.max(1), Ordering::Relaxed);
    }

    /// Sets the weight in use at run time (the admin API), 0 to
    /// [`crate::admin_state::MAX_WEIGHT`]; the configured weight stays, for the next reload
    /// that changes it.
    pub fn set_run_time_weight(&self, weight: u32) {
        self.weight.store(weight, Ordering::Relaxed);
    }

    /// What the operator last said about this backend.
    pub fn admin_state(&self) -> AdminState {
        AdminState::from_byte(self.admin.load(Ordering::Acquire))
    }

    /// Sets the administrative state and returns the one before. Leaving ready closes the idle
    /// pooled connections (a backend shutting down gracefully waits for its keep-alive
    /// connections to close); leaving maintenance with active checks on holds the backend out
    /// until a check passes, since nothing checked it meanwhile.
    pub fn set_admin_state(&self, state: AdminState) -> AdminState {
        let before = AdminState::from_byte(self.admin.swap(state.as_byte(), Ordering::AcqRel));
        if before == AdminState::Maint && state != AdminState::Maint {
            self.health.hold_until_checked();
        }
        if state != AdminState::Ready {
            self.close_idle();
        } else if before != AdminState::Ready {
            self.ramp.start();
        }
        before
    }

    /// Whether `other` is the same backend: the same address, written the same way. A reload
    /// keeps such a backend, with its statistics, health and pooled connections.
    pub fn is_same(&self, other: &Backend) -> bool {
        self.addr == other.addr && self.name == other.name && self.backup == other.backup
    }

    /// The backend's counters.
    pub fn stats(&self) -> &BackendStats {
        &self.stats
    }

    /// The backend's connection limit and its queue.
    pub fn limit(&self) -> &ConnectionLimit {
        &self.limit
    }

    /// The backend's health, as active and passive checks see it.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Whether the backend is currently considered healthy.
    pub fn is_healthy(&self) -> bool {
        self.health.is_healthy()
    }

    /// An idle pooled connection if there is one, else a new connection (when it is this
    /// request's turn to open one: see `idle_or_turn`).
    pub fn connection(
        &self,
        connect_timeout: Duration,
        io_timeout: Duration,
    ) -> io::Result<Connection> {
        let opening = match self.idle_or_turn() {
            Turn::Idle(stream) => {
                return Ok(Connection {
                    stream,
                    reused: true,
                    opening: false,
                })
            }
            Turn::Open { counted } => counted,
        };
        match self.connect(connect_timeout, io_timeout) {
            Ok(stream) => Ok(Connection {
                stream,
                reused: false,
                opening,
            }),
            Err(err) => {
                if opening {
                    self.first_exchange_ended();
                }
                Err(err)
            }
        }
    }

    /// An idle connection, or this request's turn to open one.
    ///
    /// A thread per client means a burst of new clients asks for as many new backend
    /// connections at the same moment, where an event loop opens them one after another. A
    /// backend that accepts one connection per turn of its own event loop (nginx does, without
    /// `multi_accept`) then leaves requests waiting in its accept queue for hundreds of
    /// milliseconds, while connections come back to this pool every fraction of one. So once
    /// `MAX_OPENING` new connections to this backend are in their first exchange, a request
    /// waits for a pooled connection to come back or for one of them to end it, for
    /// `OPENING_WAIT` at most, and then opens its own.
    fn idle_or_turn(&self) -> Turn {
        let mut pool = self.pool();
        if let Some(stream) = pool.take_idle() {
            return Turn::Idle(stream);
        }
        let now = Instant::now();
        let forgotten = pool
            .opening
            .iter()
            .take_while(|&&opened| now.duration_since(opened) >= OPENING_TIME)
            .count();
        pool.opening.drain(..forgotten);
        if pool.opening.len() < MAX_OPENING {
            pool.opening.push(now);
            return Turn::Open { counted: true };
        }
        let place = self.join_queue(&mut pool, true);
        drop(pool);
        match place.wait(self.opening_wait) {
            Some(Given::Connection(stream)) => Turn::Idle(stream),
            Some(Given::Turn) => Turn::Open { counted: true },
            None => Turn::Open { counted: false },
        }
    }

    /// A place at the back of the queue, for a request that waits for a connection to come back
    /// (and for a turn to open one, if it `takes_turn`).
    fn join_queue(&self, pool: &mut Pool, takes_turn: bool) -> Place<'_> {
        let ticket = pool.next_ticket;
        pool.next_ticket += 1;
        pool.queue.push_back(Waiter {
            ticket,
            takes_turn,
            wake: Arc::new(Condvar::new()),
            given: None,
        });
        Place {
            backend: self,
            ticket,
        }
    }

    /// A place in the queue for a request out of descriptors: only a connection given back
    /// helps it.
    pub fn queue_for_connection(&self) -> Place<'_> {
        self.join_queue(&mut self.pool(), false)
    }

    /// An opening connection's first exchange ended (or its connect failed): it no longer
    /// counts, and the first request waiting for a turn gets it.
    fn first_exchange_ended(&self) {
        let mut pool = self.pool();
        // Ages are approximate: the oldest entry goes, whichever connection it was.
        if !pool.opening.is_empty() {
            pool.opening.remove(0);
        }
        let Some(waiter) = pool
            .queue
            .iter_mut()
            .find(|w| w.takes_turn && w.given.is_none())
        else {
            return;
        };
        waiter.given = Some(Given::Turn);
        let wake = Arc::clone(&waiter.wake);
        pool.opening.push(Instant::now());
        drop(pool);
        wake.notify_one();
    }

    /// Opens a new connection, with `io_timeout` on every read and write.
    pub fn connect(
        &self,
        connect_timeout: Duration,
        io_timeout: Duration,
    ) -> io::Result<TcpStream> {
        let stream = TcpStream::connect_timeout(&self.addr, connect_timeout)?;
        // Small requests and responses must not wait for Nagle's algorithm to batch them.
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(io_timeout))?;
        stream.set_write_timeout(Some(io_timeout))?;
        Ok(stream)
    }

    /// Returns a connection whose last response was complete, for the next request to reuse:
    /// the request waiting longest, if any.
    pub fn put_idle(&self, stream: TcpStream) {
        let mut pool = self.pool();
        if let Some(waiter) = pool.queue.iter_mut().find(|w| w.given.is_none()) {
            waiter.given = Some(Given::Connection(stream));
            let wake = Arc::clone(&waiter.wake);
            drop(pool);
            wake.notify_one();
            return;
        }
        if pool.idle.len() < MAX_IDLE_CONNECTIONS && self.admin_state() == AdminState::Ready {
            pool.idle.push(IdleConnection {
                stream,
                since: Instant::now(),
            });
        }
    }

    /// Closes the idle connections unused for too long: the backend may have closed them, and
    /// each holds a descriptor.
    pub fn close_expired_idle(&self) {
        let mut pool = self.pool();
        let fresh_from = pool
            .idle
            .iter()
            .position(|c| c.since.elapsed() < MAX_IDLE_TIME)
            .unwrap_or(pool.idle.len());
        let expired: Vec<IdleConnection> = pool.idle.drain(..fresh_from).collect();
        drop(pool);
        drop(expired);
    }

    /// Closes every idle connection (used when a backend goes down).
    pub fn close_idle(&self) {
        let closed = std::mem::take(&mut self.pool().idle);
        drop(closed);
    }

    /// Closes the idle connection unused the longest, giving its descriptor back; false when
    /// none is idle.
    pub fn close_one_idle(&self) -> bool {
        let mut pool = self.pool();
        if pool.idle.is_empty() {
            return false;
        }
        let oldest = pool.idle.remove(0);
        drop(pool);
        drop(oldest);
        true
    }

    fn pool(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Pool {
    /// The most recently used idle connection that is not too old: the freshest one is the
    /// least likely to have been closed by the backend.
    fn take_idle(&mut self) -> Option<TcpStream> {
        let conn = self.idle.pop()?;
        if conn.since.elapsed() < MAX_IDLE_TIME {
            return Some(conn.stream);
        }
        // The newest is already too old, so all of them are (rare: the sweep closes them first).
        self.idle.clear();
        None
    }

    /// Takes this place's waiter out of the queue, with what it was given.
    fn leave(&mut self, ticket: u64) -> Option<Given> {
        let index = self.queue.iter().position(|w| w.ticket == ticket)?;
        self.queue.remove(index)?.given
    }
}

impl Place<'_> {
    /// Waits up to `timeout` for what this request was given, or for an idle connection put
    /// back before it joined the queue. Leaves the queue when something came.
    fn wait(&self, timeout: Duration) -> Option<Given> {
        let deadline = Instant::now() + timeout;
        let mut pool = self.backend.pool();
        loop {
            let waiter = pool.queue.iter().find(|w| w.ticket == self.ticket)?;
            if waiter.given.is_some() {
                return pool.leave(self.ticket);
            }
            let wake = Arc::clone(&waiter.wake);
            if let Some(stream) = pool.take_idle() {
                pool.leave(self.ticket);
                return Some(Given::Connection(stream));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            pool = wake
                .wait_timeout(pool, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// A connection given back to this backend within `timeout`, for a request out of
    /// descriptors; it keeps its place when none came.
    pub fn connection(&self, timeout: Duration) -> Option<TcpStream> {
        match self.wait(timeout)? {
            Given::Connection(stream) => Some(stream),
            Given::Turn => {
                self.backend.first_exchange_ended();
                None
            }
        }
    }
}

impl Drop for Place<'_> {
    /// Passes on what came after the request stopped waiting: it goes to the next in line.
    fn drop(&mut self) {
        let given = self.backend.pool().leave(self.ticket);
        match given {
            Some(Given::Connection(stream)) => self.backend.put_idle(stream),
            Some(Given::Turn) => self.backend.first_exchange_ended(),
            None => {}
        }
    }
}

/// Acts on a backend's health flipping: a backend that went down loses its pooled connections
/// (they likely lead nowhere), and the change is logged once, with how many backends are left,
/// as the chapter prints it: at warn when a backend goes (something is wrong), at info when it
/// comes back (nothing is). The same words go to the statistics page's events.
pub fn report_health(backends: &[Arc<Backend>], backend: &Backend, change: &Transition) {
    if change.healthy {
        backend.ramp().start();
    } else {
        backend.close_idle();
    }
    let healthy = backends.iter().filter(|b| b.is_healthy()).count();
    let (mark, verb) = match change.kind {
        _ if change.healthy => ("✅", "is back"),
        EventKind::Trial => ("❌", "stays out"),
        _ => ("❌", "is down"),
    };
    let message = format!(
        "backend {} {verb}: {}; {healthy}/{} backends healthy",
        backend.name(),
        change.reason,
        backends.len()
    );
    if change.healthy {
        log::info!("{mark} {message}");
    } else {
        log::warn!("{mark} {message}");
    }
    backend
        .stats()
        .push_event(backend.name(), change.kind, message);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::thread::JoinHandle;

    /// A pooled connection to a listener of the test's, put back `age` ago.
    fn idle_for(backend: &Backend, listener: &TcpListener, age: Duration) {
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        backend.pool().idle.push(IdleConnection {
            stream,
            since: Instant::now() - age,
        });
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// `MAX_OPENING` new connections of `backend`, each still in its first exchange.
    fn open_all_turns(backend: &Backend) -> Vec<Connection> {
        (0..MAX_OPENING)
            .map(|_| {
                let connection = backend.connection(TIMEOUT, TIMEOUT).unwrap();
                assert!(!connection.reused && connection.opening);
                connection
            })
            .collect()
    }

    #[test]
    fn once_enough_new_connections_are_opening_the_next_request_waits_then_opens_its_own() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let backend = Backend::new("b".into(), listener.local_addr().unwrap(), 1);
        let _opening = open_all_turns(&backend);
        let asked = Instant::now();
        let connection = backend.connection(TIMEOUT, TIMEOUT).unwrap();
        assert!(asked.elapsed() >= OPENING_WAIT, "it waited for its turn");
        assert!(!connection.reused && !connection.opening);
    }

    /// A backend of `listener` whose turns are all taken (the connections that took them), and a
    /// request already waiting for its turn, on a thread of its own. It would wait a minute
    /// before opening a connection all the same.
    fn a_request_waiting_for_its_turn(
        listener: &TcpListener,
    ) -> (Arc<Backend>, Vec<Connection>, JoinHandle<Connection>) {
        let mut backend = Backend::new("b".into(), listener.local_addr().unwrap(), 1);
        backend.opening_wait = Duration::from_secs(60);
        let backend = Arc::new(backend);
        let opening = open_all_turns(&backend);
        let waiter = {
            let backend = Arc::clone(&backend);
            std::thread::spawn(move || backend.connection(TIMEOUT, TIMEOUT).unwrap())
        };
        let deadline = Instant::now() + TIMEOUT;
        while backend.pool().queue.is_empty() && Instant::now() < deadline {
            std::thread::yield_now();
        }
        (backend, opening, waiter)
    }

    #[test]
    fn a_request_waiting_for_its_turn_takes_a_connection_put_back_meanwhile() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (backend, opening, waiter) = a_request_waiting_for_its_turn(&listener);
        let first = opening.into_iter().next().unwrap();
        // Its first exchange ends, and it goes back to the pool before it stops counting (as
        // the proxy does): the waiting request gets it.
        let first_exchange = FirstExchange::new(&backend, &first);
        backend.put_idle(first.stream);
        drop(first_exchange);
        let connection = waiter.join().unwrap();
        assert!(connection.reused, "the connection put back, not a new one");
    }

    #[test]
    fn a_connection_put_back_goes_to_the_waiting_request_not_to_the_next_to_ask() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (backend, opening, waiter) = a_request_waiting_for_its_turn(&listener);
        let first = opening.into_iter().next().unwrap();
        backend.put_idle(first.stream);
        // A request that asks now, before the waiting one has even woken, finds none idle.
        assert!(backend.pool().take_idle().is_none(), "handed to the waiter");
        assert!(waiter.join().unwrap().reused);
    }

    #[test]
    fn requests_out_of_descriptors_get_connections_first_come_first_served() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let backend = Backend::new("b".into(), listener.local_addr().unwrap(), 1);
        let first = backend.queue_for_connection();
        let second = backend.queue_for_connection();
        let stream = backend.connect(TIMEOUT, TIMEOUT).unwrap();
        let local = stream.local_addr().unwrap();
        backend.put_idle(stream);
        assert!(second.connection(Duration::ZERO).is_none(), "not its turn");
        assert_eq!(
            first.connection(TIMEOUT).unwrap().local_addr().unwrap(),
            local
        );
        // A connection given to a request that has stopped waiting goes to the next in line.
        let third = backend.queue_for_connection();
        backend.put_idle(backend.connect(TIMEOUT, TIMEOUT).unwrap());
        drop(second);
        drop(third);
        assert!(
            backend.pool().take_idle().is_some(),
            "back in the pool, not lost"
        );
    }

    #[test]
    fn a_first_exchange_ending_gives_a_waiting_request_its_turn() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (backend, opening, waiter) = a_request_waiting_for_its_turn(&listener);
        // The first connection's exchange ends (answered, or failed) without coming back.
        drop(FirstExchange::new(&backend, &opening[0]));
        let connection = waiter.join().unwrap();
        assert!(!connection.reused && connection.opening, "its own turn");
    }

    #[test]
    fn a_connection_unanswered_for_long_no_longer_counts_as_opening() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let backend = Backend::new("b".into(), listener.local_addr().unwrap(), 1);
        let long_ago = Instant::now() - OPENING_TIME - Duration::from_millis(1);
        backend.pool().opening = vec![long_ago; MAX_OPENING];
        let asked = Instant::now();
        let connection = backend.connection(TIMEOUT, TIMEOUT).unwrap();
        assert!(connection.opening, "a turn of its own at once");
        assert!(asked.elapsed() < OPENING_WAIT);
        assert_eq!(backend.pool().opening.len(), 1);
    }

    #[test]
    fn the_sweep_closes_only_connections_idle_too_long() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let backend = Backend::new("b".into(), listener.local_addr().unwrap(), 1);
        idle_for(&backend, &listener, MAX_IDLE_TIME + Duration::from_secs(5));
        idle_for(&backend, &listener, MAX_IDLE_TIME + Duration::from_secs(1));
        idle_for(&backend, &listener, Duration::from_secs(1));
        backend.close_expired_idle();
        assert_eq!(backend.pool().idle.len(), 1);
        assert!(
            backend.pool().take_idle().is_some(),
            "the fresh one is kept"
        );
    }
}
