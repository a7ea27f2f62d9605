//! One SMTP session: the RFC 5321 state machine with ESMTP extensions (PIPELINING, SIZE,
//! 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES, CHUNKING, STARTTLS, AUTH on submission listeners).
//!
//! The decisions taken here (relay control, recipient limits) are the seams where plugin hooks
//! plug in: connect, helo, mail-from, rcpt-to and data each have one method below.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;
use tracing::Instrument;

use super::authenticate::{authenticate, Check, Client};
use super::content::{self, Trace};
use super::data_reader::{Chunk, ContentReader, Faults, Framing};
use super::limits::canonical;
use crate::config::ListenerConfig;
use crate::net::conn::Conn;
use crate::net::line::{Framer, LineEnd};
use crate::net::stream::Stream;
use crate::plugins::chain::DataDecision;
use crate::plugins::hooks::HookKind;
use crate::plugins::PluginRun;
use crate::queue::{
    now_millis, MessageMeta, NewMessage, QueuedMessage, RecipientRow, RecipientState,
};
use crate::services::Services;
use crate::smtp::address::{domain_key, parse_path_argument, Mailbox};
use crate::smtp::reply::Reply;

/// The mail transaction under way (between MAIL and the end of DATA/BDAT LAST).
#[derive(Default)]
pub(super) struct Transaction {
    /// `Some(None)` is the null sender `<>`.
    pub(super) sender: Option<Option<Mailbox>>,
    pub(super) recipients: Vec<Mailbox>,
    pub(super) smtputf8: bool,
    pub(super) eight_bit_mime: bool,
    /// Content received so far by BDAT chunks; `Some` once the first chunk came.
    pub(super) chunks: Option<ContentReader>,
}

pub(super) enum Greeting {
    None,
    Helo(String),
    Ehlo(String),
}

/// What the command loop does after a command.
pub(super) enum Flow {
    Continue,
    Close,
    StartTls,
}

pub struct Session {
    pub(super) conn: Conn,
    pub(super) client_ip: IpAddr,
    pub(super) listener: Arc<ListenerConfig>,
    pub(super) services: Arc<Services>,
    pub(super) greeting: Greeting,
    pub(super) transaction: Transaction,
    errors: u32,
    /// Who the client authenticated as with AUTH (see `submission.rs`).
    pub(super) auth_identity: Option<String>,
    /// Plugin instances of the transaction under way (see `policy.rs`).
    pub(super) run: Option<PluginRun>,
}

impl Session {
    pub async fn run(
        stream: TcpStream,
        peer: SocketAddr,
        listener: Arc<ListenerConfig>,
        services: Arc<Services>,
    ) {
        let span = tracing::info_span!("smtp", client = %peer, listener = %listener.name);
        async move {
            tracing::debug!("connected");
            if !listener.greeting_delay.is_zero()
                && talks_first(&stream, listener.greeting_delay).await
            {
                tracing::info!("refused: client talked before the greeting");
                let mut conn = Conn::new(Stream::Plain(stream))
                    .with_write_timeout(services.config.smtp.command_timeout);
                conn.queue(
                    Reply::new(
                        554,
                        "5.5.1",
                        "Protocol error: client talked before the greeting",
                    )
                    .to_wire()
                    .as_bytes(),
                );
                conn.shutdown().await;
                return;
            }
            let mut session = Session {
                conn: Conn::new(Stream::Plain(stream))
                    .with_write_timeout(services.config.smtp.command_timeout),
                client_ip: canonical(peer.ip()),
                listener,
                services,
                greeting: Greeting::None,
                transaction: Transaction::default(),
                errors: 0,
                auth_identity: None,
                run: None,
            };
            if let Err(error) = session.serve().await {
                tracing::debug!(%error, "session ended with an I/O error");
            }
            session.conn.close_lingering().await;
            tracing::debug!("disconnected");
        }
        .instrument(span)
        .await
    }

