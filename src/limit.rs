//! A backend's connection limit and the queue of requests waiting for it (`--backend-max-conns`,
//! or `max_conns` in a backend's table of the configuration file).
//!
//! A small backend (a gunicorn app with four workers, a PHP-FPM pool) falls over when the balancer
//! sends it 200 requests at once. With a limit of N it gets at most N at a time, and the others
//! wait their turn here, as in HAProxy's server queue (`maxconn`) or nginx's `max_conns` with
//! `queue`. A thread per client makes the queue cheap: a waiting request waits in the thread it
//! already has, on a condition variable of its own.
//!
//! A request in flight holds a [`Slot`]; the slots taken are one atomic count. A request that
//! finds room and nobody waiting takes its slot with one compare-and-increment, no lock. The queue
//! is first come, first served: a slot given back while requests wait goes to the one waiting
//! longest, never to a request that has just arrived (it finds someone waiting and queues behind
//! them). Without a limit nothing is counted at all: one branch per request.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::stats::latency::LatencyHistogram;

/// How often a waiting request asks whether its client is still there: a client that went away
/// leaves the queue within this long, and its place goes to the next.
pub const CLIENT_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// One backend's limit on requests in flight, its queue, and the queue's counters.
#[derive(Debug, Default)]
pub struct ConnectionLimit {
    /// The most slots taken at once; 0 for no limit. An atomic, so that a reload can change it.
    max: AtomicU32,
    /// Slots taken now: requests in flight that counted against the limit.
    taken: AtomicU32,
    /// Requests in the queue that have no slot yet: the queue's length.
    waiting: AtomicU32,
    queue: Mutex<Queue>,
    /// Requests that had to wait in the queue, since start.
    queued: AtomicU64,
    /// Requests whose wait ran out (they got a 503).
    timeouts: AtomicU64,
    /// How long queued requests waited, however their wait ended.
    waits: LatencyHistogram,
}

/// The waiting requests, oldest first.
#[derive(Debug, Default)]
struct Queue {
    waiters: VecDeque<Waiter>,
    next_ticket: u64,
}

/// A request in the queue, and whether a slot was given to it while it slept.
#[derive(Debug)]
struct Waiter {
    ticket: u64,
    wake: Arc<Condvar>,
    given: bool,
}

/// A request's place in the queue. Leaving it (dropping it) hands a slot given too late on to
/// the next in line.
struct Place<'a> {
    limit: &'a ConnectionLimit,
    ticket: u64,
}

/// A place among a backend's requests in flight, given back when dropped: to the request waiting
/// longest, if any.
#[derive(Debug)]
#[must_use = "the slot is given back when dropped"]
pub struct Slot<'a>(Option<&'a ConnectionLimit>);

/// Why a request left the queue without a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueEnd {
    /// It waited the whole queue timeout.
    TimedOut,
    /// Its client went away.
    ClientLeft,
}

impl ConnectionLimit {
    /// A limit of `max` requests in flight, or none.
    pub fn new(max: Option<u32>) -> Self {
        let limit = ConnectionLimit::default();
        limit.max.store(max.unwrap_or(0), Relaxed);
        limit
    }

    /// The most requests in flight at once, if limited.
    pub fn max(&self) -> Option<u32> {
        Some(self.max.load(Relaxed)).filter(|&max| max > 0)
    }

    /// Changes the limit (a reload). Requests in flight keep their slots; a higher limit, or
    /// none, lets waiting requests in at once. Requests that began without a limit are not
    /// counted against one set later.
    pub fn set_max(&self, max: Option<u32>) {
        self.max.store(max.unwrap_or(0), SeqCst);
        self.hand_out(&mut self.queue());
    }

    /// Whether a new request would get a slot at once: no limit, or room and nobody waiting.
    pub fn has_room(&self) -> bool {
        match self.max.load(Relaxed) {
            0 => true,
            max => self.waiting.load(Relaxed) == 0 && self.taken.load(Relaxed) < max,
        }
    }

