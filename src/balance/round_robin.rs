//! Round robin (phase 1): each request goes to the next backend in turn.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{Balancer, Pick, Request};
use crate::backend::Backend;

/// Round robin: backend 0, 1, 2, 0, 1, 2, …, skipping backends that are not candidates.
///
/// The chapter keeps its index under a lock; a single atomic counter does the same job without
/// making concurrent requests wait for each other.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    /// A round robin that starts with the first backend.
    pub fn new() -> Self {
        RoundRobin::default()
    }
}

impl Balancer for RoundRobin {
    fn name(&self) -> &'static str {
        "round-robin"
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
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let index = (0..count)
            .map(|step| (turn + step) % count)
            .find(|&i| is_candidate(i))?;
        let reason = if request.explain {
            explain(backends, turn, index)
        } else {
            String::new()
        };
        Some(Pick { index, reason })
    }
}

/// Says whose turn it was, and which backends were passed over because they were not candidates.
fn explain(backends: &[Arc<Backend>], turn: usize, index: usize) -> String {
    let count = backends.len();
    let skipped: Vec<&str> = (0..count)
        .map(|step| (turn + step) % count)
        .take_while(|&i| i != index)
        .map(|i| backends[i].name())
        .collect();
    let chosen = backends[index].name();
    if skipped.is_empty() {
        format!(
            "round-robin: turn {turn} goes to {chosen} ({} of {count})",
            index + 1
        )
    } else {
        format!(
            "round-robin: turn {turn} skips {} (not available) and goes to {chosen}",
            skipped.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u16) -> Vec<Arc<Backend>> {
        (0..n)
            .map(|i| {
                Arc::new(Backend::new(
                    format!("b{i}"),
                    ([127, 0, 0, 1], 9000 + i).into(),
                    1,
                ))
            })
            .collect()
    }

    fn request() -> Request {
        Request {
            client_ip: [127, 0, 0, 1].into(),
            explain: false,
        }
    }

    #[test]
    fn rotates_in_order() {
        let rr = RoundRobin::new();
        let all = backends(3);
        let picks: Vec<usize> = (0..7)
            .map(|_| rr.pick(&all, &request(), &|_| true).unwrap().index)
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn skips_backends_that_are_not_candidates() {
        let rr = RoundRobin::new();
        let all = backends(3);
        let picks: Vec<usize> = (0..4)
            .map(|_| rr.pick(&all, &request(), &|i| i != 1).unwrap().index)
            .collect();
        assert_eq!(picks, [0, 2, 2, 0]);
        assert!(rr.pick(&all, &request(), &|_| false).is_none());
    }
}
