//! Servers that are not Switchyard, from `tests/peers/` (Python, installed by `scripts/test`):
//! what Switchyard sends is judged by someone else's implementation.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::certs::Issued;
use super::process::{OutputWithin, COMMAND_LIMIT};

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
            .output_within(COMMAND_LIMIT)
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

    /// A server that offers neither 8BITMIME nor SMTPUTF8; each record's `eight_bit` says
    /// whether the message held an 8-bit byte.
    pub fn start_seven_bit() -> PySink {
        PySink::spawn(None, None, true)
    }

    /// With `auth` (`USER:PASSWORD`), MAIL needs AUTH with those credentials, over TLS only.
    pub fn start_with(tls: Option<&Issued>, auth: Option<&str>) -> PySink {
        PySink::spawn(tls, auth, false)
    }

    fn spawn(tls: Option<&Issued>, auth: Option<&str>, seven_bit: bool) -> PySink {
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
        if seven_bit {
            command.arg("--seven-bit");
        }
        let (child, port) = spawn_ready(command);
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

/// Starts a peer that prints `ready PORT` once it listens; returns it and the port.
fn spawn_ready(mut command: Command) -> (Child, u16) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start a python3 peer");
    let line = super::process::first_line_within(&mut child, COMMAND_LIMIT, "a python3 peer");
    let port = line
        .trim()
        .strip_prefix("ready ")
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("the peer did not start: `{line}`"));
    (child, port)
}

/// Python's http.server over TLS, serving MTA-STS policy files by host name.
pub struct PolicyServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

impl PolicyServer {
    pub fn start(tls: &Issued) -> PolicyServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut command = Command::new("python3");
        command
            .arg(peers_dir().join("https_policy.py"))
            .arg(dir.path())
            .arg(&tls.certificate)
            .arg(&tls.private_key);
        let (child, port) = spawn_ready(command);
        PolicyServer { port, dir, child }
    }

    /// Serves `policy` as `https://HOST/.well-known/mta-sts.txt`.
    pub fn serve(&self, host: &str, policy: &str) {
        std::fs::write(self.dir.path().join(format!("{host}.txt")), policy).expect("write policy");
    }

    /// Stops serving `host`'s policy: its fetches get 404.
    pub fn unserve(&self, host: &str) {
        let _ = std::fs::remove_file(self.dir.path().join(format!("{host}.txt")));
    }

    /// The requests so far: "HOST PATH" lines.
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("requests.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for PolicyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