    pub(super) fn config(&self) -> &crate::config::Config {
        &self.services.config
    }

    pub(super) fn reply(&mut self, reply: Reply) {
        self.conn.queue(reply.to_wire().as_bytes());
    }

    async fn serve(&mut self) -> std::io::Result<()> {
        if let Some(refusal) = self.ask_connect().await {
            tracing::info!(reply = %refusal, "connection refused by plugin");
            self.reply(refusal);
            return self.conn.flush().await;
        }
        let greeting = Reply::plain(220, format!("{} ESMTP Switchyard", self.config().hostname));
        self.reply(greeting);
        self.conn.flush().await?;
        let shutdown = self.services.shutdown.clone();
        loop {
            let limits = &self.services.config.smtp;
            let (timeout, max_line) = (limits.command_timeout, limits.max_command_line);
            if shutdown.is_stopping() {
                return self.closing_for_shutdown().await;
            }
            // A session waiting for its client's next command is told of a stop at once.
            let read = tokio::select! {
                read = tokio::time::timeout(timeout, self.conn.read_line(max_line.saturating_sub(2))) => read,
                _ = shutdown.stopping() => return self.closing_for_shutdown().await,
            };
            let line = match read {
                Ok(line) => line?,
                Err(_) => {
                    tracing::info!("command timeout");
                    self.reply(Reply::new(
                        421,
                        "4.4.2",
                        "Timeout exceeded, closing connection",
                    ));
                    return self.conn.flush().await;
                }
            };
            let flow = match line.end {
                LineEnd::Eof => return Ok(()),
                LineEnd::BareLf => self.error(Reply::new(
                    500,
                    "5.5.2",
                    "Bare LF in command; lines must end with CRLF",
                )),
                LineEnd::Crlf if line.too_long => {
                    self.error(Reply::new(500, "5.5.2", "Command line too long"))
                }
                LineEnd::Crlf if line.has_bare_cr() => {
                    self.error(Reply::new(500, "5.5.2", "Bare CR in command"))
                }
                LineEnd::Crlf if line.has_control_character() => self.error(Reply::new(
                    500,
                    "5.5.2",
                    "Control characters in commands are not allowed",
                )),
                LineEnd::Crlf => match std::str::from_utf8(&line.bytes) {
                    Ok(text) => {
                        let text = text.to_string();
                        self.command(&text).await?
                    }
                    Err(_) => self.error(Reply::new(500, "5.5.2", "Command is not valid UTF-8")),
                },
            };
            if self.errors >= self.config().smtp.max_errors {
                self.reply(Reply::new(
                    421,
                    "4.7.0",
                    "Too many errors, closing connection",
                ));
                return self.conn.flush().await;
            }
            match flow {
                Flow::Continue => self.conn.flush_if_idle().await?,
                Flow::Close => return self.conn.flush().await,
                Flow::StartTls => {
                    self.conn.flush().await?;
                    self.start_tls().await?;
                }
            }
        }
    }

    /// The last reply of a session cut short by a stop (RFC 5321 3.8: 421, then close).
    async fn closing_for_shutdown(&mut self) -> std::io::Result<()> {
        self.reply_shutting_down();
        self.conn.flush().await
    }

    /// Queues the 421 of a stop.
    pub(super) fn reply_shutting_down(&mut self) {
        tracing::info!("session closed: server shutting down");
        let hostname = self.config().hostname.clone();
        self.reply(Reply::new(
            421,
            "4.3.2",
            format!("{hostname} Service shutting down, try again later"),
        ));
    }

    /// Counts a protocol error and queues its reply.
    pub(super) fn error(&mut self, reply: Reply) -> Flow {
        self.errors += 1;
        self.reply(reply);
        Flow::Continue
    }

