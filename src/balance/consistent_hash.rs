//! Consistent hashing (phase 2, beyond the chapter): client IPs and backends placed on one ring
//! of hash values, each client served by the first backend point clockwise from its own.
//!
//! The chapter's IP hash takes the hash modulo the number of backends, so removing one of three
//! backends moves about two clients in three. On a ring, removing a backend takes away only its
//! own points: only its clients move, and adding a backend moves about 1/(N+1) of the clients,
//! the share it should take. Each backend appears at many points (virtual nodes), in proportion
//! to its weight, so the arcs between points even out.

use std::fmt::Write as _;
use std::sync::Arc;

use arc_swap::ArcSwap;

use md5::{Digest, Md5};

use super::ip_hash::md5_of_ip;
use super::{Balancer, Pick, Request};
use crate::backend::Backend;

/// Points on the ring per unit of weight. With 160 (ketama's choice) each of a few equal backends
/// gets its fair share within about ten per cent.
const POINTS_PER_WEIGHT: u64 = 160;

/// An upper bound on the ring's size, so that huge weights cannot use unbounded memory; beyond
/// it, every backend gets fewer points per unit of weight (at least one).
const MAX_POINTS: u64 = 1 << 20;

/// One point on the ring: a hash value and the backend it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Point {
    hash: u64,
    index: usize,
}

/// Consistent hashing of the client IP on a ring with virtual nodes.
#[derive(Debug)]
pub struct ConsistentHash {
    /// Sorted by hash. Built with the balancer for its backend list (a reload builds a new one),
    /// and again when the operator changes a weight at run time.
    ring: ArcSwap<Vec<Point>>,
}

impl ConsistentHash {
    /// Builds the ring for `backends`, in the order the load balancer will hold them. A backend's
    /// points depend only on its name and weight, not its position, so a backend list with one
    /// backend more or less gives the other backends the same points.
    pub fn new<'a>(backends: impl IntoIterator<Item = &'a Backend>) -> Self {
        let backends: Vec<&Backend> = backends.into_iter().collect();
        ConsistentHash {
            ring: ArcSwap::from_pointee(ring_of(&backends)),
        }
    }
}

/// The ring's points for `backends`, sorted: a backend of weight 0 has none.
fn ring_of(backends: &[&Backend]) -> Vec<Point> {
    let total_weight: u64 = backends.iter().map(|b| u64::from(b.weight())).sum();
    let per_weight = (MAX_POINTS / total_weight.max(1)).clamp(1, POINTS_PER_WEIGHT);
    let mut ring: Vec<Point> = backends
        .iter()
        .enumerate()
        .flat_map(|(index, backend)| {
            let points = per_weight * u64::from(backend.weight());
            (0..points).map(move |n| Point {
                hash: hash_of(format!("{}#{n}", backend.name()).as_bytes()),
                index,
            })
        })
        .collect();
    ring.sort_unstable();
    ring
}

/// The position of the first point of `ring` at or after `hash`, wrapping around past the top.
fn first_point_from(ring: &[Point], hash: u64) -> usize {
    let position = ring.partition_point(|point| point.hash < hash);
    if position == ring.len() {
        0
    } else {
        position
    }
}

/// A 64-bit hash: the first eight bytes of the MD5 digest.
fn hash_of(bytes: &[u8]) -> u64 {
    first_eight(&Md5::digest(bytes).into())
}

fn first_eight(digest: &[u8; 16]) -> u64 {
    let mut eight = [0; 8];
    eight.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(eight)
}

impl Balancer for ConsistentHash {
    fn name(&self) -> &'static str {
        "consistent-hash"
    }

    /// A backend's share of the ring follows its weight, so a new weight needs a new ring.
    fn weights_changed(&self, backends: &[Arc<Backend>]) {
        let backends: Vec<&Backend> = backends.iter().map(|b| &**b).collect();
        self.ring.store(Arc::new(ring_of(&backends)));
    }

    /// A client keeps its backend: at the backend's connection limit it waits in its queue,
    /// and slow start does not move it.
    fn chooses_freely(&self) -> bool {
        false
    }

    fn pick(
        &self,
        backends: &[Arc<Backend>],
        request: &Request,
        is_candidate: &dyn Fn(usize) -> bool,
    ) -> Option<Pick> {
        let usable = |i: usize| i < backends.len() && is_candidate(i);
        let ring = self.ring.load();
        // Checked first so that the walk below always ends at a usable point.
        if ring.is_empty() || !(0..backends.len()).any(usable) {
            return None;
        }
        let key = first_eight(&md5_of_ip(request.client_ip));
        let start = first_point_from(&ring, key);
        // Walking on clockwise past an unavailable backend's points spreads its clients over
        // the backends that follow them, and leaves every other client where it was.
        let point = (0..ring.len())
            .map(|step| ring[(start + step) % ring.len()])
            .find(|point| usable(point.index))?;
        let reason = if request.explain {
            explain(&ring, backends, request, (key, start), point)
        } else {
            String::new()
        };
        Some(Pick {
            index: point.index,
            reason,
        })
    }
}

