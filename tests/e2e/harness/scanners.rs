//! The real content scanners, each started in the foreground on a loopback port of the test's
//! own, with every file (configuration, databases, logs) in a temporary folder, and stopped by
//! its process group when the test ends:
//! - rspamd (Debian's `rspamd`): only its normal worker, which serves `/checkv2`; no
//!   controller, proxy or fuzzy storage. Its list of domain endings is a short one of the
//!   test's, which starts it in seconds (the full list takes 20 s of CPU to compile).
//! - clamd (Debian's `clamav-daemon`): a signature database the test writes (one `.hdb` line
//!   `MD5:SIZE:NAME`), since signatures cannot be downloaded here. `freshclam` is never run.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::daemon::Daemon;
use super::router::free_port;

/// How long a scanner may take to start answering (rspamd needs a few seconds on 2 cores).
const START_LIMIT: Duration = Duration::from_secs(90);

/// The test file clamd's database names, and its name there (clamd adds `.UNOFFICIAL`).
pub const TEST_VIRUS: &[u8] = b"switchyard-test-virus\n";
pub const TEST_VIRUS_NAME: &str = "Switchyard.Test.Virus.UNOFFICIAL";

/// GTUBE: rspamd answers `reject` to a message carrying it.
pub const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

/// One request and its whole answer, on a fresh connection, within a few seconds.
fn exchange(address: &str, request: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(request)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    Ok(answer)
}

pub struct Rspamd {
    pub address: String,
    _daemon: Daemon,
    _dir: tempfile::TempDir,
}

