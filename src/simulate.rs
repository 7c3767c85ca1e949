//! The offline simulator behind `loadbalancer simulate`: synthetic clients send requests through
//! every balancing algorithm, with no network at all, and a table compares the results.
//!
//! It calls the very `Balancer::pick` the proxy calls, on backends that are never connected to,
//! so the numbers are the algorithms' own behaviour. It answers the chapter's questions in one
//! screen: does each backend get its share, does a backend get long runs of requests, and how
//! many clients lose their backend when one backend goes away (the lesson of modulo IP hash
//! against consistent hashing).

use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::balance::{Algorithm, Balancer, Request};
use crate::cli::parse_positive;
use crate::plural;

/// What `--help` says about each column of the table.
const COLUMNS: &str = "\
Columns:
  algorithm        the --algorithm name
  bN (wW)          share of all requests that backend N (of weight W) received
  max/min          the largest share per unit of weight divided by the smallest: 1.00 means the
                   shares follow the weights exactly; round robin with weights 5,3,2 gives 2.50
  longest run      most requests in a row that went to one backend (smooth weighted round robin
                   keeps it short; the chapter's interleaved version gives runs of 3 for 5,3,2)
  moved if down    share of clients whose backend changes while the last backend is unavailable
                   (the backend list is unchanged)
  moved if removed share of clients whose backend changes when the last backend is taken out of
                   the list; modulo IP hash moves most clients, consistent hashing only those of
                   the removed backend
Only the hashing algorithms keep a client on one backend, so the others show '-' for moves.";

/// Flags of `loadbalancer simulate`.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = COLUMNS)]
pub struct SimulateArgs {
    /// Requests to send through each algorithm.
    #[arg(long, value_name = "N", default_value_t = 1_000_000, value_parser = parse_positive)]
    pub requests: usize,

    /// Synthetic clients sending them, with addresses 10.0.0.1, 10.0.0.2, ...
    #[arg(long, value_name = "N", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=16_000_000))]
    pub clients: u32,

    /// One backend per weight, comma separated.
    #[arg(long, value_name = "W,W,...", value_delimiter = ',', default_value = "5,3,2",
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub weights: Vec<u32>,

    /// Requests in flight at once; each request finishes at a random later point. Least
    /// connections sees these counts: with 1 it sees only zeros and rotates like round robin.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = parse_positive)]
    pub concurrency: usize,

    /// Seed of the pseudo-random order in which clients send requests.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,
}

/// One algorithm's results.
#[derive(Debug, Clone)]
pub struct Row {
    /// The algorithm simulated.
    pub algorithm: Algorithm,
    /// Requests each backend received.
    pub requests: Vec<u64>,
    /// Most requests in a row to one backend.
    pub longest_run: u64,
    /// Share of clients that change backend while the last backend is unavailable, for
    /// algorithms that keep a client on one backend.
    pub moved_if_down: Option<f64>,
    /// Share of clients that change backend when the last backend is removed from the list.
    pub moved_if_removed: Option<f64>,
}

impl Row {
    /// The largest share per unit of weight divided by the smallest (infinite if a backend got
    /// nothing).
    pub fn spread(&self, weights: &[u32]) -> f64 {
        let per_weight = self
            .requests
            .iter()
            .zip(weights)
            .map(|(&n, &w)| n as f64 / f64::from(w));
        let (min, max) = per_weight.fold((f64::INFINITY, 0.0_f64), |(lo, hi), x| {
            (lo.min(x), hi.max(x))
        });
        max / min
    }
}

/// The whole simulation: its settings, one row per algorithm, and how long it took.
#[derive(Debug, Clone)]
pub struct Report {
    /// The settings it ran with.
    pub args: SimulateArgs,
    /// One row per algorithm, in the chapter's order.
    pub rows: Vec<Row>,
    /// Wall-clock time of the whole simulation.
    pub elapsed: Duration,
}

/// Runs every algorithm over the same synthetic traffic.
pub fn simulate(args: &SimulateArgs) -> Report {
    let started = Instant::now();
    let clients: Vec<IpAddr> = (0..args.clients).map(client_ip).collect();
    // The algorithms run side by side, one thread each, each with backends of its own: least
    // connections must see only its own requests in flight.
    let rows = thread::scope(|scope| {
        let runs: Vec<_> = Algorithm::ALL
            .iter()
            .map(|&algorithm| {
                let clients = &clients;
                scope.spawn(move || {
                    simulate_one(algorithm, &make_backends(&args.weights), clients, args)
                })
            })
            .collect();
        runs.into_iter()
            .map(|run| {
                run.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    Report {
        args: args.clone(),
        rows,
        elapsed: started.elapsed(),
    }
}

/// Backends `b1`, `b2`, … with the given weights, on addresses nothing ever connects to.
fn make_backends(weights: &[u32]) -> Vec<Arc<Backend>> {
    weights
        .iter()
        .zip(1u16..)
        .map(|(&weight, n)| {
            let addr = (Ipv4Addr::LOCALHOST, n).into();
            Arc::new(Backend::new(format!("b{n}"), addr, weight))
        })
        .collect()
}

/// The address of synthetic client `n`: 10.0.0.1 and up.
fn client_ip(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0001 + n))
}

fn simulate_one(
    algorithm: Algorithm,
    backends: &[Arc<Backend>],
    clients: &[IpAddr],
    args: &SimulateArgs,
) -> Row {
    let balancer = algorithm.balancer(backends.iter().map(|b| &**b));
    let (requests, longest_run) = send_requests(balancer.as_ref(), backends, clients, args);
    let keeps_clients = matches!(algorithm, Algorithm::IpHash | Algorithm::ConsistentHash);
    let (moved_if_down, moved_if_removed) = if keeps_clients && backends.len() > 1 {
        let (down, removed) = moved_clients(algorithm, balancer.as_ref(), backends, clients);
        (Some(down), Some(removed))
    } else {
        (None, None)
    };
    Row {
        algorithm,
        requests,
        longest_run,
        moved_if_down,
        moved_if_removed,
    }
}

/// Sends `args.requests` requests from randomly chosen clients, keeping `args.concurrency` of
/// them in flight; returns each backend's count and the longest run on one backend.
fn send_requests(
    balancer: &dyn Balancer,
    backends: &[Arc<Backend>],
    clients: &[IpAddr],
    args: &SimulateArgs,
) -> (Vec<u64>, u64) {
    let mut random = SplitMix64(args.seed);
    let mut counts = vec![0; backends.len()];
    let mut in_flight = Vec::with_capacity(args.concurrency);
    let (mut last, mut run, mut longest_run) = (usize::MAX, 0, 0);
    for _ in 0..args.requests {
        // A random request in flight finishes, as responses come back in no particular order.
        if in_flight.len() == args.concurrency {
            in_flight.swap_remove(random.below(in_flight.len()));
        }
        let request = Request {
            client_ip: clients[random.below(clients.len())],
            explain: false,
        };
        let Some(pick) = balancer.pick(backends, &request, &|_| true) else {
            break;
        };
        in_flight.push(backends[pick.index].stats().begin_request());
        counts[pick.index] += 1;
        run = if pick.index == last { run + 1 } else { 1 };
        last = pick.index;
        longest_run = longest_run.max(run);
    }
    (counts, longest_run)
}

/// Shares of clients whose backend changes while the last backend is unavailable, and when it
/// is removed from the list (a new balancer over the shorter list). Backends are compared by
/// name, since removing one shifts the positions of those after it.
fn moved_clients(
    algorithm: Algorithm,
    balancer: &dyn Balancer,
    backends: &[Arc<Backend>],
    clients: &[IpAddr],
) -> (f64, f64) {
    let last = backends.len() - 1;
    let fewer = &backends[..last];
    let shrunk = algorithm.balancer(fewer.iter().map(|b| &**b));
    let home = |balancer: &dyn Balancer,
                list: &[Arc<Backend>],
                ip,
                is_candidate: &dyn Fn(usize) -> bool| {
        let request = Request {
            client_ip: ip,
            explain: false,
        };
        balancer
            .pick(list, &request, is_candidate)
            .map(|pick| list[pick.index].name().to_string())
    };
    let (mut down, mut removed) = (0, 0);
    for &ip in clients {
        let before = home(balancer, backends, ip, &|_| true);
        if home(balancer, backends, ip, &|i| i != last) != before {
            down += 1;
        }
        if home(shrunk.as_ref(), fewer, ip, &|_| true) != before {
            removed += 1;
        }
    }
    let total = clients.len() as f64;
    (f64::from(down) / total, f64::from(removed) / total)
}

/// A tiny pseudo-random generator (SplitMix64): the simulation needs a repeatable stream of
/// numbers, not cryptographic ones, and no extra crate.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (multiply-shift, which avoids the bias of `%` well enough here).
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let args = &self.args;
        let weights: Vec<String> = args.weights.iter().map(u32::to_string).collect();
        writeln!(
            f,
            "{} from {} over {} weighted {}, {} in flight at once",
            plural::count(args.requests as u64, "request"),
            plural::count(args.clients as u64, "client"),
            plural::count(args.weights.len() as u64, "backend"),
            weights.join(","),
            args.concurrency
        )?;
        writeln!(f)?;
        writeln!(f, "{}", header(&args.weights))?;
        for row in &self.rows {
            writeln!(f, "{}", format_row(row, &args.weights))?;
        }
        writeln!(f)?;
        let last_weight = args.weights.last().copied().unwrap_or(0);
        let total: u32 = args.weights.iter().sum();
        writeln!(
            f,
            "The last backend holds {:.1}% of the weight: the fewest clients a removal can move.",
            100.0 * f64::from(last_weight) / f64::from(total)
        )?;
        write!(f, "Simulated in {:.2} s.", self.elapsed.as_secs_f64())
    }
}

fn header(weights: &[u32]) -> String {
    let mut line = format!("{:<16}", "algorithm");
    for (n, weight) in (1..).zip(weights) {
        let _ = write!(line, " {:>9}", format!("b{n} (w{weight})"));
    }
    line.push_str("  max/min  longest run  moved if down  moved if removed");
    line
}

fn format_row(row: &Row, weights: &[u32]) -> String {
    let total: u64 = row.requests.iter().sum::<u64>().max(1);
    let mut line = format!("{:<16}", row.algorithm.name());
    for &count in &row.requests {
        let _ = write!(line, " {:>8.1}%", 100.0 * count as f64 / total as f64);
    }
    let share =
        |moved: Option<f64>| moved.map_or("-".to_string(), |m| format!("{:.1}%", m * 100.0));
    let _ = write!(
        line,
        "  {:>7.2}  {:>11}  {:>13}  {:>16}",
        row.spread(weights),
        row.longest_run,
        share(row.moved_if_down),
        share(row.moved_if_removed)
    );
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(requests: usize, clients: u32, weights: &[u32]) -> SimulateArgs {
        SimulateArgs {
            requests,
            clients,
            weights: weights.to_vec(),
            concurrency: 32,
            seed: 1,
        }
    }

    fn row(report: &Report, algorithm: Algorithm) -> &Row {
        report
            .rows
            .iter()
            .find(|r| r.algorithm == algorithm)
            .expect("every algorithm has a row")
    }

    #[test]
    fn weighted_shares_are_exact_and_runs_short() {
        let report = simulate(&args(10_000, 100, &[5, 3, 2]));
        let weighted = row(&report, Algorithm::Weighted);
        assert_eq!(weighted.requests, [5000, 3000, 2000]);
        assert_eq!(weighted.longest_run, 2);
        assert!((weighted.spread(&[5, 3, 2]) - 1.0).abs() < 1e-9);
        let round_robin = row(&report, Algorithm::RoundRobin);
        assert!((round_robin.spread(&[5, 3, 2]) - 2.5).abs() < 0.01);
        assert_eq!(round_robin.longest_run, 1);
    }

    #[test]
    fn modulo_hashing_moves_most_clients_and_consistent_hashing_few() {
        let report = simulate(&args(1000, 5000, &[1, 1, 1]));
        let ip_hash = row(&report, Algorithm::IpHash);
        let consistent = row(&report, Algorithm::ConsistentHash);
        // Unavailable: both move only the last backend's third of the clients.
        for moved in [ip_hash.moved_if_down, consistent.moved_if_down] {
            assert!((0.25..0.42).contains(&moved.unwrap()), "{moved:?}");
        }
        // Removed: modulo 3 to modulo 2 keeps a client only when both remainders agree (1/3).
        assert!((0.6..0.72).contains(&ip_hash.moved_if_removed.unwrap()));
        assert_eq!(consistent.moved_if_removed, consistent.moved_if_down);
        assert_eq!(row(&report, Algorithm::LeastConn).moved_if_removed, None);
    }

    #[test]
    fn least_connections_follows_the_weights_under_load() {
        let report = simulate(&args(30_000, 100, &[5, 3, 2]));
        let least = row(&report, Algorithm::LeastConn);
        assert!(least.spread(&[5, 3, 2]) < 1.1, "{least:?}");
    }

    #[test]
    fn least_connections_rotates_when_nothing_is_in_flight() {
        let mut one_at_a_time = args(3_000, 100, &[5, 3, 2]);
        one_at_a_time.concurrency = 1;
        let report = simulate(&one_at_a_time);
        let least = row(&report, Algorithm::LeastConn);
        assert_eq!(least.requests, [1000, 1000, 1000]);
        assert_eq!(least.longest_run, 1);
    }

    #[test]
    fn the_table_names_every_algorithm_and_column() {
        let text = simulate(&args(100, 10, &[2, 1])).to_string();
        for algorithm in Algorithm::ALL {
            assert!(text.contains(algorithm.name()));
        }
        assert!(text.contains("b1 (w2)") && text.contains("moved if removed"));
        for column in [
            "max/min",
            "longest run",
            "moved if down",
            "moved if removed",
        ] {
            assert!(COLUMNS.contains(column));
        }
    }
}
