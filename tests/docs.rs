//! The commands shown in the guides are tested, so that a renamed flag fails here, in both
//! languages at once, instead of in a reader's terminal.
//!
//! Every fenced `sh` block of `README.md` and `docs/ko/README.md` is read as a small shell script
//! (and, in the other blocks, every line after a `$ ` prompt). Each `cargo run --bin NAME -- ARGS`,
//! each `target/release/NAME ARGS` and each package binary called by its bare name is checked: NAME
//! must be a binary of this package, and ARGS must parse with that binary's clap definition.
//!
//! The parse check runs the built binary with the documented arguments followed by `--help`.
//! clap reads arguments in order and validates each as it goes, so an unknown flag, a missing
//! value or a value its parser refuses (`--listen nope`, `--backend 127.0.0.1:8001=0`) fails with
//! exit code 2 before `--help` is reached; when they all parse, `--help` prints and exits 0, and
//! no server starts. What clap cannot see is not checked: `loadbalancer`'s refusal of flags whose
//! feature is off (`--max-sessions` without `--sticky`) runs after parsing, on a real start.

use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Every binary of the package and the path cargo built it at; `binaries_match_cargo_toml`
/// keeps this list in step with `Cargo.toml`.
const BINARIES: &[(&str, &str)] = &[
    ("phase1_rr", env!("CARGO_BIN_EXE_phase1_rr")),
    ("phase2_weighted", env!("CARGO_BIN_EXE_phase2_weighted")),
    ("phase2_least_conn", env!("CARGO_BIN_EXE_phase2_least_conn")),
    ("phase2_ip_hash", env!("CARGO_BIN_EXE_phase2_ip_hash")),
    (
        "phase3_active_health",
        env!("CARGO_BIN_EXE_phase3_active_health"),
    ),
    (
        "phase3_passive_health",
        env!("CARGO_BIN_EXE_phase3_passive_health"),
    ),
    ("phase4_sticky", env!("CARGO_BIN_EXE_phase4_sticky")),
    ("loadbalancer", env!("CARGO_BIN_EXE_loadbalancer")),
    ("backend", env!("CARGO_BIN_EXE_backend")),
];

/// The guides whose commands are checked, relative to the package root.
const GUIDES: &[&str] = &["README.md", "docs/ko/README.md"];

/// The fewest commands each guide is expected to hold: fewer means the reader below lost them.
const MIN_COMMANDS: usize = 6;

/// How long `NAME ARGS --help` may take before it counts as having started something.
const HELP_LIMIT: Duration = Duration::from_secs(10);

/// One documented run of a package binary.
#[derive(Debug, Clone, PartialEq)]
struct Invocation {
    /// The guide and the line the command starts on, as `README.md:42`.
    place: String,
    /// The binary's name as written.
    binary: String,
    /// The arguments the binary receives.
    args: Vec<String>,
}

/// A command in a guide that cannot work: where, and why.
type Problem = String;

/// One piece of a shell line: a word (quotes removed) or a control operator.
#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Operator,
}

#[test]
fn every_documented_command_names_a_binary_and_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut problems = Vec::new();
    for guide in GUIDES {
        let text = std::fs::read_to_string(root.join(guide))
            .unwrap_or_else(|err| panic!("cannot read {guide}: {err}"));
        let (invocations, found) = invocations_in(guide, &text);
        problems.extend(found);
        problems.extend(invocations.iter().filter_map(check));
        assert!(
            invocations.len() >= MIN_COMMANDS,
            "{guide}: only {} commands found in its sh blocks, expected at least {MIN_COMMANDS}: {:#?}",
            invocations.len(),
            invocations
        );
        eprintln!("{guide}: {} commands checked", invocations.len());
    }
    assert!(
        problems.is_empty(),
        "commands in the guides that would fail:\n{}",
        problems.join("\n")
    );
}

#[test]
fn a_renamed_flag_is_caught() {
    let guide = "Start it:\n\n```sh\ncargo run --bin phase1_rr -- --no-such-flag\n```\n";
    let (invocations, problems) = invocations_in("fake.md", guide);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(invocations.len(), 1);
    let problem = check(&invocations[0]).expect("an unknown flag is reported");
    assert!(problem.starts_with("fake.md:4: "), "{problem}");
    assert!(problem.contains("'--no-such-flag'"), "{problem}");
}

