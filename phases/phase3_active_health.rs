//! Phase 3 of the chapter, "헬스 체크" (health checks), part one: round robin with active health
//! checks.
//!
//! ```text
//! scripts/backends.sh                                # three demo backends on 8001-8003
//! cargo run --bin phase3_active_health               # the balancer on :8080
//! # stop one backend: within interval × fall the log says ❌ and curl never reaches it;
//! # start it again: after rise passed checks the log says ✅ and it is back in turn
//! ```
//!
//! Since phase 1, a checker thread per backend probes `GET /health` every `--health-interval`;
//! `--fall` failed probes in a row take a backend out of rotation and `--rise` passed ones bring
//! it back. Unlike the chapter's single checker thread, one hung backend never delays the verdict
//! on the others, and one bad probe does not flip a backend.

use std::process::ExitCode;

use clap::Parser;
use lb::balance::RoundRobin;
use lb::cli::{self, CommonArgs, HealthArgs};
use lb::error::StartError;
use lb::health::HealthMode;
use lb::proxy::LoadBalancer;
use lb::reload;

/// The phase this binary is and what it adds: the first line of `--help` and of the start-up
/// log.
const PHASE: &str =
    "Phase 3, 헬스 체크 — Active Health Check (능동적): round robin over the backends that pass \
     periodic GET /health probes.";

#[derive(Parser, Debug)]
#[command(version, about = PHASE, long_about = None)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,

    #[command(flatten)]
    health: HealthArgs,
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
    let balancer = RoundRobin::new();
    // What phase 3 adds: probes decide which backends round robin may choose.
    let lb = LoadBalancer::new(backends, Box::new(balancer), args.common.settings())
        .with_health(args.health.config(HealthMode::Active));
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
