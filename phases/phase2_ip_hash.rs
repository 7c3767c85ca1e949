//! Phase 2 of the chapter, "고급 알고리즘" (advanced algorithms), third part: IP hash ("세션
//! 유지", session persistence). The MD5 of the client IP modulo the number of backends picks the
//! backend, so the same client always reaches the same one while the backend list is unchanged.
//!
//! ```text
//! scripts/backends.sh                       # three demo backends on 8001-8003
//! cargo run --bin phase2_ip_hash -- --explain
//! curl -si localhost:8080/ | grep X-Lb-Decision            # the same backend every time
//! curl -si --interface 127.0.0.2 localhost:8080/ | grep X-Lb-Decision   # maybe another one
//! ```
//!
//! Compared with phase 1, only the balancer changes. When the hashed backend is unavailable the
//! request moves on to the next one, as nginx does, so only that backend's clients move.

use std::process::ExitCode;

use clap::Parser;
use lb::balance::IpHash;
use lb::cli::{self, CommonArgs};
use lb::error::StartError;
use lb::proxy::LoadBalancer;
use lb::reload;

/// The phase this binary is and what it adds: the first line of `--help` and of the start-up
/// log.
const PHASE: &str =
    "Phase 2, 고급 알고리즘 — IP Hash (세션 유지): keeps each client IP on one backend \
     by hashing it.";

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
    // The MD5 of the client IP, modulo the number of backends, names the backend.
    let balancer = IpHash::new();
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
