//! Which backends may take a request: the one question every algorithm asks before it chooses.
//!
//! Two things decide it, kept apart as HAProxy keeps them:
//! - **health**, which the checks decide ([`crate::health`]): a backend that fails is taken out
//!   and comes back by itself;
//! - the **administrative state** and the run-time **weight**, which the operator decides on the
//!   admin listener (`POST /backends/{name}/drain`, `loadbalancer ctl drain`): a backend being
//!   deployed is taken out on purpose and comes back only when told.
//!
//! A request asks for a backend in one of two ways ([`Admission`]): as a new request, which the
//! algorithm balances, or as a request of a sticky session already bound to the backend. A
//! draining backend (or one of weight 0) takes only the second kind, so that a user logged in on
//! it finishes what they were doing while no one new arrives; a backend in maintenance takes
//! neither, and its sessions move.

use std::fmt;
use std::str::FromStr;

use crate::backend::Backend;

/// The largest weight the admin API accepts (HAProxy's limit too).
pub const MAX_WEIGHT: u32 = 256;

/// What the operator says about a backend, beside what health checks say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdminState {
    /// In rotation (when healthy): the usual.
    #[default]
    Ready,
    /// No new requests, except those of sticky sessions bound to it; requests in flight and
    /// open tunnels finish; health checks go on.
    Drain,
    /// No traffic at all: its sticky sessions move elsewhere, and active checks stop.
    Maint,
}

impl AdminState {
    /// Every state, in the order the page shows its buttons.
    pub const ALL: [AdminState; 3] = [AdminState::Ready, AdminState::Drain, AdminState::Maint];

    /// The state's name, as the admin API and `/stats.json` spell it.
    pub fn name(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        }
    }

    /// The state stored in an atomic byte (see [`AdminState::as_byte`]).
    pub fn from_byte(byte: u8) -> AdminState {
        match byte {
            1 => AdminState::Drain,
            2 => AdminState::Maint,
            _ => AdminState::Ready,
        }
    }

    /// The state as an atomic byte holds it.
    pub fn as_byte(self) -> u8 {
        match self {
            AdminState::Ready => 0,
            AdminState::Drain => 1,
            AdminState::Maint => 2,
        }
    }
}

impl fmt::Display for AdminState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for AdminState {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        AdminState::ALL
            .into_iter()
            .find(|state| state.name() == text)
            .ok_or_else(|| format!("unknown state '{text}': ready, drain or maint"))
    }
}

/// How a request asks for a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A request the algorithm balances.
    New,
    /// A request of a sticky session bound to this backend.
    Bound,
}

/// Whether `backend` may take a request that asks as `admission`: available to health checks,
/// and let in by its administrative state and weight.
pub fn admits(backend: &Backend, admission: Admission) -> bool {
    backend.health().is_available() && admits_by_admin(backend, admission)
}

/// The operator's half of [`admits`]: ready with a weight above 0 takes every request; drain,
/// or weight 0, only those of bound sessions; maint none.
pub fn admits_by_admin(backend: &Backend, admission: Admission) -> bool {
    match (backend.admin_state(), admission) {
        (AdminState::Maint, _) => false,
        (AdminState::Ready, _) if backend.weight() > 0 => true,
        (_, admission) => admission == Admission::Bound,
    }
}

/// A weight the admin API accepts: a whole number from 0 to [`MAX_WEIGHT`].
pub fn parse_weight(text: &str) -> Result<u32, String> {
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|weight| *weight <= MAX_WEIGHT)
        .ok_or_else(|| format!("bad weight '{text}': a whole number from 0 to {MAX_WEIGHT}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> Backend {
        Backend::new("b".into(), ([127, 0, 0, 1], 9).into(), 1)
    }

    #[test]
    fn each_state_lets_in_what_it_says() {
        let b = backend();
        assert!(admits(&b, Admission::New) && admits(&b, Admission::Bound));
        b.set_admin_state(AdminState::Drain);
        assert!(!admits(&b, Admission::New) && admits(&b, Admission::Bound));
        b.set_admin_state(AdminState::Maint);
        assert!(!admits(&b, Admission::New) && !admits(&b, Admission::Bound));
        b.set_admin_state(AdminState::Ready);
        b.set_run_time_weight(0);
        assert!(!admits(&b, Admission::New) && admits(&b, Admission::Bound));
    }

    #[test]
    fn states_and_weights_are_read_as_the_api_spells_them() {
        for state in AdminState::ALL {
            assert_eq!(state.name().parse::<AdminState>(), Ok(state));
            assert_eq!(AdminState::from_byte(state.as_byte()), state);
        }
        assert!("down"
            .parse::<AdminState>()
            .unwrap_err()
            .contains("ready, drain or maint"));
        assert_eq!(parse_weight("0"), Ok(0));
        assert_eq!(parse_weight("256"), Ok(256));
        for bad in ["257", "-1", "1.5", "", "x"] {
            assert!(parse_weight(bad).unwrap_err().contains("0 to 256"), "{bad}");
        }
    }
}
