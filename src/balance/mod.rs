//! Balancing: choosing which backend takes a request.
//!
//! Every algorithm implements the small [`Balancer`] trait, one algorithm per file. The proxy
//! decides which backends are candidates (healthy ones, minus those already tried for this
//! request) and the balancer picks among them, so health checks and retries work the same way
//! with every algorithm.

use std::net::IpAddr;
use std::sync::Arc;

use crate::backend::Backend;

mod round_robin;

pub use round_robin::RoundRobin;

/// What a balancer may look at when it chooses.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    /// The client's IP address (the key for hashing algorithms).
    pub client_ip: IpAddr,
    /// Whether to say why: fills [`Pick::reason`] for the `X-Lb-Decision` header.
    pub explain: bool,
}

/// A balancer's choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pick {
    /// Index of the chosen backend.
    pub index: usize,
    /// Why it was chosen, in one line a learner can read; empty unless asked to explain.
    pub reason: String,
}

/// An algorithm that chooses a backend.
pub trait Balancer: Send + Sync {
    /// The algorithm's name, as `--algorithm` spells it.
    fn name(&self) -> &'static str;

    /// Chooses one of `backends` for which `is_candidate(index)` holds, or `None` when there is none.
    fn pick(
        &self,
        backends: &[Arc<Backend>],
        request: &Request,
        is_candidate: &dyn Fn(usize) -> bool,
    ) -> Option<Pick>;
}
