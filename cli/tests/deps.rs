//! The CLI links none of the hub's server dependencies: an operator's binary
//! carries no Git implementation, no store, no gRPC and no HTTP server.

use std::process::Command;

/// The crates the hub serves with, which the CLI must not link.
const SERVER_CRATES: [&str; 4] = ["gix", "sled", "tonic", "axum"];

#[test]
fn the_cli_links_no_server_dependency() {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--manifest-path",
            manifest,
            "-p",
            "flotilla-cli",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).expect("UTF-8");
    // Each line: `name vX.Y.Z (path)`, possibly ` (*)` for a repeat.
    let names: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        names.contains(&"flotilla-cli") && names.contains(&"reqwest"),
        "not the CLI's tree: {tree}"
    );
    for krate in SERVER_CRATES {
        let linked: Vec<&&str> = names
            .iter()
            .filter(|n| **n == krate || n.starts_with(&format!("{krate}-")))
            .collect();
        assert!(
            linked.is_empty(),
            "the CLI links {krate} ({linked:?}); the tree:\n{tree}"
        );
    }
}
