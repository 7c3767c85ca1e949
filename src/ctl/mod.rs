//! `loadbalancer ctl`: a command-line client of the admin listener's control API, so that an
//! operator can list the backends, take one out of rotation (`drain`, `maint`), put it back
//! (`ready`) or change its weight without writing HTTP by hand.
//!
//! It is a thin client: every decision stays with the balancer, which answers each request in
//! JSON, and `ctl` only builds the requests, turns the answers into lines for a terminal and a
//! failure into one line with exit code 1 (a bad command line is clap's, exit code 2).
//! `drain --wait` polls `GET /backends` until the backend has nothing left open, so that a script
//! can take a backend out and stop it only once its last request has finished.
//!
//! Read in this order: this file (the flags and one function per command), `client.rs` (the
//! requests, bounded in time, and what a failure says), `status.rs` (a backend as the API
//! describes it, and the lines and table printed from it).

use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use crate::cli::{parse_addr, parse_duration};

mod client;
mod status;

use client::{AdminClient, CtlError};
use status::{table, weight_change, Open};

/// How often `drain --wait` asks the balancer what is still open on the backend.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Flags of `loadbalancer ctl`.
///
/// `--admin` and `--token` may come before or after the action (`global`); their ids are their
/// own, because clap also hands a global flag's value to the parent command, whose own `--admin`
/// (where the balancer listens) is another flag with another type.
#[derive(clap::Args, Debug, Clone)]
// Without an action, say that one is missing rather than print the whole help.
#[command(arg_required_else_help = false)]
pub struct CtlArgs {
    /// The balancer's admin listener: the address its --admin flag gave, or the one its start-up
    /// log names ("statistics on http://ADDR/stats").
    #[arg(
        id = "ctl_admin",
        long = "admin",
        global = true,
        value_name = "ADDR",
        default_value = "127.0.0.1:8404",
        value_parser = parse_addr
    )]
    pub admin: std::net::SocketAddr,

    /// The admin token, for a balancer started with --admin-token; sent with every request.
    #[arg(
        id = "ctl_token",
        long = "token",
        global = true,
        value_name = "T",
        env = "LB_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,

    /// What to do.
    #[command(subcommand)]
    pub action: Action,
}

/// What `loadbalancer ctl` is asked to do; `NAME` is a backend's `HOST:PORT` as `list` and the
/// statistics page show it.
#[derive(clap::Subcommand, Debug, Clone, PartialEq)]
pub enum Action {
    /// List the backends: state, health, weight and what is open on each.
    List,
    /// Put a backend back into rotation.
    Ready {
        /// The backend, as HOST:PORT.
        name: String,
    },
    /// Give a backend no new requests and let the open ones finish.
    Drain {
        /// The backend, as HOST:PORT.
        name: String,
        /// Then wait until nothing is in flight and no tunnel is open on it (exit 1 if the
        /// timeout passes first).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, as 500ms, 60s, 2m or a number of seconds.
        #[arg(long, value_name = "DUR", default_value = "60s", requires = "wait",
              value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Take a backend out for maintenance: no requests at all.
    Maint {
        /// The backend, as HOST:PORT.
        name: String,
    },
    /// Set a backend's weight for the weighted algorithms (0 to 256; 0 sends it nothing).
    Weight {
        /// The backend, as HOST:PORT.
        name: String,
        /// The new weight.
        weight: u32,
    },
}

/// Runs `loadbalancer ctl`: exit code 0 when the balancer did what was asked, 1 with one line on
/// standard error when it refused, could not be reached or (`drain --wait`) did not drain in time.
pub fn run(args: &CtlArgs) -> ExitCode {
    let admin = AdminClient::new(args.admin, args.token.as_deref());
    match act(&admin, &args.action) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(1)
        }
    }
}

/// Does what `action` asks, printing its result on standard output.
fn act(admin: &AdminClient, action: &Action) -> Result<(), CtlError> {
    match action {
        Action::List => print!("{}", table(&admin.backends()?)),
        Action::Ready { name } => println!("{}", admin.set_state(name, "ready")?),
        Action::Maint { name } => println!("{}", admin.set_state(name, "maint")?),
        Action::Drain {
            name,
            wait,
            timeout,
        } => {
            println!("{}", admin.set_state(name, "drain")?);
            if *wait {
                wait_until_drained(admin, name, *timeout)?;
            }
        }
        Action::Weight { name, weight } => {
            let (old, new) = admin.set_weight(name, *weight)?;
            println!("{}", weight_change(old, &new));
        }
    }
    Ok(())
}

/// Polls the backend until nothing is open on it or `timeout` passes, printing a line each time
/// what is open changes.
fn wait_until_drained(admin: &AdminClient, name: &str, timeout: Duration) -> Result<(), CtlError> {
    let deadline = Instant::now() + timeout;
    let mut last_seen = None;
    loop {
        let open = Open::on(&admin.backend(name)?);
        if open.is_nothing() {
            println!("{name} drained: {open}");
            return Ok(());
        }
        if last_seen != Some(open) {
            println!("{name}: {open}");
            last_seen = Some(open);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(CtlError::StillOpen {
                name: name.to_string(),
                open,
                waited: timeout,
            });
        }
        thread::sleep(POLL_INTERVAL.min(left));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `ctl`'s flags as the `loadbalancer` binary takes them.
    #[derive(Parser, Debug)]
    struct Ctl {
        #[command(flatten)]
        args: CtlArgs,
    }

    fn parse(argv: &[&str]) -> Result<CtlArgs, clap::Error> {
        Ctl::try_parse_from(std::iter::once("ctl").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn flags_are_well_formed() {
        <Ctl as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn the_admin_address_defaults_to_the_listeners_default_and_flags_go_anywhere() {
        let args = parse(&["list"]).unwrap();
        assert_eq!(args.admin, "127.0.0.1:8404".parse().unwrap());
        assert_eq!(args.action, Action::List);
        let args = parse(&["maint", "127.0.0.1:8001", "--admin", "127.0.0.1:9000"]).unwrap();
        assert_eq!(args.admin, "127.0.0.1:9000".parse().unwrap());
        let args = parse(&["--token", "t", "weight", "127.0.0.1:8001", "0"]).unwrap();
        assert_eq!(args.token.as_deref(), Some("t"));
        assert!(parse(&["weight", "127.0.0.1:8001", "-1"]).is_err());
        assert!(parse(&["weight", "127.0.0.1:8001", "many"]).is_err());
        assert!(parse(&["list", "--admin", "nowhere"]).is_err());
        assert!(parse(&[]).is_err(), "an action is required");
    }

    #[test]
    fn only_drain_waits_and_its_timeout_needs_wait() {
        let args = parse(&["drain", "b:80", "--wait", "--timeout", "500ms"]).unwrap();
        let expected = Action::Drain {
            name: "b:80".into(),
            wait: true,
            timeout: Duration::from_millis(500),
        };
        assert_eq!(args.action, expected);
        let Action::Drain { timeout, .. } = parse(&["drain", "b:80", "--wait"]).unwrap().action
        else {
            panic!("drain");
        };
        assert_eq!(timeout, Duration::from_secs(60));
        assert!(parse(&["drain", "b:80", "--timeout", "5s"]).is_err());
        assert!(parse(&["drain", "b:80", "--wait", "--timeout", "soon"]).is_err());
        assert!(parse(&["maint", "b:80", "--wait"]).is_err());
        assert!(parse(&["list", "--wait"]).is_err());
    }
}
