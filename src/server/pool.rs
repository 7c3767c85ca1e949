//! How client threads are kept and reused: the leader/followers pool.
//!
//! The threads accept for themselves, in the leader/followers pattern of Apache's worker MPM:
//! idle threads block in `accept` on the listener, the kernel hands each new connection to one
//! of them, and that thread serves it, then goes back to `accept`. Nothing is handed from an
//! accepting thread to a serving one, so a new connection wakes one thread, not two.
//!
//! Three things make that design hold up under load. Finished threads are kept for the next
//! connection instead of being ended and created again, because creating a thread costs more
//! than a whole keep-alive request: a few wait in `accept`, the rest on standby, and they end
//! after a while unused. The pool grows only when connections would otherwise wait in the
//! listen queue for more than a millisecond (`Context::watch_until_shutdown`), so that under
//! many short connections a thread that finishes one finds the next already queued and takes
//! it without going to sleep. `--max-connections` bounds the threads, so it bounds the clients
//! served at once exactly: when every thread is busy, nobody accepts, and new clients wait in
//! the kernel's listen queue, which is made much longer than the chapter's 5 so that bursts of
//! connections are not dropped.
//!
//! With `--tls-listen`, a second listener is accepted by the same pool of threads under the
//! same `--max-connections`: a thread going back to `accept` goes where fewest threads wait.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::plural;
use crate::warnings::RepeatedWarning;

use super::socket::{queued_connections, ACCEPT_TICK};
use super::Context;

/// Stack size of a client thread. Buffers live on the heap, so a small stack is plenty, and an
/// idle client costs only the pages it touched.
const CLIENT_STACK: usize = 256 * 1024;

/// How long a client thread waits in `accept` before it ends (unless it is the last one
/// waiting on its listener).
pub(super) const THREAD_KEEP: Duration = Duration::from_secs(30);

/// The most threads the pool grows by at once where the kernel does not say how many
/// connections wait in the listen queue (see `ThreadPool::grow`).
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

static NO_THREAD: RepeatedWarning = RepeatedWarning::new(module_path!());

/// The client threads: how many there are, where each idle one waits, and when to start more.
pub(super) struct ThreadPool {
    /// Client threads alive may never be more (`--max-connections`).
    max_threads: usize,
    /// Set once shutdown begins. It lives with the pool because threads read it under the
    /// pool's lock: a thread cannot go to standby just after shutdown began without being told.
    shutdown: AtomicBool,
    state: Mutex<PoolState>,
    /// Signalled when shutdown begins, when a thread leaves the pool during shutdown, and when a
    /// listener is left without an acceptor while nobody watched.
    changed: Condvar,
    /// Signalled to call standby threads back to `accept` (and at shutdown).
    standby: Condvar,
    /// Wakes the thread running `serve` from `poll` (see `Context::wait_for_a_connection`).
    bell: Bell,
}

/// The pool's counts, under its lock.
#[derive(Default)]
pub(super) struct PoolState {
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

/// A socket pair whose one end the thread running `serve` polls beside the listeners, so that
/// writing a byte to the other wakes it.
struct Bell {
    ringer: UnixStream,
    ear: UnixStream,
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
pub(super) enum Sent {
    No,
    /// A thread just started (counted among the `starting` ones).
    New,
    /// A standby thread called back.
    Called,
}

/// A connection accepted on the listener of that index, not yet served.
pub(super) type Accepted = (TcpStream, SocketAddr, usize);

/// What a new client thread does first: start more threads (already counted in the pool),
/// then serve a connection accepted for it, if any, before it goes to `accept`.
pub(super) struct FirstTasks {
    pub(super) more_threads: usize,
    pub(super) accepted: Option<Accepted>,
}

impl ThreadPool {
    /// An empty pool of at most `max_threads` threads.
    pub(super) fn new(max_threads: usize) -> io::Result<ThreadPool> {
        Ok(ThreadPool {
            max_threads,
            shutdown: AtomicBool::new(false),
            state: Mutex::new(PoolState::default()),
            changed: Condvar::new(),
            standby: Condvar::new(),
            bell: Bell::new()?,
        })
    }

