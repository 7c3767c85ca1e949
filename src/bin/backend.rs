//! The demo backend: `backend --listen ADDR [--name NAME] [--delay DUR] [--reset-percent P]`.
//!
//! Run three of these (`scripts/backends.sh` does) and put a balancer in front of them; every response
//! says which backend served it. The server itself lives in [`lb::demo`]; this file only parses flags,
//! binds the listener and runs it.

use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// The demo backend (no phase of its own): an HTTP/1.1 server that answers every path with its
/// name, to run behind the balancers.
#[derive(Debug, Parser)]
#[command(name = "backend", version)]
struct Cli {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8001")]
    listen: SocketAddr,

    /// Name shown in responses and the X-Backend header [default: backend-PORT].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// Wait this long before each response (not for /health): 500ms, 5s, 1m or seconds.
    #[arg(long, value_name = "DUR", default_value = "0", value_parser = lb::cli::parse_duration)]
    delay: Duration,

    /// Cut off this share of responses (0-100; never /health) midway: head and half the body
    /// sent, then the connection reset. For soak tests; with 5, every 20th response.
    #[arg(long, value_name = "P", default_value_t = 0,
          value_parser = clap::value_parser!(u8).range(0..=100))]
    reset_percent: u8,
}

fn main() -> ExitCode {
    let cli = match lb::cli::parse::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    lb::cli::init_logging(false);
    lb::cli::exit_code(run(cli))
}

/// Binds the listener and serves forever; a port in use is a one-line error.
fn run(cli: Cli) -> Result<(), String> {
    let listener =
        TcpListener::bind(cli.listen).map_err(|err| format!("--listen {}: {err}", cli.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|err| format!("cannot read the listening address: {err}"))?;
    let name = cli
        .name
        .unwrap_or_else(|| format!("backend-{}", addr.port()));
    log::info!("backend {name} listening on {addr}");
    let options = lb::demo::Options {
        delay: cli.delay,
        reset_percent: cli.reset_percent,
    };
    lb::demo::serve_with(listener, name, options).map_err(|err| format!("backend stopped: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_name_nothing_and_listen_on_8001() {
        let cli = Cli::try_parse_from(["backend"]).expect("defaults parse");
        assert_eq!(cli.listen, "127.0.0.1:8001".parse().expect("address"));
        assert_eq!(cli.name, None);
        assert_eq!(cli.delay, Duration::ZERO);
        assert_eq!(cli.reset_percent, 0);
    }

    #[test]
    fn reset_percent_is_a_percentage() {
        let cli = Cli::try_parse_from(["backend", "--reset-percent", "5"]).expect("5 parses");
        assert_eq!(cli.reset_percent, 5);
        for bad in ["101", "-1", "five"] {
            assert!(
                Cli::try_parse_from(["backend", "--reset-percent", bad]).is_err(),
                "{bad} is refused"
            );
        }
    }
}
