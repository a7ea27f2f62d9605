//! Tenants under load, measured against the real (release) binary over loopback SMTP:
//!
//! - `scale`: 1,000 tenants, each with its own two-plugin chain (rate-limit and content-filter,
//!   every tenant with its own configuration), against one tenant with the same chain: start-up
//!   time, resident memory per idle tenant, and the delivered rate with the load spread over every
//!   tenant's domain. The two servers take turns, round after round.
//! - `noisy`: tenant B's accept latency (MAIL to the 250 after DATA, p50/p99) alone, and while
//!   tenant A's plugin loops on every call of A's clients.
//! - `flood`: tenant B's 100 messages to a fast receiver, alone, and while tenant A has 10,000
//!   messages queued for a receiver that takes 200 ms per message.
//!
//! Run:
//!
//!     ./scripts/build-plugins && cargo build --release --bin switchyard
//!     cargo bench --bench tenants                 # all three; or: cargo bench --bench tenants -- scale
//!
//! Settings by environment: `SWITCHYARD_BIN` (default `target/release/switchyard`), `TENANTS`
//! (1000), `N` (messages per scale round, 4000), `SESSIONS` (20), `ROUNDS` (3), `FLOOD` (10000).
//! The receiving servers run in this process; the load generator too.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn plugin(name: &str) -> PathBuf {
    root().join(format!("target/wasm32-wasip2/plugin/{name}.wasm"))
}

/// A receiving SMTP server that counts what it gets, answering each DATA after `delay`.
struct Receiver {
    port: u16,
    received: Arc<AtomicUsize>,
}

async fn receiver(delay: Duration) -> Receiver {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind receiver");
    let port = listener.local_addr().expect("address").port();
    let received = Arc::new(AtomicUsize::new(0));
    let counted = received.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let _ = receive(stream, delay, counted).await;
            });
        }
    });
    Receiver { port, received }
}

async fn receive(
    stream: TcpStream,
    delay: Duration,
    received: Arc<AtomicUsize>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    write.write_all(b"220 receiver ESMTP\r\n").await?;
    let mut line = String::new();
    let mut in_data = false;
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        if in_data {
            if line == ".\r\n" {
                in_data = false;
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                received.fetch_add(1, Ordering::Relaxed);
                write.write_all(b"250 2.0.0 Ok\r\n").await?;
            }
            continue;
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => b"250-receiver\r\n250 PIPELINING\r\n",
            "DATA" => {
                in_data = true;
                b"354 go ahead\r\n"
            }
            "QUIT" => {
                write.write_all(b"221 bye\r\n").await?;
                return Ok(());
            }
            _ => b"250 2.0.0 Ok\r\n",
        };
        write.write_all(reply).await?;
    }
}

/// A client session: one message after another.
struct Client {
    lines: BufReader<tokio::net::tcp::OwnedReadHalf>,
    write: tokio::net::tcp::OwnedWriteHalf,
}

