//! Phase 2 of the chapter, "고급 알고리즘" (advanced algorithms), second part: least connections.
//! Each request goes to the backend with the fewest requests in flight (per unit of weight), so
//! a slow backend that piles up requests gets fewer new ones.
//!
//! ```text
//! scripts/backends.sh                       # three demo backends on 8001-8003
//! cargo run --bin phase2_least_conn -- --explain
//! curl -si localhost:8080/ | grep X-Lb-Decision   # the in-flight counts it compared
//! ```
//!
//! Compared with phase 1, only the balancer changes. Unlike the chapter's `min()`, ties are broken
//! round robin, so sequential requests on an idle system rotate instead of all going to the first
//! backend.

use std::process::ExitCode;

use clap::Parser;
use lb::balance::LeastConnections;
use lb::cli::{self, CommonArgs};
use lb::error::StartError;
use lb::proxy::LoadBalancer;
use lb::reload;

/// The phase this binary is and what it adds: the first line of `--help` and of the start-up
/// log.
const PHASE: &str =
    "Phase 2, 고급 알고리즘 — Least Connections (최소 연결): sends each request to the backend \
     with the fewest requests in flight.";

#[derive(Parser, Debug)]
#[command(version, about = PHASE, long_about = None)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let args = match cli::parse::<Args>() {
        Ok(args) => args,
        Err(code) => return code,
    };
    cli::init_logging(args.common.verbose);
    cli::exit_code(run(args))
}

fn run(args: Args) -> Result<(), StartError> {
    let lb = build(&args)?;
    // SIGHUP and POST /reload build it again from the flags and the configuration file.
    let rebuild = reload::rebuild(|args: &Args| Ok((build(args)?, args.common.clone())));
    lb::startup::run(PHASE, lb, &args.common, rebuild)
}

/// The balancer the flags describe.
fn build(args: &Args) -> Result<LoadBalancer, StartError> {
    let backends = args.common.backends(&[1, 1, 1]);
    // The proxy holds an in-flight guard on the chosen backend for the whole exchange.
    let balancer = LeastConnections::new();
    let lb = LoadBalancer::new(backends, Box::new(balancer), args.common.settings());
    Ok(lb)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_are_well_formed() {
        Args::command().debug_assert();
    }
}
