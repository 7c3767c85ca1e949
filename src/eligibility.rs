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
//!
//! Four settings, all off by default, widen or narrow the choice for every algorithm alike
//! ([`Candidates`]): **backups** (`--backup`) take requests only while no primary backend is in
//! rotation; below the **panic threshold** (`--panic-threshold`), requests go to every primary
//! backend as if all were healthy, since a few overloaded ones would fail anyway; **slow start**
//! (`--slow-start`, [`crate::slow_start`]) lets a backend that just came back take a growing
//! share; and a backend at its **connection limit** (`--backend-max-conns`, [`crate::limit`])
//! gives way to one with room.

use std::sync::Arc;
use std::time::Duration;

use crate::admin_state::AdminState;
use crate::backend::Backend;
use crate::balance::{Balancer, Pick, Request};
use crate::settings::Settings;
use crate::stats::Stats;

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

/// Which backends take requests now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// The primary backends in rotation: the usual.
    Primary,
    /// No primary backend is in rotation, and a backup is: the backups take the requests.
    Backup,
    /// Fewer primary backends are in rotation than `--panic-threshold` asks: every one of
    /// them takes requests, whatever its health (not those the operator took out).
    Panic,
}

/// The backends a request may go to now: those of the [`Tier`] in force, not yet tried for it.
pub struct Candidates<'a> {
    backends: &'a [Arc<Backend>],
    tried: &'a [usize],
    tier: Tier,
    slow_start: Duration,
    /// Whether some backend has a connection limit (`--backend-max-conns`).
    limited: bool,
}

impl<'a> Candidates<'a> {
    /// The candidates among `backends` for a request that already tried `tried`. A change of
    /// panic is counted, logged and an event in `stats`.
    pub fn of(
        backends: &'a [Arc<Backend>],
        settings: &Settings,
        limited: bool,
        tried: &'a [usize],
        stats: &Stats,
    ) -> Self {
        let tier = tier_of(backends, settings.panic_threshold);
        let in_panic = tier.0 == Tier::Panic;
        stats.observe_panic(in_panic, || panic_message(in_panic, tier, settings));
        Candidates {
            backends,
            tried,
            tier: tier.0,
            slow_start: settings.slow_start,
            limited,
        }
    }

    /// Whether the chosen `backend` takes the request now: one that passive checks took out is
    /// chosen once its fail-timeout is over, and only one request may be its trial (see
    /// [`crate::health::Health::admit`]); in panic, health is not asked.
    pub fn lets_in(&self, backend: &Backend) -> bool {
        self.tier == Tier::Panic || backend.health().admit()
    }

    /// Whether the backend at `index` may take a request that asks as `admission`.
    pub fn admits(&self, index: usize, admission: Admission) -> bool {
        let backend = &self.backends[index];
        !self.tried.contains(&index)
            && match self.tier {
                Tier::Primary => !backend.is_backup() && admits(backend, admission),
                Tier::Backup => backend.is_backup() && admits(backend, admission),
                Tier::Panic => !backend.is_backup() && admits_by_admin(backend, admission),
            }
    }

    /// The balancer's pick for a new request, among the backends with room first when some
    /// have a connection limit (`crate::proxy` queues the request when none has). With slow
    /// start, a pick of a backend still ramping up goes through in proportion to its ramp;
    /// otherwise the balancer picks again without it (and the first pick stands when there is
    /// no other). Hashing algorithms are left alone: their promise is that a client keeps its
    /// backend.
    pub fn pick(&self, balancer: &dyn Balancer, request: &Request) -> Option<Pick> {
        let freely = balancer.chooses_freely();
        let admitted = |i: usize| self.admits(i, Admission::New);
        let has_room = |i: usize| self.backends[i].limit().has_room();
        let skip_full =
            self.limited && freely && (0..self.backends.len()).any(|i| admitted(i) && has_room(i));
        let new = |i: usize| admitted(i) && (!skip_full || has_room(i));
        let first = balancer.pick(self.backends, request, &new)?;
        let ramp = self.backends[first.index].ramp();
        if !freely || ramp.lets_through(self.slow_start) {
            return Some(first);
        }
        balancer
            .pick(self.backends, request, &|i| i != first.index && new(i))
            .or(Some(first))
    }
}

/// The tier for `backends` with `--panic-threshold` at `threshold` percent, with how many
/// primary backends are in rotation and how many the operator left in.
fn tier_of(backends: &[Arc<Backend>], threshold: u8) -> (Tier, usize, usize) {
    let has_backups = backends.iter().any(|b| b.is_backup());
    if threshold == 0 && !has_backups {
        return (Tier::Primary, 0, 0);
    }
    let primaries = backends
        .iter()
        .filter(|b| !b.is_backup() && admits_by_admin(b, Admission::New));
    let (mut total, mut in_rotation) = (0, 0);
    for backend in primaries {
        total += 1;
        in_rotation += usize::from(backend.health().is_available());
    }
    let backup_in_rotation = || {
        backends
            .iter()
            .any(|b| b.is_backup() && admits(b, Admission::New))
    };
    let tier = if in_rotation == 0 && has_backups && backup_in_rotation() {
        Tier::Backup
    } else if in_rotation * 100 < usize::from(threshold) * total {
        Tier::Panic
    } else {
        Tier::Primary
    };
    (tier, in_rotation, total)
}

/// The log line and event of panic starting or ending.
fn panic_message(
    in_panic: bool,
    (_, in_rotation, total): (Tier, usize, usize),
    settings: &Settings,
) -> String {
    let share = format!("{in_rotation} of {total} primary backends in rotation");
    if in_panic {
        format!(
            "panic: {share}, below --panic-threshold {} %: balancing over all of them as if \
             healthy",
            settings.panic_threshold
        )
    } else {
        format!("panic over: {share}")
    }
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
}
