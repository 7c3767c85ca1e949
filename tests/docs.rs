//! The guides are tested, so that a renamed flag, a moved function or a broken link fails here,
//! in both languages at once, instead of in a reader's terminal. The guides are `README.md` and
//! every `docs/**/*.md`.
//!
//! Commands. Every fenced `sh` block is read as a small shell script (and, in the other
//! blocks, every line after a `$ ` prompt). Each `cargo run --bin NAME -- ARGS`, each
//! `target/release/NAME ARGS` and each package binary called by its bare name is checked: NAME
//! must be a binary of this package, and ARGS must parse with that binary's clap definition.
//! The guides use one build profile, release: a `cargo run` without `--release` or a
//! `target/debug/` path is reported, so that a reader never builds twice.
//!
//! The parse check runs the built binary with the documented arguments followed by `--help`.
//! clap reads arguments in order and validates each as it goes, so an unknown flag, a missing
//! value or a value its parser refuses (`--listen nope`, `--backend 127.0.0.1:8001=0`) fails with
//! exit code 2 before `--help` is reached; when they all parse, `--help` prints and exits 0, and
//! no server starts. What clap cannot see is not checked: `loadbalancer`'s refusal of flags whose
//! feature is off (`--max-sessions` without `--sticky`) runs after parsing, on a real start.
//!
//! Links. Every relative link and image (Markdown or HTML) must name a file that exists, and an
//! anchor (`#...`) a heading of the page it points to, spelled as GitHub spells heading anchors
//! (Korean headings included), or an explicit `<a id>`.
//!
//! "Follow one request". Each `path::function` in that section of `README.md` must exist: a
//! `fn function` in that file, or in a file under that folder. The source tree is being
//! restructured, so a name that moved is reported with the file that now holds it.
//!
//! The Korean phase pages. `docs/ko/phase1.md` to `phase4.md` carry the chapter's own `##` and
//! `###` headings, exactly and in the chapter's order (the list below is the course's); their
//! own sections are `####`.
//!
//! Figures. Measured figures (requests per second, ratios to nginx) live in
//! `docs/performance.md` only, so that a new measurement changes one file.

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

/// The fewest commands a phase page is expected to hold: fewer means the reader below lost them.
const MIN_COMMANDS: usize = 3;

/// The fewest commands `README.md` is expected to hold: run, and follow the chapter.
const MIN_COMMANDS_IN_README: usize = 2;

