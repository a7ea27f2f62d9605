//! Runs the real `switchyard` binary with a generated configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::process::{OutputWithin, COMMAND_LIMIT};

pub struct RouterOptions {
    pub dns: Option<SocketAddr>,
    /// More lines for the [dns] section (the name server and timeout are set already).
    pub dns_settings: String,
    pub delivery_port: u16,
    pub greeting_delay: &'static str,
    /// The listener's role: "inbound" or "submission".
    pub role: &'static str,
    /// Lines for the [smtp] section.
    pub smtp: String,
    /// Lines for the [relay] section.
    pub relay: String,
    /// Lines for the [delivery] section (port is set already).
    pub delivery: String,
    /// Lines for the [retry] section.
    pub retry: String,
    /// Lines for the [queue] section (the scan interval is 200 ms unless they set it).
    pub queue: String,
    /// The node's name on queue leases (default: the hostname).
    pub node_id: Option<String>,
    /// Anything else ([[route]] tables...).
    pub extra: String,
}

impl Default for RouterOptions {
    fn default() -> Self {
        RouterOptions {
            dns: None,
            dns_settings: String::new(),
            delivery_port: 25,
            greeting_delay: "0s",
            role: "inbound",
            smtp: String::new(),
            relay: "domains = [\"switchyard.test\"]\nnetworks = [\"127.0.0.0/8\"]\n".to_string(),
            delivery: String::new(),
            retry: "intervals = [\"1s\"]\n".to_string(),
            queue: String::new(),
            node_id: None,
            extra: String::new(),
        }
    }
}

impl RouterOptions {
    /// Options for a router that sends everything to `smarthost` with these `[delivery]` lines.
    pub fn relaying_to(smarthost: impl std::fmt::Display, delivery: &str) -> RouterOptions {
        RouterOptions {
            delivery: format!("smarthost = \"{smarthost}\"\n{delivery}"),
            ..RouterOptions::default()
        }
    }
}

pub struct Router {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub config_path: PathBuf,
    child: Option<Child>,
}

/// A plugin built by `scripts/build-plugins`.
pub fn plugin_path(name: &str) -> PathBuf {
    let dir = std::env::var_os("SWITCHYARD_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip2/plugin")
        });
    let path = dir.join(format!("{}.wasm", name.replace('-', "_")));
    assert!(
        path.is_file(),
        "{} is missing: run scripts/build-plugins",
        path.display()
    );
    path
}

/// Writes a certificate for mx.switchyard.test, issued by a CA made for the test, and its key
/// into `dir`; returns the `[tls]` section that uses them. The CA is `dir/switchyard-test-ca.pem`.
pub fn tls_section(dir: &std::path::Path) -> String {
    let issued =
        super::certs::TestCa::new(dir, "switchyard-test").issue(dir, "mx", &["mx.switchyard.test"]);
    format!(
        "[tls]\ncertificate = \"{}\"\nprivate_key = \"{}\"\n",
        issued.certificate.display(),
        issued.private_key.display()
    )
}

/// The CA that signed the certificate [`tls_section`] wrote into `dir`.
pub fn test_ca(dir: &std::path::Path) -> PathBuf {
    dir.join("switchyard-test-ca.pem")
}