    async fn command(&mut self, line: &str) -> std::io::Result<Flow> {
        let (verb, argument) = match line.split_once(' ') {
            Some((verb, argument)) => (verb, argument),
            None => (line, ""),
        };
        let verb = verb.to_ascii_uppercase();
        tracing::trace!(command = %verb, "command");
        Ok(match verb.as_str() {
            "EHLO" => self.helo(argument, true).await,
            "HELO" => self.helo(argument, false).await,
            "MAIL" => self.mail(argument).await,
            "RCPT" => self.rcpt(argument).await,
            "DATA" => return self.data(argument).await,
            "BDAT" => return self.bdat(argument).await,
            "AUTH" => return self.auth_command(argument).await,
            "RSET" => {
                self.transaction = Transaction::default();
                self.end_plugin_run();
                self.reply(Reply::new(250, "2.0.0", "Ok"));
                Flow::Continue
            }
            "NOOP" => {
                self.reply(Reply::new(250, "2.0.0", "Ok"));
                Flow::Continue
            }
            "QUIT" => {
                self.reply(Reply::new(221, "2.0.0", "Bye"));
                Flow::Close
            }
            "HELP" => {
                self.reply(Reply::new(
                    214,
                    "2.0.0",
                    "Commands: EHLO HELO AUTH MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY STARTTLS",
                ));
                Flow::Continue
            }
            "VRFY" | "EXPN" => {
                self.reply(Reply::new(
                    252,
                    "2.5.0",
                    "Cannot VRFY user, but will accept message and attempt delivery",
                ));
                Flow::Continue
            }
            "STARTTLS" => self.starttls_command(argument),
            _ => self.error(Reply::new(500, "5.5.2", "Command not recognized")),
        })
    }

    async fn helo(&mut self, argument: &str, extended: bool) -> Flow {
        let name = argument.trim();
        if name.is_empty() || name.contains(char::is_whitespace) {
            let verb = if extended { "EHLO" } else { "HELO" };
            return self.error(Reply::new(501, "5.5.4", format!("Syntax: {verb} hostname")));
        }
        self.transaction = Transaction::default();
        if let Some(refusal) = self.ask_helo(name).await {
            self.reply(refusal);
            return Flow::Continue;
        }
        let hostname = self.config().hostname.clone();
        if !extended {
            self.greeting = Greeting::Helo(name.to_string());
            self.reply(Reply::plain(250, hostname));
            return Flow::Continue;
        }
        self.greeting = Greeting::Ehlo(name.to_string());
        let mut lines = vec![
            hostname,
            "PIPELINING".to_string(),
            format!("SIZE {}", self.config().smtp.max_message_size),
            "8BITMIME".to_string(),
            "SMTPUTF8".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
            "CHUNKING".to_string(),
        ];
        if self.services.tls_acceptor.is_some() && !self.conn.stream().is_tls() {
            lines.push("STARTTLS".to_string());
        }
        if let Some(auth) = self.auth_keyword() {
            lines.push(auth);
        }
        lines.push("HELP".to_string());
        self.reply(Reply::multiline(250, lines));
        Flow::Continue
    }

