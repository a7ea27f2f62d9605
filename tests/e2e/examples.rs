//! The configuration the README runs must stay valid, plugins included.

use std::process::Command;

use crate::harness::process::{OutputWithin, COMMAND_LIMIT};

#[test]
fn example_configuration_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/switchyard.toml");
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check-config", path])
        .output_within(COMMAND_LIMIT);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let effective = String::from_utf8_lossy(&output.stdout);
    assert_eq!(effective.matches("[[plugin]]").count(), 5, "{effective}");
}

#[test]
fn filtering_example_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/filtering.toml");
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check-config", path])
        .output_within(COMMAND_LIMIT);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let effective = String::from_utf8_lossy(&output.stdout);
    assert_eq!(effective.matches("[[scanner]]").count(), 2, "{effective}");
}

#[test]
fn tenants_example_is_valid() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/tenants/switchyard.toml"
    );
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check-config", path])
        .output_within(COMMAND_LIMIT);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("tenant acme plugin rate-limit: loads"),
        "{stderr}"
    );
    assert!(
        stderr.contains("tenant bravo plugin stamp: loads"),
        "{stderr}"
    );
    assert!(stderr.contains("2 tenant file(s) valid"), "{stderr}");
}