/// The fewest commands all the guides hold together.
const MIN_COMMANDS_IN_ALL: usize = 50;

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
    let mut problems = Vec::new();
    let mut total = 0;
    for guide in guides() {
        let text = read(&guide);
        let (invocations, found) = invocations_in(&guide, &text);
        problems.extend(found);
        problems.extend(profile_problems(&guide, &text));
        problems.extend(invocations.iter().filter_map(check));
        let is_phase_page = guide
            .rsplit('/')
            .next()
            .is_some_and(|name| name.starts_with("phase"));
        let least = match guide.as_str() {
            "README.md" => MIN_COMMANDS_IN_README,
            _ if is_phase_page => MIN_COMMANDS,
            _ => 0,
        };
        assert!(
            invocations.len() >= least,
            "{guide}: only {} commands found in its sh blocks, expected at least {least}: {:#?}",
            invocations.len(),
            invocations
        );
        total += invocations.len();
        let noun = if invocations.len() == 1 {
            "command"
        } else {
            "commands"
        };
        eprintln!("{guide}: {} {noun} checked", invocations.len());
    }
    assert!(
        total >= MIN_COMMANDS_IN_ALL,
        "only {total} commands in all the guides, expected at least {MIN_COMMANDS_IN_ALL}"
    );
    assert!(
        problems.is_empty(),
        "commands in the guides that would fail:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_guides_use_one_build_profile() {
    let guide = "```sh\ncargo run --bin phase1_rr\ncargo run -r --bin phase1_rr\ntarget/debug/backend --name x\ncargo run --release --bin backend\n```\n";
    let problems = profile_problems("fake.md", guide);
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(problems[0].starts_with("fake.md:2: "), "{problems:?}");
    assert!(problems[1].starts_with("fake.md:4: "), "{problems:?}");
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

// ---------------------------------------------------------------------------------------------
// The guides, and one build profile.

/// The package root.
fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The text of `guide` (a path relative to the package root).
fn read(guide: &str) -> String {
    std::fs::read_to_string(root().join(guide))
        .unwrap_or_else(|err| panic!("cannot read {guide}: {err}"))
}

/// Every guide, relative to the package root: `README.md` and every `docs/**/*.md`, sorted.
fn guides() -> Vec<String> {
    let mut found = vec!["README.md".to_string()];
    let mut dirs = vec![root().join("docs")];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|err| panic!("cannot list {}: {err}", dir.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                let relative = path.strip_prefix(root()).expect("under the root");
                found.push(relative.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    found[1..].sort();
    found
}

/// The guides' commands that would build a second profile: a `cargo run` without `--release`
/// (or `-r`), or a binary run from `target/debug/`.
fn profile_problems(file: &str, text: &str) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (number, line) in shell_lines(text) {
        for command in simple_commands(&tokens(&line)) {
            let words: Vec<&str> = command.iter().map(String::as_str).collect();
            let options = match words.as_slice() {
                ["cargo", "run" | "r", rest @ ..] => rest,
                [program, ..]
                    if program
                        .trim_start_matches("./")
                        .starts_with("target/debug/") =>
                {
                    problems.push(format!(
                        "{file}:{number}: `{}`: the guides use release builds (target/release/)",
                        words.join(" ")
                    ));
                    continue;
                }
                _ => continue,
            };
            let before_args = options.split(|w| *w == "--").next().unwrap_or_default();
            if !before_args.iter().any(|w| *w == "--release" || *w == "-r") {
                problems.push(format!(
                    "{file}:{number}: `{}`: the guides use one build profile, `cargo run --release`",
                    words.join(" ")
                ));
            }
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// Links and anchors.

/// A relative link in a guide: the line it is on and its target as written.
#[derive(Debug, Clone, PartialEq)]
struct Link {
    line: usize,
    target: String,
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for guide in guides() {
        let text = read(&guide);
        for link in links_in(&text) {
            checked += 1;
            if let Err(why) = resolve(&guide, &link.target) {
                problems.push(format!("{guide}:{}: ({}): {why}", link.line, link.target));
            }
        }
    }
    assert!(checked >= 50, "only {checked} relative links found");
    assert!(
        problems.is_empty(),
        "links that lead nowhere:\n{}",
        problems.join("\n")
    );
}

#[test]
fn links_are_found_outside_code_and_anchors_spelled_as_github_does() {
    let text =
        "# Title\n\nSee [one](a.md#x), ![pic](p.png \"t\") and <img src=\"q.png\" width=3>.\n\
                `[not](a link)` and [web](https://example.com).\n\n```text\n[no](code.md)\n```\n";
    let found: Vec<String> = links_in(text).into_iter().map(|l| l.target).collect();
    assert_eq!(found, ["a.md#x", "p.png", "q.png"]);
    let page = "# Phase 4: Sticky Session (세션 유지)\n## `--explain` and `X-Lb-Decision`\n\
                ## Notes\n## Notes\n<a id=\"phase-1\"></a>\n## 1. Weighted Round Robin (가중 라운드 로빈)\n\
                ## What [the chapter](x.md) does — and *why*\n";
    let anchors = anchors_in(page);
    for anchor in [
        "phase-4-sticky-session-세션-유지",
        "--explain-and-x-lb-decision",
        "notes",
        "notes-1",
        "phase-1",
        "1-weighted-round-robin-가중-라운드-로빈",
        "what-the-chapter-does--and-why",
    ] {
        assert!(
            anchors.contains(&anchor.to_string()),
            "{anchor} in {anchors:?}"
        );
    }
}

/// The relative links of a Markdown text, outside fenced blocks and code spans: Markdown links
/// and images, and HTML `src`/`href` attributes. Web and mail addresses are left out.
fn links_in(text: &str) -> Vec<Link> {
    let mut links = Vec::new();
    let mut in_fence = false;
    for (index, raw) in text.lines().enumerate() {
        if raw.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        let line = without_code_spans(raw);
        let mut targets = Vec::new();
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let end = after.find(')').unwrap_or(after.len());
            let inside = after[..end].trim();
            // `(target "title")` or `(<target>)`
            let target = inside.split_whitespace().next().unwrap_or_default();
            targets.push(target.trim_matches(['<', '>']).to_string());
            rest = &after[end..];
        }
        for attribute in ["src=\"", "href=\""] {
            let mut rest = line.as_str();
            while let Some(at) = rest.find(attribute) {
                let after = &rest[at + attribute.len()..];
                let end = after.find('"').unwrap_or(after.len());
                targets.push(after[..end].to_string());
                rest = &after[end..];
            }
        }
        for target in targets {
            let is_web = ["http://", "https://", "mailto:"]
                .iter()
                .any(|scheme| target.starts_with(scheme));
            if !target.is_empty() && !is_web {
                links.push(Link {
                    line: index + 1,
                    target,
                });
            }
        }
    }
    links
}

/// `line` with its code spans (`` `...` ``) blanked out.
fn without_code_spans(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut in_code = false;
    for c in line.chars() {
        if c == '`' {
            in_code = !in_code;
            out.push(' ');
        } else if in_code {
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether a link written in `guide` leads somewhere: its file exists, and its anchor (if any)
/// is one of that page's anchors.
fn resolve(guide: &str, target: &str) -> Result<(), String> {
    let (path, anchor) = match target.split_once('#') {
        Some((path, anchor)) => (path, Some(anchor)),
        None => (target, None),
    };
    let file = if path.is_empty() {
        guide.to_string()
    } else {
        let base = Path::new(guide).parent().unwrap_or(Path::new(""));
        normalize(&base.join(path))?
    };
    let on_disk = root().join(&file);
    if !on_disk.exists() {
        return Err(format!("no file {file}"));
    }
    let Some(anchor) = anchor else {
        return Ok(());
    };
    if !file.ends_with(".md") {
        return Err(format!(
            "an anchor into {file}, which is not a Markdown page"
        ));
    }
    let anchors = anchors_in(&read(&file));
    if anchors.iter().any(|a| a == anchor) {
        Ok(())
    } else {
        Err(format!("no heading in {file} has the anchor #{anchor}"))
    }
}

/// `path` with its `.` and `..` steps taken, relative to the package root, which it must not
/// leave.
fn normalize(path: &Path) -> Result<String, String> {
    let mut parts: Vec<String> = Vec::new();
    for part in path.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                parts
                    .pop()
                    .ok_or_else(|| format!("{} leaves the repository", path.display()))?;
            }
            other => parts.push(other.as_os_str().to_string_lossy().into_owned()),
        }
    }
    Ok(parts.join("/"))
}

/// The anchors of a Markdown page: each heading's, as GitHub makes them (lower case; letters,
/// digits, `-` and `_` kept, spaces made `-`, everything else dropped; a repeated one gets `-1`,
/// `-2`, ...), and every explicit `id="..."`.
fn anchors_in(text: &str) -> Vec<String> {
    let mut anchors: Vec<String> = Vec::new();
    let mut in_fence = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find(" id=\"").or_else(|| rest.find(" name=\"")) {
            let after = &rest[at..];
            let start = after.find('"').expect("found above") + 1;
            let end = after[start..].find('"').map_or(after.len(), |e| start + e);
            anchors.push(after[start..end].to_string());
            rest = &after[end..];
        }
        let Some((_, heading)) = heading(line) else {
            continue;
        };
        let slug = slug(&heading);
        let repeats = anchors
            .iter()
            .filter(|a| {
                **a == slug
                    || a.strip_prefix(&format!("{slug}-"))
                        .is_some_and(|n| n.parse::<u32>().is_ok())
            })
            .count();
        anchors.push(if repeats == 0 {
            slug
        } else {
            format!("{slug}-{repeats}")
        });
    }
    anchors
}

/// The level and the text (as rendered: no code marks, links reduced to their text, no emphasis
/// stars) of a Markdown ATX heading line.
fn heading(line: &str) -> Option<(usize, String)> {
    let level = line.chars().take_while(|&c| c == '#').count();
    if level == 0 || level > 6 || !line[level..].starts_with(' ') {
        return None;
    }
    let text = line[level..].trim().trim_end_matches('#').trim();
    let mut rendered = String::new();
    let mut rest = text;
    // `[text](target)` becomes `text`.
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find("](").map(|c| open + c) else {
            break;
        };
        let Some(end) = rest[close..].find(')').map(|e| close + e) else {
            break;
        };
        rendered.push_str(&rest[..open]);
        rendered.push_str(&rest[open + 1..close]);
        rest = &rest[end + 1..];
    }
    rendered.push_str(rest);
    Some((level, rendered.replace(['`', '*'], "")))
}

/// A heading's anchor as GitHub writes it.
fn slug(text: &str) -> String {
    text.to_lowercase()
        .chars()
        .filter(|&c| c.is_alphanumeric() || c == '-' || c == '_' || c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// "Follow one request".

/// The steps of the chapter's phase-1 Python, in the order a request takes them.
const STEPS: [&str; 7] = [
    "accept", "read", "choose", "connect", "send", "relay", "close",
];

#[test]
fn follow_one_request_names_functions_that_exist_in_the_order_of_the_steps() {
    let text = read("README.md");
    let section = section(&text, "Follow one request")
        .expect("README.md has a section \"Follow one request\"");
    let steps: Vec<&str> = section
        .iter()
        .filter_map(|(_, line)| {
            let first = line.strip_prefix('|')?.split('|').next()?.trim();
            let word = first.trim_matches(['*', '`']).to_lowercase();
            STEPS.iter().find(|s| **s == word).copied()
        })
        .collect();
    assert_eq!(
        steps, STEPS,
        "README.md's \"Follow one request\" has one table row per step of the chapter's \
         phase-1 Python, in order"
    );
    let mut problems = Vec::new();
    let mut named = 0;
    for (number, line) in &section {
        for reference in code_spans(line) {
            let Some((path, function)) = reference.split_once("::") else {
                continue;
            };
            if !(path.contains('/') || path.ends_with(".rs")) {
                continue;
            }
            named += 1;
            if let Err(why) = function_exists(path, function) {
                problems.push(format!("README.md:{number}: `{reference}`: {why}"));
            }
        }
    }
    assert!(
        named >= STEPS.len(),
        "only {named} `file::function` names found"
    );
    assert!(
        problems.is_empty(),
        "\"Follow one request\" names functions that are not where it says:\n{}",
        problems.join("\n")
    );
}

#[test]
fn a_moved_function_is_reported_with_where_it_is_now() {
    let why = function_exists("src/no_such_file.rs", "relay_body").unwrap_err();
    assert!(why.contains("no file src/no_such_file.rs"), "{why}");
    assert!(why.contains("`fn relay_body` is now in src/http"), "{why}");
    let why = function_exists("src/balance/round_robin.rs", "no_such_function").unwrap_err();
    assert!(
        why.contains("no `fn no_such_function` in src/balance/round_robin.rs"),
        "{why}"
    );
    assert_eq!(
        function_exists("src/balance/round_robin.rs", "pick"),
        Ok(())
    );
    assert_eq!(function_exists("src/balance", "pick"), Ok(()));
    assert_eq!(function_exists("src/balance/", "pick"), Ok(()));
}

/// The numbered lines of the section of `text` whose heading contains `title`, up to the next
/// heading of the same level or higher.
fn section<'t>(text: &'t str, title: &str) -> Option<Vec<(usize, &'t str)>> {
    let mut lines = text.lines().enumerate();
    let level = lines.by_ref().find_map(|(_, line)| {
        heading(line)
            .filter(|(_, text)| text.contains(title))
            .map(|(level, _)| level)
    })?;
    Some(
        lines
            .take_while(|(_, line)| heading(line).is_none_or(|(l, _)| l > level))
            .map(|(index, line)| (index + 1, line))
            .collect(),
    )
}

/// The code spans of a line, without their backticks.
fn code_spans(line: &str) -> Vec<&str> {
    line.split('`').skip(1).step_by(2).collect()
}

/// Whether `fn function` is defined in `path`: a file, or any `.rs` file under a folder. When
/// it is not, says where in `src/` and `phases/` it is now, if anywhere.
fn function_exists(path: &str, function: &str) -> Result<(), String> {
    let place = root().join(path.trim_end_matches('/'));
    let files = if place.is_dir() {
        rust_files(&place)
    } else if place.is_file() {
        vec![place.clone()]
    } else {
        Vec::new()
    };
    if files.iter().any(|file| defines(file, function)) {
        return Ok(());
    }
    let mut why = if files.is_empty() {
        format!("no file {path}")
    } else {
        format!("no `fn {function}` in {path}")
    };
    let now: Vec<String> = ["src", "phases"]
        .iter()
        .flat_map(|dir| rust_files(&root().join(dir)))
        .filter(|file| defines(file, function))
        .map(|file| {
            let relative = file.strip_prefix(root()).expect("under the root");
            relative.to_string_lossy().replace('\\', "/")
        })
        .collect();
    if now.is_empty() {
        why.push_str(&format!(
            ", and no `fn {function}` anywhere in src/ or phases/"
        ));
    } else {
        why.push_str(&format!("; `fn {function}` is now in {}", now.join(", ")));
    }
    Err(why)
}

/// The `.rs` files under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Whether the Rust file defines a function named `function` (`fn function(` or `fn function<`).
fn defines(file: &Path, function: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(file) else {
        return false;
    };
    let needle = format!("fn {function}");
    text.match_indices(&needle).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + needle.len()..].chars().next();
        !before.is_some_and(|c| c.is_alphanumeric() || c == '_') && matches!(after, Some('(' | '<'))
    })
}