#[test]
fn bad_values_unknown_binaries_and_misplaced_flags_are_caught() {
    let guide = "```sh
cargo run --bin phase2_weighted -- --backend 127.0.0.1:8001=0
target/release/phase3_active_health --health-interval soon
cargo run --release --bin loadbalancer -- simulate --no-such-flag
cargo run --bin phase9_quantum
cargo run --bin phase1_rr --demo
cargo run -- --demo
```
";
    let (invocations, mut problems) = invocations_in("fake.md", guide);
    problems.extend(invocations.iter().filter_map(check));
    let expect = [
        ("fake.md:2: ", "weight must be at least 1"),
        ("fake.md:3: ", "'soon' is not a duration"),
        ("fake.md:4: ", "'--no-such-flag'"),
        ("fake.md:5: ", "no binary 'phase9_quantum'"),
        ("fake.md:6: ", "'--demo' is not a `cargo run` option"),
        ("fake.md:7: ", "--bin NAME"),
    ];
    for (place, why) in expect {
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with(place) && p.contains(why)),
            "no problem at {place} saying {why:?} in:\n{}",
            problems.join("\n")
        );
    }
    assert_eq!(problems.len(), expect.len(), "{problems:#?}");
}

#[test]
fn commands_are_found_the_way_a_shell_reads_them() {
    let guide = r#"Some prose with `cargo run --bin nope` inline, which is not a command.

```sh
scripts/backends.sh &                     # three backends
RUST_LOG=debug cargo run -q --bin phase1_rr -- --listen 127.0.0.1:8081 \
    --explain    # two lines
cargo run --release --bin loadbalancer -- simulate --requests 1000 | head -3
for i in 1 2; do curl -s localhost:8080/; done; target/release/backend --name "slow one" --delay 1s &
cargo run --bin phase2_ip_hash && echo '# not a comment' # a comment --no-such-flag
# cargo run --bin commented_out
cargo test
```

```text
$ ./target/debug/phase4_sticky --cookie-name SID 2>&1 | grep -v DEBUG
cargo run --bin not_a_prompt_line
```

```json
{"cargo run --bin": "not a shell block"}
```
"#;
    let (invocations, problems) = invocations_in("fake.md", guide);
    assert!(problems.is_empty(), "{problems:?}");
    let found: Vec<(&str, &str, Vec<&str>)> = invocations
        .iter()
        .map(|i| {
            let args = i.args.iter().map(String::as_str).collect();
            (i.place.as_str(), i.binary.as_str(), args)
        })
        .collect();
    assert_eq!(
        found,
        [
            (
                "fake.md:5",
                "phase1_rr",
                vec!["--listen", "127.0.0.1:8081", "--explain"]
            ),
            (
                "fake.md:7",
                "loadbalancer",
                vec!["simulate", "--requests", "1000"]
            ),
            (
                "fake.md:8",
                "backend",
                vec!["--name", "slow one", "--delay", "1s"]
            ),
            ("fake.md:9", "phase2_ip_hash", vec![]),
            ("fake.md:15", "phase4_sticky", vec!["--cookie-name", "SID"]),
        ]
    );
    for invocation in &invocations {
        assert_eq!(check(invocation), None);
    }
}

#[test]
fn binaries_match_cargo_toml() {
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .expect("Cargo.toml is readable");
    let mut declared: Vec<&str> = manifest
        .split("[[bin]]")
        .skip(1)
        .filter_map(|section| {
            let line = section.lines().find(|l| l.trim().starts_with("name"))?;
            line.split('"').nth(1)
        })
        .collect();
    let mut listed: Vec<&str> = BINARIES.iter().map(|(name, _)| *name).collect();
    declared.sort_unstable();
    listed.sort_unstable();
    assert_eq!(declared, listed, "add the new binary to BINARIES");
}

/// The runs of package binaries in the fenced blocks of `text` (a guide named `file`), and the
/// commands that cannot work whatever their flags (a `cargo run` without `--bin`, say).
fn invocations_in(file: &str, text: &str) -> (Vec<Invocation>, Vec<Problem>) {
    let mut invocations = Vec::new();
    let mut problems = Vec::new();
    for (number, line) in shell_lines(text) {
        let place = format!("{file}:{number}");
        for command in simple_commands(&tokens(&line)) {
            match invocation(&command) {
                Ok(Some((binary, args))) => invocations.push(Invocation {
                    place: place.clone(),
                    binary,
                    args,
                }),
                Ok(None) => {}
                Err(why) => problems.push(format!("{place}: `{}`: {why}", command.join(" "))),
            }
        }
    }
    (invocations, problems)
}

/// The shell lines of `text` with the number of the line each starts on: every line of a fenced
/// `sh` (or `bash`, `shell`) block, and the lines after a `$ ` prompt in the other fenced blocks,
/// with `\` continuations joined.
fn shell_lines(text: &str) -> Vec<(usize, String)> {
    let mut lines = Vec::new();
    let mut fence: Option<bool> = None; // Some(whether the block is a shell script)
    let mut pending: Option<(usize, String)> = None;
    for (index, raw) in text.lines().enumerate() {
        let number = index + 1;
        let trimmed = raw.trim_start();
        if let Some(info) = trimmed.strip_prefix("```") {
            fence = match fence {
                None => Some(matches!(
                    info.split_whitespace().next(),
                    Some("sh" | "bash" | "shell")
                )),
                Some(_) => None,
            };
            pending = None;
            continue;
        }
        let Some(is_script) = fence else { continue };
        let text = match pending.take() {
            Some((start, mut joined)) => {
                joined.push(' ');
                joined.push_str(trimmed);
                (start, joined)
            }
            None if is_script => (number, trimmed.to_string()),
            None => match trimmed.strip_prefix("$ ") {
                Some(command) => (number, command.to_string()),
                None => continue,
            },
        };
        match text.1.strip_suffix('\\') {
            Some(head) => pending = Some((text.0, head.to_string())),
            None => lines.push(text),
        }
    }
    lines
}