impl Client {
    async fn connect(port: u16) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let (read, write) = stream.into_split();
        let mut client = Client {
            lines: BufReader::new(read),
            write,
        };
        client.reply().await;
        client.command("EHLO load.bench.test").await;
        client
    }

    /// The last line of the next reply.
    async fn reply(&mut self) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            if self.lines.read_line(&mut line).await.unwrap_or(0) == 0 {
                return "closed".to_string();
            }
            if line.as_bytes().get(3) != Some(&b'-') {
                return line.trim_end().to_string();
            }
        }
    }

    async fn command(&mut self, line: &str) -> String {
        let _ = self.write.write_all(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// Sends one message; the final reply.
    async fn send(&mut self, to: &str, body: &str) -> String {
        let reply = self.command("MAIL FROM:<load@source.bench.test>").await;
        if !reply.starts_with("250") {
            return reply;
        }
        let reply = self.command(&format!("RCPT TO:<{to}>")).await;
        if !reply.starts_with("250") {
            self.command("RSET").await;
            return reply;
        }
        let reply = self.command("DATA").await;
        if !reply.starts_with("354") {
            return reply;
        }
        let _ = self.write.write_all(body.as_bytes()).await;
        self.command(".").await
    }
}

fn body(size: usize) -> String {
    let mut text =
        "From: load@source.bench.test\r\nTo: someone@bench.test\r\nSubject: load\r\n\r\n"
            .to_string();
    while text.len() < size {
        text.push_str("0123456789012345678901234567890123456789012345678901234567890123456789\r\n");
    }
    text
}

/// A running server.
struct Server {
    child: Child,
    port: u16,
    started_in: Duration,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("free port")
}

/// Starts the binary on `dir/switchyard.toml` (written from `config`, which gets `{port}` and
/// `{dir}` filled in) and waits for its listener.
async fn start(dir: &Path, config: &str) -> Server {
    let port = free_port();
    let text = config
        .replace("{port}", &port.to_string())
        .replace("{dir}", &dir.display().to_string());
    let path = dir.join("switchyard.toml");
    std::fs::write(&path, text).expect("write config");
    let binary = std::env::var("SWITCHYARD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("target/release/switchyard"));
    let log = std::fs::File::create(dir.join("switchyard.log")).expect("log file");
    let began = Instant::now();
    let child = Command::new(&binary)
        .args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", binary.display()));
    loop {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(600),
            "the server did not start; see {}",
            dir.join("switchyard.log").display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Server {
        child,
        port,
        started_in: began.elapsed(),
    }
}

/// Resident memory of a process, in KiB.
fn resident_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

const BASE: &str = r#"hostname = "switchyard.bench.test"
data_dir = "{dir}/data"

[[listener]]
name = "bench"
address = "127.0.0.1:{port}"
greeting_delay = "0s"

[smtp]
max_sessions_per_ip = 500

[relay]
domains = []
networks = []

[authentication]
verify = false

[tenants]
directory = "{dir}/tenants"
"#;

/// `count` tenant files, `tN.bench.test` each, with a two-plugin chain configured for tenant N.
fn write_tenants(dir: &Path, count: usize, extra: &str) {
    let tenants = dir.join("tenants");
    std::fs::create_dir_all(&tenants).expect("tenants dir");
    for n in 0..count {
        let text = format!(
            "domains = [\"t{n}.bench.test\"]\n\n[limits]\nmessages_per_hour = 100000000\nrecipients_per_hour = 100000000\n\n\
             [[plugin]]\nname = \"rate-limit\"\npath = \"{}\"\ngrants = [\"kv\", \"metrics\"]\n[plugin.config]\nper_ip = {{ limit = {}, window_seconds = 3600 }}\n\n\
             [[plugin]]\nname = \"content-filter\"\npath = \"{}\"\n[plugin.config]\nrules = [{{ header = \"Subject\", contains = \"[spam-{n}]\", action = \"reject\", reply = \"550 5.7.1 tenant {n} says no\" }}]\n{extra}",
            plugin("rate_limit").display(),
            1_000_000_000 + n,
            plugin("content_filter").display(),
        );
        std::fs::write(tenants.join(format!("t{n}.toml")), text).expect("tenant file");
    }
}

/// Who a message goes to, by its number.
type Recipients = Arc<dyn Fn(usize) -> String + Send + Sync>;

/// Sends `n` messages of 1 KiB over `sessions` sessions, message `i` to `to(i)`; every one must
/// be accepted.
async fn send_all(port: u16, n: usize, sessions: usize, to: Recipients) {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..sessions {
        let (next, to) = (next.clone(), to.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(port).await;
            let body = body(1024);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let reply = client.send(&to(i), &body).await;
                assert!(reply.starts_with("250"), "message {i}: {reply}");
            }
            client.command("QUIT").await;
        }));
    }
    for task in tasks {
        task.await.expect("load task");
    }
}

/// [`send_all`], then waits until `receiver` counted them all; returns the time it all took.
async fn load(
    port: u16,
    n: usize,
    sessions: usize,
    to: Recipients,
    receiver: &Receiver,
) -> Duration {
    let before = receiver.received.load(Ordering::Relaxed);
    let began = Instant::now();
    send_all(port, n, sessions, to).await;
    while receiver.received.load(Ordering::Relaxed) < before + n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    began.elapsed()
}

