//! Balancing: choosing which backend takes a request.
//!
//! Every algorithm implements the small [`Balancer`] trait, one algorithm per file. The proxy
//! decides which backends are candidates (those [`crate::eligibility`] admits: healthy, and not
//! drained or in maintenance by the operator, minus those already tried for this request) and
//! the balancer picks among them, so health checks, drain and retries work the same way with
//! every algorithm.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use crate::backend::Backend;

mod consistent_hash;
mod ip_hash;
mod least_conn;
mod round_robin;
mod weighted;

pub use consistent_hash::ConsistentHash;
pub use ip_hash::IpHash;
pub use least_conn::LeastConnections;
pub use round_robin::RoundRobin;
pub use weighted::SmoothWeighted;

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

    /// Called after the operator changed a weight at run time. The algorithms that read the
    /// weights at each pick need nothing; one that built something from them (consistent
    /// hashing's ring) builds it again.
    fn weights_changed(&self, _backends: &[Arc<Backend>]) {}

    /// Whether any candidate will do (round robin, weighted, least connections), or a key ties
    /// a client to one backend (the hashing algorithms). Only in the first case does a backend
    /// at its connection limit give way to one with room (see [`crate::limit`]), or a backend
    /// still ramping up pass its pick on to another (see [`crate::slow_start`]); a client of a
    /// hashing algorithm waits in its own backend's queue and keeps its backend.
    fn chooses_freely(&self) -> bool {
        true
    }
}

/// The algorithms `--algorithm` can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Algorithm {
    /// Each backend in turn (phase 1).
    RoundRobin,
    /// Smooth weighted round robin: turns in proportion to the weights.
    Weighted,
    /// The backend with the fewest requests in flight per unit of weight.
    LeastConn,
    /// MD5 of the client IP modulo the number of backends.
    IpHash,
    /// The client IP's place on a hash ring with virtual nodes.
    ConsistentHash,
}

impl Algorithm {
    /// Every algorithm, in the order the chapter introduces them.
    pub const ALL: [Algorithm; 5] = [
        Algorithm::RoundRobin,
        Algorithm::Weighted,
        Algorithm::LeastConn,
        Algorithm::IpHash,
        Algorithm::ConsistentHash,
    ];

    /// A balancer running this algorithm over `backends` (consistent hashing builds its ring
    /// from their names and weights; the others only need them at each pick).
    pub fn balancer<'a>(
        self,
        backends: impl IntoIterator<Item = &'a Backend>,
    ) -> Box<dyn Balancer> {
        match self {
            Algorithm::RoundRobin => Box::new(RoundRobin::new()),
            Algorithm::Weighted => Box::new(SmoothWeighted::new()),
            Algorithm::LeastConn => Box::new(LeastConnections::new()),
            Algorithm::IpHash => Box::new(IpHash::new()),
            Algorithm::ConsistentHash => Box::new(ConsistentHash::new(backends)),
        }
    }

    /// The name as `--algorithm` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round-robin",
            Algorithm::Weighted => "weighted",
            Algorithm::LeastConn => "least-conn",
            Algorithm::IpHash => "ip-hash",
            Algorithm::ConsistentHash => "consistent-hash",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Helpers for the algorithms' unit tests: backends that are never connected to, and a loop of
/// picks.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// Backends `b0`, `b1`, … with the given weights, on addresses nothing listens on.
    pub fn backends(weights: &[u32]) -> Vec<Arc<Backend>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| {
                let port = 9000 + u16::try_from(i).unwrap_or(0);
                Arc::new(Backend::new(
                    format!("b{i}"),
                    ([127, 0, 0, 1], port).into(),
                    weight,
                ))
            })
            .collect()
    }

    /// A request from 127.0.0.1.
    pub fn request(explain: bool) -> Request {
        request_from([127, 0, 0, 1].into(), explain)
    }

    /// A request from `client_ip`.
    pub fn request_from(client_ip: IpAddr, explain: bool) -> Request {
        Request { client_ip, explain }
    }

    /// The indices of `count` picks in a row.
    pub fn picks(
        balancer: &dyn Balancer,
        backends: &[Arc<Backend>],
        count: usize,
        is_candidate: &dyn Fn(usize) -> bool,
    ) -> Vec<usize> {
        (0..count)
            .map(|_| {
                balancer
                    .pick(backends, &request(false), is_candidate)
                    .expect("a candidate")
                    .index
            })
            .collect()
    }

    #[test]
    fn algorithm_names_match_their_balancers() {
        let all = backends(&[1, 2]);
        for algorithm in Algorithm::ALL {
            let balancer = algorithm.balancer(all.iter().map(|b| &**b));
            assert_eq!(balancer.name(), algorithm.name());
            let value = clap::ValueEnum::to_possible_value(&algorithm).expect("not skipped");
            assert_eq!(value.get_name(), algorithm.name());
        }
    }
}
