//! The configuration file (`--config FILE`): TOML whose keys are the flags' own names.
//!
//! A file stands for flags: `listen = "127.0.0.1:8080"` is `--listen 127.0.0.1:8080`,
//! `backend = ["127.0.0.1:8001=5", "127.0.0.1:8002"]` is two `--backend` flags, `sticky = true`
//! is `--sticky`. So the file is read into command-line arguments and clap parses them with the
//! very parsers the flags use: one list of names and one set of rules, which cannot drift apart
//! the way a second, serde-derived description of every setting could. Each value is checked on
//! its own first, so that a bad one is reported with the file, line and column it came from.
//! Flags given on the command line win over the file.
//!
//! A backend may also be a table, which carries the per-backend settings:
//! `backend = [{ address = "app:8000", weight = 3, max_conns = 4 }]`, or `[[backend]]` sections.
//! Its `max_conns` (a connection limit of its own, see [`crate::limit`]) has no flag of its own:
//! it rides on the backend's flag value as `app:8000=3,max_conns=4`.

use std::ffi::OsString;
use std::path::Path;

use clap::{Arg, ArgAction, Command};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// The keys a backend's table may hold, and what each is.
const BACKEND_KEYS: &[(&str, &str)] = &[
    ("address", "HOST:PORT, a literal IP or a name"),
    ("weight", "a whole number of at least 1"),
    ("max_conns", "a whole number of at least 1"),
];

/// The command-line arguments `text` (the contents of the file at `path`) stands for, leaving
/// out the settings whose flag `given` says the command line already has. An error is one line:
/// `FILE:LINE:COLUMN: what is wrong`.
pub fn file_args(
    command: &Command,
    path: &Path,
    text: &str,
    given: impl Fn(&Arg) -> bool,
) -> Result<Vec<OsString>, String> {
    let file = File { path, text };
    let table = DeTable::parse(text).map_err(|err| {
        let at = err.span().map_or(0, |span| span.start);
        file.error(at, err.message().trim())
    })?;
    let mut args = Vec::new();
    for (key, value) in table.get_ref().iter() {
        let arg = file.flag(command, key)?;
        if given(arg) {
            continue;
        }
        file.push_values(arg, value, &mut args)?;
    }
    Ok(args)
}

/// Parses `flag` (`--name=value`) alone, with the parser of `arg`: clap keeps its parsers to
/// itself, so the flag goes through a command of its own.
fn check_alone(arg: &Arg, flag: &str) -> Result<(), clap::Error> {
    let alone = Arg::new(arg.get_id().clone())
        .long(arg.get_long().unwrap_or_default().to_string())
        .action(ArgAction::Set)
        .value_names(arg.get_value_names().unwrap_or_default().to_vec())
        .value_parser(arg.get_value_parser().clone());
    Command::new("check")
        .no_binary_name(true)
        .arg(alone)
        .try_get_matches_from([flag])
        .map(drop)
}

/// The file being read, to name places in it.
struct File<'a> {
    path: &'a Path,
    text: &'a str,
}

