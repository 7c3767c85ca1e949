//! Traffic over time: one backend's requests, errors and latency per second for the last five
//! minutes, in a ring of [`HISTORY_SECONDS`] slots.
//!
//! Each slot holds one second: its number and the counts recorded in it. Whoever records first in
//! a new second claims the slot (a compare-and-swap on the slot's second) and clears it, so the
//! ring advances without a timer thread, recording costs a few atomic additions and no
//! allocation, and memory does not depend on traffic or uptime. A second nobody recorded in keeps
//! its slot's old number, and readers count it as zero.
//!
//! The claim marks the slot as being cleared before it publishes the new second, so no count can
//! land in it between the claim and the clearing and be wiped: a recorder that meets the mark
//! waits the few nanoseconds the clearing takes (yielding its core after a short spin, in case the
//! claimer was preempted). That wait happens at most once per backend per second.

use std::sync::atomic::{
    AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

/// Seconds kept: five minutes, the current (still filling) second included.
pub const HISTORY_SECONDS: usize = 300;

/// A slot no second has claimed yet.
const NEVER: u64 = u64::MAX;

/// A slot being cleared for a new second.
const CLEARING: u64 = u64::MAX - 1;

/// Spins on a slot being cleared before yielding the core to the thread clearing it.
const SPINS_BEFORE_YIELD: u32 = 64;

/// The clock the rings and the events share, so that one second means the same on every
/// backend: whole seconds since the process first read it, with the wall-clock time of that
/// moment to turn them into dates.
fn origin() -> &'static (Instant, SystemTime) {
    static ORIGIN: OnceLock<(Instant, SystemTime)> = OnceLock::new();
    ORIGIN.get_or_init(|| (Instant::now(), SystemTime::now()))
}

/// The number of the second `at` falls in, on the shared clock.
pub fn second_of(at: Instant) -> u64 {
    at.saturating_duration_since(origin().0).as_secs()
}

/// The number of the second now, on the shared clock.
pub fn current_second() -> u64 {
    second_of(Instant::now())
}

/// The wall-clock time of the start of `second` (which may be before the clock's origin).
pub fn wall_time(second: i64) -> SystemTime {
    let start = origin().1;
    let offset = Duration::from_secs(second.unsigned_abs());
    if second >= 0 {
        start + offset
    } else {
        start - offset
    }
}

/// The wall-clock time of an instant, on the shared clock.
pub fn wall_time_of(at: Instant) -> SystemTime {
    let (origin, start) = *origin();
    match at.checked_duration_since(origin) {
        Some(after) => start + after,
        None => start - origin.duration_since(at),
    }
}

/// One second of traffic.
#[derive(Debug)]
struct Slot {
    second: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    finished: AtomicU64,
    latency_micros: AtomicU64,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            second: AtomicU64::new(NEVER),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            latency_micros: AtomicU64::new(0),
        }
    }
}

/// The per-second ring of one backend.
#[derive(Debug)]
pub struct History {
    slots: [Slot; HISTORY_SECONDS],
}

impl Default for History {
    fn default() -> Self {
        History {
            slots: std::array::from_fn(|_| Slot::new()),
        }
    }
}

/// What was recorded in each second of the window, oldest first; the last entry is the second
/// `last`, still filling.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Series {
    /// The number of the newest second, on the shared clock.
    pub last: u64,
    /// Requests sent to the backend in each second.
    pub requests: Vec<u64>,
    /// Failed requests and connection attempts in each second.
    pub errors: Vec<u64>,
    /// Mean latency in milliseconds of the requests that finished in each second; `None` when
    /// none did.
    pub latency_ms_avg: Vec<Option<f64>>,
}

impl History {
    /// Counts a request sent in `second`.
    pub fn count_request(&self, second: u64) {
        if let Some(slot) = self.slot(second) {
            slot.requests.fetch_add(1, Relaxed);
        }
    }

    /// Records a request that finished in `second` after `micros`.
    pub fn record_latency(&self, second: u64, micros: u64) {
        if let Some(slot) = self.slot(second) {
            slot.finished.fetch_add(1, Relaxed);
            slot.latency_micros.fetch_add(micros, Relaxed);
        }
    }

    /// Counts an error in `second`.
    pub fn count_error(&self, second: u64) {
        if let Some(slot) = self.slot(second) {
            slot.errors.fetch_add(1, Relaxed);
        }
    }