/// One line with the client's hash, the ring point it reached, and any backend passed over.
fn explain(
    ring: &[Point],
    backends: &[Arc<Backend>],
    request: &Request,
    (key, start): (u64, usize),
    chosen: Point,
) -> String {
    let first = ring[start];
    let mut line = format!(
        "consistent-hash: md5(\"{}\") -> {key:#018x}; next of {} ring points clockwise is \
             {:#018x}",
        request.client_ip.to_canonical(),
        ring.len(),
        first.hash,
    );
    let owner = |index: usize| backends.get(index).map_or("?", |b| b.name());
    if first == chosen {
        let _ = write!(line, " of {}", owner(chosen.index));
    } else {
        let _ = write!(
            line,
            " of {} (unavailable), moved on to {:#018x}",
            owner(first.index),
            chosen.hash
        );
    }
    let _ = write!(line, " -> {}", owner(chosen.index));
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::test_support::{backends, request_from};
    use proptest::prelude::*;
    use std::net::IpAddr;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n * 7919))
    }

    /// The name of the backend each of `clients` clients lands on.
    fn homes(all: &[Arc<Backend>], clients: u32) -> Vec<String> {
        let ring = ConsistentHash::new(all.iter().map(|b| &**b));
        (0..clients)
            .map(|n| {
                let pick = ring.pick(all, &request_from(ip(n), false), &|_| true);
                all[pick.expect("a backend").index].name().to_string()
            })
            .collect()
    }

    fn without(all: &[Arc<Backend>], removed: usize) -> Vec<Arc<Backend>> {
        let mut fewer = all.to_vec();
        fewer.remove(removed);
        fewer
    }

    #[test]
    fn equal_backends_get_about_equal_shares() {
        let all = backends(&[1, 1, 1]);
        let homes = homes(&all, 6000);
        for backend in &all {
            let share = homes.iter().filter(|h| *h == backend.name()).count() as f64 / 6000.0;
            assert!((0.25..0.42).contains(&share), "{}: {share}", backend.name());
        }
    }

    #[test]
    fn weights_scale_the_share() {
        let all = backends(&[3, 1]);
        let homes = homes(&all, 4000);
        let heavy = homes.iter().filter(|h| *h == "b0").count() as f64 / 4000.0;
        assert!((0.68..0.82).contains(&heavy), "{heavy}");
    }

    #[test]
    fn adding_a_backend_moves_about_one_in_n_plus_one() {
        let five = backends(&[1, 1, 1, 1, 1]);
        let four = without(&five, 4);
        let (before, after) = (homes(&four, 5000), homes(&five, 5000));
        let moved: Vec<usize> = (0..5000).filter(|&c| before[c] != after[c]).collect();
        let share = moved.len() as f64 / 5000.0;
        assert!((0.12..0.28).contains(&share), "moved {share}");
        assert!(
            moved.iter().all(|&c| after[c] == "b4"),
            "moves only to the new one"
        );
    }

    #[test]
    fn an_unavailable_backend_gives_up_only_its_own_clients() {
        let all = backends(&[1, 1, 1]);
        let ring = ConsistentHash::new(all.iter().map(|b| &**b));
        for n in 0..1000 {
            let client = request_from(ip(n), false);
            let home = ring.pick(&all, &client, &|_| true).unwrap().index;
            let now = ring.pick(&all, &client, &|i| i != 0).unwrap().index;
            assert!(now != 0 && (home == 0 || now == home));
        }
        assert!(ring
            .pick(&all, &request_from(ip(1), false), &|_| false)
            .is_none());
    }

    #[test]
    fn explains_with_the_hash_and_the_ring_point() {
        let all = backends(&[1, 1]);
        let ring = ConsistentHash::new(all.iter().map(|b| &**b));
        let client = request_from("127.0.0.1".parse().unwrap(), true);
        let pick = ring.pick(&all, &client, &|_| true).unwrap();
        let chosen = all[pick.index].name();
        assert!(pick.reason.starts_with(
            "consistent-hash: md5(\"127.0.0.1\") -> 0xf528764d624db129; next of 320 ring points"
        ));
        assert!(pick.reason.ends_with(&format!(" of {chosen} -> {chosen}")));
        let other = ring.pick(&all, &client, &|i| i != pick.index).unwrap();
        assert!(other
            .reason
            .contains(&format!(" of {chosen} (unavailable), moved on to 0x")));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn removing_a_backend_moves_only_its_clients(
            weights in prop::collection::vec(1u32..=5, 2..=8),
            removed in 0usize..8,
        ) {
            let all = backends(&weights);
            let removed = removed % all.len();
            let fewer = without(&all, removed);
            let (before, after) = (homes(&all, 500), homes(&fewer, 500));
            for client in 0..500 {
                if before[client] != after[client] {
                    prop_assert_eq!(&before[client], all[removed].name());
                }
            }
        }
    }
}
