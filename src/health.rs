//! Backend health: whether each backend may take requests, as active and passive checks see it.
//!
//! Active checks (the [`active`] submodule) probe `GET --health-path` on a timer; a backend goes
//! down after `--fall` failed probes in a row and comes back after `--rise` passed ones. Passive
//! checks watch real requests: `--max-fails` failures in a row take a backend out for
//! `--fail-timeout`, after which exactly one trial request decides whether it is back. Each
//! backend's [`Health`] is a small state machine that reports only when it flips.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::plural;
use crate::stats::events::EventKind;

pub mod active;

pub use active::ActiveChecker;

/// Which health checks run: the `loadbalancer` binary's `--health-check` flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum HealthMode {
    /// No checks: every backend is always considered healthy.
    None,
    /// Probes of the health path on a timer.
    Active,
    /// Watching real requests fail.
    Passive,
    /// Both active and passive checks.
    #[default]
    Both,
}

impl HealthMode {
    /// Whether active checks run in this mode.
    pub fn is_active(self) -> bool {
        matches!(self, HealthMode::Active | HealthMode::Both)
    }

    /// Whether passive checks run in this mode.
    pub fn is_passive(self) -> bool {
        matches!(self, HealthMode::Passive | HealthMode::Both)
    }
}

impl fmt::Display for HealthMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HealthMode::None => "none",
            HealthMode::Active => "active",
            HealthMode::Passive => "passive",
            HealthMode::Both => "both",
        })
    }
}

/// How active checks probe a backend and when their verdict flips.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivePolicy {
    /// The path to `GET`; a 2xx answer passes.
    pub path: String,
    /// Time between two probes of the same backend.
    pub interval: Duration,
    /// Time one probe may take, connecting included.
    pub timeout: Duration,
    /// Passed probes in a row that bring a down backend back.
    pub rise: u32,
    /// Failed probes in a row that take an up backend down.
    pub fall: u32,
}

/// When passive checks take a backend out, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassivePolicy {
    /// Failed requests in a row that take a backend out.
    pub max_fails: u32,
    /// How long a backend stays out before one trial request.
    pub fail_timeout: Duration,
}

/// Which checks run and how: built from the command line by `cli::HealthArgs`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthConfig {
    /// Active checks, when on.
    pub active: Option<ActivePolicy>,
    /// Passive checks, when on.
    pub passive: Option<PassivePolicy>,
}

impl HealthConfig {
    /// Which checks this configuration turns on.
    pub fn mode(&self) -> HealthMode {
        match (&self.active, &self.passive) {
            (None, None) => HealthMode::None,
            (Some(_), None) => HealthMode::Active,
            (None, Some(_)) => HealthMode::Passive,
            (Some(_), Some(_)) => HealthMode::Both,
        }
    }
}

/// The result of the latest active check of a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastCheck {
    /// What the probe got, as a learner reads it: `200`, `500`, `timeout`, `refused`.
    pub result: String,
    /// When the probe ended.
    pub at: Instant,
}

impl LastCheck {
    /// Time since the probe ended.
    pub fn ago(&self) -> Duration {
        self.at.elapsed()
    }
}

/// A backend's health flipping, reported once by whoever caused it; or a failed trial request,
/// which keeps a backend out that was already out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The new state: true when the backend came back, false when it went (or stays) down.
    pub healthy: bool,
    /// Which check decided: `down` (active), `ejected` (passive), `trial` (a failed trial
    /// request) or `up`; the event's kind on the statistics page.
    pub kind: EventKind,
    /// Why, e.g. `3 checks failed in a row (last: 500)`.
    pub reason: String,
}

