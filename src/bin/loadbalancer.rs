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

use clap::{ArgMatches, Parser, Subcommand};
use lb::balance::Algorithm;
use lb::cli::{self, CommonArgs, HealthArgs, HealthCheckArgs, StickyArgs};
use lb::ctl::{self, CtlArgs};
use lb::error::StartError;
use lb::proxy::LoadBalancer;
use lb::reload;
use lb::simulate::{self, SimulateArgs};

/// The phases this binary is: the first line of `--help` and of the start-up log.
const PHASE: &str =
    "Phases 1–4, 로드 밸런서 구현 (Load Balancer Implementation): every algorithm, \
                     health check and feature of the chapter in one binary, chosen by flags.";

/// What `--help` says below [`PHASE`]: what each phase adds, and its flags.
const PHASES_IN_SHORT: &str = "Phase 1 forwards HTTP/1.1 and takes backends in turn. Phase 2 \
    chooses how to balance (--algorithm). Phase 3 keeps failing backends out (--health-check, \
    active probes and passive observation of real traffic). Phase 4 keeps clients on one backend \
    (--sticky) and serves statistics on --admin (/stats, /stats.json, /metrics). \
    `loadbalancer simulate` compares the algorithms offline.";

/// The flags, under one heading per phase.
#[derive(Parser, Debug)]
#[command(
    version,
    about = PHASE,
    long_about = format!("{PHASE}\n\n{PHASES_IN_SHORT}"),
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(
        flatten,
        next_help_heading = "Phase 1: serving and statistics (every binary)"
    )]
    common: CommonArgs,

    /// How to choose a backend for each request.
    #[arg(long, value_enum, default_value_t = Algorithm::RoundRobin, help_heading = "Phase 2: algorithms (고급 알고리즘)")]
    algorithm: Algorithm,

    #[command(flatten, next_help_heading = "Phase 3: health checks (헬스 체크)")]
    health_check: HealthCheckArgs,

    #[command(flatten, next_help_heading = "Phase 3: health checks (헬스 체크)")]
    health: HealthArgs,

    #[command(
        flatten,
        next_help_heading = "Phase 4: sticky sessions (Cookie 기반 Sticky Session)"
    )]
    sticky: StickyArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Send synthetic clients' requests through every algorithm offline (no network) and print
    /// a table comparing them.
    Simulate(SimulateArgs),
    /// Check a configuration file (as `nginx -t` does) and print the effective configuration:
    /// every setting, defaults included. Exit 0 when it is valid, 2 with FILE:LINE:COLUMN when not.
    CheckConfig {
        /// The TOML file to check.
        file: std::path::PathBuf,
    },
    /// Control a running balancer through its admin listener: list the backends, drain one,
    /// take it out for maintenance, put it back or change its weight.
    Ctl(CtlArgs),
}

fn main() -> ExitCode {
    let (cli, matches) = match cli::parse_with_matches::<Cli>() {
        Ok(parsed) => parsed,
        Err(code) => return code,
    };
    // The balancer's own flags only: an environment set up for the balancer (LB_STICKY_SECRET
    // exported in the shell) must not stop `ctl` or `simulate`, which do not read it.
    if cli.command.is_none() {
        if let Err(why) = check_combinations(&cli, &matches) {
            eprintln!("error: {why}");
            return ExitCode::from(2);
        }
    }
    match cli.command {
        Some(Command::Simulate(args)) => {
            println!("{}", simulate::simulate(&args));
            ExitCode::SUCCESS
        }
        Some(Command::CheckConfig { file }) => check_config(&file),
        Some(Command::Ctl(args)) => ctl::run(&args),
        None => {
            cli::init_logging(cli.common.verbose);
            cli::exit_code(run(cli))
        }
    }
}

