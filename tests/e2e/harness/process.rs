//! Child processes with a deadline: a test waiting on a command or a peer fails, naming the
//! command, when it does not finish in time, instead of hanging the suite.

use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a command of the binary under test (`queue ...`, `plugins ...`, `check-config`) or a
/// Python peer script may take. Generous: the slowest of them compile every plugin of a chain.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(120);

/// `Command::output` with a deadline.
pub trait OutputWithin {
    /// Runs the command to its end with no standard input and its output captured; past `limit`
    /// the command is killed and the test panics with its name.
    fn output_within(&mut self, limit: Duration) -> Output;
}

impl OutputWithin for Command {
    fn output_within(&mut self, limit: Duration) -> Output {
        let what = describe(self);
        let child = self
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {what}: {error}"));
        wait_within(child, limit, &what)
    }
}

/// `Child::wait_with_output` with a deadline: past `limit` the child is killed and the test
/// panics, naming `what`.
pub fn wait_within(mut child: Child, limit: Duration, what: &str) -> Output {
    let stdout = child.stdout.take().map(drain);
    let stderr = child.stderr.take().map(drain);
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} was still running after {limit:?}, so it was killed");
            }
            Err(error) => panic!("cannot wait for {what}: {error}"),
        }
    };
    // A grandchild may hold the pipes open after the child is gone: read what there is, briefly.
    let collect = |pipe: Option<mpsc::Receiver<Vec<u8>>>| {
        pipe.and_then(|pipe| pipe.recv_timeout(Duration::from_secs(5)).ok())
            .unwrap_or_default()
    };
    Output {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
    }
}

/// The first line `child` prints on its standard output (a peer's `ready PORT`), within `limit`.
pub fn first_line_within(child: &mut Child, limit: Duration, what: &str) -> String {
    let stdout = child.stdout.take().expect("the child's stdout is piped");
    let (send, lines) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let mut reader = std::io::BufReader::new(stdout);
        let _ = std::io::BufRead::read_line(&mut reader, &mut line);
        let _ = send.send(line);
        // Keep reading, so the child never blocks on a full pipe.
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    match lines.recv_timeout(limit) {
        Ok(line) => line,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} printed nothing within {limit:?}, so it was killed");
        }
    }
}

/// Reads a pipe to its end on a thread of its own; the bytes arrive on the channel.
fn drain(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (send, bytes) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buffer = Vec::new();
        let _ = pipe.read_to_end(&mut buffer);
        let _ = send.send(buffer);
    });
    bytes
}

fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args().take(4) {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    format!("`{text}`")
}
