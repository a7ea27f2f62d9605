//! Dovecot's LMTP server (Debian's `dovecot-lmtpd`), started in the foreground with a
//! configuration, users and Maildirs of the test's own in a temporary folder, listening on a
//! loopback port and a Unix socket. Users: `alice` and `bob`, and `carol`, whose quota (1 byte)
//! no message fits, so Dovecot answers her with a temporary failure after the data.
//!
//! Dovecot never delivers as root: mail is written as uid/gid 65534 (nobody), so the folder is
//! opened to it.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use super::daemon::Daemon;
use super::router::free_port;

pub struct Dovecot {
    /// Its LMTP listener on loopback.
    pub address: String,
    /// Its LMTP Unix socket.
    pub socket: PathBuf,
    root: PathBuf,
    _daemon: Daemon,
    _dir: tempfile::TempDir,
}

impl Dovecot {
    pub fn start() -> Dovecot {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let port = free_port();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::create_dir_all(root.join("run")).expect("mkdir");
        let mail = root.join("mail");
        std::fs::create_dir_all(&mail).expect("mkdir");
        std::os::unix::fs::chown(&mail, Some(65534), Some(65534)).expect("chown mail");
        let d = root.display();
        std::fs::write(
            root.join("dovecot.conf"),
            format!(
                "base_dir = {d}/run\nstate_dir = {d}/run/state\ninstance_name = dovecot-test-{port}\n\
                 log_path = {d}/dovecot.log\nprotocols = lmtp\nlisten = 127.0.0.1\nssl = no\n\
                 default_internal_user = root\ndefault_internal_group = root\ndefault_login_user = root\n\
                 mail_uid = 65534\nmail_gid = 65534\nfirst_valid_uid = 1\nfirst_valid_gid = 1\n\
                 mail_location = maildir:{d}/mail/%n\nmail_fsync = never\nmail_plugins = quota\n\
                 quota_full_tempfail = yes\nauth_username_format = %Ln\nhostname = lmtp.example.test\n\
                 postmaster_address = postmaster@example.test\n\
                 passdb {{\n  driver = passwd-file\n  args = {d}/users\n}}\n\
                 userdb {{\n  driver = passwd-file\n  args = {d}/users\n}}\n\
                 plugin {{\n  quota = maildir:User quota\n}}\n\
                 service lmtp {{\n  inet_listener lmtp {{\n    address = 127.0.0.1\n    port = {port}\n  }}\n  \
                 unix_listener {d}/lmtp.sock {{\n    mode = 0666\n  }}\n}}\n"
            ),
        )
        .expect("dovecot.conf");
        // passdb and userdb in one (Dovecot's auth refuses to start without a passdb).
        std::fs::write(
            root.join("users"),
            "alice:::::::\nbob:::::::\ncarol:::::::userdb_quota_rule=*:storage=1B\n",
        )
        .expect("users");
        let log = root.join("stdout.log");
        let mut daemon = Daemon::spawn(
            Command::new("dovecot")
                .arg("-F")
                .arg("-c")
                .arg(root.join("dovecot.conf")),
            "dovecot",
            &log,
        );
        let address = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        // The port accepts before the LMTP process is up: ready once it greets.
        while !greets(&address) {
            daemon.check_running(&log);
            assert!(
                Instant::now() < deadline,
                "dovecot did not greet within 30 s:\n{}",
                std::fs::read_to_string(root.join("dovecot.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Dovecot {
            address,
            socket: root.join("lmtp.sock"),
            root,
            _daemon: daemon,
            _dir: dir,
        }
    }

    /// The messages in `user`'s inbox (its Maildir's `new/`), as files.
    pub fn inbox(&self, user: &str) -> Vec<String> {
        let new = self.root.join("mail").join(user).join("new");
        let Ok(entries) = std::fs::read_dir(new) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .map(|entry| std::fs::read_to_string(entry.path()).unwrap_or_default())
            .collect()
    }

    /// Dovecot's own log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("dovecot.log")).unwrap_or_default()
    }
}

fn greets(address: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(address) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    let greeted = BufReader::new(&stream)
        .read_line(&mut line)
        .is_ok_and(|_| line.starts_with("220 "));
    let _ = stream.write_all(b"QUIT\r\n");
    greeted
}
