//! `switchyard plugins new`: the project it writes, in each language, passes its own tests
//! natively (the Rust SDK's mock host, unittest, Node's test runner), builds as a component, and
//! that component decides in the real router.

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
async fn new_plugins_in_rust_python_and_javascript_pass_their_tests_build_and_decide() {
    let dir = tempfile::tempdir().expect("tempdir");
    let project = dir.path().join("deny-list");
    new_project("deny-list", "rust", &project);

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

    // Python and JavaScript, with their own toolchains (componentize-py from PyPI and
    // componentize-js from npm, both installed by scripts/build-plugins).
    let python = dir.path().join("py-deny");
    new_project("py-deny", "python", &python);
    let tested = run(&python, "./test.sh", &[]);
    assert!(
        String::from_utf8_lossy(&tested.stderr).contains("Ran 3 tests"),
        "{tested:?}"
    );
    run(&python, "./build.sh", &[]);
    let javascript = dir.path().join("js-deny");
    new_project("js-deny", "js", &javascript);
    // The npm packages plugins/js-policy installed (the same pinned componentize-js), instead
    // of another download of them.
    std::os::unix::fs::symlink(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/js-policy/node_modules"),
        javascript.join("node_modules"),
    )
    .expect("link node_modules");
    let tested = run(&javascript, "node", &["--test"]);
    assert!(
        String::from_utf8_lossy(&tested.stdout).contains("# pass 3"),
        "{tested:?}"
    );
    run(&javascript, "node", &["build.mjs"]);

    // All three in one chain, each refusing its own recipient.
    let manifest = |project: &Path, component: &Path, gone: &str| {
        std::fs::read_to_string(project.join("manifest.toml"))
            .expect("manifest")
            .lines()
            .map(|line| {
                if line.starts_with("path = ") {
                    format!("path = \"{}\"\ntime_limit = \"2s\"", component.display())
                } else {
                    line.replace("former-employee@example.com", gone)
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    };
    let chain = [
        manifest(&project, &component, "gone@switchyard.test"),
        manifest(
            &python,
            &python.join("py_deny.wasm"),
            "gone-py@switchyard.test",
        ),
        manifest(
            &javascript,
            &javascript.join("js_deny.wasm"),
            "gone-js@switchyard.test",
        ),
    ]
    .concat();
    let router = Router::start(RouterOptions {
        extra: chain,
        ..RouterOptions::default()
    })
    .await;
    let mut client = TestClient::connect(router.port).await;
    assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
    for gone in ["gone", "gone-py", "gone-js"] {
        let refused = client
            .command(&format!("RCPT TO:<{gone}@switchyard.test>"))
            .await;
        assert_eq!(refused.code, 550, "{gone}: {refused:?}");
        assert!(refused.text.contains("No such user here"), "{refused:?}");
    }
    assert_eq!(
        client
            .command("RCPT TO:<friend@switchyard.test>")
            .await
            .code,
        250
    );
}

/// `switchyard plugins new NAME --lang LANG --dir DIRECTORY`, which must succeed.
fn new_project(name: &str, lang: &str, directory: &Path) {
    let written = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["plugins", "new", name, "--lang", lang, "--dir"])
        .arg(directory)
        .output()
        .expect("run plugins new");
    assert!(stdout(&written).contains("wrote"));
}

/// Runs `program ARGS` in `directory`; it must succeed.
fn run(directory: &Path, program: &str, args: &[&str]) -> std::process::Output {
    let output = Command::new(program)
        .args(args)
        .current_dir(directory)
        .output()
        .unwrap_or_else(|error| panic!("{program}: {error}"));
    assert!(
        output.status.success(),
        "{program} {args:?} in {}:\n{}\n{}",
        directory.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}