    async fn mail(&mut self, argument: &str) -> Flow {
        if matches!(self.greeting, Greeting::None) {
            return self.error(Reply::new(503, "5.5.1", "Error: send HELO/EHLO first"));
        }
        if self.transaction.sender.is_some() {
            return self.error(Reply::new(503, "5.5.1", "Error: nested MAIL command"));
        }
        let Some(path) = argument
            .get(..5)
            .filter(|from| from.eq_ignore_ascii_case("FROM:"))
            .map(|_| &argument[5..])
        else {
            return self.error(Reply::new(501, "5.5.4", "Syntax: MAIL FROM:<address>"));
        };
        let parsed = match parse_path_argument(path) {
            Ok(parsed) => parsed,
            Err(reply) => return self.error(reply),
        };
        let extended = matches!(self.greeting, Greeting::Ehlo(_));
        let mut transaction = Transaction::default();
        for (keyword, value) in &parsed.params {
            if !extended {
                return self.error(Reply::new(555, "5.5.4", "MAIL parameters need EHLO"));
            }
            match (keyword.as_str(), value.as_deref()) {
                ("SIZE", Some(size)) => {
                    let Ok(size) = size.parse::<u64>() else {
                        return self.error(Reply::new(501, "5.5.4", "Bad SIZE parameter"));
                    };
                    let max = self.config().smtp.max_message_size;
                    if size > max {
                        self.reply(Reply::new(
                            552,
                            "5.3.4",
                            format!(
                                "Message size exceeds fixed maximum message size of {max} bytes"
                            ),
                        ));
                        return Flow::Continue;
                    }
                }
                ("BODY", Some(body)) if body.eq_ignore_ascii_case("8BITMIME") => {
                    transaction.eight_bit_mime = true
                }
                ("BODY", Some(body)) if body.eq_ignore_ascii_case("7BIT") => {}
                ("SMTPUTF8", None) => transaction.smtputf8 = true,
                // RFC 4954 5: the identity the message was submitted by; we know our own.
                ("AUTH", Some(_)) if self.offers_auth() => {}
                _ => {
                    return self.error(Reply::new(
                        555,
                        "5.5.4",
                        format!("Unsupported parameter {keyword}"),
                    ))
                }
            }
        }
        if let Some(mailbox) = &parsed.mailbox {
            if !mailbox.is_ascii() && !transaction.smtputf8 {
                return self.error(Reply::new(
                    553,
                    "5.6.7",
                    "Non-ASCII sender address needs SMTPUTF8",
                ));
            }
        }
        if let Some(refusal) = self.authentication_required() {
            self.reply(refusal);
            return Flow::Continue;
        }
        let sender = match self.ask_mail_from(&parsed).await {
            Ok(sender) => sender,
            Err(refusal) => {
                self.reply(refusal);
                return Flow::Continue;
            }
        };
        let shown = sender.as_ref().map(|m| m.to_string()).unwrap_or_default();
        transaction.sender = Some(sender);
        self.transaction = transaction;
        tracing::debug!(from = %shown, "MAIL accepted");
        self.reply(Reply::new(250, "2.1.0", "Ok"));
        Flow::Continue
    }

    async fn rcpt(&mut self, argument: &str) -> Flow {
        if self.transaction.sender.is_none() {
            return self.error(Reply::new(503, "5.5.1", "Error: need MAIL command"));
        }
        let Some(path) = argument
            .get(..3)
            .filter(|to| to.eq_ignore_ascii_case("TO:"))
            .map(|_| &argument[3..])
        else {
            return self.error(Reply::new(501, "5.5.4", "Syntax: RCPT TO:<address>"));
        };
        let parsed = match parse_path_argument(path) {
            Ok(parsed) => parsed,
            Err(reply) => return self.error(reply),
        };
        if let Some((keyword, _)) = parsed.params.first() {
            return self.error(Reply::new(
                555,
                "5.5.4",
                format!("Unsupported parameter {keyword}"),
            ));
        }
        let Some(recipient) = parsed.mailbox.clone() else {
            return self.error(Reply::new(
                501,
                "5.1.3",
                "Bad recipient address syntax: empty path",
            ));
        };
        if !recipient.is_ascii() && !self.transaction.smtputf8 {
            return self.error(Reply::new(
                553,
                "5.6.7",
                "Non-ASCII recipient address needs SMTPUTF8",
            ));
        }
        if self.transaction.recipients.len() >= self.config().smtp.max_recipients {
            self.reply(Reply::new(452, "4.5.3", "Too many recipients"));
            return Flow::Continue;
        }
        let (recipient, accepted_by_plugin) = match self.ask_rcpt_to(&recipient, &parsed).await {
            Ok(answer) => answer,
            Err(refusal) => {
                self.reply(refusal);
                return Flow::Continue;
            }
        };
        if !accepted_by_plugin && !self.may_send_to(&recipient) {
            tracing::info!(to = %recipient, "relay denied");
            self.reply(Reply::new(
                550,
                "5.7.1",
                format!("<{recipient}>: Relay access denied"),
            ));
            return Flow::Continue;
        }
        self.transaction.recipients.push(recipient);
        self.reply(Reply::new(250, "2.1.5", "Ok"));
        Flow::Continue
    }