/// The PostgreSQL server the tests use (`scripts/test` starts it where it is down).
pub fn database_url() -> String {
    std::env::var("SWITCHYARD_TEST_DATABASE")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// `[queue]` lines for a PostgreSQL queue in a schema of its own (its name, lower case, is
/// returned too): nodes given the same lines share the queue.
pub fn postgres_queue(lease: &str) -> (String, String) {
    let schema = format!("e2e_{}", ulid::Ulid::new()).to_lowercase();
    (
        format!(
            "engine = \"postgres\"\nurl = \"{}\"\nschema = \"{schema}\"\nlease = \"{lease}\"\n",
            database_url()
        ),
        schema,
    )
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("free port")
}

impl Router {
    pub async fn start(options: RouterOptions) -> Router {
        let mut router = Router::start_stopped(options);
        router.spawn().await;
        router
    }

    /// Starts the binary with a configuration of the caller's own: `build(data_dir, port)`
    /// returns its text, which must listen on `port` and keep its state in `data_dir`.
    pub async fn start_with(build: impl FnOnce(&std::path::Path, u16) -> String) -> Router {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let config_path = dir.path().join("switchyard.toml");
        std::fs::write(&config_path, build(dir.path(), port)).expect("write config");
        let mut router = Router {
            dir,
            port,
            config_path,
            child: None,
        };
        router.spawn().await;
        router
    }

    /// Writes the configuration without starting the process.
    fn start_stopped(options: RouterOptions) -> Router {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let nameservers = options
            .dns
            .map(|dns| format!("nameservers = [\"{dns}\"]\n"))
            .unwrap_or_default();
        // Without the test's own DNS server, SPF/DKIM/DMARC checks would ask the system's
        // resolver: tests talk only to loopback, so they are off then.
        let authentication = if options.dns.is_some() {
            ""
        } else {
            "[authentication]\nverify = false\n\n"
        };
        // A shared queue needs each node named; a test of one node gets a name of its own.
        let node_id = options
            .node_id
            .or_else(|| {
                options
                    .queue
                    .contains("postgres")
                    .then(|| "solo".to_string())
            })
            .map(|node| format!("node_id = \"{node}\"\n"))
            .unwrap_or_default();
        let config = format!(
            "hostname = \"mx.switchyard.test\"\n{node_id}data_dir = \"{dir}\"\n\n\
             [[listener]]\nname = \"{role}\"\nrole = \"{role}\"\naddress = \"127.0.0.1:{port}\"\ngreeting_delay = \"{delay}\"\n\n\
             [smtp]\n{smtp}\n[relay]\n{relay}\n\
             [queue]\n{scan}{queue}\n[retry]\n{retry}\n\
             [dns]\n{nameservers}timeout = \"2s\"\n{dns_settings}\n\
             {authentication}\
             [delivery]\nport = {delivery_port}\nconnect_timeout = \"2s\"\ncommand_timeout = \"10s\"\n{delivery}\n{extra}\n",
            dir = dir.path().display(),
            delay = options.greeting_delay,
            role = options.role,
            smtp = options.smtp,
            relay = options.relay,
            retry = options.retry,
            // A test's own scan interval replaces the quick default.
            scan = if options.queue.contains("scan_interval") {
                ""
            } else {
                "scan_interval = \"200ms\"\n"
            },
            queue = options.queue,
            delivery_port = options.delivery_port,
            delivery = options.delivery,
            extra = options.extra,
            dns_settings = options.dns_settings,
        );
        let config_path = dir.path().join("switchyard.toml");
        std::fs::write(&config_path, config).expect("write config");
        Router {
            dir,
            port,
            config_path,
            child: None,
        }
    }

    /// Like [`Router::start`], but a router that fails to start is an `Err` with its log.
    pub async fn try_start(options: RouterOptions) -> Result<Router, String> {
        let mut router = Router::start_stopped(options);
        router.try_spawn().await.map(|()| router)
    }

    /// Starts the process and waits until it accepts connections.
    pub async fn spawn(&mut self) {
        if let Err(log) = self.try_spawn().await {
            panic!("switchyard did not start; log:\n{log}");
        }
    }

    async fn try_spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("switchyard.log"))
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn switchyard");
        self.child = Some(child);
        // A bound, not a timing: the router listens once its plugins are compiled, and the 18 MB
        // Python component alone takes 10 s to compile on a slow machine and over 20 s while the
        // rest of the suite runs beside it (a chain of Python and JavaScript components, over a
        // minute). A router that cannot start exits, and is reported at once.
        for _ in 0..3600 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("exited with {status}; log:\n{}", self.log()));
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!("not listening after 180s; log:\n{}", self.log()))
    }

    /// Sends SIGTERM: the graceful stop.
    pub fn terminate(&self) {
        if let Some(child) = &self.child {
            let pid = libc::pid_t::try_from(child.id()).expect("pid");
            // SAFETY: kill(2) on our own child's pid; it cannot touch this process's memory.
            let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
            assert_eq!(sent, 0, "SIGTERM to {pid}");
        }
    }

    /// Waits for the process to exit by itself, at most `limit`; returns its status and how
    /// long it took. Panics with the log if it is still running then.
    pub async fn wait_exit(&mut self, limit: Duration) -> (std::process::ExitStatus, Duration) {
        let started = std::time::Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return (status, started.elapsed());
                }
            }
            assert!(
                started.elapsed() < limit,
                "switchyard still running {limit:?} after being told to stop; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The running process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the router is running").id()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("switchyard.log")).unwrap_or_default()
    }

    /// The log once it holds every one of `lines` (within 10 s): a delivery's log line is written
    /// after the next hop's reply, so a test that saw the message arrive may read the log first.
    pub async fn log_with(&self, lines: &[&str]) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let log = self.log();
            if lines.iter().all(|line| log.contains(line)) {
                return log;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the log never showed all of {lines:?}:\n{log}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Runs `switchyard tls-reports ...` against this router.
    pub fn tls_reports(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("tls-reports")
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .output_within(COMMAND_LIMIT)
    }

    /// Runs `switchyard plugins ...` against this router.
    pub fn plugins(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("plugins")
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .output_within(COMMAND_LIMIT)
    }

    /// Runs `switchyard queue ...` against this router's queue.
    pub fn queue(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("queue")
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .output_within(COMMAND_LIMIT)
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a command that must succeed printed (its error output is the failure message).
pub fn stdout(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The Prometheus page of a router's metrics endpoint.
pub async fn scrape_metrics(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .expect("send the request");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .expect("a response within 10 s")
        .expect("read the response");
    let response = String::from_utf8_lossy(&response).to_string();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}
