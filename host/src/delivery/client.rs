//! The SMTP client used for delivery: greeting, EHLO (HELO fallback), opportunistic or mandatory
//! STARTTLS, and mail transactions with PIPELINING, several per connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::{Endpoint, TlsPolicy};
use crate::mail::reply::Reply;
use crate::net::conn::Conn;
use crate::net::line::LineEnd;
use crate::net::stream::Stream;
use crate::net::verify::{ClientTls, TlsState};

use super::credentials::Credentials;
use crate::queue::{MessageDsn, RecipientDsn};

/// Why a connection could not be used. Each carries the reply to record for the recipients.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect to {peer}: {message}")]
    Connect { peer: String, message: String },
    #[error("{peer}: {reply}")]
    Refused { peer: String, reply: Reply },
    #[error("{peer}: TLS handshake failed: {message}")]
    Tls { peer: String, message: String },
    /// The policy asks for a verified certificate and this server's did not check out.
    #[error("{peer}: certificate verification failed: {message}")]
    Unverified { peer: String, message: String },
    #[error("{peer}: STARTTLS required by policy but not offered")]
    TlsRequired { peer: String },
    #[error("{peer}: lost connection: {message}")]
    Lost { peer: String, message: String },
    /// The hop has credentials, and they cannot be used or were refused.
    #[error("{peer}: authentication failed: {message}")]
    Auth {
        peer: String,
        /// The enhanced status for the recipients' reply.
        status: &'static str,
        message: String,
    },
}

impl ClientError {
    /// The SMTP reply to record for recipients that could not be delivered because of this.
    pub fn reply(&self) -> Reply {
        match self {
            ClientError::Refused { reply, .. } if reply.is_permanent() => reply.clone(),
            ClientError::Refused { reply, .. } => reply.clone(),
            ClientError::TlsRequired { .. } => Reply::new(451, "4.7.4", self.to_string()),
            ClientError::Tls { .. } | ClientError::Unverified { .. } => {
                Reply::new(451, "4.7.5", self.to_string())
            }
            // A refused password defers, as Postfix's smtp_sasl_auth_soft_bounce: the operator
            // can fix the file before the mail expires.
            ClientError::Auth { status, .. } => Reply::new(451, status, self.to_string()),
            _ => Reply::new(451, "4.4.1", self.to_string()),
        }
    }
}

/// What the remote server advertised in its EHLO reply.
#[derive(Debug, Default, Clone)]
pub struct Capabilities {
    pub pipelining: bool,
    pub starttls: bool,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub size: Option<u64>,
    /// AUTH with the PLAIN mechanism.
    pub auth_plain: bool,
    /// RFC 3461 DSN: takes NOTIFY, ORCPT, RET and ENVID.
    pub dsn: bool,
    /// RFC 8689 REQUIRETLS.
    pub requiretls: bool,
}

impl Capabilities {
    fn from_ehlo(reply: &Reply) -> Capabilities {
        let mut capabilities = Capabilities::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let keyword = words.next().unwrap_or_default().to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => capabilities.pipelining = true,
                "STARTTLS" => capabilities.starttls = true,
                "8BITMIME" => capabilities.eight_bit_mime = true,
                "SMTPUTF8" => capabilities.smtputf8 = true,
                "DSN" => capabilities.dsn = true,
                "REQUIRETLS" => capabilities.requiretls = true,
                "AUTH" => {
                    capabilities.auth_plain =
                        words.any(|mechanism| mechanism.eq_ignore_ascii_case("PLAIN"))
                }
                "SIZE" => {
                    capabilities.size = words
                        .next()
                        .and_then(|size| size.parse().ok())
                        .filter(|&size| size > 0)
                }
                _ => {}
            }
        }
        capabilities
    }
}