    /// No open relay: anyone may send to the domains we accept; only listed networks and
    /// authenticated clients elsewhere.
    fn may_send_to(&self, recipient: &Mailbox) -> bool {
        let domain = recipient.domain_key();
        self.config()
            .relay
            .domains
            .iter()
            .any(|accepted| domain_key(accepted) == domain)
            || self.in_relay_networks()
            || self.auth_identity.is_some()
    }

    async fn data(&mut self, argument: &str) -> std::io::Result<Flow> {
        if !argument.trim().is_empty() {
            return Ok(self.error(Reply::new(501, "5.5.4", "Syntax: DATA")));
        }
        if self.transaction.sender.is_none() {
            return Ok(self.error(Reply::new(503, "5.5.1", "Error: need MAIL command")));
        }
        if self.transaction.chunks.is_some() {
            return Ok(self.error(Reply::new(503, "5.5.1", "Error: DATA after BDAT")));
        }
        if self.transaction.recipients.is_empty() {
            return Ok(self.error(Reply::new(554, "5.5.1", "Error: no valid recipients")));
        }
        self.reply(Reply::plain(354, "End data with <CR><LF>.<CR><LF>"));
        self.conn.flush().await?;
        let limits = &self.services.config.smtp;
        let mut reader = ContentReader::new(
            Framing::Dotted,
            limits.max_message_size,
            limits.max_data_line,
        );
        if let Some(flow) = self.read_content(&mut reader, "DATA").await? {
            return Ok(flow);
        }
        let (message, faults) = reader.finish();
        Ok(self.end_of_content(message, faults).await)
    }

    async fn bdat(&mut self, argument: &str) -> std::io::Result<Flow> {
        let mut words = argument.split_whitespace();
        let size = words.next().and_then(|size| size.parse::<u64>().ok());
        let last = match words.next() {
            None => false,
            Some(word) if word.eq_ignore_ascii_case("LAST") => true,
            Some(_) => false,
        };
        let Some(size) =
            size.filter(|_| words.next().is_none() && argument.split_whitespace().count() <= 2)
        else {
            // Without a size we cannot tell where the chunk ends: the session cannot go on.
            self.reply(Reply::new(
                501,
                "5.5.4",
                "Syntax: BDAT size [LAST]; closing connection",
            ));
            return Ok(Flow::Close);
        };
        let ready = self.transaction.sender.is_some() && !self.transaction.recipients.is_empty();
        let limits = &self.services.config.smtp;
        let mut content = self.transaction.chunks.take().unwrap_or_else(|| {
            ContentReader::new(
                Framing::Chunked,
                limits.max_message_size,
                limits.max_data_line,
            )
        });
        if size > 0 {
            // A chunk the transaction cannot take is still read, to stay in step.
            let mut chunk = Chunk {
                remaining: size,
                into: ready.then_some(&mut content),
            };
            if let Some(flow) = self.read_content(&mut chunk, "BDAT").await? {
                return Ok(flow);
            }
        }
        if !ready {
            let reply = if self.transaction.sender.is_none() {
                Reply::new(503, "5.5.1", "Error: need MAIL command")
            } else {
                Reply::new(554, "5.5.1", "Error: no valid recipients")
            };
            return Ok(self.error(reply));
        }
        if !last {
            self.transaction.chunks = Some(content);
            self.reply(Reply::new(250, "2.0.0", format!("{size} octets received")));
            return Ok(Flow::Continue);
        }
        let (mut message, faults) = content.finish();
        if !message.is_empty() && !message.ends_with(b"\r\n") {
            message.extend_from_slice(b"\r\n");
        }
        Ok(self.end_of_content(message, faults).await)
    }

