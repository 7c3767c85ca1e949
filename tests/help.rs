//! `--help` of every binary, as a new user first meets it: the first line says which phase of
//! the chapter the binary is (number and Korean section title) and what it adds, and the
//! defaults shown are the ones the binary uses.

use std::process::Command;

/// The help text `bin` prints for `flag` (`-h` or `--help`), checked to exit 0.
fn help(bin: &str, flag: &str) -> String {
    let output = Command::new(bin).arg(flag).output().expect("binary runs");
    assert_eq!(output.status.code(), Some(0), "{bin} {flag}");
    String::from_utf8(output.stdout).expect("help is UTF-8")
}

/// Asserts that both `-h` and `--help` of `bin` open with a line starting with `start` and
/// containing each of `names`.
fn opens_with(bin: &str, start: &str, names: &[&str]) {
    for flag in ["-h", "--help"] {
        let text = help(bin, flag);
        let first = text.lines().next().unwrap_or_default();
        assert!(first.starts_with(start), "{bin} {flag} opens with: {first}");
        for name in names {
            assert!(
                first.contains(name),
                "{bin} {flag}: no '{name}' in: {first}"
            );
        }
        // The crate's description is what clap showed before each binary had its own line.
        assert!(
            !text.contains("built in four phases"),
            "{bin} {flag}:\n{text}"
        );
    }
}

#[test]
fn phase1_rr_says_it_is_phase_1() {
    opens_with(
        env!("CARGO_BIN_EXE_phase1_rr"),
        "Phase 1, 기본 로드 밸런서",
        &["Round Robin", "next backend in turn"],
    );
}

#[test]
fn phase2_weighted_says_it_is_phase_2_weighted_round_robin() {
    opens_with(
        env!("CARGO_BIN_EXE_phase2_weighted"),
        "Phase 2, 고급 알고리즘",
        &["Weighted Round Robin", "가중 라운드 로빈", "weights"],
    );
}

#[test]
fn phase2_least_conn_says_it_is_phase_2_least_connections() {
    opens_with(
        env!("CARGO_BIN_EXE_phase2_least_conn"),
        "Phase 2, 고급 알고리즘",
        &[
            "Least Connections",
            "최소 연결",
            "fewest requests in flight",
        ],
    );
}

#[test]
fn phase2_ip_hash_says_it_is_phase_2_ip_hash() {
    opens_with(
        env!("CARGO_BIN_EXE_phase2_ip_hash"),
        "Phase 2, 고급 알고리즘",
        &["IP Hash", "세션 유지", "client IP"],
    );
}

#[test]
fn phase3_active_health_says_it_is_phase_3_active_checks() {
    opens_with(
        env!("CARGO_BIN_EXE_phase3_active_health"),
        "Phase 3, 헬스 체크",
        &["Active Health Check", "능동적"],
    );
}

#[test]
fn phase3_passive_health_says_it_is_phase_3_passive_checks() {
    opens_with(
        env!("CARGO_BIN_EXE_phase3_passive_health"),
        "Phase 3, 헬스 체크",
        &["Passive Health Check", "수동적"],
    );
}

#[test]
fn phase4_sticky_says_it_is_phase_4_sticky_sessions() {
    opens_with(
        env!("CARGO_BIN_EXE_phase4_sticky"),
        "Phase 4, 추가 기능",
        &["Cookie 기반 Sticky Session", "session cookie"],
    );
}

#[test]
fn loadbalancer_says_it_is_every_phase() {
    opens_with(
        env!("CARGO_BIN_EXE_loadbalancer"),
        "Phases 1–4, 로드 밸런서 구현",
        &["every algorithm", "chosen by flags"],
    );
}

#[test]
fn backend_says_it_is_the_demo_backend() {
    opens_with(
        env!("CARGO_BIN_EXE_backend"),
        "The demo backend",
        &["no phase", "answers every path with its name"],
    );
}

#[test]
fn phase2_weighted_shows_its_default_backends_with_their_weights() {
    let weighted = "[default: 127.0.0.1:8001=5, 127.0.0.1:8002=3, 127.0.0.1:8003=2]";
    for flag in ["-h", "--help"] {
        let text = help(env!("CARGO_BIN_EXE_phase2_weighted"), flag);
        let line = text
            .lines()
            .find(|line| line.contains("--backend <"))
            .unwrap_or_else(|| panic!("no --backend in:\n{text}"));
        assert!(line.contains(weighted), "{line}");
    }
    // The other binaries give every default backend a weight of 1, and say so.
    let plain = "[default: 127.0.0.1:8001, 127.0.0.1:8002, 127.0.0.1:8003]";
    for bin in [
        env!("CARGO_BIN_EXE_phase1_rr"),
        env!("CARGO_BIN_EXE_phase2_least_conn"),
        env!("CARGO_BIN_EXE_loadbalancer"),
    ] {
        assert!(help(bin, "--help").contains(plain), "{bin}");
    }
}