/// Settings for one connection.
pub struct ConnectOptions<'a> {
    pub helo_name: &'a str,
    pub tls: TlsPolicy,
    /// The configurations for the handshake and the verifier that judges certificates.
    pub client_tls: Arc<ClientTls>,
    /// The name for SNI, certificate checks and logs.
    pub server_name: &'a str,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    /// AUTH PLAIN with these after TLS (never without TLS).
    pub credentials: Option<Credentials>,
    /// The MX host has validated TLSA records (DANE, RFC 7672): STARTTLS is required, and the
    /// certificate is checked against them instead of the trust anchors.
    pub dane: Option<Dane>,
}

/// What an MX host's validated TLSA records ask of its connection.
#[derive(Clone)]
pub enum Dane {
    /// Usable records: a configuration whose verifier accepts only certificates they match.
    Authenticate(Arc<rustls::ClientConfig>),
    /// Records, none usable: TLS without authentication (RFC 7672 2.2).
    EncryptOnly,
}

/// One mail transaction's envelope.
#[derive(Clone, Copy)]
pub struct Envelope<'a> {
    pub sender: &'a str,
    pub recipients: &'a [String],
    pub smtputf8: bool,
    pub eight_bit: bool,
    pub size: u64,
    /// RET, ENVID and REQUIRETLS.
    pub dsn: &'a MessageDsn,
    /// NOTIFY and ORCPT of each recipient (missing ones: none given).
    pub recipient_dsn: &'a [RecipientDsn],
}

/// An open, greeted connection ready for transactions.
pub struct Client {
    conn: Conn,
    capabilities: Capabilities,
    command_timeout: Duration,
    /// "mx.example.com[192.0.2.1]:25", for logs and DSNs.
    pub peer: String,
    /// Transactions since the connection opened.
    pub transactions: usize,
    /// What protects the connection, for the delivery log line.
    pub tls: TlsState,
    /// The host is the one the sender's path really leads to: a relay named by the
    /// configuration or a route hook, or an MX host an MTA-STS `enforce` policy lists (plain
    /// DNS authenticates no MX record). REQUIRETLS needs it (RFC 8689 4.2.1).
    pub authenticated_host: bool,
    /// LMTP (RFC 2033): LHLO, and one reply per accepted recipient after the data.
    lmtp: bool,
}

/// `connect` within `limit`, its failure a [`ClientError::Connect`] naming `peer`.
async fn within<T>(
    limit: Duration,
    peer: &str,
    connect: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, ClientError> {
    let failed = |message: String| ClientError::Connect {
        peer: peer.to_string(),
        message,
    };
    match tokio::time::timeout(limit, connect).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(error)) => Err(failed(error.to_string())),
        Err(_) => Err(failed("connection timed out".to_string())),
    }
}

impl Client {
    /// Connects, reads the greeting, says EHLO and negotiates TLS as the policy says.
    pub async fn connect(
        address: SocketAddr,
        options: &ConnectOptions<'_>,
    ) -> Result<Client, ClientError> {
        let peer = format!(
            "{}[{}]:{}",
            options.server_name,
            address.ip(),
            address.port()
        );
        let tcp = within(options.connect_timeout, &peer, TcpStream::connect(address)).await?;
        let _ = tcp.set_nodelay(true);
        Client::greet(Stream::Plain(tcp), peer, options, false).await
    }

    /// Connects to an LMTP server (RFC 2033) over TCP or its Unix socket and greets it with
    /// LHLO; over TCP, STARTTLS as the policy says where the server offers it.
    pub async fn connect_lmtp(
        endpoint: &Endpoint,
        options: &ConnectOptions<'_>,
    ) -> Result<Client, ClientError> {
        let peer = format!("lmtp:{endpoint}");
        let stream = match endpoint {
            Endpoint::Tcp(address) => {
                let tcp = within(
                    options.connect_timeout,
                    &peer,
                    TcpStream::connect(address.as_str()),
                )
                .await?;
                let _ = tcp.set_nodelay(true);
                Stream::Plain(tcp)
            }
            Endpoint::Unix(path) => Stream::Unix(
                within(
                    options.connect_timeout,
                    &peer,
                    tokio::net::UnixStream::connect(path),
                )
                .await?,
            ),
        };
        Client::greet(stream, peer, options, true).await
    }