    /// Reads message content with `framer` within `data_timeout`: `None` once it is all in,
    /// `Some(Flow::Close)` when the client took too long or went away first (nothing is queued).
    async fn read_content(
        &mut self,
        framer: &mut impl Framer,
        verb: &str,
    ) -> std::io::Result<Option<Flow>> {
        let timeout = self.config().smtp.data_timeout;
        let shutdown = self.services.shutdown.clone();
        // A stop lets content under way finish, unless the drain time runs out first.
        let read = tokio::select! {
            read = tokio::time::timeout(timeout, self.conn.read_frame(framer)) => read,
            _ = shutdown.cut() => {
                self.reply_shutting_down();
                return Ok(Some(Flow::Close));
            }
        };
        match read {
            Err(_) => {
                tracing::info!("{verb} timeout");
                self.reply(Reply::new(
                    421,
                    "4.4.2",
                    format!("Timeout exceeded during {verb}, closing connection"),
                ));
                Ok(Some(Flow::Close))
            }
            Ok(Ok(true)) => Ok(None),
            Ok(Ok(false)) => {
                tracing::info!("client disconnected during {verb}; nothing queued");
                Ok(Some(Flow::Close))
            }
            Ok(Err(error)) => Err(error),
        }
    }

    /// Ends the transaction once its content is in: refuses content with a fault (and closes
    /// the session when the fault says the client's framing cannot be trusted), else queues it.
    async fn end_of_content(&mut self, message: Vec<u8>, faults: Faults) -> Flow {
        let limits = &self.services.config.smtp;
        let Some(refusal) = faults.refusal(limits.max_message_size, limits.max_data_line) else {
            let reply = self.finish_message(message).await;
            self.reply(reply);
            return Flow::Continue;
        };
        tracing::info!(reply = %refusal.reply, close = refusal.close, "message refused");
        self.transaction = Transaction::default();
        self.end_plugin_run();
        self.reply(refusal.reply);
        if !refusal.close {
            return Flow::Continue;
        }
        // RFC 5321 3.8: a server that closes says 421 first. The client gets it where it
        // expects its next reply.
        let hostname = self.config().hostname.clone();
        self.reply(Reply::new(
            421,
            "4.5.2",
            format!("{hostname} closing connection after malformed message content"),
        ));
        Flow::Close
    }

    /// Ends the transaction with content that passed the checks: stamps it, asks the data hooks
    /// and queues it.
    /// The reply is 250 only once the queue has committed the message.
    async fn finish_message(&mut self, message: Vec<u8>) -> Reply {
        let reply = self.accept_message(message).await;
        self.end_plugin_run();
        reply
    }