/// Splits a shell line into words and control operators (`;`, `&`, `&&`, `|`, `||`, parentheses),
/// removing quotes and stopping at a `#` that starts a word.
fn tokens(line: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars().peekable();
    let end_word = |word: &mut String, in_word: &mut bool, tokens: &mut Vec<Token>| {
        if *in_word {
            tokens.push(Token::Word(std::mem::take(word)));
            *in_word = false;
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '#' if !in_word => break,
            '\'' => {
                in_word = true;
                word.extend(chars.by_ref().take_while(|&c| c != '\''));
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => word.extend(chars.next()),
                        c => word.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                word.extend(chars.next());
            }
            // `2>&1` and `&>` are redirections, not the background operator.
            '&' if word.ends_with('>') || chars.peek() == Some(&'>') => {
                in_word = true;
                word.push(c);
            }
            ';' | '&' | '|' | '(' | ')' => {
                end_word(&mut word, &mut in_word, &mut tokens);
                tokens.push(Token::Operator);
            }
            c if c.is_whitespace() => end_word(&mut word, &mut in_word, &mut tokens),
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    end_word(&mut word, &mut in_word, &mut tokens);
    tokens
}

/// The simple commands among `tokens`: the words between control operators, without the shell
/// keywords that may open them (`do`, `then`, ...), variable assignments before the command
/// (`RUST_LOG=debug`), and redirections (`2>&1`, `> out.txt`).
fn simple_commands(tokens: &[Token]) -> Vec<Vec<String>> {
    let mut commands = Vec::new();
    for group in tokens.split(|t| *t == Token::Operator) {
        let mut words: Vec<String> = Vec::new();
        let mut skip_next = false;
        for token in group {
            let Token::Word(word) = token else { continue };
            if std::mem::take(&mut skip_next) {
                continue;
            }
            if is_redirection(word) {
                skip_next = word.trim_start_matches(|c: char| c.is_ascii_digit()).len() <= 2
                    && !word.contains('&')
                    && word.ends_with(['>', '<']);
                continue;
            }
            let is_prefix = ["do", "then", "else", "time", "env", "nohup", "exec", "!"]
                .contains(&word.as_str())
                || (word.contains('=') && !word.starts_with('-') && !word.starts_with('='));
            if words.is_empty() && is_prefix {
                continue;
            }
            words.push(word.clone());
        }
        if !words.is_empty() {
            commands.push(words);
        }
    }
    commands
}

/// Whether `word` is a redirection such as `>`, `2>&1`, `>/dev/null` or `<input`.
fn is_redirection(word: &str) -> bool {
    let rest = word.trim_start_matches(|c: char| c.is_ascii_digit());
    rest.starts_with(['>', '<']) || rest.starts_with("&>")
}

/// The binary and arguments `command` runs, when it runs one of this package's binaries:
/// through `cargo run`, from `target/`, or by its bare name.
fn invocation(command: &[String]) -> Result<Option<(String, Vec<String>)>, String> {
    let (program, rest) = command.split_first().expect("a command has a word");
    if program == "cargo" {
        return match rest.split_first() {
            Some((run, options)) if run == "run" || run == "r" => cargo_run(options).map(Some),
            _ => Ok(None),
        };
    }
    let name = program.trim_start_matches("./");
    let built = ["target/release/", "target/debug/"]
        .iter()
        .find_map(|dir| name.strip_prefix(dir));
    match built {
        Some(binary) => Ok(Some((binary.to_string(), rest.to_vec()))),
        None if BINARIES.iter().any(|(known, _)| *known == name) => {
            Ok(Some((name.to_string(), rest.to_vec())))
        }
        None => Ok(None),
    }
}

/// The binary and its arguments from the words after `cargo run`: cargo's own options up to
/// `--`, the binary's after it.
fn cargo_run(words: &[String]) -> Result<(String, Vec<String>), String> {
    const SWITCHES: &[&str] = &[
        "--release",
        "-r",
        "-q",
        "--quiet",
        "-v",
        "--verbose",
        "--offline",
        "--locked",
        "--frozen",
        "--all-features",
        "--no-default-features",
    ];
    const WITH_VALUE: &[&str] = &[
        "--bin",
        "--profile",
        "--features",
        "-F",
        "-p",
        "--package",
        "-j",
        "--jobs",
        "--target",
        "--target-dir",
        "--manifest-path",
        "--color",
    ];
    let (options, args) = match words.iter().position(|w| w == "--") {
        Some(at) => (&words[..at], words[at + 1..].to_vec()),
        None => (words, Vec::new()),
    };
    let mut binary = None;
    let mut options = options.iter();
    while let Some(option) = options.next() {
        let (flag, inline) = match option.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_string())),
            _ => (option.as_str(), None),
        };
        if SWITCHES.contains(&flag) {
            continue;
        }
        if !WITH_VALUE.contains(&flag) {
            return Err(format!(
                "'{option}' is not a `cargo run` option (the binary's flags go after `--`)"
            ));
        }
        let value = inline.or_else(|| options.next().cloned());
        let value = value.ok_or_else(|| format!("'{flag}' needs a value"))?;
        if flag == "--bin" {
            binary = Some(value);
        }
    }
    let names: Vec<&str> = BINARIES.iter().map(|(name, _)| *name).collect();
    let binary = binary.ok_or_else(|| {
        format!(
            "`cargo run` needs --bin NAME here: the package has several binaries ({})",
            names.join(", ")
        )
    })?;
    Ok((binary, args))
}

