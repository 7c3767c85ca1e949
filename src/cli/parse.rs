//! Reading the command line with the settings of `--config FILE` under it: clap parses the flags,
//! the file's settings fill in what the command line leaves out, and a failure is one line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{ArgMatches, Parser};

use super::*;

/// Parses the command line, with the settings of `--config FILE` under it; on a bad flag or a
/// bad file prints a one-line error and returns exit code 2. `--help` and `--version` print as
/// usual and return exit code 0.
pub fn parse<A: Parser>() -> Result<A, ExitCode> {
    let matches = matches_with_config(A::command(), std::env::args_os().collect())
        .map_err(ParseFailure::report)?;
    A::from_arg_matches(&matches).map_err(report)
}

/// Parses the command line like [`parse`], for a binary whose default backends carry
/// `default_weights` (the weights it hands to [`CommonArgs::backends`]), so that its `--help`
/// shows the default backends as the binary uses them.
pub fn parse_with_default_weights<A: Parser>(default_weights: &[u32; 3]) -> Result<A, ExitCode> {
    let command = command_with_default_weights::<A>(default_weights);
    let matches = matches_with_config(command, std::env::args_os().collect())
        .map_err(ParseFailure::report)?;
    A::from_arg_matches(&matches).map_err(report)
}

/// Why the command line and its configuration file could not be parsed.
#[derive(Debug)]
pub enum ParseFailure {
    /// A bad flag, or `--help` / `--version` (which are not failures of the user's).
    Flags(clap::Error),
    /// The configuration file cannot be read or holds a bad setting: one line, naming the file
    /// (and the line and column, when the problem is in a setting).
    File(String),
}

impl ParseFailure {
    /// Prints the failure as one line and returns exit code 2 (0 for help and version).
    pub fn report(self) -> ExitCode {
        match self {
            ParseFailure::Flags(err) => report(err),
            ParseFailure::File(message) => {
                eprintln!("error: {message}");
                ExitCode::from(2)
            }
        }
    }
}

impl std::fmt::Display for ParseFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseFailure::Flags(err) => {
                let line = one_line(err);
                f.write_str(line.strip_prefix("error: ").unwrap_or(&line))
            }
            ParseFailure::File(message) => f.write_str(message),
        }
    }
}

impl From<clap::Error> for ParseFailure {
    fn from(err: clap::Error) -> Self {
        ParseFailure::Flags(err)
    }
}