    /// Reads the greeting, says EHLO (LHLO) and negotiates TLS and AUTH as `options` say.
    async fn greet(
        stream: Stream,
        peer: String,
        options: &ConnectOptions<'_>,
        lmtp: bool,
    ) -> Result<Client, ClientError> {
        let mut client = Client {
            conn: Conn::new(stream),
            capabilities: Capabilities::default(),
            command_timeout: options.command_timeout,
            peer,
            transactions: 0,
            tls: TlsState::None,
            authenticated_host: false,
            lmtp,
        };
        let greeting = client.read_reply().await?;
        if !greeting.is_positive() {
            return Err(client.refused(greeting));
        }
        client.hello(options.helo_name).await?;
        let required = options.tls == TlsPolicy::Require || options.dane.is_some();
        let wants_tls = options.tls != TlsPolicy::None || options.dane.is_some();
        if wants_tls && client.capabilities.starttls {
            client.send_line("STARTTLS").await?;
            let reply = client.read_reply().await?;
            if reply.code != 220 {
                if required {
                    return Err(client.refused(reply));
                }
            } else {
                client = client.start_tls(options).await?;
                client.hello(options.helo_name).await?;
            }
        } else if required {
            return Err(ClientError::TlsRequired {
                peer: client.peer.clone(),
            });
        }
        if let Some(credentials) = &options.credentials {
            client.authenticate(credentials).await?;
        }
        Ok(client)
    }

