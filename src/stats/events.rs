//! Recent events: what changed and when (a backend going down or coming back and why, the start
//! and the stop of the balancer), for the statistics page.
//!
//! Each event is pushed at the place its log line is written, with the same words, so the page
//! and the log tell the same story. Events are rare, so a bounded queue behind a mutex is enough:
//! it holds the last [`MAX_EVENTS`], and the oldest is dropped when a new one comes.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Events kept per log (the balancer's own, and one per backend).
pub const MAX_EVENTS: usize = 50;

/// What kind of change an event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The balancer started serving.
    Start,
    /// The balancer was asked to stop (Ctrl-C or SIGTERM).
    Stop,
    /// Active health checks took a backend out.
    Down,
    /// A backend is back in rotation.
    Up,
    /// Passive health checks took a backend out after failed requests.
    Ejected,
    /// A trial request after the fail-timeout failed, so the backend stays out.
    Trial,
    /// The configuration was read again: applied, or refused with the old one kept.
    Reload,
    /// The operator changed a backend's state or weight on the admin listener: `out` says
    /// whether that took it out of rotation (drain, maint, weight 0) or put it back, if either.
    Admin {
        /// Some(true): out of rotation; Some(false): back in it; None: neither.
        out: Option<bool>,
    },
    /// Panic (`--panic-threshold`) started or ended.
    Panic,
}

impl EventKind {
    /// Whether the backend was out of rotation after an event of this kind.
    pub fn leaves_backend_out(self) -> Option<bool> {
        match self {
            EventKind::Down | EventKind::Ejected | EventKind::Trial => Some(true),
            EventKind::Up => Some(false),
            EventKind::Admin { out } => out,
            EventKind::Start | EventKind::Stop | EventKind::Reload | EventKind::Panic => None,
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EventKind::Start => "start",
            EventKind::Stop => "stop",
            EventKind::Down => "down",
            EventKind::Up => "up",
            EventKind::Ejected => "ejected",
            EventKind::Trial => "trial",
            EventKind::Reload => "reload",
            EventKind::Admin { .. } => "admin",
            EventKind::Panic => "panic",
        })
    }
}

/// One change, as the log line told it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// When it happened.
    pub at: Instant,
    /// The backend it concerns, as the user wrote it; `None` for the balancer as a whole.
    pub backend: Option<String>,
    /// What changed.
    pub kind: EventKind,
    /// The log line's words.
    pub message: String,
}

/// The last [`MAX_EVENTS`] events of one source.
#[derive(Debug, Default)]
pub struct EventLog {
    events: Mutex<VecDeque<Event>>,
}

impl EventLog {
    /// Adds an event that happens now, dropping the oldest when the log is full.
    pub fn push(&self, backend: Option<&str>, kind: EventKind, message: String) {
        let event = Event {
            at: Instant::now(),
            backend: backend.map(str::to_string),
            kind,
            message,
        };
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        if events.len() == MAX_EVENTS {
            events.pop_front();
        }
        events.push_back(event);
    }

    /// The events held, oldest first.
    pub fn recent(&self) -> Vec<Event> {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.iter().cloned().collect()
    }
}

/// A wall-clock time in RFC 3339, UTC, to the millisecond: `2026-11-30T23:05:09.042Z`. The
/// standard library has no calendar, so the date comes from the count of days since 1970 by
/// Howard Hinnant's `civil_from_days`.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since.as_secs();
    let (days, of_day) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60,
        since.subsec_millis()
    )
}

/// The year, month and day of the `days`th day after 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_log_keeps_the_last_fifty() {
        let log = EventLog::default();
        for i in 0..60 {
            log.push(Some("a:1"), EventKind::Down, format!("event {i}"));
        }
        let events = log.recent();
        assert_eq!(events.len(), MAX_EVENTS);
        assert_eq!(events[0].message, "event 10");
        assert_eq!(events[49].message, "event 59");
        assert_eq!(events[0].backend.as_deref(), Some("a:1"));
    }

    #[test]
    fn times_read_as_rfc_3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_millis(951_782_400_000 + 3_723_042);
        assert_eq!(rfc3339(leap), "2000-02-29T01:02:03.042Z");
        let later = UNIX_EPOCH + Duration::from_secs(1_796_080_000);
        assert_eq!(rfc3339(later), "2026-11-30T23:06:40.000Z");
    }

    #[test]
    fn kinds_read_as_the_contract_names_them() {
        let names: Vec<String> = [
            EventKind::Start,
            EventKind::Stop,
            EventKind::Down,
            EventKind::Up,
            EventKind::Ejected,
            EventKind::Trial,
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        assert_eq!(names, ["start", "stop", "down", "up", "ejected", "trial"]);
    }
}
