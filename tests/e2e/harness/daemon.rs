//! A server the tests start in the foreground, in its own process group, and stop with every
//! process it forked.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server in its own process group, stopped (with every worker it forked) on drop.
pub struct Daemon {
    child: Child,
    what: &'static str,
}

impl Daemon {
    pub fn spawn(command: &mut Command, what: &'static str, log: &Path) -> Daemon {
        let output = std::fs::File::create(log).expect("log file");
        let errors = output.try_clone().expect("log file");
        let child = command
            .stdin(Stdio::null())
            // Servers in the foreground may log to their standard output: a file never fills
            // up as an unread pipe would.
            .stdout(output)
            .stderr(errors)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|error| {
                panic!("cannot start {what} (scripts/test installs it from Debian's packages): {error}")
            });
        Daemon { child, what }
    }

    /// Panics, with the log, if the server has exited.
    pub fn check_running(&mut self, log: &Path) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            panic!("{} exited ({status}) while starting:\n{log}", self.what);
        }
    }

    fn stop(&mut self) {
        let group = -(self.child.id() as i32);
        // SAFETY: kill(2) on the process group this daemon leads; no memory is involved.
        unsafe { libc::kill(group, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Whatever is left of the group (rspamd's workers outlive a killed main process).
        // SAFETY: as above.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}