// ---------------------------------------------------------------------------------------------
// The Korean pages follow the chapter.

/// The chapter's headings (`##` and `###`, as the course writes them, emoji left out), page by
/// page of the Korean guide, in the chapter's order. The map (`docs/ko/README.md`) opens with
/// the chapter's title and its first sections; the phase pages carry the rest.
const CHAPTER: &[(&str, &[&str])] = &[
    (
        "docs/ko/README.md",
        &[
            "# Load Balancer Implementation - 로드 밸런서 구현",
            "## 학습 목표",
            "## 프로젝트 개요",
            "### 구현할 기능",
        ],
    ),
    (
        "docs/ko/phase1.md",
        &[
            "## Phase 1: 기본 로드 밸런서",
            "### Round Robin 구현 (Python)",
            "### 테스트",
        ],
    ),
    (
        "docs/ko/phase2.md",
        &[
            "## Phase 2: 고급 알고리즘",
            "### 1. Weighted Round Robin (가중 라운드 로빈)",
            "### 2. Least Connections (최소 연결)",
            "### 3. IP Hash (세션 유지)",
        ],
    ),
    (
        "docs/ko/phase3.md",
        &[
            "## Phase 3: 헬스 체크",
            "### Active Health Check (능동적 헬스 체크)",
            "### Passive Health Check (수동적 헬스 체크)",
        ],
    ),
    (
        "docs/ko/phase4.md",
        &[
            "## Phase 4: Sticky Session (세션 유지)",
            "### Cookie 기반 Sticky Session",
            "## 통계 및 모니터링",
            "### 통계 수집",
            "## 체크리스트",
            "## 다음 학습",
        ],
    ),
];