    /// AUTH PLAIN (RFC 4954, RFC 4616) with the initial response, only over verified TLS.
    async fn authenticate(&mut self, credentials: &Credentials) -> Result<(), ClientError> {
        use base64::Engine;
        let peer = self.peer.clone();
        let failed = |status: &'static str, message: String| ClientError::Auth {
            peer: peer.clone(),
            status,
            message,
        };
        // Over TLS whose certificate verified: under opportunistic TLS anyone in the path
        // could present a certificate and read the password.
        if self.tls != TlsState::Verified {
            return Err(failed(
                "4.7.11",
                format!(
                    "credentials are sent only over verified TLS, and this connection's TLS is {}",
                    self.tls
                ),
            ));
        }
        if !self.capabilities.auth_plain {
            return Err(failed(
                "4.7.8",
                "the server does not offer AUTH PLAIN".to_string(),
            ));
        }
        let response = base64::engine::general_purpose::STANDARD.encode(format!(
            "\0{}\0{}",
            credentials.username, credentials.password
        ));
        self.send_line(&format!("AUTH PLAIN {response}")).await?;
        let reply = self.read_reply().await?;
        if reply.code == 235 {
            return Ok(());
        }
        Err(failed("4.7.8", reply.to_string()))
    }

    pub fn is_tls(&self) -> bool {
        self.conn.stream().is_tls()
    }

    /// The server takes DSN parameters.
    pub fn offers_dsn(&self) -> bool {
        self.capabilities.dsn
    }

    fn refused(&self, reply: Reply) -> ClientError {
        ClientError::Refused {
            peer: self.peer.clone(),
            reply,
        }
    }

    fn lost(&self, message: impl ToString) -> ClientError {
        ClientError::Lost {
            peer: self.peer.clone(),
            message: message.to_string(),
        }
    }

    async fn hello(&mut self, helo_name: &str) -> Result<(), ClientError> {
        let verb = if self.lmtp { "LHLO" } else { "EHLO" };
        self.send_line(&format!("{verb} {helo_name}")).await?;
        let reply = self.read_reply().await?;
        if reply.is_positive() {
            self.capabilities = Capabilities::from_ehlo(&reply);
            return Ok(());
        }
        if self.lmtp {
            // LMTP has no HELO to fall back to (RFC 2033 4.1).
            return Err(self.refused(reply));
        }
        // An old server: fall back to HELO and plain SMTP.
        self.send_line(&format!("HELO {helo_name}")).await?;
        let reply = self.read_reply().await?;
        if !reply.is_positive() {
            return Err(self.refused(reply));
        }
        self.capabilities = Capabilities::default();
        Ok(())
    }

    async fn start_tls(self, options: &ConnectOptions<'_>) -> Result<Client, ClientError> {
        let peer = self.peer.clone();
        let Stream::Plain(tcp) = self.conn.into_stream() else {
            return Err(ClientError::Tls {
                peer,
                message: "not a plain stream".to_string(),
            });
        };
        // Under `require` (or DANE) the handshake itself refuses a certificate that does not
        // check out; otherwise any certificate is taken and judged afterwards, for the log line.
        let dane = match &options.dane {
            Some(Dane::Authenticate(config)) => Some(config.clone()),
            _ => None,
        };
        let verify = options.tls == TlsPolicy::Require || dane.is_some();
        let unverified = |message: String| ClientError::Unverified {
            peer: peer.clone(),
            message,
        };
        let name = match crate::net::verify::server_name(options.server_name) {
            Ok(name) => name,
            Err(message) if verify => return Err(unverified(message)),
            // SNI is a courtesy here: any name gets the handshake going.
            Err(_) => rustls::pki_types::ServerName::try_from("invalid.invalid")
                .map_err(|error| unverified(error.to_string()))?,
        };
        let config = match dane {
            Some(config) => config,
            None => options.client_tls.config(verify).map_err(&unverified)?,
        };
        let connector = tokio_rustls::TlsConnector::from(config);
        let handshake =
            tokio::time::timeout(options.command_timeout, connector.connect(name, tcp)).await;
        let tls = match handshake {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) if verify && is_certificate_error(&error) => {
                return Err(unverified(error.to_string()))
            }
            Ok(Err(error)) => {
                return Err(ClientError::Tls {
                    peer,
                    message: error.to_string(),
                })
            }
            Err(_) => {
                return Err(ClientError::Tls {
                    peer,
                    message: "handshake timed out".to_string(),
                })
            }
        };
        let state = if verify {
            TlsState::Verified
        } else {
            let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
            match options.client_tls.check(chain, options.server_name) {
                Ok(()) => TlsState::Verified,
                Err(reason) => {
                    tracing::debug!(peer = %peer, %reason, "certificate not verified");
                    TlsState::Unverified
                }
            }
        };
        Ok(Client {
            conn: Conn::new(Stream::ClientTls(Box::new(tls))),
            capabilities: Capabilities::default(),
            command_timeout: self.command_timeout,
            peer: self.peer,
            transactions: 0,
            tls: state,
            authenticated_host: self.authenticated_host,
            lmtp: self.lmtp,
        })
    }

    async fn send_line(&mut self, line: &str) -> Result<(), ClientError> {
        self.conn.queue(line.as_bytes());
        self.conn.queue(b"\r\n");
        self.flush().await
    }

    async fn flush(&mut self) -> Result<(), ClientError> {
        match tokio::time::timeout(self.command_timeout, self.conn.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(self.lost(error)),
            Err(_) => Err(self.lost("timeout while sending")),
        }
    }

    /// Reads one (possibly multi-line) reply.
    async fn read_reply(&mut self) -> Result<Reply, ClientError> {
        let mut lines = Vec::new();
        loop {
            let line =
                match tokio::time::timeout(self.command_timeout, self.conn.read_line(4096)).await {
                    Ok(Ok(line)) => line,
                    Ok(Err(error)) => return Err(self.lost(error)),
                    Err(_) => return Err(self.lost("timeout waiting for a reply")),
                };
            if line.end == LineEnd::Eof {
                return Err(self.lost("connection closed by server"));
            }
            let text = String::from_utf8_lossy(&line.bytes).into_owned();
            let code = text
                .get(..3)
                .and_then(|code| code.parse::<u16>().ok())
                .filter(|code| (200..600).contains(code));
            let Some(code) = code else {
                return Err(self.lost(format!("malformed reply `{text}`")));
            };
            let separator = text.as_bytes().get(3).copied().unwrap_or(b' ');
            lines.push(text.get(4..).unwrap_or_default().to_string());
            if separator != b'-' {
                return Ok(Reply::parse_lines(code, lines));
            }
        }
    }

    /// Sends one message. Returns the final reply for each recipient (in envelope order); an
    /// error means the connection is unusable and no recipient's fate is known.
    pub async fn send(
        &mut self,
        envelope: &Envelope<'_>,
        content: &[u8],
    ) -> Result<Vec<Reply>, ClientError> {
        self.transactions += 1;
        if let Some(reply) = self.cannot_take(envelope) {
            return Ok(vec![reply; envelope.recipients.len()]);
        }
        // RFC 6152 3: 8-bit content goes to a server without 8BITMIME only converted to 7 bits;
        // what cannot be converted is returned to its sender. (Off the async workers: a large
        // message takes a while.)
        let converted = if envelope.eight_bit && !self.capabilities.eight_bit_mime {
            let owned = content.to_vec();
            let converted = tokio::task::spawn_blocking(move || {
                crate::mail::seven_bit::seven_bit(&owned).map(std::borrow::Cow::into_owned)
            })
            .await;
            match converted {
                Ok(Ok(converted)) => Some(converted),
                // The conversion task itself failed: nothing is wrong with the message.
                Err(_) => {
                    let reply = Reply::new(451, "4.3.0", "the 7-bit conversion failed");
                    return Ok(vec![reply; envelope.recipients.len()]);
                }
                Ok(Err(error)) => {
                    let reply = Reply::new(
                        554,
                        "5.6.3",
                        format!("{} does not support 8BITMIME and {error}", self.peer),
                    );
                    return Ok(vec![reply; envelope.recipients.len()]);
                }
            }
        } else {
            None
        };
        let content = converted.as_deref().unwrap_or(content);
        // SIZE is what is sent: the converted message, when it was converted.
        let resized = Envelope {
            size: content.len() as u64,
            ..*envelope
        };
        let envelope = &resized;
        if converted.is_some() {
            // Converted, it may be past the server's SIZE where the original was not.
            if let Some(reply) = self.cannot_take(envelope) {
                return Ok(vec![reply; envelope.recipients.len()]);
            }
        }
        let replies = self.exchange(&self.envelope_commands(envelope)).await?;
        let mail_reply = replies[0].clone();
        if !mail_reply.is_positive() {
            self.reset().await?;
            return Ok(vec![mail_reply; envelope.recipients.len()]);
        }
        let rcpt_replies: Vec<Reply> = (0..envelope.recipients.len())
            .map(|index| {
                replies
                    .get(index + 1)
                    .cloned()
                    .unwrap_or_else(|| Reply::new(451, "4.4.0", "no reply to RCPT"))
            })
            .collect();
        let data_reply = replies.get(envelope.recipients.len() + 1).cloned();
        let accepted = rcpt_replies
            .iter()
            .filter(|rcpt| rcpt.is_positive())
            .count();
        let finals = self.content(data_reply, accepted, content).await?;
        // LMTP answers each accepted recipient in turn (RFC 2033 4.2); SMTP, once for all.
        let per_recipient = self.lmtp && accepted > 0 && finals.len() == accepted;
        let mut next_final = finals.iter();
        Ok(rcpt_replies
            .into_iter()
            .map(|rcpt| match (rcpt.is_positive(), per_recipient) {
                (false, _) => rcpt,
                (true, true) => next_final.next().cloned().unwrap_or_else(|| {
                    Reply::new(451, "4.4.0", "no reply for this recipient after the data")
                }),
                (true, false) => finals[0].clone(),
            })
            .collect())
    }

    /// The reply for every recipient when this server cannot take the message at all.
    fn cannot_take(&self, envelope: &Envelope<'_>) -> Option<Reply> {
        if envelope.dsn.requiretls {
            // RFC 8689 4.2.1: never without a verified certificate and a next hop that
            // promises the same; a failure, not a fallback.
            let reason = if self.tls != TlsState::Verified {
                Some("the connection's certificate is not verified")
            } else if !self.authenticated_host {
                Some("the MX host is not authenticated by an MTA-STS policy")
            } else if !self.capabilities.requiretls {
                Some("the server does not offer REQUIRETLS")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Some(Reply::new(
                    550,
                    "5.7.30",
                    format!("REQUIRETLS support required: {} ({reason})", self.peer),
                ));
            }
        }
        if envelope.smtputf8 && !self.capabilities.smtputf8 {
            // RFC 6531 3.4: a message that needs SMTPUTF8 must not be downgraded silently.
            return Some(Reply::new(
                553,
                "5.6.7",
                format!("{} does not support SMTPUTF8", self.peer),
            ));
        }
        let limit = self.capabilities.size?;
        (envelope.size > limit).then(|| {
            Reply::new(
                552,
                "5.3.4",
                format!(
                    "message size {} exceeds {}'s limit of {limit}",
                    envelope.size, self.peer
                ),
            )
        })
    }

    /// MAIL (with the parameters this server takes), one RCPT per recipient, DATA.
    fn envelope_commands(&self, envelope: &Envelope<'_>) -> Vec<String> {
        let mut mail = format!("MAIL FROM:<{}>", envelope.sender);
        if self.capabilities.size.is_some() {
            mail.push_str(&format!(" SIZE={}", envelope.size));
        }
        if envelope.eight_bit && self.capabilities.eight_bit_mime {
            mail.push_str(" BODY=8BITMIME");
        }
        if envelope.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        let dsn = self.capabilities.dsn;
        if dsn {
            if let Some(ret) = envelope.dsn.ret {
                mail.push_str(&format!(" RET={}", ret.as_str()));
            }
            if let Some(envid) = &envelope.dsn.envid {
                mail.push_str(&format!(" ENVID={envid}"));
            }
        }
        if envelope.dsn.requiretls {
            mail.push_str(" REQUIRETLS");
        }
        let rcpt = |(index, recipient): (usize, &String)| {
            let mut command = format!("RCPT TO:<{recipient}>");
            let given = envelope.recipient_dsn.get(index).filter(|_| dsn);
            if let Some(given) = given {
                if given.notify.is_specified() {
                    command.push_str(&format!(" NOTIFY={}", given.notify));
                }
                if let Some(orcpt) = &given.orcpt {
                    command.push_str(&format!(" ORCPT={orcpt}"));
                }
            }
            command
        };
        std::iter::once(mail)
            .chain(envelope.recipients.iter().enumerate().map(rcpt))
            .chain(std::iter::once("DATA".to_string()))
            .collect()
    }

    /// Sends the envelope's commands, all at once with PIPELINING, else one by one (stopping
    /// after a refused MAIL, or before DATA when no RCPT was accepted). One reply per command
    /// sent.
    async fn exchange(&mut self, commands: &[String]) -> Result<Vec<Reply>, ClientError> {
        let mut replies = Vec::with_capacity(commands.len());
        if self.capabilities.pipelining {
            for command in commands {
                self.conn.queue(command.as_bytes());
                self.conn.queue(b"\r\n");
            }
            self.flush().await?;
            for _ in commands {
                replies.push(self.read_reply().await?);
            }
            return Ok(replies);
        }
        for command in commands {
            self.send_line(command).await?;
            let reply = self.read_reply().await?;
            let stop = (replies.is_empty() && !reply.is_positive()) || command == "DATA";
            replies.push(reply);
            if stop {
                break;
            }
            let accepted = replies.iter().skip(1).any(Reply::is_positive);
            if replies.len() == commands.len() - 1 && !accepted {
                break;
            }
        }
        Ok(replies)
    }

    /// After DATA's reply: the content (dot-stuffed) and the final reply (LMTP: one per
    /// accepted recipient), or the reason there was none.
    async fn content(
        &mut self,
        data_reply: Option<Reply>,
        accepted: usize,
        content: &[u8],
    ) -> Result<Vec<Reply>, ClientError> {
        match data_reply {
            Some(reply) if reply.code == 354 => {
                if accepted > 0 {
                    let stuffed = dot_stuff(content);
                    self.conn.queue(&stuffed);
                    self.conn.queue(b".\r\n");
                } else {
                    // A server that said 354 with no recipient gets an empty message it will refuse.
                    self.conn.queue(b".\r\n");
                }
                self.flush().await?;
                let count = if self.lmtp { accepted.max(1) } else { 1 };
                let mut finals = Vec::with_capacity(count);
                for _ in 0..count {
                    finals.push(self.read_reply().await?);
                }
                Ok(finals)
            }
            Some(reply) => {
                self.reset().await?;
                Ok(vec![reply])
            }
            None => {
                self.reset().await?;
                Ok(vec![Reply::new(554, "5.5.1", "no valid recipients")])
            }
        }
    }

    async fn reset(&mut self) -> Result<(), ClientError> {
        self.send_line("RSET").await?;
        self.read_reply().await.map(|_| ())
    }

    /// Whether the session still answers: RSET, and a 250 within a few seconds (Postfix checks
    /// a cached connection the same way before it reuses it).
    pub async fn still_open(&mut self) -> bool {
        const CHECK: std::time::Duration = std::time::Duration::from_secs(5);
        let answered = async {
            self.send_line("RSET").await?;
            self.read_reply().await
        };
        matches!(
            tokio::time::timeout(CHECK, answered).await,
            Ok(Ok(reply)) if reply.code == 250
        )
    }

    /// Ends the session politely.
    pub async fn quit(mut self) {
        if self.send_line("QUIT").await.is_ok() {
            let _ = self.read_reply().await;
        }
        self.conn.shutdown().await;
    }
}

