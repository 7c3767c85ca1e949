//! The demo backend: `backend --listen ADDR [--name NAME] [--delay DUR]`.
//!
//! Run three of these (`scripts/backends.sh` does) and put a balancer in front of them; every response
//! says which backend served it. The server itself lives in [`lb::demo`]; this file only parses flags,
//! binds the listener and runs it.

use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// A demo HTTP/1.1 backend that answers every path with its own name.
#[derive(Debug, Parser)]
#[command(name = "backend", version, about)]
struct Cli {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8001")]
    listen: SocketAddr,

    /// Name shown in responses and the X-Backend header [default: backend-PORT].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// Wait this long before each response (not for /health): 500ms, 5s, 1m or seconds.
    #[arg(long, value_name = "DUR", default_value = "0", value_parser = parse_duration)]
    delay: Duration,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            log::error!("{message}");
            ExitCode::from(2)
        }
    }
}

/// Parses the flags, binds the listener and serves forever; errors are one-line messages.
fn run() -> Result<(), String> {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // `--help` and `--version` arrive as "errors" that belong on stdout with success.
        Err(err) if !err.use_stderr() => {
            let _ = err.print();
            return Ok(());
        }
        Err(err) => return Err(first_line(&err.to_string())),
    };
    let listener = TcpListener::bind(cli.listen)
        .map_err(|err| format!("cannot listen on {}: {err}", cli.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|err| format!("cannot read the listening address: {err}"))?;
    let name = cli
        .name
        .unwrap_or_else(|| format!("backend-{}", addr.port()));
    log::info!("backend {name} listening on {addr}");
    lb::demo::serve(listener, name, cli.delay).map_err(|err| format!("backend stopped: {err}"))
}

/// The first line of a clap error, without its `error: ` prefix (the log line says ERROR already).
fn first_line(message: &str) -> String {
    let line = message.lines().next().unwrap_or(message);
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

/// Parses `--delay`: `500ms`, `5s`, `1m`, or a bare number of seconds.
///
/// Kept private and minimal on purpose: the balancer binaries share a fuller parser in the library's
/// CLI module.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let invalid =
        || format!("invalid duration {text:?}: expected e.g. 500ms, 5s, 1m or a number of seconds");
    let (digits, unit_ms) = if let Some(digits) = text.strip_suffix("ms") {
        (digits, 1)
    } else if let Some(digits) = text.strip_suffix('s') {
        (digits, 1_000)
    } else if let Some(digits) = text.strip_suffix('m') {
        (digits, 60_000)
    } else {
        (text, 1_000)
    };
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(invalid());
    }
    let count: u64 = digits.parse().map_err(|_| invalid())?;
    let millis = count.checked_mul(unit_ms).ok_or_else(invalid)?;
    Ok(Duration::from_millis(millis))
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
    fn parses_durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_bad_durations() {
        for text in [
            "",
            "ms",
            "-1s",
            "1.5s",
            "5h",
            "abc",
            "99999999999999999999m",
        ] {
            assert!(parse_duration(text).is_err(), "{text:?} should be refused");
        }
    }

    #[test]
    fn defaults_name_nothing_and_listen_on_8001() {
        let cli = Cli::try_parse_from(["backend"]).expect("defaults parse");
        assert_eq!(cli.listen, "127.0.0.1:8001".parse().expect("address"));
        assert_eq!(cli.name, None);
        assert_eq!(cli.delay, Duration::ZERO);
    }
}