async fn scale() {
    let tenants = setting("TENANTS", 1000);
    let n = setting("N", 4000);
    let sessions = setting("SESSIONS", 20);
    let rounds = setting("ROUNDS", 3);
    let sink = receiver(Duration::ZERO).await;
    let config = format!(
        "{BASE}\n[delivery]\nsmarthost = \"127.0.0.1:{}\"\ntls = \"none\"\n",
        sink.port
    );
    let one_dir = tempfile::tempdir().expect("tempdir");
    write_tenants(one_dir.path(), 1, "");
    let many_dir = tempfile::tempdir().expect("tempdir");
    write_tenants(many_dir.path(), tenants, "");
    let one = start(one_dir.path(), &config).await;
    let many = start(many_dir.path(), &config).await;
    // Idle, after start: what the tenants' chains hold.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (one_rss, many_rss) = (resident_kib(one.child.id()), resident_kib(many.child.id()));
    println!(
        "# scale: {tenants} tenants, each with its own two-plugin chain, against one tenant with the same chain"
    );
    println!(
        "start-up: one tenant {:.2} s, {tenants} tenants {:.2} s",
        one.started_in.as_secs_f64(),
        many.started_in.as_secs_f64()
    );
    println!(
        "resident at idle: one tenant {one_rss} KiB, {tenants} tenants {many_rss} KiB: {:.0} KiB per idle tenant",
        (many_rss.saturating_sub(one_rss)) as f64 / (tenants - 1).max(1) as f64
    );
    println!("| round | one tenant delivered/s | {tenants} tenants delivered/s | ratio |");
    println!("| --- | --- | --- | --- |");
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let to_one: Recipients = Arc::new(|i| format!("user{i}@t0.bench.test"));
        let one_time = load(one.port, n, sessions, to_one, &sink).await;
        let spread = tenants;
        let to_many: Recipients = Arc::new(move |i| format!("user{i}@t{}.bench.test", i % spread));
        let many_time = load(many.port, n, sessions, to_many, &sink).await;
        let (one_rate, many_rate) = (
            n as f64 / one_time.as_secs_f64(),
            n as f64 / many_time.as_secs_f64(),
        );
        ratios.push(many_rate / one_rate);
        println!(
            "| {round} | {one_rate:.0} | {many_rate:.0} | {:.0} % |",
            100.0 * many_rate / one_rate
        );
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "median ratio: {:.0} % (target: at least 90 %)",
        100.0 * ratios[ratios.len() / 2]
    );
    let after = resident_kib(many.child.id());
    println!("resident after the load: {tenants} tenants {after} KiB");
}

fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |fraction: f64| {
        samples[((samples.len() as f64 - 1.0) * fraction).round() as usize].as_secs_f64() * 1000.0
    };
    (at(0.5), at(0.99))
}

/// B's accept latency over `count` messages from `clients` sequential clients.
async fn latencies(port: u16, clients: usize, count: usize) -> Vec<Duration> {
    let mut tasks = Vec::new();
    for c in 0..clients {
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(port).await;
            let body = body(1024);
            let mut samples = Vec::new();
            for i in 0..count / clients {
                let began = Instant::now();
                let reply = client.send(&format!("b{c}-{i}@b.bench.test"), &body).await;
                assert!(reply.starts_with("250"), "{reply}");
                samples.push(began.elapsed());
            }
            samples
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("latency task"));
    }
    all
}

