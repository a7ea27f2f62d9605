//! `switchyard plugins new`: the project it writes passes its own tests natively (the SDK's mock
//! host), builds as a component, and that component decides in the real router.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::client::TestClient;
use crate::harness::process::{OutputWithin, COMMAND_LIMIT};
use crate::harness::router::{stdout, Router, RouterOptions};

/// The workspace's target directory (the binary under test is in `target/debug/`).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
        .ancestors()
        .nth(2)
        .expect("target directory")
        .to_path_buf()
}

/// `cargo ARGS` in `project`, offline (the registry cache the workspace's build filled has
/// every crate the project needs), into a target directory of its own beside the workspace's.
fn cargo(project: &Path, args: &[&str]) -> std::process::Output {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string()))
        .args(args)
        .arg("--offline")
        .current_dir(project)
        .env("CARGO_TARGET_DIR", target_dir().join("scaffold"))
        // A first build of the project compiles the SDK and its dependencies twice (native, wasm).
        .output_within(std::time::Duration::from_secs(900))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_rust_plugin_passes_its_tests_builds_and_decides_in_the_router() {
    let dir = tempfile::tempdir().expect("tempdir");
    let project = dir.path().join("deny-list");
    let written = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["plugins", "new", "deny-list", "--dir"])
        .arg(&project)
        .output_within(COMMAND_LIMIT);
    assert!(stdout(&written).contains("wrote"));

    let tested = cargo(&project, &["test"]);
    let report = String::from_utf8_lossy(&tested.stdout).into_owned();
    assert!(
        tested.status.success() && report.contains("3 passed"),
        "{report}\n{}",
        String::from_utf8_lossy(&tested.stderr)
    );
    let built = cargo(
        &project,
        &["build", "--target", "wasm32-wasip2", "--release"],
    );
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let component = target_dir().join("scaffold/wasm32-wasip2/release/deny_list.wasm");

    // A project that exists is not overwritten.
    let again = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["plugins", "new", "deny-list", "--dir"])
        .arg(&project)
        .output_within(COMMAND_LIMIT);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists and is not empty"));
    let bad = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["plugins", "new", "Bad Name"])
        .output_within(COMMAND_LIMIT);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("lower-case letters"));

    let manifest = std::fs::read_to_string(project.join("manifest.toml"))
        .expect("manifest")
        .replace(
            "target/wasm32-wasip2/release/deny_list.wasm",
            &component.display().to_string(),
        )
        .replace("former-employee@example.com", "gone@switchyard.test");
    let router = Router::start(RouterOptions {
        extra: manifest,
        ..RouterOptions::default()
    })
    .await;
    let mut client = TestClient::connect(router.port).await;
    assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
    let refused = client.command("RCPT TO:<gone@switchyard.test>").await;
    assert_eq!(refused.code, 550, "{refused:?}");
    assert!(refused.text.contains("No such user here"), "{refused:?}");
    assert_eq!(
        client
            .command("RCPT TO:<friend@switchyard.test>")
            .await
            .code,
        250
    );
}