    async fn accept_message(&mut self, message: Vec<u8>) -> Reply {
        let envelope = self.wit_envelope();
        let transaction = std::mem::take(&mut self.transaction);
        let limits = &self.services.config.smtp;
        if content::count_headers(&message, "Received") > limits.max_received_headers {
            return Reply::new(
                554,
                "5.4.6",
                "Too many hops: Received headers suggest a mail loop",
            );
        }
        let queue_id = ulid::Ulid::new().to_string();
        let mut stamped = self.stamp(message, &transaction, &queue_id);
        let verdicts = match self.sender_check(&envelope.sender) {
            Some(check) => Some(authenticate(check, &stamped).await),
            None => None,
        };
        if let Some(verdicts) = &verdicts {
            stamped = content::remove_forged_results(&stamped, &self.config().hostname);
            stamped.splice(0..0, verdicts.header.bytes());
        }
        let sender = envelope.sender.clone();
        let mut recipients = envelope.recipients.clone();
        let mut content = Bytes::from(stamped);
        let mut quarantine = None;
        if let Some((decision, edits)) =
            self.ask_data(&queue_id, envelope, &content, verdicts).await
        {
            match decision {
                DataDecision::Reject(reply) | DataDecision::Tempfail(reply) => {
                    tracing::info!(queue_id = %queue_id, reply = %reply, "message refused by plugin");
                    return reply;
                }
                DataDecision::Discard => {
                    tracing::info!(queue_id = %queue_id, "message discarded by plugin");
                    return Reply::new(250, "2.0.0", format!("Ok: queued as {queue_id}"));
                }
                DataDecision::Quarantine(reason) => quarantine = Some(reason),
                DataDecision::Accept | DataDecision::Continue => {}
            }
            content = Bytes::from(content::edit_headers(&content, &edits));
            content::edit_recipients(&mut recipients, &edits);
            if recipients.is_empty() {
                tracing::info!(queue_id = %queue_id, "plugins removed every recipient; message dropped");
                return Reply::new(250, "2.0.0", format!("Ok: queued as {queue_id}"));
            }
        }
        let received_at = now_millis();
        let meta = MessageMeta {
            id: queue_id.clone(),
            sender: sender.clone(),
            received_at,
            size: content.len() as u64,
            smtputf8: transaction.smtputf8,
            eight_bit: transaction.eight_bit_mime || content.iter().any(|&b| b >= 0x80),
        };
        let lease_until = received_at + self.services.config.queue.lease.as_millis() as i64;
        let new = NewMessage {
            meta: meta.clone(),
            recipients: recipients.clone(),
            content: content.clone(),
            quarantine: quarantine.clone(),
        };
        let lease = quarantine
            .is_none()
            .then(|| (self.services.node_id.clone(), lease_until));
        if let Err(error) = self.services.queue.enqueue(new, lease).await {
            tracing::error!(queue_id = %queue_id, %error, "cannot queue message");
            return Reply::new(
                451,
                "4.3.0",
                "Temporary queue failure, please try again later",
            );
        }
        tracing::info!(
            queue_id = %queue_id,
            listener = %self.listener.name,
            from = %sender,
            recipients = recipients.len(),
            size = meta.size,
            quarantine = quarantine.as_deref().unwrap_or("-"),
            "queued"
        );
        metrics::counter!("switchyard_messages_accepted_total").increment(1);
        if quarantine.is_none() {
            let queued = QueuedMessage {
                meta,
                recipients: recipients
                    .into_iter()
                    .enumerate()
                    .map(|(index, address)| RecipientRow {
                        index: index as i64,
                        address,
                        state: RecipientState::Queued,
                        attempts: 0,
                        next_attempt: received_at,
                        last_reply: None,
                    })
                    .collect(),
            };
            // The transaction's plugin instances go on to serve this message's route and
            // delivery-result hooks, so a message costs one instantiation per plugin, not three.
            let run = self.run.take().and_then(|run| {
                self.services.plugins.hold(
                    run,
                    &[HookKind::Route, HookKind::DeliveryResult, HookKind::Bounce],
                )
            });
            self.services.dispatcher.submit(queued, Some(content), run);
        }
        Reply::new(250, "2.0.0", format!("Ok: queued as {queue_id}"))
    }

    /// Prepends the Received header (and a Message-ID if missing).
    /// What SPF, DKIM and DMARC checks of this message need, if it is to be checked: verification
    /// is on, an inbound listener got it, from a client outside `relay.networks`.
    fn sender_check(&self, sender: &str) -> Option<Check> {
        let authenticator = self.services.authenticator.clone()?;
        if self.in_relay_networks() || self.listener.role != crate::config::ListenerRole::Inbound {
            return None;
        }
        let helo = match &self.greeting {
            Greeting::Ehlo(name) | Greeting::Helo(name) => name.clone(),
            Greeting::None => String::new(),
        };
        Some(Check {
            authenticator,
            hostname: self.config().hostname.clone(),
            client: Client {
                ip: self.client_ip,
                helo,
                sender: sender.to_string(),
            },
        })
    }