async fn noisy() {
    let sink = receiver(Duration::ZERO).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let tenants = dir.path().join("tenants");
    std::fs::create_dir_all(&tenants).expect("tenants");
    std::fs::write(
        tenants.join("a.toml"),
        format!(
            "domains = [\"a.bench.test\"]\n[[plugin]]\nname = \"looping\"\npath = \"{}\"\ngrants = [\"kv\"]\n[plugin.config]\nmode = \"loop\"\n",
            plugin("misbehave").display()
        ),
    )
    .expect("tenant a");
    std::fs::write(
        tenants.join("b.toml"),
        format!(
            "domains = [\"b.bench.test\"]\n[[plugin]]\nname = \"filter\"\npath = \"{}\"\n[plugin.config]\nrules = [{{ header = \"Subject\", contains = \"[spam]\", action = \"reject\" }}]\n",
            plugin("content_filter").display()
        ),
    )
    .expect("tenant b");
    let config = format!(
        "{BASE}\n[tenants.limits]\nplugin_time_limit = \"100ms\"\n\n[delivery]\nsmarthost = \"127.0.0.1:{}\"\ntls = \"none\"\n",
        sink.port
    );
    let server = start(dir.path(), &config).await;
    let count = setting("NOISY_MESSAGES", 2000);
    let clients = 4;
    // Warm up, then B alone.
    latencies(server.port, clients, 200).await;
    let alone = percentiles(latencies(server.port, clients, count).await);
    // A's clients: every RCPT makes A's plugin loop until its 100 ms limit.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loops = Arc::new(AtomicUsize::new(0));
    let mut noisy = Vec::new();
    for _ in 0..setting("NOISY_CLIENTS", 8) {
        let (stop, loops, port) = (stop.clone(), loops.clone(), server.port);
        noisy.push(tokio::spawn(async move {
            let mut client = Client::connect(port).await;
            while !stop.load(Ordering::Relaxed) {
                let reply = client.command("MAIL FROM:<x@source.bench.test>").await;
                assert!(reply.starts_with("250"), "{reply}");
                let reply = client.command("RCPT TO:<victim@a.bench.test>").await;
                assert!(reply.starts_with("451"), "{reply}");
                client.command("RSET").await;
                loops.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let beside = percentiles(latencies(server.port, clients, count).await);
    stop.store(true, Ordering::Relaxed);
    for task in noisy {
        let _ = task.await;
    }
    println!("# noisy neighbour: tenant B's accept latency (MAIL to 250 after DATA), {count} messages from {clients} clients");
    println!("| | p50 ms | p99 ms |");
    println!("| --- | --- | --- |");
    println!("| B alone | {:.2} | {:.2} |", alone.0, alone.1);
    println!(
        "| B while A's plugin loops ({} timed-out calls) | {:.2} | {:.2} |",
        loops.load(Ordering::Relaxed),
        beside.0,
        beside.1
    );
    println!("p99 ratio: {:.2} (target: at most 1.5)", beside.1 / alone.1);
}

async fn flood() {
    let slow = receiver(Duration::from_millis(200)).await;
    let fast = receiver(Duration::ZERO).await;
    let flood = setting("FLOOD", 10_000);
    let (slow, fast) = (&slow, &fast);
    let run = |with_flood: bool| {
        let (slow_port, fast_port) = (slow.port, fast.port);
        async move {
            let dir = tempfile::tempdir().expect("tempdir");
            let tenants = dir.path().join("tenants");
            std::fs::create_dir_all(&tenants).expect("tenants");
            let limits =
                "[limits]\nmessages_per_hour = 100000000\nrecipients_per_hour = 100000000\n";
            std::fs::write(
                tenants.join("a.toml"),
                format!("domains = [\"a.bench.test\"]\n{limits}"),
            )
            .expect("tenant a");
            std::fs::write(
                tenants.join("b.toml"),
                format!("domains = [\"b.bench.test\"]\n{limits}"),
            )
            .expect("tenant b");
            let config = format!(
                "{BASE}\n[delivery]\ntls = \"none\"\n\n[[route]]\ndomain = \"a.bench.test\"\nsmarthost = \"127.0.0.1:{slow_port}\"\n\n[[route]]\ndomain = \"b.bench.test\"\nsmarthost = \"127.0.0.1:{fast_port}\"\n"
            );
            let server = start(dir.path(), &config).await;
            if with_flood {
                // Queue A's flood (accepted fast, delivered at 200 ms a message per connection).
                let to: Recipients = Arc::new(|i| format!("a{i}@a.bench.test"));
                send_all(server.port, flood, 20, to).await;
            }
            let to: Recipients = Arc::new(|i| format!("b{i}@b.bench.test"));
            let took = load(server.port, 100, 4, to, fast).await;
            let queued_for_a = if with_flood {
                flood.saturating_sub(slow.received.load(Ordering::Relaxed))
            } else {
                0
            };
            (took, queued_for_a)
        }
    };
    let (alone, _) = run(false).await;
    let (beside, waiting) = run(true).await;
    println!("# flood fairness: tenant B's 100 messages to a fast receiver");
    println!("| | B's 100 delivered in |");
    println!("| --- | --- |");
    println!("| B alone | {:.2} s |", alone.as_secs_f64());
    println!(
        "| B while A has {waiting} of {flood} messages waiting for a receiver taking 200 ms each | {:.2} s |",
        beside.as_secs_f64()
    );
    println!(
        "ratio: {:.2} (target: at most 2)",
        beside.as_secs_f64() / alone.as_secs_f64()
    );
}

fn main() {
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    let runs = |name: &str| wanted.is_empty() || wanted.iter().any(|w| w == name);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        if runs("scale") {
            scale().await;
        }
        if runs("noisy") {
            noisy().await;
        }
        if runs("flood") {
            flood().await;
        }
    });
}