/// What the balancer knows about one backend's health.
///
/// `is_available` runs for every candidate of every request, so the state it reads lives in
/// atomics; the mutex only serialises compound updates (a count and a flip together), and no
/// lock is ever held across I/O.
#[derive(Debug)]
pub struct Health {
    /// Which checks judge the backend; a reload may change it.
    config: arc_swap::ArcSwapOption<HealthConfig>,
    /// The origin of the millisecond timestamps below.
    born: Instant,
    /// The active checks' verdict; true when active checks are off. Backends start healthy, as
    /// with nginx and HAProxy, until checks say otherwise.
    active_up: AtomicBool,
    /// Whether passive checks took the backend out.
    passive_out: AtomicBool,
    /// Passive: when (ms after `born`) the next trial request may go out.
    trial_at: AtomicU64,
    /// Active: when (ms after `born`) the next probe is due.
    next_check_at: AtomicU64,
    /// Passive: failed requests in a row. An atomic, so a success on a backend without failures
    /// costs no lock.
    failed_requests: AtomicU32,
    /// Passive: a trial request was let through and its outcome not yet seen.
    trial_pending: AtomicBool,
    /// Active: the next probe should go out now rather than after the interval (the backend
    /// left maintenance and is held out until it passes).
    check_soon: AtomicBool,
    checks: Mutex<CheckCounts>,
}

/// The active checks' counters, updated together.
#[derive(Debug, Default)]
struct CheckCounts {
    successes: u32,
    failures: u32,
    last: Option<LastCheck>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            config: arc_swap::ArcSwapOption::empty(),
            born: Instant::now(),
            active_up: AtomicBool::new(true),
            passive_out: AtomicBool::new(false),
            trial_at: AtomicU64::new(0),
            next_check_at: AtomicU64::new(0),
            failed_requests: AtomicU32::new(0),
            trial_pending: AtomicBool::new(false),
            check_soon: AtomicBool::new(false),
            checks: Mutex::new(CheckCounts::default()),
        }
    }
}

impl Health {
    /// Sets which checks judge this backend: before the balancer starts serving, and again when
    /// a reload changes the health settings (a backend kept by the reload keeps its state).
    pub fn configure(&self, config: HealthConfig) {
        self.config.store(Some(Arc::new(config)));
    }

    /// For a backend a reload adds while active checks run: out of rotation until its first
    /// passing check (one pass brings it in), so that no request meets a backend nobody has
    /// seen answer yet.
    pub fn hold_until_checked(&self) {
        let Some(policy) = self.active_policy() else {
            return;
        };
        let mut counts = self.counts();
        counts.successes = policy.rise.saturating_sub(1);
        self.active_up.store(false, Ordering::Release);
        self.check_soon.store(true, Ordering::Release);
    }

    /// Whether the next probe was asked to go out now (see [`Health::hold_until_checked`]);
    /// asking once is answered once.
    pub fn take_check_soon(&self) -> bool {
        self.check_soon.swap(false, Ordering::AcqRel)
    }

    /// Which checks judge this backend.
    pub fn mode(&self) -> HealthMode {
        self.config
            .load()
            .as_deref()
            .map_or(HealthMode::None, HealthConfig::mode)
    }

    /// Whether the backend is considered healthy: no check currently holds it out.
    pub fn is_healthy(&self) -> bool {
        self.active_up.load(Ordering::Acquire) && !self.passive_out.load(Ordering::Acquire)
    }

    /// Whether the backend may be chosen for a request now: healthy, or held out by passive
    /// checks whose fail-timeout is over (then one trial request may go, see [`Health::admit`]).
    pub fn is_available(&self) -> bool {
        self.active_up.load(Ordering::Acquire)
            && (!self.passive_out.load(Ordering::Acquire)
                || self.now_ms() >= self.trial_at.load(Ordering::Acquire))
    }