    /// The slot of `second`, claimed and cleared if it still holds an older second; `None` when
    /// a newer second already has it (a thread that stalled for the whole window).
    fn slot(&self, second: u64) -> Option<&Slot> {
        let slot = &self.slots[(second % HISTORY_SECONDS as u64) as usize];
        let mut spins = 0;
        loop {
            let seen = slot.second.load(Acquire);
            if seen == second {
                return Some(slot);
            }
            if seen == CLEARING {
                spins += 1;
                if spins < SPINS_BEFORE_YIELD {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
                continue;
            }
            if seen != NEVER && seen > second {
                return None;
            }
            // One thread wins the claim and clears the counts, then publishes the second; the
            // others wait for it and add to the cleared slot.
            if slot
                .second
                .compare_exchange(seen, CLEARING, Acquire, Relaxed)
                .is_ok()
            {
                slot.requests.store(0, Relaxed);
                slot.errors.store(0, Relaxed);
                slot.finished.store(0, Relaxed);
                slot.latency_micros.store(0, Relaxed);
                slot.second.store(second, Release);
                return Some(slot);
            }
        }
    }

    /// The [`HISTORY_SECONDS`] seconds ending with `now`, oldest first. A slot holding any other
    /// second counts as a second without traffic.
    pub fn series(&self, now: u64) -> Series {
        let mut series = Series {
            last: now,
            requests: Vec::with_capacity(HISTORY_SECONDS),
            errors: Vec::with_capacity(HISTORY_SECONDS),
            latency_ms_avg: Vec::with_capacity(HISTORY_SECONDS),
        };
        let first = now as i64 - (HISTORY_SECONDS as i64 - 1);
        for second in first..=now as i64 {
            let slot = u64::try_from(second)
                .ok()
                .map(|s| (s, &self.slots[(s % HISTORY_SECONDS as u64) as usize]))
                .filter(|(s, slot)| slot.second.load(Acquire) == *s)
                .map(|(_, slot)| slot);
            let Some(slot) = slot else {
                series.requests.push(0);
                series.errors.push(0);
                series.latency_ms_avg.push(None);
                continue;
            };
            let finished = slot.finished.load(Relaxed);
            series.requests.push(slot.requests.load(Relaxed));
            series.errors.push(slot.errors.load(Relaxed));
            series.latency_ms_avg.push(
                (finished > 0)
                    .then(|| slot.latency_micros.load(Relaxed) as f64 / finished as f64 / 1000.0),
            );
        }
        series
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_exactly_the_last_300_seconds() {
        let history = History::default();
        for second in 0..1000 {
            history.count_request(second);
            history.record_latency(second, 2000);
        }
        let series = history.series(999);
        assert_eq!(series.requests.len(), 300);
        assert_eq!(series.last, 999);
        assert!(series.requests.iter().all(|&n| n == 1), "{series:?}");
        assert!(series.latency_ms_avg.iter().all(|&ms| ms == Some(2.0)));
        // One second later, the oldest second has left the window and the new one is empty.
        let later = history.series(1000);
        assert_eq!(later.requests.len(), 300);
        assert_eq!(later.requests[..299], series.requests[1..]);
        assert_eq!(later.requests[299], 0);
        assert_eq!(later.latency_ms_avg[299], None);
    }

    #[test]
    fn a_stale_slot_is_cleared_when_its_place_comes_round_again() {
        let history = History::default();
        for _ in 0..5 {
            history.count_request(7);
            history.count_error(7);
        }
        // 307 falls on 7's slot: the old counts must not leak into it.
        history.count_request(307);
        let series = history.series(307);
        assert_eq!(series.requests[299], 1);
        assert_eq!(series.errors[299], 0);
        // Second 7 is out of the window; and a quiet second reads as zero, not as what its slot
        // held 300 seconds earlier.
        history.count_request(10);
        let quiet = history.series(610);
        assert_eq!(quiet.requests.iter().sum::<u64>(), 0, "{quiet:?}");
    }

    #[test]
    fn a_late_recorder_does_not_write_into_a_newer_second() {
        let history = History::default();
        history.count_request(400);
        history.count_request(100); // same slot, 300 seconds older
        assert_eq!(history.series(400).requests[299], 1);
    }

    #[test]
    fn the_window_starts_before_the_clock_did() {
        let history = History::default();
        history.count_request(0);
        history.count_request(3);
        let series = history.series(3);
        assert_eq!(series.requests.len(), 300);
        assert_eq!(series.requests[296..], [1, 0, 0, 1]);
    }

    #[test]
    fn threads_racing_for_new_seconds_lose_no_count() {
        // Every thread starts each second at once, so they race for its claim: no count may be
        // lost to the clearing.
        let history = std::sync::Arc::new(History::default());
        let start = std::sync::Arc::new(std::sync::Barrier::new(4));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (history, start) = (
                    std::sync::Arc::clone(&history),
                    std::sync::Arc::clone(&start),
                );
                std::thread::spawn(move || {
                    for second in 0..600 {
                        start.wait();
                        for _ in 0..100 {
                            history.count_request(second);
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let series = history.series(599);
        assert!(
            series.requests.iter().all(|&n| n == 400),
            "{:?}",
            series.requests
        );
    }

    #[test]
    fn seconds_turn_into_wall_clock_times() {
        let before = wall_time(-10);
        let after = wall_time(10);
        assert_eq!(
            after.duration_since(before).unwrap(),
            Duration::from_secs(20)
        );
        let now = Instant::now();
        let wall = wall_time_of(now);
        let second = wall_time(second_of(now) as i64);
        assert!(wall >= second && wall.duration_since(second).unwrap() < Duration::from_secs(1));
    }
}
