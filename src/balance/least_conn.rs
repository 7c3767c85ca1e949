//! Least connections (phase 2): the backend with the fewest requests in flight.
//!
//! The count is the backend's in-flight gauge, which the proxy raises with an RAII guard right
//! after the pick and which falls when the guard drops, on every path out of the exchange:
//! success, error, timeout or panic. Slow backends pile up requests in flight, so new ones go
//! elsewhere without the balancer measuring anything else.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{Balancer, Pick, Request};
use crate::backend::Backend;

/// Least connections: fewest requests in flight per unit of weight, ties broken round robin.
///
/// The chapter takes `min()` over a dict of counts, which breaks ties by taking the first
/// backend, so on an idle system (every count zero between sequential requests) every request
/// goes to the first backend. Here the search starts one backend further at each pick, and the
/// first backend with the lowest load from that starting point wins, so ties rotate.
#[derive(Debug, Default)]
pub struct LeastConnections {
    next: AtomicUsize,
}

impl LeastConnections {
    /// A least-connections balancer whose first tie goes to the first backend.
    pub fn new() -> Self {
        LeastConnections::default()
    }
}

impl Balancer for LeastConnections {
    fn name(&self) -> &'static str {
        "least-conn"
    }

    fn pick(
        &self,
        backends: &[Arc<Backend>],
        request: &Request,
        is_candidate: &dyn Fn(usize) -> bool,
    ) -> Option<Pick> {
        let count = backends.len();
        if count == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % count;
        // The counts as they were compared, kept only to explain (an empty Vec allocates nothing).
        let mut seen = Vec::new();
        let mut best: Option<(usize, u64)> = None;
        for i in (0..count).map(|step| (start + step) % count) {
            if !is_candidate(i) {
                continue;
            }
            let active = backends[i].stats().active();
            if request.explain {
                seen.push((i, active));
            }
            let weight = backends[i].weight();
            if best.is_none_or(|(b, b_active)| {
                is_less_loaded(active, weight, b_active, backends[b].weight())
            }) {
                best = Some((i, active));
            }
        }
        let (index, _) = best?;
        let reason = if request.explain {
            explain(backends, &seen, start, index)
        } else {
            String::new()
        };
        Some(Pick { index, reason })
    }
}

/// Whether `a_active / a_weight < b_active / b_weight`, compared by cross-multiplying so that
/// no division rounds (and no float is needed).
fn is_less_loaded(a_active: u64, a_weight: u32, b_active: u64, b_weight: u32) -> bool {
    u128::from(a_active) * u128::from(b_weight) < u128::from(b_active) * u128::from(a_weight)
}

/// One line with each candidate's in-flight count and weight, in the order they were compared,
/// and the backends skipped as unavailable.
fn explain(backends: &[Arc<Backend>], seen: &[(usize, u64)], start: usize, index: usize) -> String {
    let mut line = String::from("least-conn: in flight/weight");
    for &(i, active) in seen {
        let _ = write!(
            line,
            " {}={active}/{}",
            backends[i].name(),
            backends[i].weight()
        );
    }
    let _ = write!(
        line,
        " -> {} (fewest; ties go to the first from {}, which moves on each request)",
        backends[index].name(),
        backends[start].name()
    );
    let skipped: Vec<&str> = (0..backends.len())
        .filter(|i| !seen.iter().any(|(s, _)| s == i))
        .map(|i| backends[i].name())
        .collect();
    if !skipped.is_empty() {
        let _ = write!(line, "; skipped as unavailable: {}", skipped.join(", "));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::test_support::{backends, picks, request};

    #[test]
    fn ties_rotate_on_an_idle_system() {
        let all = backends(&[1, 1, 1]);
        let order = picks(&LeastConnections::new(), &all, 7, &|_| true);
        assert_eq!(order, [0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn busy_backends_are_avoided() {
        let all = backends(&[1, 1, 1]);
        let _busy = [
            all[0].stats().begin_request(),
            all[0].stats().begin_request(),
        ];
        let _one = all[2].stats().begin_request();
        let order = picks(&LeastConnections::new(), &all, 4, &|_| true);
        assert_eq!(order, [1, 1, 1, 1]);
    }

    #[test]
    fn load_is_in_flight_per_unit_of_weight() {
        let all = backends(&[3, 1]);
        // Two in flight on weight 3 is less loaded than one on weight 1.
        let _heavy = [
            all[0].stats().begin_request(),
            all[0].stats().begin_request(),
        ];
        let _light = all[1].stats().begin_request();
        assert_eq!(
            picks(&LeastConnections::new(), &all, 3, &|_| true),
            [0, 0, 0]
        );
        assert!(is_less_loaded(2, 3, 1, 1));
        assert!(!is_less_loaded(3, 3, 1, 1));
    }

    #[test]
    fn only_candidates_are_chosen() {
        let all = backends(&[1, 1, 1]);
        let order = picks(&LeastConnections::new(), &all, 4, &|i| i != 1);
        assert_eq!(order, [0, 2, 2, 0]);
        assert!(LeastConnections::new()
            .pick(&all, &request(false), &|_| false)
            .is_none());
    }

    #[test]
    fn in_flight_counts_are_released_even_when_a_request_panics() {
        let all = backends(&[1, 1]);
        let balancer = LeastConnections::new();
        let pick = balancer.pick(&all, &request(false), &|_| true).unwrap();
        let backend = Arc::clone(&all[pick.index]);
        let outcome = std::panic::catch_unwind(move || {
            let _in_flight = backend.stats().begin_request();
            panic!("the exchange failed");
        });
        assert!(outcome.is_err());
        assert_eq!(all[pick.index].stats().active(), 0);
    }

    #[test]
    fn explains_with_the_counts_compared() {
        let all = backends(&[1, 2, 1]);
        let _busy = all[0].stats().begin_request();
        let balancer = LeastConnections::new();
        let pick = balancer.pick(&all, &request(true), &|i| i != 2).unwrap();
        assert_eq!(pick.index, 1);
        assert_eq!(
            pick.reason,
            "least-conn: in flight/weight b0=1/1 b1=0/2 -> b1 (fewest; ties go to the first \
             from b0, which moves on each request); skipped as unavailable: b2"
        );
        assert!(balancer
            .pick(&all, &request(false), &|_| true)
            .unwrap()
            .reason
            .is_empty());
    }
}
