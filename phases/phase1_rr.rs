//! Phase 1 of the chapter, "기본 로드 밸런서" (the basic load balancer): round robin over a list
//! of backends.
//!
//! ```text
//! scripts/backends.sh                 # three demo backends on 8001-8003
//! cargo run --bin phase1_rr           # the balancer on :8080
//! curl localhost:8080/                # backend-8001, then 8002, then 8003, then 8001 ...
//! ```
//!
//! Compared with the chapter's Python, the forwarding underneath speaks real HTTP/1.1
//! (keep-alive, streamed bodies, clear errors), but the balancing decision is the same: the next
//! backend in turn.

use std::process::ExitCode;

use clap::Parser;
use lb::balance::RoundRobin;
use lb::cli::{self, CommonArgs};
use lb::error::StartError;
use lb::proxy::LoadBalancer;
use lb::reload;

/// The phase this binary is and what it adds: the first line of `--help` and of the start-up
/// log.
const PHASE: &str =
    "Phase 1, 기본 로드 밸런서 — Round Robin 구현: an HTTP/1.1 load balancer that sends each \
     request to the next backend in turn.";

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
    // The whole of phase 1's balancing: take the next backend in turn.
    let balancer = RoundRobin::new();
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
