//! What the operator says about a backend, beside what health checks say: its administrative
//! state (ready, drain, maint) and the weights the admin API accepts. [`crate::eligibility`]
//! says what each lets in.

use std::fmt;
use std::str::FromStr;

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