/// Runs the documented binary with its arguments and `--help` (see the module's comment), and
/// says what is wrong, or `None` when the command parses.
fn check(invocation: &Invocation) -> Option<Problem> {
    let Invocation {
        place,
        binary,
        args,
    } = invocation;
    let written = format!("`{binary} {}`", args.join(" "));
    let Some((_, path)) = BINARIES.iter().find(|(name, _)| name == binary) else {
        let names: Vec<&str> = BINARIES.iter().map(|(name, _)| *name).collect();
        return Some(format!(
            "{place}: {written}: no binary '{binary}' in this package (it has {})",
            names.join(", ")
        ));
    };
    // The guide's own `--help` or `--version` would stop clap before the flags after it.
    let args: Vec<&String> = args
        .iter()
        .filter(|a| !["-h", "--help", "-V", "--version"].contains(&a.as_str()))
        .collect();
    let mut child = Command::new(path)
        .args(&args)
        .arg("--help")
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {path}: {err}"));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("the child can be waited for") {
            break status;
        }
        if started.elapsed() > HELP_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            return Some(format!(
                "{place}: {written}: still running {HELP_LIMIT:?} after `--help`"
            ));
        }
        thread::sleep(Duration::from_millis(5));
    };
    if status.success() {
        return None;
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    let why = stderr.lines().next().unwrap_or("no message");
    Some(format!("{place}: {written}: {why} ({status})"))
}