    /// A slot: at once when there is no limit, or room and nobody waiting; else after waiting in
    /// the queue, first come first served, for at most `timeout`. Every
    /// [`CLIENT_CHECK_INTERVAL`] of the wait, and once more when a slot comes, `client_left` says
    /// whether the client went away: then the request leaves the queue, and a slot it was given
    /// goes on to the next in line.
    pub fn enter(
        &self,
        timeout: Duration,
        client_left: &dyn Fn() -> bool,
    ) -> Result<Slot<'_>, QueueEnd> {
        if self.max.load(Relaxed) == 0 {
            return Ok(Slot(None));
        }
        if self.waiting.load(SeqCst) == 0 && self.take_if_room() {
            return Ok(Slot(Some(self)));
        }
        self.queued.fetch_add(1, Relaxed);
        let started = Instant::now();
        let end = self.wait_in_queue(started + timeout, client_left);
        self.waits.record(started.elapsed());
        if let Err(QueueEnd::TimedOut) = end {
            self.timeouts.fetch_add(1, Relaxed);
        }
        end
    }

    /// Joins the queue and waits for a slot until `deadline`, looking after the client between
    /// slices of the wait.
    fn wait_in_queue(
        &self,
        deadline: Instant,
        client_left: &dyn Fn() -> bool,
    ) -> Result<Slot<'_>, QueueEnd> {
        let place = self.join();
        loop {
            let given = place.wait(deadline.min(Instant::now() + CLIENT_CHECK_INTERVAL));
            // Dropping the place on the way out passes on a slot it was given.
            if client_left() {
                return Err(QueueEnd::ClientLeft);
            }
            if given {
                return Ok(place.into_slot());
            }
            if Instant::now() >= deadline {
                return Err(QueueEnd::TimedOut);
            }
        }
    }

    /// A place at the back of the queue.
    fn join(&self) -> Place<'_> {
        let mut queue = self.queue();
        let ticket = queue.next_ticket;
        queue.next_ticket += 1;
        queue.waiters.push_back(Waiter {
            ticket,
            wake: Arc::new(Condvar::new()),
            given: false,
        });
        self.waiting.fetch_add(1, SeqCst);
        // A slot given back between the look for room and now was given back by a request that
        // saw nobody waiting, so it handed it to no one: it is handed out here, in order.
        self.hand_out(&mut queue);
        Place {
            limit: self,
            ticket,
        }
    }

    /// Takes a slot if the limit leaves room (or there is none any more), with one
    /// compare-and-increment.
    fn take_if_room(&self) -> bool {
        let max = self.max.load(Relaxed);
        self.taken
            .fetch_update(SeqCst, SeqCst, |taken| {
                (max == 0 || taken < max).then_some(taken + 1)
            })
            .is_ok()
    }

    /// Gives free slots to the requests waiting longest, in order, while there is room.
    fn hand_out(&self, queue: &mut Queue) {
        for waiter in queue.waiters.iter_mut().filter(|w| !w.given) {
            if !self.take_if_room() {
                return;
            }
            waiter.given = true;
            self.waiting.fetch_sub(1, SeqCst);
            waiter.wake.notify_one();
        }
    }

    /// A slot given back: the count falls first, then the queue is looked at. A request joining
    /// the queue raises the waiting count first, then looks for room; so whichever of the two
    /// comes second sees the other (the atomics are sequentially consistent), and a slot is
    /// never left free while a request sleeps.
    fn release(&self) {
        self.taken.fetch_sub(1, SeqCst);
        if self.waiting.load(SeqCst) > 0 {
            self.hand_out(&mut self.queue());
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests waiting now.
    pub fn queue_length(&self) -> u64 {
        u64::from(self.waiting.load(Relaxed))
    }

    /// Slots taken now.
    pub fn taken(&self) -> u64 {
        u64::from(self.taken.load(Relaxed))
    }

    /// Requests that had to wait in the queue, since start.
    pub fn queued(&self) -> u64 {
        self.queued.load(Relaxed)
    }

    /// Requests whose wait ran out, since start.
    pub fn timeouts(&self) -> u64 {
        self.timeouts.load(Relaxed)
    }

    /// A percentile (0–100) of the time queued requests waited, in milliseconds; 0 when none
    /// waited.
    pub fn wait_ms_percentile(&self, percentile: f64) -> f64 {
        self.waits.percentile_ms(percentile)
    }
}

impl Queue {
    /// Takes the waiter with `ticket` out of the queue, if it is still in it.
    fn remove(&mut self, ticket: u64) -> Option<Waiter> {
        let index = self.waiters.iter().position(|w| w.ticket == ticket)?;
        self.waiters.remove(index)
    }
}

impl<'a> Place<'a> {
    /// Waits until `until` at most; whether a slot was given to this place.
    fn wait(&self, until: Instant) -> bool {
        let mut queue = self.limit.queue();
        loop {
            let Some(waiter) = queue.waiters.iter().find(|w| w.ticket == self.ticket) else {
                return false;
            };
            if waiter.given {
                return true;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let wake = Arc::clone(&waiter.wake);
            queue = wake
                .wait_timeout(queue, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The slot given to this place: it leaves the queue, keeping the slot (the drop that
    /// follows finds nothing left to pass on).
    fn into_slot(self) -> Slot<'a> {
        self.limit.queue().remove(self.ticket);
        Slot(Some(self.limit))
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let limit = self.limit;
        let mut queue = limit.queue();
        match queue.remove(self.ticket) {
            Some(waiter) if waiter.given => {
                limit.taken.fetch_sub(1, SeqCst);
                limit.hand_out(&mut queue);
            }
            Some(_) => {
                limit.waiting.fetch_sub(1, SeqCst);
            }
            None => {}
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Some(limit) = self.0 {
            limit.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::thread;

    const LONG: Duration = Duration::from_secs(10);

    fn stays() -> bool {
        false
    }

    /// Waits (bounded) until `limit` has `n` requests waiting.
    fn until_waiting(limit: &ConnectionLimit, n: u64) {
        let deadline = Instant::now() + LONG;
        while limit.queue_length() != n {
            assert!(Instant::now() < deadline, "{n} never waited");
            thread::yield_now();
        }
    }

    #[test]
    fn without_a_limit_nothing_is_counted() {
        let limit = ConnectionLimit::new(None);
        let slots: Vec<Slot> = (0..100)
            .map(|_| limit.enter(Duration::ZERO, &stays).unwrap())
            .collect();
        assert!(limit.has_room());
        assert_eq!((limit.taken(), limit.queued()), (0, 0));
        drop(slots);
        assert_eq!(limit.taken(), 0);
    }

    #[test]
    fn slots_are_taken_up_to_the_limit_and_given_back() {
        let limit = ConnectionLimit::new(Some(2));
        let first = limit.enter(Duration::ZERO, &stays).unwrap();
        let second = limit.enter(Duration::ZERO, &stays).unwrap();
        assert_eq!(limit.taken(), 2);
        assert!(!limit.has_room());
        assert_eq!(
            limit.enter(Duration::ZERO, &stays).unwrap_err(),
            QueueEnd::TimedOut
        );
        assert_eq!(
            (limit.queued(), limit.timeouts(), limit.queue_length()),
            (1, 1, 0)
        );
        drop(first);
        assert!(limit.has_room());
        drop(second);
        assert_eq!(limit.taken(), 0);
    }

    #[test]
    fn waiting_requests_get_slots_first_come_first_served() {
        let limit = Arc::new(ConnectionLimit::new(Some(1)));
        let held = limit.enter(Duration::ZERO, &stays).unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let waiters: Vec<_> = (0..8)
            .map(|i| {
                let (shared, order) = (Arc::clone(&limit), Arc::clone(&order));
                let waiter = thread::spawn(move || {
                    let _slot = shared.enter(LONG, &stays).unwrap();
                    order.lock().unwrap().push(i);
                });
                // Each joins the queue before the next starts.
                until_waiting(&limit, i + 1);
                waiter
            })
            .collect();
        drop(held);
        for waiter in waiters {
            waiter.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (0..8).collect::<Vec<_>>());
        assert_eq!((limit.taken(), limit.queued(), limit.timeouts()), (0, 8, 0));
        assert!(limit.wait_ms_percentile(50.0) > 0.0);
    }

    #[test]
    fn a_slot_given_back_goes_to_the_waiting_request_not_to_a_newcomer() {
        let limit = Arc::new(ConnectionLimit::new(Some(1)));
        let held = limit.enter(Duration::ZERO, &stays).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let limit = Arc::clone(&limit);
            thread::spawn(move || {
                let slot = limit.enter(LONG, &stays).unwrap();
                // Holds the slot until the newcomer has tried.
                rx.recv_timeout(LONG).unwrap();
                drop(slot);
            })
        };
        until_waiting(&limit, 1);
        drop(held);
        // Handed over at once: the count never fell to a free slot.
        assert_eq!(limit.taken(), 1);
        assert!(!limit.has_room());
        assert_eq!(
            limit.enter(Duration::ZERO, &stays).unwrap_err(),
            QueueEnd::TimedOut
        );
        tx.send(()).unwrap();
        waiter.join().unwrap();
        assert_eq!(limit.taken(), 0);
    }

    #[test]
    fn a_client_that_leaves_frees_its_place_and_a_slot_it_was_given() {
        let limit = Arc::new(ConnectionLimit::new(Some(1)));
        let held = limit.enter(Duration::ZERO, &stays).unwrap();
        let gone = Arc::new(AtomicBool::new(false));
        let leaver = {
            let (limit, gone) = (Arc::clone(&limit), Arc::clone(&gone));
            thread::spawn(move || limit.enter(LONG, &|| gone.load(SeqCst)).map(drop))
        };
        until_waiting(&limit, 1);
        let next = {
            let limit = Arc::clone(&limit);
            thread::spawn(move || limit.enter(LONG, &stays).map(|_slot| limit.taken()))
        };
        until_waiting(&limit, 2);
        // The first client goes, and the slot comes free at the same moment: it may be given
        // to the one that left, which passes it on.
        gone.store(true, SeqCst);
        let left_at = Instant::now();
        drop(held);
        assert_eq!(leaver.join().unwrap(), Err(QueueEnd::ClientLeft));
        assert!(left_at.elapsed() < LONG);
        assert_eq!(next.join().unwrap(), Ok(1), "the next in line got the slot");
        assert_eq!((limit.taken(), limit.queue_length()), (0, 0));
        assert_eq!(limit.timeouts(), 0);
    }

    #[test]
    fn a_client_that_leaves_while_nothing_comes_free_leaves_within_a_check() {
        let limit = ConnectionLimit::new(Some(1));
        let _held = limit.enter(Duration::ZERO, &stays).unwrap();
        let asked = Instant::now();
        assert_eq!(
            limit.enter(LONG, &|| true).unwrap_err(),
            QueueEnd::ClientLeft
        );
        assert!(asked.elapsed() < LONG / 2);
        assert_eq!(limit.queue_length(), 0);
    }

    #[test]
    fn a_higher_limit_lets_waiting_requests_in() {
        let limit = Arc::new(ConnectionLimit::new(Some(1)));
        let _held = limit.enter(Duration::ZERO, &stays).unwrap();
        let waiter = {
            let limit = Arc::clone(&limit);
            thread::spawn(move || limit.enter(LONG, &stays).map(|_slot| ()))
        };
        until_waiting(&limit, 1);
        limit.set_max(Some(2));
        assert_eq!(waiter.join().unwrap(), Ok(()));
        assert_eq!(limit.max(), Some(2));
        limit.set_max(None);
        assert!(limit.has_room());
    }
}
