//! The configuration the README runs must stay valid, plugins included.

use std::process::Command;

#[test]
fn example_configuration_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/switchyard.toml");
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check-config", path])
        .output()
        .expect("run check-config");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let effective = String::from_utf8_lossy(&output.stdout);
    assert_eq!(effective.matches("[[plugin]]").count(), 5, "{effective}");
}
