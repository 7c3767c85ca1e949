//! `loadbalancer`: every algorithm and feature of the chapter in one binary, chosen by flags.
//!
//! ```text
//! scripts/backends.sh                                   # three demo backends on 8001-8003
//! cargo run --bin loadbalancer -- --algorithm least-conn --explain
//! cargo run --release --bin loadbalancer -- simulate    # compare the algorithms offline
//! ```
//!
//! Phase 2 starts it with `--algorithm` and the `simulate` subcommand; the later phases add their
//! flags to [`Cli`] and their parts to [`run`], which builds the [`LoadBalancer`] step by step.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lb::balance::Algorithm;
use lb::cli::{self, CommonArgs, HealthArgs, HealthCheckArgs, StickyArgs};
use lb::error::StartError;
use lb::proxy::LoadBalancer;
use lb::simulate::{self, SimulateArgs};

/// An HTTP/1.1 load balancer with every algorithm of the chapter, chosen by flags.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    common: CommonArgs,

    /// How to choose a backend for each request (phase 2).
    #[arg(long, value_enum, default_value_t = Algorithm::RoundRobin)]
    algorithm: Algorithm,

    #[command(flatten)]
    health_check: HealthCheckArgs,

    #[command(flatten)]
    health: HealthArgs,

    #[command(flatten)]
    sticky: StickyArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Send synthetic clients' requests through every algorithm offline (no network) and print
    /// a table comparing them.
    Simulate(SimulateArgs),
}

fn main() -> ExitCode {
    let cli = match cli::parse::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match cli.command {
        Some(Command::Simulate(args)) => {
            println!("{}", simulate::simulate(&args));
            ExitCode::SUCCESS
        }
        None => {
            cli::init_logging(cli.common.verbose);
            cli::exit_code(run(cli))
        }
    }
}

/// Builds the load balancer the flags describe and serves until Ctrl-C.
fn run(cli: Cli) -> Result<(), StartError> {
    let backends = cli.common.backends(&[1, 1, 1]);
    let balancer = cli.algorithm.balancer(&backends);
    let mut lb = LoadBalancer::new(backends, balancer, cli.common.settings())
        .with_health(cli.health.config(cli.health_check.health_check));
    if let Some(sessions) = cli.sticky.session_table() {
        lb = lb.with_sessions(sessions);
    }
    lb::startup::run(lb, &cli.common)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_are_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_algorithm_defaults_to_round_robin() {
        let cli = Cli::try_parse_from(["loadbalancer"]).unwrap();
        assert_eq!(cli.algorithm, Algorithm::RoundRobin);
        let cli = Cli::try_parse_from(["loadbalancer", "--algorithm", "consistent-hash"]).unwrap();
        assert_eq!(cli.algorithm, Algorithm::ConsistentHash);
        assert!(Cli::try_parse_from(["loadbalancer", "--algorithm", "random"]).is_err());
    }

    #[test]
    fn simulate_takes_its_own_flags() {
        let cli = Cli::try_parse_from(["loadbalancer", "simulate", "--weights", "1,2"]).unwrap();
        let Some(Command::Simulate(args)) = cli.command else {
            panic!("simulate is a subcommand");
        };
        assert_eq!(args.weights, [1, 2]);
        assert!(Cli::try_parse_from(["loadbalancer", "simulate", "--weights", "0"]).is_err());
    }
}
