//! Phase 2 of the chapter, "고급 알고리즘" (advanced algorithms), first part: weighted round
//! robin. Backends get requests in proportion to their weights: 5, 3 and 2 by default, as in the
//! chapter, or `--backend HOST:PORT=WEIGHT`.
//!
//! ```text
//! scripts/backends.sh                       # three demo backends on 8001-8003
//! cargo run --bin phase2_weighted           # weights 5, 3, 2 on :8080
//! for i in $(seq 10); do curl -s localhost:8080/; done   # 8001 five times, 8002 three, 8003 two
//! ```
//!
//! Compared with phase 1, only the balancer changes: smooth weighted round robin (nginx's) in
//! place of round robin. The chapter's own interleaved version and why this one replaces it are
//! explained in `lb::balance::SmoothWeighted`.

use std::process::ExitCode;

use clap::Parser;
use lb::balance::SmoothWeighted;
use lb::cli::{self, CommonArgs};
use lb::error::StartError;
use lb::proxy::LoadBalancer;
use lb::reload;

/// The phase this binary is and what it adds: the first line of `--help` and of the start-up
/// log.
const PHASE: &str =
    "Phase 2, 고급 알고리즘 — Weighted Round Robin (가중 라운드 로빈): shares requests among \
     backends in proportion to their weights.";

/// The weights of the three default backends, as in the chapter: 50 %, 30 % and 20 % of requests.
const DEFAULT_WEIGHTS: [u32; 3] = [5, 3, 2];

#[derive(Parser, Debug)]
#[command(version, about = PHASE, long_about = None)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    // `--help` shows the default backends with the weights this phase gives them.
    let args = match cli::parse_with_default_weights::<Args>(&DEFAULT_WEIGHTS) {
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
    let backends = args.common.backends(&DEFAULT_WEIGHTS);
    // Each pick raises every current weight by its weight and takes the largest.
    let balancer = SmoothWeighted::new();
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
        cli::command_with_default_weights::<Args>(&DEFAULT_WEIGHTS).debug_assert();
    }
}
