//! The configuration file: `--config FILE` under the flags' own names, `check-config`, and
//! errors that name the file, line and column.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{backends_hit, Balancer, DemoBackend};

/// A file in the temporary directory with `text`, named after the test, removed when dropped.
fn write_config(name: &str, text: &str) -> ConfigFile {
    let path = std::env::temp_dir().join(format!("lb-config-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, text).expect("config written");
    ConfigFile(path)
}

struct ConfigFile(PathBuf);

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl std::ops::Deref for ConfigFile {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<OsStr> for ConfigFile {
    fn as_ref(&self) -> &OsStr {
        self.0.as_os_str()
    }
}

fn lb_bin() -> &'static str {
    env!("CARGO_BIN_EXE_loadbalancer")
}

#[test]
fn check_config_prints_the_effective_configuration() {
    let path = write_config(
        "check",
        "# a comment\nalgorithm = \"least-conn\"\nbackend = [\"127.0.0.1:8001=5\", { address = \"127.0.0.1:8002\", weight = 2 }]\nmax_connections = 10\n",
    );
    let output = Command::new(lb_bin())
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("algorithm = \"least-conn\""), "{text}");
    assert!(
        text.contains("backend = [\"127.0.0.1:8001=5\", \"127.0.0.1:8002=2\"]"),
        "{text}"
    );
    assert!(text.contains("max-connections = 10"), "{text}");
    assert!(
        text.contains("health-interval = \"5s\""),
        "defaults too: {text}"
    );
}

#[test]
fn a_bad_file_is_one_line_naming_file_line_and_column_and_exit_2() {
    let cases = [
        ("syntax", "listen = \"127.0.0.1:1\nalgorithm = 3\n", ":1:"),
        (
            "unknown",
            "# ok\n\nlistne = \"127.0.0.1:1\"\n",
            ":3:1: unknown key 'listne'",
        ),
        (
            "address",
            "backend = [\"127.0.0.1:1\", \"nowhere\"]\n",
            ":1:27: invalid value 'nowhere'",
        ),
        (
            "type",
            "sticky = \"yes\"\n",
            ":1:10: expected true or false, found string",
        ),
        (
            "value",
            "algorithm = \"random\"\n",
            ":1:13: invalid value 'random'",
        ),
    ];
    for (name, text, expected) in cases {
        let path = write_config(name, text);
        for args in [
            vec!["check-config".into(), path.as_os_str().to_owned()],
            vec!["--config".into(), path.as_os_str().to_owned()],
        ] {
            let output = Command::new(lb_bin()).args(&args).output().unwrap();
            assert_eq!(output.status.code(), Some(2), "{name}: {output:?}");
            let err = String::from_utf8(output.stderr).unwrap();
            assert_eq!(err.lines().count(), 1, "{name}: {err}");
            let wanted = format!("{}{expected}", path.display());
            assert!(err.contains(&wanted), "{name}: wanted {wanted} in {err}");
        }
    }
}

#[test]
fn the_file_sets_the_backends_and_the_command_line_wins() {
    let a = DemoBackend::start("a");
    let b = DemoBackend::start("b");
    let path = write_config(
        "serve",
        &format!(
            "backend = [\"{}\"]\nexplain = true\nlisten = \"127.0.0.1:1\"\n",
            a.spec()
        ),
    );
    // `--listen 127.0.0.1:0` (from the helper) wins over the file's port 1.
    let lb = Balancer::start(lb_bin(), &["--config", path.to_str().unwrap()]);
    assert_eq!(backends_hit(lb.addr, 4), ["a", "a", "a", "a"]);
    let both = Balancer::start(
        lb_bin(),
        &["--config", path.to_str().unwrap(), "--backend", &b.spec()],
    );
    assert_eq!(
        backends_hit(both.addr, 2),
        ["b", "b"],
        "the flag replaces the file's list"
    );
}

#[test]
fn every_phase_binary_takes_a_config_file() {
    let path = write_config("phase", "listen = \"not an address\"\n");
    for bin in [
        env!("CARGO_BIN_EXE_phase1_rr"),
        env!("CARGO_BIN_EXE_phase2_weighted"),
        env!("CARGO_BIN_EXE_phase3_active_health"),
        env!("CARGO_BIN_EXE_phase4_sticky"),
    ] {
        let output = Command::new(bin)
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{bin}");
        let err = String::from_utf8(output.stderr).unwrap();
        assert!(err.contains(":1:10: invalid value"), "{bin}: {err}");
    }
}

#[test]
fn the_commented_example_in_the_docs_is_valid() {
    let page =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/config.md")).unwrap();
    let start = page.find("```toml\n# lb.toml").expect("the example") + "```toml\n".len();
    let end = start + page[start..].find("```").unwrap();
    let path = write_config("example", &page[start..end]);
    let output = Command::new(lb_bin())
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    // Every flag of `loadbalancer` appears in the example (commented out or not).
    let help = Command::new(lb_bin()).arg("--help").output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    // The flags are the words starting with `--` on the lines that start with a dash.
    let flags = help
        .lines()
        .filter(|line| line.trim_start().starts_with('-'))
        .filter_map(|line| line.split_whitespace().find_map(|w| w.strip_prefix("--")));
    for flag in flags {
        let key = flag.trim_end_matches([',', '.']);
        if ["help", "version", "config"].contains(&key) || key.is_empty() {
            continue;
        }
        assert!(
            page[start..end].contains(&format!("{key} =")),
            "docs/config.md's example has no '{key}'"
        );
    }
}