    /// Sets the pool up for `listeners` listening sockets.
    pub(super) fn listen_on(&self, listeners: usize) {
        let mut pool = self.lock();
        pool.accepting = vec![0; listeners];
        pool.accepted = vec![0; listeners];
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The shutdown flag, which client connections read too.
    pub(super) fn shutdown_flag(&self) -> &AtomicBool {
        &self.shutdown
    }

    pub(super) fn is_shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    /// Sets the shutdown flag and wakes every thread that waits in the pool.
    pub(super) fn begin_shutdown(&self) {
        let pool = self.lock();
        self.shutdown.store(true, Ordering::SeqCst);
        drop(pool);
        self.changed.notify_all();
        self.standby.notify_all();
    }

    /// Wakes the thread running `serve` from `poll`.
    pub(super) fn ring_bell(&self) {
        self.bell.ring();
    }

    /// Counts a new client thread in the pool, if `--max-connections` leaves room for it.
    pub(super) fn reserve_thread(&self) -> bool {
        let mut pool = self.lock();
        if pool.threads >= self.max_threads {
            return false;
        }
        pool.threads += 1;
        pool.starting += 1;
        true
    }

    /// At shutdown: waits until the pool has room for one more thread, or `deadline`; counts
    /// the thread in when there is room.
    pub(super) fn reserve_thread_until(&self, deadline: Instant) -> bool {
        let mut pool = self.lock();
        while pool.threads >= self.max_threads {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            pool = self
                .changed
                .wait_timeout(pool, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        pool.threads += 1;
        true
    }

    /// `count` client threads leave the pool (`starting`: before they reached `accept`).
    pub(super) fn threads_ended(&self, count: usize, starting: bool) {
        let mut pool = self.lock();
        pool.threads -= count;
        if starting {
            pool.starting -= count;
        }
        drop(pool);
        if self.is_shutting_down() {
            self.changed.notify_all();
        }
    }

    /// The listener a thread waits in `accept` on next, after a wait on standby when enough
    /// threads wait there already; `None` when the thread ends. `sent`: whether the pool sent
    /// this thread rather than it coming back from a connection by itself.
    pub(super) fn next_listener(&self, mut sent: Sent) -> Option<usize> {
        loop {
            match self.next_step(sent) {
                Step::Accept(index) => return Some(index),
                Step::Standby if self.stand_by() => sent = Sent::Called,
                Step::Standby | Step::Leave => return None,
            }
        }
    }

    /// What a thread does next: wait in `accept` on the listener where fewest threads wait
    /// (taking turns among equals, so that no listener is left without), unless `ACCEPTORS`
    /// already wait on each and the pool did not send it; then standby. Once shutdown began,
    /// the thread leaves the pool.
    fn next_step(&self, sent: Sent) -> Step {
        let mut pool = self.lock();
        if sent == Sent::New {
            pool.starting -= 1;
        }
        if self.is_shutting_down() {
            pool.threads -= 1;
            drop(pool);
            self.changed.notify_all();
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
        let mut pool = self.lock();
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
                self.changed.notify_all();
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
    pub(super) fn end_accept(&self, index: usize) {
        self.lock().accepting[index] -= 1;
    }

    /// A thread's `accept` timed out after it waited `idle` in all. It ends (returns true) once
    /// it has waited `THREAD_KEEP`, unless it is the last one waiting on its listener.
    pub(super) fn end_accept_idle(&self, index: usize, idle: Duration) -> bool {
        let mut pool = self.lock();
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
    pub(super) fn took_connection(&self, index: usize) {
        let mut pool = self.lock();
        pool.accepting[index] -= 1;
        pool.accepted[index] += 1;
        if pool.accepting[index] > 0 {
            return;
        }
        if !pool.watching {
            pool.watching = true;
            drop(pool);
            self.changed.notify_all();
        } else if pool.polling {
            // It polls only the listeners that had no acceptor then.
            pool.polling = false;
            drop(pool);
            self.bell.ring();
        }
    }

    /// Sends threads to `accept` on a listener that has none, for the connections waiting in its
    /// queue (`queued`, when the kernel says) that the threads would not take within
    /// `QUEUE_WAIT` at the rate they took them during the last tick (`accepted`): all of them
    /// when every thread is busy with slow requests or keep-alive clients (none accepted), none
    /// while the threads keep up. Threads already on their way to `accept` count. Standby
    /// threads go first, then new ones, up to `--max-connections`. Returns how many new threads
    /// to start (counted in already).
    fn grow(&self, pool: &mut PoolState, queued: Option<usize>, accepted: usize) -> usize {
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
            self.standby.notify_one();
        }
        let new = (wanted - call).min(self.max_threads - pool.threads);
        pool.threads += new;
        pool.starting += new;
        if call + new == 0 && pool.accepting.iter().all(|&n| n == 0) {
            // Said once at warn: under sustained load this happens for every new client.
            if pool.paused_before {
                log::debug!("--max-connections reached: accepting paused");
            } else {
                log::warn!(
                    "{} open (--max-connections): accepting paused until one closes",
                    plural::count(self.max_threads as u64, "connection")
                );
                pool.paused_before = true;
            }
        }
        new
    }

    /// At shutdown: waits until no thread is blocked in `accept` any more (each sees the flag
    /// within `ACCEPT_TICK`), so that the queues can be emptied.
    pub(super) fn wait_for_acceptors(&self) {
        let mut pool = self.lock();
        while pool.accepting.iter().any(|&n| n > 0) {
            pool = self
                .changed
                .wait_timeout(pool, ACCEPT_TICK)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Context {
    /// Starts a client thread, its place in the pool already reserved.
    pub(super) fn spawn(&self, first: FirstTasks) {
        let reserved = 1 + first.more_threads;
        let starting = first.accepted.is_none();
        let context = self.clone();
        let spawned = thread::Builder::new()
            .name("client".into())
            .stack_size(CLIENT_STACK)
            .spawn(move || context.client_thread(first));
        if let Err(err) = spawned {
            self.shared.pool.threads_ended(reserved, starting);
            NO_THREAD.warn(format_args!(
                "cannot start a client thread: {err}; the busy ones accept when they finish"
            ));
        }
    }

    /// Starts `count` more client threads (already counted in the pool). Each thread started
    /// here starts half of those left in turn, so that hundreds start in a few rounds rather
    /// than one after another.
    pub(super) fn start_threads(&self, count: usize) {
        let mut left = count;
        while left > 0 {
            let share = left / 2;
            self.spawn(FirstTasks {
                more_threads: share,
                accepted: None,
            });
            left -= 1 + share;
        }
    }

    /// The thread running `serve`, until shutdown: while a listener has no thread in `accept`,
    /// looks every `WATCH_TICK` at its listen queue and grows the pool when connections would
    /// wait there longer than `QUEUE_WAIT` (see `ThreadPool::grow`).
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
    pub(super) fn watch_until_shutdown(&self) {
        let threads = &self.shared.pool;
        let mut pool = threads.lock();
        let mut quiet_ticks = 0;
        while !threads.is_shutting_down() {
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
                let new = threads.grow(&mut pool, queued, accepted);
                if new > 0 {
                    // Started without the lock: a thread that cannot start gives its place
                    // back, which takes the lock.
                    drop(pool);
                    self.spawn(FirstTasks {
                        more_threads: new - 1,
                        accepted: None,
                    });
                    pool = threads.lock();
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
                threads
                    .changed
                    .wait_timeout(pool, WATCH_TICK)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            } else {
                threads
                    .changed
                    .wait(pool)
                    .unwrap_or_else(|e| e.into_inner())
            };
        }
    }

    /// Waits in `poll` until a connection arrives on a listener that no thread accepts on, for
    /// `ACCEPT_TICK` at most. The bell cuts it short when another listener loses its last
    /// acceptor meanwhile, and at shutdown.
    fn wait_for_a_connection<'a>(
        &'a self,
        mut pool: MutexGuard<'a, PoolState>,
    ) -> MutexGuard<'a, PoolState> {
        let bell = &self.shared.pool.bell;
        let mut fds: Vec<libc::pollfd> = (0..self.listeners.len())
            .filter(|&index| pool.accepting[index] == 0)
            .map(|index| self.listeners[index].socket.as_raw_fd())
            .chain([bell.ear.as_raw_fd()])
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
        bell.silence();
        let mut pool = self.shared.pool.lock();
        pool.polling = false;
        pool
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
