//! Phase 3 of the chapter, "헬스 체크" (health checks), part two: round robin with passive health
//! checks.
//!
//! ```text
//! scripts/backends.sh                                # three demo backends on 8001-8003
//! cargo run --bin phase3_passive_health              # the balancer on :8080
//! # stop one backend: after --max-fails failed requests the log says ❌ and it is out;
//! # clients never see an error, since a refused connection is retried on the next backend
//! ```
//!
//! Since phase 1, real traffic is the probe: `--max-fails` failed requests in a row (refused,
//! timed out, reset, or a 502/503/504) take a backend out for `--fail-timeout`, after which one
//! trial request decides whether it is back. The chapter's version can never bring a backend
//! back: once it is out, no traffic reaches it, so no success can ever reset its count. The
//! trial request is what fixes that.

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
    "Phase 3, 헬스 체크 — Passive Health Check (수동적): round robin that takes out backends \
     whose requests fail, and tries them again later.";

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
    // What phase 3 adds: failed requests decide which backends round robin may choose.
    let lb = LoadBalancer::new(backends, Box::new(balancer), args.common.settings())
        .with_health(args.health.config(HealthMode::Passive));
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
