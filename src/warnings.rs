//! Warnings that can repeat once per request or per connection, logged at most once a second.
//!
//! A backend that is down, or a process out of file descriptors, would otherwise write a
//! warning for every request: thousands of lines a second that bury the one line that says
//! what changed. Each such warning is a [`RepeatedWarning`]: the first occurrence is logged,
//! the ones in the following second are only counted, and the next line logged says how many
//! were left out.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The least time between two lines of the same warning.
const INTERVAL: Duration = Duration::from_secs(1);

/// One kind of warning, rate-limited; declare it as a `static` beside the code that warns.
pub struct RepeatedWarning {
    /// The log target, the module that warns (`module_path!()`), as a plain `log::warn!` has.
    target: &'static str,
    state: Mutex<State>,
}

struct State {
    last_logged: Option<Instant>,
    suppressed: u64,
}

impl RepeatedWarning {
    /// A warning not yet logged, from the module `target` (pass `module_path!()`).
    pub const fn new(target: &'static str) -> Self {
        RepeatedWarning {
            target,
            state: Mutex::new(State {
                last_logged: None,
                suppressed: 0,
            }),
        }
    }

    /// Logs `message` at warn level, unless this warning was logged less than a second ago;
    /// then it is only counted. The message is formatted only when it is logged.
    pub fn warn(&self, message: fmt::Arguments<'_>) {
        let Some(suppressed) = self.admit(Instant::now()) else {
            return;
        };
        if suppressed == 0 {
            log::warn!(target: self.target, "{message}");
        } else {
            log::warn!(
                target: self.target,
                "{message} ({suppressed} more like it suppressed since the last one)"
            );
        }
    }

    /// Whether a warning at `now` is logged, and if so how many were suppressed before it.
    fn admit(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(last) = state.last_logged {
            if now.saturating_duration_since(last) < INTERVAL {
                state.suppressed += 1;
                return None;
            }
        }
        state.last_logged = Some(now);
        Some(std::mem::take(&mut state.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_with_the_count_of_the_rest() {
        let warning = RepeatedWarning::new(module_path!());
        let start = Instant::now();
        assert_eq!(warning.admit(start), Some(0));
        for i in 1..=100 {
            assert_eq!(warning.admit(start + Duration::from_millis(i * 9)), None);
        }
        assert_eq!(warning.admit(start + INTERVAL), Some(100));
        assert_eq!(warning.admit(start + INTERVAL), None);
        assert_eq!(warning.admit(start + 2 * INTERVAL), Some(1));
    }
}
