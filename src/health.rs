//! Backend health. In phase 1 every backend is assumed healthy; phase 3 adds active and passive
//! checks that take failing backends out of rotation and bring them back.

use std::time::Duration;

/// What the balancer knows about one backend's health.
#[derive(Debug, Default)]
pub struct Health {}

impl Health {
    /// Whether the backend is considered healthy.
    pub fn is_healthy(&self) -> bool {
        true
    }

    /// Whether the backend may be chosen for a request now.
    pub fn is_available(&self) -> bool {
        true
    }

    /// How long until the backend could be chosen again, if it cannot be now.
    pub fn available_in(&self) -> Duration {
        Duration::from_secs(1)
    }

    /// Takes note of how a request to the backend went (passive health checking).
    pub fn observe_request(&self, _ok: bool) {}
}