    fn stamp(&self, message: Vec<u8>, transaction: &Transaction, queue_id: &str) -> Vec<u8> {
        let tls = self.conn.stream().tls_description();
        // RFC 3848 and RFC 6531: S for TLS, A for an authenticated client.
        let authenticated = self.auth_identity.is_some();
        let protocol = match (
            &self.greeting,
            transaction.smtputf8,
            tls.is_some(),
            authenticated,
        ) {
            (Greeting::Ehlo(_), true, true, true) => "UTF8SMTPSA",
            (Greeting::Ehlo(_), true, true, false) => "UTF8SMTPS",
            (Greeting::Ehlo(_), true, false, true) => "UTF8SMTPA",
            (Greeting::Ehlo(_), true, false, false) => "UTF8SMTP",
            (Greeting::Ehlo(_), false, true, true) => "ESMTPSA",
            (Greeting::Ehlo(_), false, true, false) => "ESMTPS",
            (Greeting::Ehlo(_), false, false, true) => "ESMTPA",
            (Greeting::Ehlo(_), false, false, false) => "ESMTP",
            _ => "SMTP",
        };
        let helo = match &self.greeting {
            Greeting::Ehlo(name) | Greeting::Helo(name) => name.as_str(),
            Greeting::None => "unknown",
        };
        let trace = Trace {
            helo,
            client_ip: self.client_ip,
            hostname: &self.services.config.hostname,
            protocol,
            tls,
            queue_id,
            single_recipient: (transaction.recipients.len() == 1)
                .then(|| transaction.recipients[0].to_string()),
        };
        content::stamp(message, &trace)
    }

    fn starttls_command(&mut self, argument: &str) -> Flow {
        if !argument.trim().is_empty() {
            return self.error(Reply::new(501, "5.5.4", "Syntax: STARTTLS"));
        }
        if self.services.tls_acceptor.is_none() || self.conn.stream().is_tls() {
            return self.error(Reply::new(454, "4.7.0", "TLS not available"));
        }
        if self.conn.has_buffered_input() {
            // Commands pipelined after STARTTLS would cross into the TLS session (CVE-2011-0411).
            self.reply(Reply::new(
                554,
                "5.5.1",
                "Error: commands pipelined after STARTTLS",
            ));
            return Flow::Close;
        }
        self.reply(Reply::new(220, "2.0.0", "Ready to start TLS"));
        Flow::StartTls
    }

    async fn start_tls(&mut self) -> std::io::Result<()> {
        let Some(acceptor) = self.services.tls_acceptor.clone() else {
            return Ok(());
        };
        let conn = std::mem::replace(&mut self.conn, Conn::new(Stream::Detached));
        let Stream::Plain(tcp) = conn.into_stream() else {
            return Err(std::io::Error::other("STARTTLS on a TLS stream"));
        };
        // A client that asks for TLS and then says nothing must not hold the session forever.
        let timeout = self.config().smtp.command_timeout;
        let tls = tokio::time::timeout(timeout, acceptor.accept(tcp))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
            })??;
        self.conn = Conn::new(Stream::ServerTls(Box::new(tls))).with_write_timeout(timeout);
        // RFC 3207 4.2: forget everything learnt before TLS.
        self.greeting = Greeting::None;
        self.transaction = Transaction::default();
        self.auth_identity = None;
        tracing::debug!(tls = ?self.conn.stream().tls_description(), "TLS established");
        Ok(())
    }
}

/// Waits up to `delay` for the client to send anything before our greeting.
async fn talks_first(stream: &TcpStream, delay: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(tokio::time::timeout(delay, stream.peek(&mut byte)).await, Ok(Ok(n)) if n > 0)
}