/// Clap's matches for `argv` with the settings of its `--config FILE` added for the flags the
/// command line does not give (a flag, or its environment variable, wins over the file). A
/// subcommand's command line takes no file.
pub fn matches_with_config(
    command: clap::Command,
    argv: Vec<std::ffi::OsString>,
) -> Result<ArgMatches, ParseFailure> {
    let matches = command.clone().try_get_matches_from(&argv)?;
    if matches.subcommand().is_some() {
        return Ok(matches);
    }
    let Some(path) = matches.try_get_one::<PathBuf>("config").ok().flatten() else {
        return Ok(matches);
    };
    let text = std::fs::read_to_string(path)
        .map_err(|err| ParseFailure::File(format!("{}: {err}", path.display())))?;
    let given = |arg: &clap::Arg| {
        matches!(
            matches.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    let from_file =
        crate::config::file_args(&command, path, &text, given).map_err(ParseFailure::File)?;
    let mut all = argv;
    let rest = all.split_off(1.min(all.len()));
    all.extend(from_file);
    all.extend(rest);
    Ok(command.try_get_matches_from(all)?)
}

/// The clap command of `A` with the `--backend` help naming the default backends with
/// `default_weights`: `[default: 127.0.0.1:8001=5, ...]` where the doc comment of
/// [`CommonArgs`] can only say the weight-less addresses.
pub fn command_with_default_weights<A: Parser>(default_weights: &[u32; 3]) -> clap::Command {
    let defaults: Vec<String> = DEFAULT_BACKENDS
        .iter()
        .zip(default_weights)
        .map(|(addr, weight)| match weight {
            1 => addr.to_string(),
            weight => format!("{addr}={weight}"),
        })
        .collect();
    let help = format!(
        "A backend as HOST:PORT[=WEIGHT]; repeat the flag for each one [default: {}]",
        defaults.join(", ")
    );
    A::command().mut_arg("backends", |arg| arg.help(help))
}

/// Parses the command line like [`parse`], and also returns clap's matches, so that a binary can
/// ask which flags were given explicitly (see [`given`]).
pub fn parse_with_matches<A: Parser>() -> Result<(A, ArgMatches), ExitCode> {
    parse_again::<A>().map_err(ParseFailure::report)
}

/// The command line and its configuration file parsed again, as a reload does: the file may
/// have changed since start-up.
pub fn parse_again<A: Parser>() -> Result<(A, ArgMatches), ParseFailure> {
    let matches = matches_with_config(A::command(), std::env::args_os().collect())?;
    let args = A::from_arg_matches(&matches)?;
    Ok((args, matches))
}

/// The effective configuration `matches` holds, as a configuration file would say it: every
/// setting with a value (defaults included), one a line, under its flag's name. A secret is not
/// printed.
pub fn effective_config(command: &clap::Command, matches: &ArgMatches) -> String {
    let mut lines = Vec::new();
    for arg in command.get_arguments() {
        let (Some(long), id) = (arg.get_long(), arg.get_id().as_str()) else {
            continue;
        };
        if matches!(
            arg.get_action(),
            clap::ArgAction::Help | clap::ArgAction::Version
        ) || long == "config"
        {
            continue;
        }
        let Some(values) = matches.get_raw(id) else {
            continue;
        };
        let values: Vec<String> = values.map(|v| v.to_string_lossy().into_owned()).collect();
        // Numbers bare, the rest as TOML strings.
        let quoted = |v: &String| match v.parse::<u64>() {
            Ok(_) => v.clone(),
            Err(_) => format!("{v:?}"),
        };
        let line = if arg.is_hide_env_values_set() {
            format!("{long} = \"(hidden)\"")
        } else if matches!(arg.get_action(), clap::ArgAction::SetTrue) {
            format!(
                "{long} = {}",
                values.first().map_or("false", String::as_str)
            )
        } else if matches!(arg.get_action(), clap::ArgAction::Append) {
            let items: Vec<String> = values.iter().map(quoted).collect();
            format!("{long} = [{}]", items.join(", "))
        } else {
            format!(
                "{long} = {}",
                values.first().map(quoted).unwrap_or_default()
            )
        };
        lines.push(line);
    }
    lines.join("\n")
}

/// Whether the flag with clap id `id` was written on the command line (not just defaulted).
pub fn given(matches: &ArgMatches, id: &str) -> bool {
    matches.value_source(id) == Some(ValueSource::CommandLine)
}

/// Prints a clap error as one line and returns exit code 2; help and version requests are not
/// errors: clap prints them to standard output and the exit code is 0.
fn report(err: clap::Error) -> ExitCode {
    if err.use_stderr() {
        eprintln!("{}", one_line(&err));
        ExitCode::from(2)
    } else {
        let _ = err.print();
        ExitCode::SUCCESS
    }
}

/// A clap error in one line: its first line, and when that line ends in `:` the indented list
/// under it (the missing arguments of "the following required arguments were not provided:").
fn one_line(err: &clap::Error) -> String {
    let rendered = err.to_string();
    let mut lines = rendered.lines();
    let first = lines.next().unwrap_or("error: bad arguments");
    if !first.ends_with(':') {
        return first.to_string();
    }
    let listed: Vec<&str> = lines
        .take_while(|line| line.starts_with(' '))
        .map(str::trim)
        .collect();
    format!("{first} {}", listed.join(", "))
}

/// Sets up logging: `info` by default, `debug` with `-v`, and `RUST_LOG` overrides both.
///
/// `rustls` logs only its errors unless `RUST_LOG` names it: its warnings are about what one
/// client sent (wrk, for one, names the IP address it connects to as the server name, which TLS
/// does not allow), so a line per connection; the balancer's own debug line says when a
/// handshake failed.
pub fn init_logging(verbose: bool) {
    let default = if verbose { "debug" } else { "info" };
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default));
    if !std::env::var("RUST_LOG").is_ok_and(|filter| filter.contains("rustls")) {
        builder.filter_module("rustls", log::LevelFilter::Error);
    }
    builder.format_timestamp_millis().init();
}

/// Turns the result of a binary's `run` into its exit code: a start-up error is logged and gives 2.
pub fn exit_code<E: std::fmt::Display>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line on standard error, as for a bad flag; not also in the log, which goes there too.
            eprintln!("error: {err}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_argument_is_named_on_the_one_line() {
        let command = clap::Command::new("lb")
            .arg(clap::Arg::new("file").required(true))
            .arg(clap::Arg::new("name").long("name").required(true));
        let err = command.clone().try_get_matches_from(["lb"]).unwrap_err();
        assert_eq!(
            one_line(&err),
            "error: the following required arguments were not provided: --name <name>, <file>"
        );
        let err = command
            .try_get_matches_from(["lb", "f", "--nam", "x"])
            .unwrap_err();
        assert!(
            one_line(&err).starts_with("error: unexpected argument '--nam' found"),
            "{}",
            one_line(&err)
        );
    }
}
