//! A receiving SMTP server on a loopback address, recording what it gets and answering as told.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// One message as the sink received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub helo: String,
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    pub data: String,
    /// When the end of its data came.
    pub arrived: std::time::Instant,
}

/// How the sink answers RCPT TO and the end of DATA.
pub type Rule = Arc<dyn Fn(&str, usize) -> Option<String> + Send + Sync>;

#[derive(Clone)]
pub struct Sink {
    pub address: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    rcpt_attempts: Arc<Mutex<usize>>,
    connections: Arc<Mutex<Connections>>,
    /// How long to wait before answering the end of DATA: keeps deliveries under way.
    data_delay: Duration,
    /// Told to close every session waiting for a command (as a server that times clients out).
    hang_up: Arc<tokio::sync::Notify>,
}

/// Connection counts, to check reuse and per-destination limits.
#[derive(Debug, Default, Clone, Copy)]
pub struct Connections {
    pub total: usize,
    pub open: usize,
    pub most_open: usize,
}

impl Sink {
    /// Starts a sink on `ip:port`. `rcpt_rule(address, attempt)` may return a reply line (e.g.
    /// "450 4.2.0 busy") instead of 250; `attempt` counts RCPTs seen for any address.
    pub async fn start(ip: IpAddr, port: u16, rcpt_rule: Option<Rule>) -> Sink {
        Sink::start_slow(ip, port, rcpt_rule, Duration::ZERO).await
    }

    /// Like [`Sink::start`], answering the end of each message's DATA only after `data_delay`.
    pub async fn start_slow(
        ip: IpAddr,
        port: u16,
        rcpt_rule: Option<Rule>,
        data_delay: Duration,
    ) -> Sink {
        let listener = TcpListener::bind(SocketAddr::new(ip, port))
            .await
            .expect("bind sink");
        let address = listener.local_addr().expect("sink address");
        let sink = Sink {
            address,
            received: Arc::new(Mutex::new(Vec::new())),
            rcpt_attempts: Arc::new(Mutex::new(0)),
            connections: Arc::new(Mutex::new(Connections::default())),
            data_delay,
            hang_up: Arc::new(tokio::sync::Notify::new()),
        };
        let served = sink.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let sink = served.clone();
                let rule = rcpt_rule.clone();
                tokio::spawn(async move {
                    sink.count_connection(1);
                    sink.session(stream, rule).await;
                    sink.count_connection(-1);
                });
            }
        });
        sink
    }

    async fn session(&self, stream: tokio::net::TcpStream, rule: Option<Rule>) {
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let _ = write.write_all(b"220 sink.test ESMTP\r\n").await;
        let mut current = Received {
            helo: String::new(),
            mail_from: String::new(),
            rcpt_to: Vec::new(),
            data: String::new(),
            arrived: std::time::Instant::now(),
        };
        let mut line = String::new();
        loop {
            line.clear();
            let read = tokio::select! {
                read = reader.read_line(&mut line) => read,
                _ = self.hang_up.notified() => return,
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let command = line.trim_end().to_string();
            let upper = command.to_ascii_uppercase();
            let reply: String = if upper.starts_with("EHLO") {
                current.helo = command[5..].to_string();
                "250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 100000000".to_string()
            } else if upper.starts_with("HELO") {
                "250 sink.test".to_string()
            } else if upper.starts_with("MAIL FROM:") {
                current.mail_from = extract(&command[10..]);
                current.rcpt_to.clear();
                "250 2.1.0 ok".to_string()
            } else if upper.starts_with("RCPT TO:") {
                let address = extract(&command[8..]);
                let attempt = {
                    let mut count = self.rcpt_attempts.lock().expect("count");
                    *count += 1;
                    *count
                };
                match rule.as_ref().and_then(|rule| rule(&address, attempt)) {
                    Some(reply) => reply,
                    None => {
                        current.rcpt_to.push(address);
                        "250 2.1.5 ok".to_string()
                    }
                }
            } else if upper == "DATA" {
                if current.rcpt_to.is_empty() {
                    "554 5.5.1 no valid recipients".to_string()
                } else {
                    let _ = write.write_all(b"354 go ahead\r\n").await;
                    let mut data = String::new();
                    loop {
                        let mut data_line = String::new();
                        match reader.read_line(&mut data_line).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        if data_line == ".\r\n" {
                            break;
                        }
                        let unstuffed = data_line.strip_prefix('.').unwrap_or(&data_line);
                        data.push_str(unstuffed);
                    }
                    current.data = data;
                    current.arrived = std::time::Instant::now();
                    // Kept even if the client hangs up meanwhile, as most servers do (the
                    // duplicate of RFC 1047 when the client then sends it again).
                    tokio::time::sleep(self.data_delay).await;
                    self.received
                        .lock()
                        .expect("received")
                        .push(current.clone());
                    "250 2.0.0 accepted".to_string()
                }
            } else if upper == "RSET" {
                current.rcpt_to.clear();
                "250 2.0.0 ok".to_string()
            } else if upper == "QUIT" {
                let _ = write.write_all(b"221 2.0.0 bye\r\n").await;
                return;
            } else {
                "502 5.5.2 unknown".to_string()
            };
            if write
                .write_all(format!("{reply}\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    }

    fn count_connection(&self, change: isize) {
        let mut connections = self.connections.lock().expect("connections");
        if change > 0 {
            connections.total += 1;
            connections.open += 1;
            connections.most_open = connections.most_open.max(connections.open);
        } else {
            connections.open -= 1;
        }
    }

    /// Closes every session waiting for a command, without a reply (a server that timed its
    /// clients out).
    pub fn drop_connections(&self) {
        self.hang_up.notify_waiters();
    }

    pub fn connections(&self) -> Connections {
        *self.connections.lock().expect("connections")
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("received").clone()
    }

    /// Waits until at least `count` messages arrived, or panics after `limit`.
    pub async fn wait_for(&self, count: usize, limit: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let received = self.received();
            if received.len() >= count {
                return received;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "sink {} got {} of {count} messages",
                    self.address,
                    received.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn extract(argument: &str) -> String {
    let argument = argument.trim();
    let start = argument.find('<').map(|i| i + 1).unwrap_or(0);
    let end = argument.find('>').unwrap_or(argument.len());
    argument[start..end].to_string()
}
