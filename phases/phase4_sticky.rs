//! Phase 4 of the chapter, "추가 기능" (additional features): cookie sticky sessions
//! ("Cookie 기반 Sticky Session") on top of round robin, and statistics on the admin port.
//!
//! ```text
//! scripts/backends.sh                              # three demo backends on 8001-8003
//! cargo run --bin phase4_sticky                    # the balancer on :8080, statistics on :8404
//! curl -c jar -b jar localhost:8080/               # the same backend every time, thanks to the cookie
//! curl localhost:8080/                             # no cookie kept: the next backend in turn
//! open http://127.0.0.1:8404/stats                 # the statistics page
//! ```
//!
//! Compared with phase 1, one thing is added: a [`SessionTable`](lb::sticky::SessionTable). A
//! request whose `SESSION_ID` cookie names a known session goes to that session's backend while
//! it is available; any other request is balanced round robin and its response gets a new
//! session cookie. The table is bounded (`--max-sessions`) and forgets idle sessions
//! (`--session-ttl`), where the chapter's dict grew forever.
//!
//! Beyond the chapter, `--sticky-secret` (or `LB_STICKY_SECRET`) replaces the table with signed
//! cookies that name their backend, which any instance with the same secret honours
//! ([`SignedCookies`](lb::sticky::signed::SignedCookies)).

use std::process::ExitCode;

use clap::Parser;
use lb::balance::RoundRobin;
use lb::cli::{self, CommonArgs, SessionArgs};
use lb::error::StartError;
use lb::proxy::LoadBalancer;
use lb::reload;

/// The phase this binary is and what it adds: the first line of `--help` and of the start-up
/// log.
const PHASE: &str =
    "Phase 4, 추가 기능 — Cookie 기반 Sticky Session: round robin that keeps each client on one \
     backend with a session cookie.";

#[derive(Parser, Debug)]
#[command(version, about = PHASE, long_about = None)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,

    #[command(flatten)]
    session: SessionArgs,
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
    // `--sticky-secret` (beyond the chapter): the cookie itself names the backend, signed.
    let signed = args.session.signed_cookies(&backends)?;
    let lb = LoadBalancer::new(backends, Box::new(balancer), args.common.settings());
    // What phase 4 adds: a session's requests stay on the backend its first request went to.
    let lb = match signed {
        Some(signed) => lb.with_signed_sessions(signed),
        None => lb.with_sessions(args.session.session_table()),
    };
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
