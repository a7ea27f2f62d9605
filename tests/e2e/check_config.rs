//! `switchyard check-config`: the effective configuration, or file:line and a precise message.

use std::process::Command;

fn check(text: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("switchyard.toml");
    std::fs::write(&path, text).expect("write config");
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run check-config");
    let stderr =
        String::from_utf8_lossy(&output.stderr).replace(&path.display().to_string(), "FILE");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).to_string(),
        stderr,
    )
}

#[test]
fn valid_config_prints_every_default() {
    let (ok, stdout, _) = check("[delivery]\nport = 2526\n");
    assert!(ok);
    for key in [
        "max_message_size = 26214400",
        "port = 2526",
        "max_lifetime = \"5days\"",
        "[[listener]]",
    ] {
        assert!(stdout.contains(key), "{key} missing from:\n{stdout}");
    }
}

#[test]
fn errors_name_file_line_and_problem() {
    let cases = [
        (
            "[smtp]\nmax_recipients = \"ten\"\n",
            "FILE:2:18: invalid type: string \"ten\", expected usize",
        ),
        ("[relay]\nnetworks = [\"10.0.0.0/33\"]\n", "FILE:2:"),
        (
            "[[route]]\ndomain = \"example.com\"\n",
            "FILE:1:1: missing field `smarthost`",
        ),
        (
            "[delivery]\ntls = \"sometimes\"\n",
            "FILE:2:7: unknown variant `sometimes`",
        ),
        (
            "hostname = \"mx\"\nlistner = 1\n",
            "FILE:2:1: unknown field `listner`",
        ),
        (
            "[smtp]\nmax_data_line = 100\n",
            "FILE:2:1: max_data_line must be at least 998",
        ),
    ];
    for (text, expected) in cases {
        let (ok, _, stderr) = check(text);
        assert!(!ok, "{text:?} should be refused");
        assert!(
            stderr.contains(expected),
            "{text:?}: expected {expected:?} in {stderr:?}"
        );
    }
}