/// Refuses flags that would be silently ignored because what they tune is off, the way nginx
/// refuses a directive in the wrong place: `--max-sessions` without `--sticky`, say.
fn check_combinations(cli: &Cli, matches: &ArgMatches) -> Result<(), String> {
    let mode = cli.health_check.health_check;
    let rules: [(&[&str], bool, &str); 3] = [
        (
            &["cookie_name", "session_ttl", "max_sessions"],
            cli.sticky.sticky,
            "--sticky",
        ),
        (
            &[
                "health_path",
                "health_interval",
                "health_timeout",
                "rise",
                "fall",
            ],
            mode.is_active(),
            "--health-check active or both",
        ),
        (
            &["max_fails", "fail_timeout"],
            mode.is_passive(),
            "--health-check passive or both",
        ),
    ];
    // The secret may come from the environment too, where `given` does not look.
    if cli.sticky.session.sticky_secret.is_some() && !cli.sticky.sticky {
        return Err("--sticky-secret (or LB_STICKY_SECRET) needs --sticky".to_string());
    }
    for (ids, enabled, needed) in rules {
        if let Some(id) = ids.iter().find(|&&id| !enabled && cli::given(matches, id)) {
            return Err(format!("--{} needs {needed}", id.replace('_', "-")));
        }
    }
    Ok(())
}

/// `check-config FILE`: the file read as `--config FILE` would be, every check of a start-up
/// made short of binding a port, and the effective configuration printed.
fn check_config(file: &std::path::Path) -> ExitCode {
    let argv = vec![
        "loadbalancer".into(),
        "--config".into(),
        file.as_os_str().to_owned(),
    ];
    let command = <Cli as clap::CommandFactory>::command();
    let checked = cli::matches_with_config(command.clone(), argv)
        .map_err(|err| err.to_string())
        .and_then(|matches| {
            let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches)
                .map_err(|err| err.to_string())?;
            check_combinations(&cli, &matches)?;
            cli.common
                .check_listeners()
                .map_err(|err| err.to_string())?;
            build(&cli).map_err(|err| err.to_string())?;
            for name in cli.common.unresolved() {
                eprintln!("warning: backend {name} does not resolve now; it would be left out until it does");
            }
            Ok(matches)
        });
    match checked {
        Ok(matches) => {
            println!(
                "# {}: the configuration is valid; in effect, defaults included:",
                file.display()
            );
            println!("{}", cli::effective_config(&command, &matches));
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("error: {why}");
            ExitCode::from(2)
        }
    }
}

/// Builds the load balancer the flags describe and serves until Ctrl-C.
fn run(cli: Cli) -> Result<(), StartError> {
    let lb = build(&cli)?;
    // SIGHUP and POST /reload read the flags and the configuration file again, with the checks
    // of a start-up.
    let rebuild: reload::Rebuild = Box::new(|| {
        let (cli, matches) = cli::parse_again::<Cli>().map_err(|err| err.to_string())?;
        check_combinations(&cli, &matches)?;
        let lb = build(&cli).map_err(|err| err.to_string())?;
        Ok((lb, cli.common))
    });
    lb::startup::run(PHASE, lb, &cli.common, rebuild)
}

/// The load balancer the flags (and the configuration file under them) describe.
fn build(cli: &Cli) -> Result<LoadBalancer, StartError> {
    let backends = cli.common.backends(&[1, 1, 1]);
    let balancer = cli.algorithm.balancer(&backends);
    let signed = cli.sticky.session.signed_cookies(&backends)?;
    let mut lb = LoadBalancer::new(backends, balancer, cli.common.settings())
        .with_health(cli.health.config(cli.health_check.health_check));
    if let Some(signed) = signed {
        lb = lb.with_signed_sessions(signed);
    } else if let Some(sessions) = cli.sticky.session_table() {
        lb = lb.with_sessions(sessions);
    }
    Ok(lb)
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

    #[test]
    fn ctl_has_an_admin_flag_of_its_own() {
        // Not the balancer's --admin (another type), whether it comes before or after the action.
        for argv in [
            ["loadbalancer", "ctl", "--admin", "127.0.0.1:9000", "list"],
            ["loadbalancer", "ctl", "list", "--admin", "127.0.0.1:9000"],
        ] {
            let cli = Cli::try_parse_from(argv).unwrap();
            let Some(Command::Ctl(args)) = cli.command else {
                panic!("ctl is a subcommand");
            };
            assert_eq!(args.admin, "127.0.0.1:9000".parse().unwrap());
        }
    }
}
