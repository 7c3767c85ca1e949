//! The walk of one request stays short. `src/lib.rs` lists, under "Reading one request", the
//! files and functions a reader opens to follow one phase-1 request from `accept` to the
//! answer; `scripts/walk.py` prints them and counts their lines. Here the script runs on the
//! tree: every file and function the list names must exist, and the whole must stay within
//! 700 lines over 8 files, so that the walk cannot grow without anyone noticing.
//!
//! The script is also run on a small made-up tree, to see that it does report a function the
//! list names and the code lacks, and a walk that grew too long.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/walk.py");

/// Runs `scripts/walk.py --summary` on the package at `root`.
fn walk(root: &Path) -> Output {
    Command::new("python3")
        .arg(SCRIPT)
        .arg("--summary")
        .arg("--root")
        .arg(root)
        .output()
        .expect("python3 runs scripts/walk.py")
}

/// What the script printed, for a failed assertion's message.
fn printed(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn the_walk_of_one_request_names_what_exists_and_stays_short() {
    let output = walk(Path::new(env!("CARGO_MANIFEST_DIR")));
    let text = printed(&output);
    eprintln!("{text}");
    assert_eq!(
        output.status.code(),
        Some(0),
        "scripts/walk.py found a name that does not exist (exit 2) or a walk too long (exit 1):\n{text}"
    );
    assert!(text.contains("lines over 8 files"), "{text}");
}

/// A made-up package: `src/lib.rs` with a reading order of one item, and the file it names.
struct Tree {
    root: PathBuf,
}

impl Tree {
    fn new(name: &str, item: &str, file: &str) -> Tree {
        let root = std::env::temp_dir().join(format!("walk-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("src")).unwrap();
        let lib = format!(
            "//! A library.\n//!\n//! # Reading one request\n//!\n//! 1. {item}\n//!\n//! # Next\n"
        );
        fs::write(root.join("src/lib.rs"), lib).unwrap();
        fs::write(root.join("src/serve.rs"), file).unwrap();
        Tree { root }
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

const SERVE_RS: &str = "//! Serving.\n\n/// Serves.\npub fn serve() {\n    accept();\n}\n\nimpl Client {\n    /// Accepts.\n    fn accept(&self) {\n        todo!()\n    }\n}\n\n#[cfg(test)]\nmod tests {\n    fn lost() {}\n}\n";

#[test]
fn a_function_the_list_names_and_the_code_lacks_is_reported() {
    let tree = Tree::new("missing", "`serve.rs`: (`serve`, `lost`).", SERVE_RS);
    let output = walk(&tree.root);
    let text = printed(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(text.contains("serve.rs: no function `lost`"), "{text}");
}

#[test]
fn the_script_counts_the_header_and_each_function_whole() {
    let tree = Tree::new(
        "count",
        "`serve.rs`: (`serve`,\n//!    `Client::accept`).",
        SERVE_RS,
    );
    let output = walk(&tree.root);
    let text = printed(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(
        text.contains("src/serve.rs  (//! 1, serve 4, Client::accept 4)"),
        "{text}"
    );
    assert!(text.contains("9  lines over 1 files"), "{text}");
}

#[test]
fn a_walk_that_grew_too_long_fails() {
    let long: String = (0..700).map(|i| format!("    step({i});\n")).collect();
    let file = format!("//! Serving.\n\npub fn serve() {{\n{long}}}\n");
    let tree = Tree::new("long", "`serve.rs`: (`serve`).", &file);
    let output = walk(&tree.root);
    assert_eq!(output.status.code(), Some(1), "{}", printed(&output));
}

/// Runs `scripts/import_cycles.py` in `root` (a package: it reads `src/`).
fn import_cycles(root: &Path) -> Output {
    Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/import_cycles.py"
        ))
        .current_dir(root)
        .output()
        .expect("python3 runs scripts/import_cycles.py")
}

#[test]
fn no_module_imports_another_that_imports_it_back() {
    let output = import_cycles(Path::new(env!("CARGO_MANIFEST_DIR")));
    assert!(output.status.success(), "{}", printed(&output));
    assert!(printed(&output).contains("no import cycles"));
}

#[test]
fn an_import_cycle_through_a_third_module_is_reported() {
    let root = std::env::temp_dir().join(format!("lb-cycles-{}", std::process::id()));
    fs::create_dir_all(root.join("src/c")).unwrap();
    fs::write(
        root.join("src/lib.rs"),
        "pub mod a;\npub mod b;\npub mod c;\n",
    )
    .unwrap();
    fs::write(root.join("src/a.rs"), "use crate::b::B;\n").unwrap();
    fs::write(
        root.join("src/b.rs"),
        "// use crate::a; (a comment)\nuse crate::c::C;\n",
    )
    .unwrap();
    fs::write(root.join("src/c/mod.rs"), "mod inner;\nuse super::a::A;\n").unwrap();
    fs::write(root.join("src/c/inner.rs"), "use super::C;\n").unwrap();
    let output = import_cycles(&root);
    let _ = fs::remove_dir_all(&root);
    assert_eq!(output.status.code(), Some(1), "{}", printed(&output));
    let text = printed(&output);
    assert!(
        text.contains("crate::a -> crate::b -> crate::c -> crate::a"),
        "{text}"
    );
}