#[test]
fn the_korean_pages_carry_the_chapters_headings_in_its_order() {
    let mut problems = Vec::new();
    for (page, expected) in CHAPTER {
        let text = read(page);
        let found = headings_of(&text);
        if page.ends_with("README.md") {
            // The map: the chapter's headings in order, among its own.
            let mut wanted = expected.iter().peekable();
            for heading in &found {
                if wanted.peek().is_some_and(|w| **w == heading) {
                    wanted.next();
                }
            }
            if let Some(missing) = wanted.next() {
                problems.push(format!(
                    "{page}: `{missing}` missing or out of order in {found:#?}"
                ));
            }
        } else {
            // A phase page: its `##` and `###` headings are exactly the chapter's.
            let chapter: Vec<&String> = found
                .iter()
                .filter(|h| h.starts_with("## ") || h.starts_with("### "))
                .collect();
            if chapter != *expected {
                problems.push(format!(
                    "{page}: its ## and ### headings are {chapter:#?}, the chapter's are {expected:#?} \
                     (the page's own sections are ####)"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The headings of a page outside fenced blocks, as written (`## text`).
fn headings_of(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut in_fence = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
        } else if !in_fence && heading(line).is_some() {
            found.push(line.trim_end().to_string());
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// Figures in one place.

/// The one page that carries measured figures.
const FIGURES_PAGE: &str = "docs/performance.md";

#[test]
fn measured_figures_live_in_the_performance_page_only() {
    let mut problems = Vec::new();
    for guide in guides().into_iter().filter(|g| g != FIGURES_PAGE) {
        let mut in_fence = false;
        for (index, line) in read(&guide).lines().enumerate() {
            // A program's output in a fenced block (a statistics log line) is not a measurement.
            if line.trim_start().starts_with("```") {
                in_fence = !in_fence;
            }
            if in_fence {
                continue;
            }
            if let Some(figure) = figure_in(line) {
                problems.push(format!("{guide}:{}: `{figure}`", index + 1));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "measured figures outside {FIGURES_PAGE} (link to it instead):\n{}",
        problems.join("\n")
    );
    assert!(figure_in("32 connections 0.82× nginx").is_some());
    assert!(figure_in("6.1k req/s").is_some());
    assert!(figure_in("answers 1,000 requests").is_none());
}

#[test]
fn counts_shown_in_the_guides_agree_with_their_nouns() {
    let mut problems = Vec::new();
    for guide in guides() {
        for (index, line) in read(&guide).lines().enumerate() {
            if let Some(count) = singular_count_with_plural(line) {
                problems.push(format!("{guide}:{}: `{count}`", index + 1));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "\"1\" with a plural noun (show a run whose counts read right, or fix the log line):\n{}",
        problems.join("\n")
    );
    assert!(singular_count_with_plural("127.0.0.1:8004: 1 requests, 0 errors").is_some());
    assert!(singular_count_with_plural("on HTTP/1.1 backends, 1 request, 2 errors").is_none());
}

/// A count of one followed by a plural noun, as a log line with `{} requests` prints it.
fn singular_count_with_plural(line: &str) -> Option<String> {
    const PLURALS: &[&str] = &[
        "requests",
        "errors",
        "retries",
        "connections",
        "checks",
        "backends",
        "clients",
        "tunnels",
        "commands",
        "sessions",
    ];
    let words: Vec<&str> = line.split_whitespace().collect();
    words.windows(2).find_map(|pair| {
        let count = pair[0].trim_start_matches(['(', '[', '`']);
        let noun = pair[1].trim_end_matches([',', '.', ';', ')', '`']);
        (count == "1" && PLURALS.contains(&noun)).then(|| format!("{} {}", pair[0], pair[1]))
    })
}

/// A measured figure on a line of prose: a ratio (`0.82×`) or a rate (`6.1k req/s`).
fn figure_in(line: &str) -> Option<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    for (i, word) in words.iter().enumerate() {
        let starts_with_digit = word.chars().next().is_some_and(|c| c.is_ascii_digit());
        if starts_with_digit && word.trim_end_matches([',', ')', ';', '.']).ends_with('×') {
            return Some(word.to_string());
        }
        if starts_with_digit && words.get(i + 1).is_some_and(|w| w.starts_with("req/s")) {
            return Some(format!("{word} {}", words[i + 1]));
        }
    }
    None
}
