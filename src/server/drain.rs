//! Graceful stop: what the server does between Ctrl-C (or SIGTERM) and exit.
//!
//! Shutdown stops accepting, accepts what is already in the listen queues (closing a listener
//! would reset those connections), closes connections that are idle between requests, and lets
//! requests in flight finish for up to ten seconds. To reach the idle connections, the server
//! keeps a [`Registry`] of the open ones: it remembers each socket's descriptor number (not a
//! duplicate of it), so a client connection still costs one file descriptor.

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use socket2::SockRef;

use crate::plural;
use crate::proxy::{ConnectionState, LoadBalancer};

use super::pool::FirstTasks;
use super::Context;

/// How long requests in flight may take to finish once shutdown begins.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// The open client connections, so that shutdown can find the idle ones and wait for the rest.
pub(super) struct Registry {
    open: Mutex<Connections>,
    /// Signalled whenever a connection closes (or shutdown begins).
    closed: Condvar,
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

impl Registry {
    /// An empty registry.
    pub(super) fn new() -> Registry {
        Registry {
            open: Mutex::new(Connections::default()),
            closed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Connections> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lists an accepted connection among the open ones, so shutdown can reach it.
    pub(super) fn register(&self, stream: &TcpStream, state: &Arc<ConnectionState>) -> u64 {
        let mut open = self.lock();
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

    /// Forgets a closed connection and wakes whoever waits for the drain or for a descriptor.
    pub(super) fn finish(&self, id: u64) {
        let mut open = self.lock();
        open.by_id.remove(&id);
        let wake = open.waiting > 0;
        drop(open);
        // Waking costs a system call, so only when someone waits.
        if wake {
            self.closed.notify_all();
        }
    }

    /// Waits until a connection closes, for `limit` at most.
    pub(super) fn wait_for_a_close(&self, limit: Duration) {
        let mut open = self.lock();
        open.waiting += 1;
        open = self
            .closed
            .wait_timeout(open, limit)
            .unwrap_or_else(|e| e.into_inner())
            .0;
        open.waiting -= 1;
    }

    /// Wakes every thread waiting for a connection to close (shutdown began).
    pub(super) fn wake_all(&self) {
        self.closed.notify_all();
    }

    /// Closes connections idle between requests and waits for the busy ones to finish.
    pub(super) fn drain(&self, lb: &LoadBalancer) {
        let deadline = Instant::now() + DRAIN_LIMIT;
        let mut open = self.lock();
        open.waiting += 1;
        for connection in open.by_id.values() {
            if connection.state.idle.load(Ordering::SeqCst) {
                // A read blocked on this socket now sees the end of the stream.
                connection.shutdown(Shutdown::Read);
            }
        }
        if !open.by_id.is_empty() {
            log::info!(
                "waiting for {} to finish",
                plural::count(open.by_id.len() as u64, "open connection")
            );
        }
        while !open.by_id.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!(
                    "{} still busy after {:?} ({} of them tunnels); closing them",
                    plural::count(open.by_id.len() as u64, "connection"),
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

impl Context {
    /// Accepts the connections still waiting in listener `index`'s queue, before it closes:
    /// the kernel completed their handshakes, their requests are on the way, and closing the
    /// listener would reset them. This is what lets a `--reuse-port` takeover lose nothing:
    /// the old instance's queue is emptied, not dropped. Each gets a thread of its own and is
    /// served its first request (with `Connection: close`); `--max-connections` still holds,
    /// within the drain's limit.
    pub(super) fn accept_queued(&self, index: usize) {
        let listener = &self.listeners[index].socket;
        if let Err(err) = listener.set_nonblocking(true) {
            return log::warn!("cannot empty the listen queue before closing it: {err}");
        }
        let pool = &self.shared.pool;
        let deadline = Instant::now() + DRAIN_LIMIT;
        let mut taken: u64 = 0;
        while pool.reserve_thread_until(deadline) {
            let Ok((stream, peer)) = listener.accept() else {
                pool.threads_ended(1, false);
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
                pool.threads_ended(1, false);
            }
        }
        if taken > 0 {
            log::info!(
                "accepted {} still queued when shutdown began",
                plural::count(taken, "connection")
            );
        }
        // Stops listening now rather than at exit (on Linux `shutdown` does that to a listening
        // socket): a client connecting while requests in flight finish is refused at once, as
        // by nginx, instead of waiting in a queue nobody takes and being reset at exit.
        let _ = SockRef::from(listener).shutdown(Shutdown::Both);
    }
}
