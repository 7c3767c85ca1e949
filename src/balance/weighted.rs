//! Smooth weighted round robin (phase 2): backends take turns in proportion to their weights.
//!
//! This is the algorithm nginx uses for its `weight=` parameter. Every backend keeps a current
//! weight; each pick adds every candidate's weight to its current weight, takes the largest, and
//! subtracts the sum of the weights from the one it took. Over every window of sum(weights)
//! requests each backend gets exactly its weight, and a heavy backend's turns are spread out
//! instead of coming in a burst.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use super::{Balancer, Pick, Request};
use crate::backend::Backend;

/// Smooth weighted round robin, as nginx does it.
///
/// The chapter uses the interleaved weighted round robin of LVS: it walks the backends over and
/// over with a current weight that starts at the largest weight and falls by one (the weights'
/// greatest common divisor) after each full pass, taking every backend whose weight is at least
/// the current weight. Its shares are right (5, 3, 2 gives 50/30/20 %), but the order is not:
/// 5, 3, 2 gives `A A A B A B C A B C`, three requests in a row to the heaviest backend at the
/// start of every cycle, and with weights like 100, 1, 1 the first backend gets 100 in a row. The
/// smooth algorithm gives `A B C A A B A C B A` instead, the same shares with the turns spread
/// out, and it needs no greatest common divisor or maximum weight kept up to date.
#[derive(Debug, Default)]
pub struct SmoothWeighted {
    /// Each backend's current weight. The pick is a read-modify-write over all of them, so they
    /// live under one lock; it is held for a few additions only, never across I/O.
    current: Mutex<Vec<i64>>,
}

impl SmoothWeighted {
    /// A smooth weighted round robin with every current weight at zero.
    pub fn new() -> Self {
        SmoothWeighted::default()
    }
}

impl Balancer for SmoothWeighted {
    fn name(&self) -> &'static str {
        "weighted"
    }

    fn pick(
        &self,
        backends: &[Arc<Backend>],
        request: &Request,
        is_candidate: &dyn Fn(usize) -> bool,
    ) -> Option<Pick> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        current.resize(backends.len(), 0);
        // Backends that cannot be chosen neither gain weight nor count in the total, as in nginx:
        // the others share the traffic in proportion to their own weights meanwhile.
        let mut total = 0;
        let mut best: Option<usize> = None;
        for (i, backend) in backends.iter().enumerate() {
            if !is_candidate(i) {
                continue;
            }
            let weight = i64::from(backend.weight());
            current[i] += weight;
            total += weight;
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        let index = best?;
        let reason = if request.explain {
            explain(backends, &current, is_candidate, index, total)
        } else {
            String::new()
        };
        current[index] -= total;
        Some(Pick { index, reason })
    }
}

/// One line naming every backend's current weight (after this pick's additions), the winner,
/// and where the winner's weight falls to.
fn explain(
    backends: &[Arc<Backend>],
    current: &[i64],
    is_candidate: &dyn Fn(usize) -> bool,
    index: usize,
    total: i64,
) -> String {
    let mut line = String::from("weighted: current weights");
    let mut skipped = Vec::new();
    for (i, backend) in backends.iter().enumerate() {
        if is_candidate(i) {
            let _ = write!(line, " {}={}", backend.name(), current[i]);
        } else {
            skipped.push(backend.name());
        }
    }
    let _ = write!(
        line,
        " -> {} (largest), which drops by the total {total} to {}",
        backends[index].name(),
        current[index] - total
    );
    if !skipped.is_empty() {
        let _ = write!(line, "; skipped as unavailable: {}", skipped.join(", "));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::test_support::{backends, picks, request};
    use proptest::prelude::*;

    #[test]
    fn five_three_two_is_interleaved() {
        let all = backends(&[5, 3, 2]);
        let order = picks(&SmoothWeighted::new(), &all, 20, &|_| true);
        let letters: String = order.iter().map(|&i| (b'A' + i as u8) as char).collect();
        assert_eq!(letters, "ABCAABACBAABCAABACBA");
    }

    #[test]
    fn unavailable_backends_are_skipped_and_share_is_kept_among_the_rest() {
        let all = backends(&[5, 3, 2]);
        let order = picks(&SmoothWeighted::new(), &all, 8, &|i| i != 0);
        assert!(!order.contains(&0));
        assert_eq!(order.iter().filter(|&&i| i == 1).count(), 5);
        assert!(SmoothWeighted::new()
            .pick(&all, &request(false), &|_| false)
            .is_none());
    }

    #[test]
    fn explains_with_the_current_weights() {
        let all = backends(&[5, 3, 2]);
        let wrr = SmoothWeighted::new();
        let first = wrr.pick(&all, &request(true), &|_| true).unwrap();
        assert_eq!(
            first.reason,
            "weighted: current weights b0=5 b1=3 b2=2 -> b0 (largest), which drops by the \
             total 10 to -5"
        );
        let second = wrr.pick(&all, &request(true), &|i| i != 2).unwrap();
        assert_eq!(
            second.reason,
            "weighted: current weights b0=0 b1=6 -> b1 (largest), which drops by the total 8 \
             to -2; skipped as unavailable: b2"
        );
        assert!(wrr
            .pick(&all, &request(false), &|_| true)
            .unwrap()
            .reason
            .is_empty());
    }

    /// A bound on the longest run smooth weighted round robin gives a backend of `weight` out
    /// of `total`. Spread perfectly, a backend's run would be about `weight / (total - weight)`
    /// picks long; the current weights drift within a band that can stretch a run, but not
    /// beyond twice that (plus one), as this property test checks. The chapter's interleaved
    /// algorithm, by contrast, gives runs as long as the weight itself.
    fn run_bound(weight: u64, total: u64) -> u64 {
        if weight == total {
            u64::MAX
        } else {
            2 * (weight.div_ceil(total - weight) + 1)
        }
    }

    proptest! {
        #[test]
        fn every_window_of_sum_weights_gives_exact_shares(
            weights in prop::collection::vec(1u32..=100, 1..=10)
        ) {
            let all = backends(&weights);
            let total: usize = weights.iter().map(|&w| w as usize).sum();
            let order = picks(&SmoothWeighted::new(), &all, 2 * total, &|_| true);
            // The first window holds each backend exactly `weight` times, and the sequence
            // repeats every `total` picks: so every window of that length, wherever it starts,
            // holds the same picks in another order.
            for (i, &weight) in weights.iter().enumerate() {
                let got = order[..total].iter().filter(|&&p| p == i).count();
                prop_assert_eq!(got, weight as usize);
            }
            prop_assert_eq!(&order[..total], &order[total..]);
        }

        #[test]
        fn runs_on_one_backend_are_bounded(
            weights in prop::collection::vec(1u32..=100, 1..=10)
        ) {
            let all = backends(&weights);
            let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
            let order = picks(&SmoothWeighted::new(), &all, 2 * total as usize, &|_| true);
            for run in order.chunk_by(|a, b| a == b) {
                let weight = u64::from(weights[run[0]]);
                prop_assert!(run.len() as u64 <= run_bound(weight, total),
                    "run of {} on weight {} of {}", run.len(), weight, total);
            }
        }
    }
}
