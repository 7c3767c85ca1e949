//! Slow start (`--slow-start DURATION`): a backend that comes back into rotation (its checks
//! passed again, the operator made it ready, a reload added it) takes a share of the new requests
//! that grows from near nothing to its full share over the duration, instead of all of it at once
//! with cold caches and connection pools (HAProxy's `slowstart`, Envoy's `slow_start_config`).
//!
//! The algorithms keep their own arithmetic: a pick of a ramping backend goes through in
//! proportion to how far its ramp has gone, and otherwise the algorithm picks again without it.
//! Each pick adds the ramp's progress (0 to 1) to a credit, and a pick goes through when the
//! credit reaches 1, so a backend a quarter of the way up takes every fourth of the picks it is
//! offered: smooth, with no randomness for a test to tolerate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A backend's ramp: whether it is on, since when, and the credit of its picks.
#[derive(Debug, Default)]
pub struct Ramp {
    /// Read on every pick of the backend: false for all but a ramping backend, so slow start
    /// costs one load when nothing ramps.
    ramping: AtomicBool,
    state: Mutex<RampState>,
}

#[derive(Debug, Default)]
struct RampState {
    started: Option<Instant>,
    credit: f64,
}

impl Ramp {
    /// The backend came back into rotation: its share starts again from nothing.
    pub fn start(&self) {
        let mut state = self.state();
        state.started = Some(Instant::now());
        state.credit = 0.0;
        self.ramping.store(true, Ordering::Release);
    }

    /// How far up the ramp of length `over` the backend is (0 to 1), or `None` when it is not
    /// ramping (never was, or the ramp is over).
    pub fn progress(&self, over: Duration) -> Option<f64> {
        if !self.ramping.load(Ordering::Acquire) {
            return None;
        }
        let state = self.state();
        let elapsed = state.started?.elapsed();
        if over.is_zero() || elapsed >= over {
            self.ramping.store(false, Ordering::Release);
            return None;
        }
        Some(elapsed.as_secs_f64() / over.as_secs_f64())
    }

    /// Whether a pick of this backend goes through, with slow start over `over`: always when it
    /// is not ramping, else in proportion to its progress (see the module's note).
    pub fn lets_through(&self, over: Duration) -> bool {
        let Some(progress) = self.progress(over) else {
            return true;
        };
        let mut state = self.state();
        state.credit += progress;
        if state.credit >= 1.0 {
            state.credit -= 1.0;
            return true;
        }
        false
    }

    fn state(&self) -> MutexGuard<'_, RampState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_ramp_every_pick_goes_through() {
        let ramp = Ramp::default();
        assert_eq!(ramp.progress(Duration::from_secs(10)), None);
        assert!((0..10).all(|_| ramp.lets_through(Duration::from_secs(10))));
        ramp.start();
        assert!(ramp.lets_through(Duration::ZERO), "slow start off");
    }

    #[test]
    fn a_ramp_lets_through_a_share_that_grows_with_it() {
        let ramp = Ramp::default();
        ramp.start();
        let over = Duration::from_secs(3600);
        let early = (0..1000).filter(|_| ramp.lets_through(over)).count();
        assert!(early <= 1, "near the start, almost nothing: {early}");
        // Half-way up: every second pick.
        ramp.state().started = Some(Instant::now() - over / 2);
        let half = (0..1000).filter(|_| ramp.lets_through(over)).count();
        assert!((495..=505).contains(&half), "{half}");
        ramp.state().started = Some(Instant::now() - over);
        assert_eq!(ramp.progress(over), None, "the ramp is over");
        assert!((0..10).all(|_| ramp.lets_through(over)));
    }
}