impl Rspamd {
    /// Starts rspamd and waits until it recognises GTUBE.
    pub fn start() -> Rspamd {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let port = free_port();
        for sub in ["db", "run", "log", "tmp", "local.d"] {
            std::fs::create_dir_all(root.join(sub)).expect("mkdir");
        }
        std::fs::write(
            root.join("rspamd.conf"),
            format!(
                ".include \"$CONFDIR/common.conf\"\n\
                 options {{\n  pidfile = \"$RUNDIR/rspamd.pid\";\n  .include \"$CONFDIR/options.inc\"\n  \
                 .include(try=true; priority=1,duplicate=merge) \"$LOCAL_CONFDIR/local.d/options.inc\"\n}}\n\
                 logging {{\n  type = \"file\";\n  filename = \"$LOGDIR/rspamd.log\";\n  .include \"$CONFDIR/logging.inc\"\n}}\n\
                 worker \"normal\" {{\n  bind_socket = \"127.0.0.1:{port}\";\n  count = 1;\n  .include \"$CONFDIR/worker-normal.inc\"\n}}\n"
            ),
        )
        .expect("rspamd.conf");
        std::fs::write(
            root.join("tld.dat"),
            "com\norg\nnet\nexample\ntest\nlocal\n",
        )
        .expect("tld");
        std::fs::write(
            root.join("local.d/options.inc"),
            format!(
                "url_tld = \"{}\";\ntempdir = \"{}\";\n",
                root.join("tld.dat").display(),
                root.join("tmp").display()
            ),
        )
        .expect("options.inc");
        // Its header fields in every report (`milter.add_headers`), for mail from loopback too.
        std::fs::write(
            root.join("local.d/milter_headers.conf"),
            "use = [\"x-spamd-result\", \"x-spam-status\", \"x-spam-level\", \"x-spamd-bar\"];\n\
             skip_local = false;\nskip_authenticated = false;\n",
        )
        .expect("milter_headers.conf");
        // No lookups of rspamd.com's fuzzy servers (there is no network here).
        std::fs::write(root.join("local.d/fuzzy_check.conf"), "enabled = false;\n")
            .expect("fuzzy_check.conf");
        let log = root.join("log/stdout.log");
        let var = |name: &str, path: PathBuf| format!("--var={name}={}", path.display());
        let mut daemon = Daemon::spawn(
            Command::new("rspamd")
                .args(["-f", "-u", "root", "-g", "root", "-c"])
                .arg(root.join("rspamd.conf"))
                .arg(var("LOCAL_CONFDIR", root.to_path_buf()))
                .arg(var("DBDIR", root.join("db")))
                .arg(var("RUNDIR", root.join("run")))
                .arg(var("LOGDIR", root.join("log"))),
            "rspamd",
            &log,
        );
        let address = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + START_LIMIT;
        loop {
            daemon.check_running(&log);
            let message = format!("Subject: probe\r\n\r\n{GTUBE}\r\n");
            let request = format!(
                "POST /checkv2 HTTP/1.0\r\nContent-Length: {}\r\nIP: 127.0.0.1\r\n\r\n{message}",
                message.len()
            );
            if let Ok(answer) = exchange(&address, request.as_bytes()) {
                if String::from_utf8_lossy(&answer).contains("\"action\":\"reject\"") {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "rspamd did not recognise GTUBE within {START_LIMIT:?}:\n{}",
                std::fs::read_to_string(root.join("log/rspamd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        Rspamd {
            address,
            _daemon: daemon,
            _dir: dir,
        }
    }
}

pub struct Clamd {
    /// Its TCP address.
    pub address: String,
    /// Its Unix socket.
    pub socket: PathBuf,
    _daemon: Daemon,
    _dir: tempfile::TempDir,
}

impl Clamd {
    /// Starts clamd with a database that knows [`TEST_VIRUS`], streams up to `max_stream`
    /// bytes, closes sessions idle for 2 s, and waits until it answers.
    pub fn start(max_stream: &str) -> Clamd {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let port = free_port();
        for sub in ["db", "tmp"] {
            std::fs::create_dir_all(root.join(sub)).expect("mkdir");
        }
        let digest = md5_hex(TEST_VIRUS);
        std::fs::write(
            root.join("db/switchyard.hdb"),
            format!("{digest}:{}:Switchyard.Test.Virus\n", TEST_VIRUS.len()),
        )
        .expect("hdb");
        let socket = root.join("clamd.sock");
        std::fs::write(
            root.join("clamd.conf"),
            format!(
                "Foreground yes\nTCPSocket {port}\nTCPAddr 127.0.0.1\nLocalSocket {}\n\
                 DatabaseDirectory {}\nTemporaryDirectory {}\nPidFile {}\nLogFile {}\n\
                 StreamMaxLength {max_stream}\nMaxThreads 4\nSelfCheck 0\nIdleTimeout 2\n",
                socket.display(),
                root.join("db").display(),
                root.join("tmp").display(),
                root.join("clamd.pid").display(),
                root.join("clamd.log").display(),
            ),
        )
        .expect("clamd.conf");
        let log = root.join("stdout.log");
        let mut daemon = Daemon::spawn(
            Command::new("clamd").arg("-c").arg(root.join("clamd.conf")),
            "clamd",
            &log,
        );
        let address = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + START_LIMIT;
        loop {
            daemon.check_running(&log);
            if exchange(&address, b"zPING\0").is_ok_and(|answer| answer.starts_with(b"PONG")) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "clamd did not answer within {START_LIMIT:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Clamd {
            address,
            socket,
            _daemon: daemon,
            _dir: dir,
        }
    }
}

/// MD5 in hex, by the system's `md5sum` (the test crate has no MD5 of its own).
fn md5_hex(bytes: &[u8]) -> String {
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("md5sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(bytes)
        .expect("write to md5sum");
    let output = super::process::wait_within(child, Duration::from_secs(10), "md5sum");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_string()
}

/// A message with `attachment` as a base64 file attachment named `name`.
pub fn message_with_attachment(subject: &str, name: &str, attachment: &[u8]) -> String {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(attachment);
    format!(
        "From: a@example.com\r\nTo: b@switchyard.test\r\nSubject: {subject}\r\n\
         Message-ID: <{subject}@example.com>\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
         --b1\r\nContent-Type: text/plain\r\n\r\nSee the file.\r\n\
         --b1\r\nContent-Type: application/octet-stream\r\n\
         Content-Disposition: attachment; filename=\"{name}\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{encoded}\r\n--b1--\r\n"
    )
}
