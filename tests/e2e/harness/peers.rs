//! Servers that are not Switchyard, from `tests/peers/` (Python, installed by `scripts/test`):
//! what Switchyard sends is judged by someone else's implementation.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::certs::Issued;

/// The directory of the Python peers.
pub fn peers_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/peers")
}

/// Runs `python3 ARGS` (a peer script or `-c CODE`) off the async workers; panics with its
/// output unless it succeeds, else returns the lines it printed.
pub async fn python(args: Vec<String>) -> Vec<String> {
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args(&args)
            .output()
            .expect("run python3")
    })
    .await
    .expect("python");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// aiosmtpd, receiving on a loopback port, with STARTTLS when given a certificate.
pub struct PySink {
    pub port: u16,
    out: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl PySink {
    pub fn start(tls: Option<&Issued>) -> PySink {
        PySink::start_with(tls, None)
    }

    /// With `auth` (`USER:PASSWORD`), MAIL needs AUTH with those credentials, over TLS only.
    pub fn start_with(tls: Option<&Issued>, auth: Option<&str>) -> PySink {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("received.jsonl");
        let mut command = Command::new("python3");
        command
            .arg(peers_dir().join("smtp_sink.py"))
            .arg(&out)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(issued) = tls {
            command
                .arg("--cert")
                .arg(&issued.certificate)
                .arg("--key")
                .arg(&issued.private_key);
        }
        if let Some(auth) = auth {
            command.arg("--auth").arg(auth);
        }
        let mut child = command.spawn().expect("start python3 smtp_sink.py");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("sink's first line");
        let port = line
            .trim()
            .strip_prefix("ready ")
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("smtp_sink.py did not start: `{line}`"));
        PySink {
            port,
            out,
            child,
            _dir: dir,
        }
    }

    /// The messages received so far, as the sink recorded them.
    pub fn received(&self) -> Vec<serde_json::Value> {
        read_records(&self.out)
    }

    /// Waits until `count` messages arrived (panics after `limit`).
    pub async fn wait_for(&self, count: usize, limit: Duration) -> Vec<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let received = self.received();
            if received.len() >= count {
                return received;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the sink got {} of {count} messages",
                received.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn read_records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

impl Drop for PySink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