impl File<'_> {
    /// `FILE:LINE:COLUMN: message` for the byte offset `at`.
    fn error(&self, at: usize, message: &str) -> String {
        let before = &self.text[..at.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        format!("{}:{line}:{column}: {message}", self.path.display())
    }

    /// The flag a key names: `health-interval` or `health_interval` for `--health-interval`.
    fn flag<'c>(
        &self,
        command: &'c Command,
        key: &Spanned<std::borrow::Cow<str>>,
    ) -> Result<&'c Arg, String> {
        let name = key.get_ref().replace('_', "-");
        let at = key.span().start;
        if name == "config" {
            return Err(self.error(at, "a configuration file cannot name another one"));
        }
        command
            .get_arguments()
            .filter(|arg| !matches!(arg.get_action(), ArgAction::Help | ArgAction::Version))
            .find(|arg| arg.get_long() == Some(name.as_str()))
            .ok_or_else(|| self.error(at, &format!("unknown key '{}'", key.get_ref())))
    }

    /// Appends the flags `value` stands for, each checked with the flag's own parser.
    fn push_values(
        &self,
        arg: &Arg,
        value: &Spanned<DeValue>,
        args: &mut Vec<OsString>,
    ) -> Result<(), String> {
        let long = arg.get_long().unwrap_or_default();
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            return match value.get_ref() {
                DeValue::Boolean(true) => {
                    args.push(format!("--{long}").into());
                    Ok(())
                }
                DeValue::Boolean(false) => Ok(()),
                other => Err(self.wrong_type(value, "true or false", other)),
            };
        }
        let items: Vec<&Spanned<DeValue>> = match value.get_ref() {
            DeValue::Array(array) if matches!(arg.get_action(), ArgAction::Append) => {
                array.iter().collect()
            }
            _ => vec![value],
        };
        for item in items {
            let text = self.scalar(long, item)?;
            let flag = format!("--{long}={text}");
            if let Err(err) = check_alone(arg, &flag) {
                let rendered = err.to_string();
                let first = rendered.lines().next().unwrap_or_default();
                let message = first.strip_prefix("error: ").unwrap_or(first);
                return Err(self.error(item.span().start, message));
            }
            args.push(flag.into());
        }
        Ok(())
    }

    /// A value as the flag would be written: a string as it is, a number in digits; a backend's
    /// table as `HOST:PORT=WEIGHT`.
    fn scalar(&self, long: &str, value: &Spanned<DeValue>) -> Result<String, String> {
        match value.get_ref() {
            DeValue::String(text) => Ok(text.to_string()),
            DeValue::Integer(number) if number.radix() == 10 => Ok(number.as_str().to_string()),
            DeValue::Table(table) if long == "backend" || long == "backup" => {
                self.backend_table(value, table)
            }
            other => Err(self.wrong_type(value, "a string or a whole number", other)),
        }
    }

    /// `{ address = "HOST:PORT", weight = N, max_conns = M }` as `HOST:PORT=N,max_conns=M`.
    fn backend_table(&self, value: &Spanned<DeValue>, table: &DeTable) -> Result<String, String> {
        let mut address = None;
        let mut weight = None;
        let mut max_conns = None;
        for (key, item) in table.iter() {
            match (key.get_ref().as_ref(), item.get_ref()) {
                ("address", DeValue::String(text)) => address = Some(text.to_string()),
                ("weight", DeValue::Integer(n)) if n.radix() == 10 => {
                    weight = Some(n.as_str().to_string())
                }
                ("max_conns", DeValue::Integer(n)) if n.radix() == 10 => {
                    max_conns = Some(n.as_str().to_string())
                }
                (name, other) => {
                    let Some((_, expected)) = BACKEND_KEYS.iter().find(|(k, _)| *k == name) else {
                        let known: Vec<&str> = BACKEND_KEYS.iter().map(|(k, _)| *k).collect();
                        return Err(self.error(
                            key.span().start,
                            &format!(
                                "unknown key '{name}' in a backend (known: {})",
                                known.join(", ")
                            ),
                        ));
                    };
                    return Err(self.wrong_type(item, expected, other));
                }
            }
        }
        let address =
            address.ok_or_else(|| self.error(value.span().start, "a backend needs an address"))?;
        let weight = weight.map(|w| format!("={w}")).unwrap_or_default();
        let max_conns = max_conns
            .map(|m| format!(",max_conns={m}"))
            .unwrap_or_default();
        Ok(format!("{address}{weight}{max_conns}"))
    }

    fn wrong_type(&self, value: &Spanned<DeValue>, expected: &str, found: &DeValue) -> String {
        self.error(
            value.span().start,
            &format!("expected {expected}, found {}", found.type_str()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::CommonArgs;
    use clap::{CommandFactory, Parser};

    #[derive(Parser, Debug)]
    struct Flags {
        #[command(flatten)]
        common: CommonArgs,
    }

    fn args(text: &str) -> Result<Vec<String>, String> {
        let command = Flags::command();
        file_args(&command, Path::new("lb.toml"), text, |_| false)
            .map(|args| args.into_iter().map(|a| a.into_string().unwrap()).collect())
    }

    #[test]
    fn keys_are_the_flags_own_names() {
        let text = "listen = \"127.0.0.1:9000\"\nmax-connections = 10\nexplain = true\n\
                    reuse_port = false\nbackend = [\"127.0.0.1:8001=5\", { address = \"127.0.0.1:8002\", weight = 2 }]\n";
        assert_eq!(
            args(text).unwrap(),
            [
                "--backend=127.0.0.1:8001=5",
                "--backend=127.0.0.1:8002=2",
                "--explain",
                "--listen=127.0.0.1:9000",
                "--max-connections=10",
            ]
        );
        let parsed =
            Flags::try_parse_from(std::iter::once("lb".to_string()).chain(args(text).unwrap()))
                .unwrap();
        assert_eq!(parsed.common.backends.len(), 2);
        assert_eq!(parsed.common.max_connections, 10);
    }

    #[test]
    fn sections_of_backends_work_too() {
        let text = "[[backend]]\naddress = \"127.0.0.1:8001\"\n\n[[backend]]\naddress = \"127.0.0.1:8002\"\nweight = 3\n";
        assert_eq!(
            args(text).unwrap(),
            ["--backend=127.0.0.1:8001", "--backend=127.0.0.1:8002=3"]
        );
        let backups = "backup = [{ address = \"127.0.0.1:8003\", weight = 2 }]\n\
                       panic-threshold = 50\nslow-start = \"30s\"\n";
        assert_eq!(
            args(backups).unwrap(),
            [
                "--backup=127.0.0.1:8003=2",
                "--panic-threshold=50",
                "--slow-start=30s"
            ]
        );
    }

    #[test]
    fn a_backend_table_may_carry_its_own_connection_limit() {
        let text = "[[backend]]\naddress = \"127.0.0.1:8001\"\nmax_conns = 4\n\n\
                    [[backend]]\naddress = \"127.0.0.1:8002\"\nweight = 3\nmax_conns = 2\n";
        let flags = args(text).unwrap();
        assert_eq!(
            flags,
            [
                "--backend=127.0.0.1:8001,max_conns=4",
                "--backend=127.0.0.1:8002=3,max_conns=2"
            ]
        );
        let parsed = Flags::try_parse_from(std::iter::once("lb".to_string()).chain(flags)).unwrap();
        let limits: Vec<_> = parsed.common.backends.iter().map(|b| b.max_conns).collect();
        assert_eq!(limits, [Some(4), Some(2)]);
        let err = args("backend = [{ address = \"127.0.0.1:1\", max_conns = 0 }]").unwrap_err();
        assert!(err.contains("max_conns"), "{err}");
    }

    #[test]
    fn errors_name_the_file_line_and_column() {
        let err = args("listen = \"127.0.0.1:9000\"\nlisten_on = 1\n").unwrap_err();
        assert_eq!(err, "lb.toml:2:1: unknown key 'listen_on'");
        let err = args("\nmax-connections = \"many\"\n").unwrap_err();
        assert!(
            err.starts_with("lb.toml:2:19: invalid value 'many' for '--max-connections <N>'"),
            "{err}"
        );
        assert!(err.contains("many"), "{err}");
        let err = args("explain = 1\n").unwrap_err();
        assert_eq!(err, "lb.toml:1:11: expected true or false, found integer");
        let err = args("backend = [\"127.0.0.1:8001\",\n  \"nowhere\"]\n").unwrap_err();
        assert!(
            err.starts_with("lb.toml:2:3: invalid value 'nowhere'"),
            "{err}"
        );
        let err = args("backend = [{ address = \"127.0.0.1:1\", wieght = 2 }]").unwrap_err();
        assert!(
            err.starts_with("lb.toml:1:39: unknown key 'wieght' in a backend"),
            "{err}"
        );
        let err = args("listen = \"127.0.0.1:9000\n").unwrap_err();
        assert!(err.starts_with("lb.toml:1:"), "{err}");
        let err = args("stats-interval = 1.5\n").unwrap_err();
        assert!(err.contains("found float"), "{err}");
    }

    #[test]
    fn the_command_line_wins() {
        let command = Flags::command();
        let args = file_args(
            &command,
            Path::new("lb.toml"),
            "listen = \"127.0.0.1:9000\"\nexplain = true\n",
            |arg| arg.get_id() == "listen",
        )
        .unwrap();
        assert_eq!(args, [OsString::from("--explain")]);
    }
}