    /// Lets a chosen request through. Always true for a healthy backend; for one that passive
    /// checks took out, true for exactly one caller once its fail-timeout is over: the trial.
    /// The claim pushes the next trial a fail-timeout away, so a trial whose outcome is never
    /// observed (the client left first) cannot keep the backend out for good.
    pub fn admit(&self) -> bool {
        if !self.passive_out.load(Ordering::Acquire) {
            return true;
        }
        let Some(policy) = self.passive_policy() else {
            return true;
        };
        let now = self.now_ms();
        let due = self.trial_at.load(Ordering::Acquire);
        let claimed = now >= due
            && self
                .trial_at
                .compare_exchange(
                    due,
                    now.saturating_add(millis(policy.fail_timeout)),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok();
        if claimed {
            self.trial_pending.store(true, Ordering::Release);
        }
        claimed
    }

    /// How long until the backend could be chosen again (zero if it can be now): the active
    /// checks it still has to pass, or the end of its fail-timeout, whichever is later.
    pub fn available_in(&self) -> Duration {
        let now = self.now_ms();
        let mut wait = 0;
        if !self.active_up.load(Ordering::Acquire) {
            let next_check = self
                .next_check_at
                .load(Ordering::Acquire)
                .saturating_sub(now);
            // `--rise` checks must pass in a row: the next one, then the others an interval apart.
            let after_it = self.active_policy().map_or(0, |policy| {
                let more = policy.rise.saturating_sub(self.consecutive_successes() + 1);
                u64::from(more) * policy.interval.as_millis() as u64
            });
            wait = next_check + after_it;
        }
        if self.passive_out.load(Ordering::Acquire) {
            wait = wait.max(self.trial_at.load(Ordering::Acquire).saturating_sub(now));
        }
        Duration::from_millis(wait)
    }

    /// Active checks passed in a row (zero after a failure).
    pub fn consecutive_successes(&self) -> u32 {
        self.counts().successes
    }

    /// Active checks failed in a row (zero after a success).
    pub fn consecutive_failures(&self) -> u32 {
        self.counts().failures
    }

    /// Requests failed in a row, as passive checks count them (zero after a success).
    pub fn failed_requests(&self) -> u32 {
        self.failed_requests.load(Ordering::Acquire)
    }

    /// The latest active check's result and time, if a check ran yet.
    pub fn last_check(&self) -> Option<LastCheck> {
        self.counts().last.clone()
    }

    /// One line for the statistics log: the state and the counts behind it. Without health
    /// checks the state is `not checked`: the backend stays in rotation whatever its requests
    /// do, and "up" beside a 100 % error rate would claim a verdict nothing made.
    pub fn describe(&self) -> String {
        let mode = self.mode();
        if mode == HealthMode::None {
            return String::from("not checked");
        }
        let mut text = String::from(if self.is_healthy() { "up" } else { "DOWN" });
        if mode.is_active() {
            let counts = self.counts();
            text.push_str(&format!(
                ", checks {} passed / {} failed in a row",
                counts.successes, counts.failures
            ));
            if let Some(last) = &counts.last {
                text.push_str(&format!(
                    ", last {} {:.1}s ago",
                    last.result,
                    last.ago().as_secs_f64()
                ));
            }
        }
        if mode.is_passive() {
            text.push_str(&format!(
                ", {} failed requests in a row",
                self.failed_requests()
            ));
        }
        text
    }

    /// Takes note of how a request to the backend went (passive health checking). Returns the
    /// transition when the backend's health flipped.
    pub fn observe_request(&self, ok: bool) -> Option<Transition> {
        let policy = self.passive_policy()?;
        // The common case, a success on a backend without failures, changes nothing.
        if ok
            && self.failed_requests.load(Ordering::Acquire) == 0
            && !self.passive_out.load(Ordering::Acquire)
        {
            return None;
        }
        let mut counts = self.counts();
        let was = self.is_healthy();
        let (kind, reason) = if ok {
            self.failed_requests.store(0, Ordering::Release);
            self.trial_pending.store(false, Ordering::Release);
            if !self.passive_out.swap(false, Ordering::AcqRel) {
                return None;
            }
            (EventKind::Up, "a trial request succeeded".to_string())
        } else {
            let fails = self
                .failed_requests
                .load(Ordering::Acquire)
                .saturating_add(1);
            self.failed_requests.store(fails, Ordering::Release);
            let out_until = self.now_ms().saturating_add(millis(policy.fail_timeout));
            if self.passive_out.load(Ordering::Acquire) {
                // The trial failed (or a request sent before the backend went out did): out
                // for another fail-timeout. Only the trial is worth reporting.
                self.trial_at.store(out_until, Ordering::Release);
                if !self.trial_pending.swap(false, Ordering::AcqRel) {
                    return None;
                }
                return Some(Transition {
                    healthy: false,
                    kind: EventKind::Trial,
                    reason: format!(
                        "the trial request failed, out for another {:?}",
                        policy.fail_timeout
                    ),
                });
            }
            if fails < policy.max_fails {
                return None;
            }
            self.trial_at.store(out_until, Ordering::Release);
            self.passive_out.store(true, Ordering::Release);
            // Active checks bring it back after `rise` passes from now (see `observe_check`).
            counts.successes = 0;
            let reason = format!(
                "{} failed in a row, out for {:?}",
                plural::count(fails, "request"),
                policy.fail_timeout
            );
            (EventKind::Ejected, reason)
        };
        self.flipped(was, kind, reason)
    }

    /// Takes note of an active check's result: `passed` with what the probe got (`200`,
    /// `timeout`, ...). Returns the transition when the backend's health flipped.
    pub fn observe_check(&self, passed: bool, result: &str) -> Option<Transition> {
        let policy = self.active_policy()?;
        let mut counts = self.counts();
        let was = self.is_healthy();
        counts.last = Some(LastCheck {
            result: result.to_string(),
            at: Instant::now(),
        });
        let up = self.active_up.load(Ordering::Acquire);
        let (kind, reason) = if passed {
            counts.successes = counts.successes.saturating_add(1);
            counts.failures = 0;
            if counts.successes < policy.rise {
                return None;
            }
            // Taken out by failed requests, and `rise` checks passed since: back now, as HAProxy
            // does, rather than after the rest of its fail-timeout.
            let readmitted = self.passive_out.swap(false, Ordering::AcqRel);
            if readmitted {
                self.failed_requests.store(0, Ordering::Release);
                self.trial_pending.store(false, Ordering::Release);
            }
            if up && !readmitted {
                return None;
            }
            self.active_up.store(true, Ordering::Release);
            let reason = format!(
                "{} passed in a row ({result})",
                plural::count(counts.successes, "check")
            );
            (EventKind::Up, reason)
        } else {
            counts.failures = counts.failures.saturating_add(1);
            counts.successes = 0;
            if !up || counts.failures < policy.fall {
                return None;
            }
            self.active_up.store(false, Ordering::Release);
            let reason = format!(
                "{} failed in a row (last: {result})",
                plural::count(counts.failures, "check")
            );
            (EventKind::Down, reason)
        };
        drop(counts);
        self.flipped(was, kind, reason)
    }

    /// Records when the next active check is due, for `Retry-After`.
    fn expect_check_in(&self, wait: Duration) {
        self.next_check_at.store(
            self.now_ms().saturating_add(millis(wait)),
            Ordering::Release,
        );
    }

    /// A transition if the overall state changed: a backend held out by the other kind of
    /// check does not come back just because one kind passes.
    fn flipped(&self, was: bool, kind: EventKind, reason: String) -> Option<Transition> {
        let healthy = self.is_healthy();
        (healthy != was).then_some(Transition {
            healthy,
            kind,
            reason,
        })
    }

    fn active_policy(&self) -> Option<ActivePolicy> {
        self.config.load().as_deref()?.active.clone()
    }

    fn passive_policy(&self) -> Option<PassivePolicy> {
        self.config.load().as_deref()?.passive.clone()
    }

    fn counts(&self) -> MutexGuard<'_, CheckCounts> {
        self.checks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        millis(self.born.elapsed())
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn active(rise: u32, fall: u32) -> HealthConfig {
        HealthConfig {
            active: Some(ActivePolicy {
                path: "/health".into(),
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(2),
                rise,
                fall,
            }),
            passive: None,
        }
    }

    fn passive(max_fails: u32, fail_timeout: Duration) -> HealthConfig {
        HealthConfig {
            active: None,
            passive: Some(PassivePolicy {
                max_fails,
                fail_timeout,
            }),
        }
    }

    fn health(config: HealthConfig) -> Health {
        let health = Health::default();
        health.configure(config);
        health
    }

    #[test]
    fn without_checks_a_backend_is_always_healthy() {
        let health = Health::default();
        assert_eq!(health.mode(), HealthMode::None);
        assert_eq!(health.observe_request(false), None);
        assert_eq!(health.observe_check(false, "500"), None);
        assert!(health.is_healthy() && health.is_available() && health.admit());
        assert_eq!(health.available_in(), Duration::ZERO);
        // Healthy for selection, but nothing judged it: the statistics say so.
        assert_eq!(health.describe(), "not checked");
        assert_eq!(health.observe_request(false), None);
        assert_eq!(health.describe(), "not checked");
    }

    #[test]
    fn active_checks_flip_only_after_fall_and_rise() {
        let health = health(active(2, 3));
        assert_eq!(health.mode(), HealthMode::Active);
        assert!(health.is_healthy(), "backends start healthy");
        assert_eq!(health.observe_check(false, "500"), None);
        assert_eq!(health.observe_check(false, "timeout"), None);
        assert_eq!(health.consecutive_failures(), 2);
        // A single success in between resets the count: no flapping.
        assert_eq!(health.observe_check(true, "200"), None);
        assert_eq!(health.consecutive_failures(), 0);
        assert_eq!(health.consecutive_successes(), 1);
        assert_eq!(health.observe_check(false, "500"), None);
        assert_eq!(health.observe_check(false, "500"), None);
        let down = health
            .observe_check(false, "refused")
            .expect("third failure flips");
        assert!(!down.healthy);
        assert!(down.reason.contains("3 checks failed") && down.reason.contains("refused"));
        assert!(!health.is_healthy() && !health.is_available());
        assert_eq!(
            health.observe_check(false, "refused"),
            None,
            "reported once"
        );
        assert_eq!(health.observe_check(true, "200"), None);
        let up = health
            .observe_check(true, "200")
            .expect("second success flips");
        assert!(up.healthy && up.reason.contains("2 checks passed"));
        assert!(health.is_available());
        let last = health.last_check().expect("a check ran");
        assert_eq!(last.result, "200");
        assert!(last.ago() < Duration::from_secs(5));
        assert!(health
            .describe()
            .starts_with("up, checks 2 passed / 0 failed"));
    }

    #[test]
    fn passive_checks_take_a_backend_out_after_max_fails() {
        let health = health(passive(3, Duration::from_secs(60)));
        assert_eq!(health.observe_request(false), None);
        assert_eq!(health.observe_request(false), None);
        assert_eq!(health.failed_requests(), 2);
        assert_eq!(health.observe_request(true), None);
        assert_eq!(health.failed_requests(), 0, "a success resets the count");
        health.observe_request(false);
        health.observe_request(false);
        let out = health.observe_request(false).expect("third failure flips");
        assert!(!out.healthy && out.reason.contains("3 requests failed"));
        assert!(!health.is_healthy() && !health.is_available() && !health.admit());
        let wait = health.available_in();
        assert!(wait > Duration::from_secs(59) && wait <= Duration::from_secs(60));
        assert!(health.describe().starts_with("DOWN"));
    }

    #[test]
    fn after_the_fail_timeout_exactly_one_trial_goes() {
        let health = health(passive(1, Duration::from_millis(50)));
        health.observe_request(false).expect("one failure flips");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !health.is_available() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(health.admit(), "the trial");
        assert!(!health.admit(), "no second trial");
        assert!(!health.is_available());
        let back = health.observe_request(true).expect("the trial succeeded");
        assert!(back.healthy && back.reason.contains("trial"));
        assert!(health.is_healthy() && health.admit() && health.admit());
    }

    #[test]
    fn a_failed_trial_is_reported_and_kinds_name_the_check() {
        let health = health(passive(1, Duration::from_millis(20)));
        let out = health.observe_request(false).expect("one failure flips");
        assert_eq!(out.kind, EventKind::Ejected);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !health.admit() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let trial = health.observe_request(false).expect("the trial failed");
        assert_eq!(trial.kind, EventKind::Trial);
        assert!(!trial.healthy && trial.reason.contains("trial request failed"));
        assert_eq!(health.observe_request(false), None, "no trial in flight");
        let active = self::health(active(1, 1));
        assert_eq!(
            active.observe_check(false, "500").unwrap().kind,
            EventKind::Down
        );
        assert_eq!(
            active.observe_check(true, "200").unwrap().kind,
            EventKind::Up
        );
    }

    #[test]
    fn a_failed_trial_sends_the_backend_out_again() {
        let health = health(passive(1, Duration::from_secs(60)));
        health.observe_request(false);
        assert_eq!(
            health.observe_request(false),
            None,
            "still out, not reported again"
        );
        assert!(!health.is_available());
        assert!(health.available_in() > Duration::from_secs(59));
    }

    #[test]
    fn a_passing_request_does_not_bring_back_what_active_checks_hold_out() {
        let mut config = active(1, 1);
        config.passive = passive(1, Duration::from_secs(60)).passive;
        let health = health(config);
        assert_eq!(health.mode(), HealthMode::Both);
        health
            .observe_check(false, "500")
            .expect("active takes it out");
        health.observe_request(false);
        assert_eq!(
            health.observe_request(true),
            None,
            "the trial passed, checks still fail"
        );
        assert!(!health.is_healthy());
    }

    #[test]
    fn active_checks_bring_back_a_backend_failed_requests_took_out() {
        let mut config = active(2, 3);
        config.passive = passive(1, Duration::from_secs(60)).passive;
        let health = health(config);
        health.observe_check(true, "200");
        health.observe_check(true, "200");
        health.observe_request(false).expect("passive takes it out");
        assert!(!health.is_healthy());
        // Checks passed before it went out do not count: `rise` passes from now on.
        assert_eq!(health.observe_check(true, "200"), None);
        let back = health
            .observe_check(true, "200")
            .expect("rise passes bring it back");
        assert!(
            back.healthy && back.reason.contains("2 checks passed"),
            "{back:?}"
        );
        assert!(health.is_healthy() && health.admit());
        assert_eq!(health.failed_requests(), 0);
        // With passive checks alone, the trial request after the fail-timeout stays the way.
        let passive_only = self::health(passive(1, Duration::from_secs(60)));
        passive_only.observe_request(false).expect("out");
        assert_eq!(passive_only.observe_check(true, "200"), None);
        assert!(!passive_only.is_healthy());
    }

    #[test]
    fn retry_after_waits_for_the_next_check() {
        let health = health(active(1, 1));
        health.observe_check(false, "500");
        health.expect_check_in(Duration::from_secs(5));
        let wait = health.available_in();
        assert!(wait > Duration::from_secs(4) && wait <= Duration::from_secs(5));
    }

    #[test]
    fn retry_after_counts_every_check_rise_still_needs() {
        // Down, with three passes needed: the next check in 5 s, then two more 5 s apart.
        let health = health(active(3, 1));
        health.observe_check(false, "500");
        health.expect_check_in(Duration::from_secs(5));
        let wait = health.available_in();
        assert!(wait > Duration::from_secs(14) && wait <= Duration::from_secs(15));
        // One passed: two to go.
        health.observe_check(true, "200");
        health.expect_check_in(Duration::from_secs(5));
        let wait = health.available_in();
        assert!(wait > Duration::from_secs(9) && wait <= Duration::from_secs(10));
    }
}