/// Whether a failed handshake failed on the server's certificate (rather than on the network).
fn is_certificate_error(error: &std::io::Error) -> bool {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|error| {
            matches!(
                error,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            )
        })
}

/// Doubles a leading dot on every line (RFC 5321 4.5.2). `content` ends with CRLF.
pub fn dot_stuff(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 64);
    let mut start = 0;
    if content.first() == Some(&b'.') {
        out.push(b'.');
    }
    for position in memchr::memmem::find_iter(content, b"\n.") {
        out.extend_from_slice(&content[start..=position]);
        out.push(b'.');
        start = position + 1;
    }
    out.extend_from_slice(&content[start..]);
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stuffing() {
        assert_eq!(
            dot_stuff(b".a\r\nb\r\n.\r\n..c\r\n"),
            b"..a\r\nb\r\n..\r\n...c\r\n"
        );
        assert_eq!(dot_stuff(b"plain\r\n"), b"plain\r\n");
    }

    #[test]
    fn capabilities() {
        let reply = Reply::multiline(
            250,
            vec![
                "mx".into(),
                "PIPELINING".into(),
                "SIZE 1000".into(),
                "STARTTLS".into(),
                "SMTPUTF8".into(),
            ],
        );
        let capabilities = Capabilities::from_ehlo(&reply);
        assert!(capabilities.pipelining && capabilities.starttls && capabilities.smtputf8);
        assert!(!capabilities.eight_bit_mime);
        assert_eq!(capabilities.size, Some(1000));
    }
}
