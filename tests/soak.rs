//! The soak test's quick mode, run by hand: `cargo test --test soak -- --ignored --nocapture`.
//!
//! `scripts/soak.sh --quick` puts `loadbalancer` in front of four demo backends for 20 seconds of
//! mixed load while one backend is killed and restarted, one is stopped for 5 seconds and one cuts
//! some responses off midway, then waits up to 45 seconds for threads and descriptors to come back
//! to the baseline and prints its samples and verdict. It takes a minute or more, so it is ignored
//! by `cargo test`; `scripts/soak.sh --minutes 10` is the real soak. This runs the binaries cargo
//! built for this test (add `--release` to test optimised ones) and passes when the verdict does.

use std::path::Path;
use std::process::Command;

#[test]
#[ignore = "takes a minute or more; run with --ignored"]
fn quick_soak_passes() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/soak.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg(env!("CARGO_BIN_EXE_loadbalancer"))
        .args(["--quick", "--no-build"])
        .env("SOAK_BACKEND", env!("CARGO_BIN_EXE_backend"))
        .output()
        .expect("bash runs scripts/soak.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        stdout.contains("VERDICT: "),
        "soak.sh ended without a verdict (exit {:?})",
        output.status.code()
    );
    assert_eq!(
        output.status.code(),
        Some(0),
        "the soak verdict is FAIL; its reasons are above"
    );
}
