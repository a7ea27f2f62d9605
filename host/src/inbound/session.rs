//! One SMTP session: the RFC 5321 state machine with ESMTP extensions (PIPELINING, SIZE,
//! 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES, CHUNKING, STARTTLS, AUTH on submission listeners).
//! This file holds the session's state, the command loop and the dispatch by verb; each verb's
//! work is in its own file (`envelope.rs`, `data.rs`, `tls.rs`, `submission.rs`), as Stalwart's
//! inbound folder does.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tracing::Instrument;

use super::data_reader::ContentReader;
use super::services::Services;
use crate::config::ListenerConfig;
use crate::mail::address::Mailbox;
use crate::mail::reply::Reply;
use crate::net::client_network::canonical;
use crate::net::conn::Conn;
use crate::net::line::LineEnd;
use crate::net::stream::Stream;
use crate::plugins::PluginRun;
use crate::tenants::{SessionSlot, Tenant};

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
    /// MAIL's parameters, for the tenant's mail-from hooks asked at the first recipient.
    pub(super) params: Vec<crate::plugins::facts::Param>,
    /// MAIL's SIZE, 0 when not given.
    pub(super) declared_size: u64,
    /// The sender as the global chain left it, kept while a tenant's mail-from hooks may have
    /// rewritten it: restored if the recipient that chose the tenant is refused.
    pub(super) global_sender: Option<Option<Mailbox>>,
    /// MAIL's RET, ENVID and REQUIRETLS.
    pub(super) dsn: crate::mail::dsn_params::MessageDsn,
    /// RCPT's NOTIFY and ORCPT, one per entry of `recipients`.
    pub(super) recipient_dsn: Vec<crate::mail::dsn_params::RecipientDsn>,
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
    /// The id the transaction's message will be queued as, once chosen (see `policy.rs`).
    pub(super) queue_id: Option<String>,
    /// The envelope as DATA began (the transaction is taken apart then), for the trace of a
    /// message refused after it.
    pub(super) traced_envelope: Option<crate::plugins::facts::Envelope>,
    /// The sender of the transaction under way as the client gave it, for its trace.
    pub(super) traced_sender: Option<String>,
    /// The tenant of the transaction under way, once its first recipient fixed it (see
    /// `tenancy.rs`).
    pub(super) tenant: Option<Arc<Tenant>>,
    /// The tenant of the authenticated identity: all its mail is that tenant's.
    pub(super) auth_tenant: Option<Arc<Tenant>>,
    /// The session's place among its tenant's sessions at once.
    pub(super) tenant_slot: Option<(Arc<str>, SessionSlot)>,
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
            let timeout = services.config.smtp.command_timeout;
            if listener.role.implicit_tls() {
                // RFC 8314: the handshake first; the client speaks first in TLS, so there is no
                // greeting delay to keep.
                let stream = match Session::accept_implicit(stream, &services, timeout).await {
                    Ok(stream) => stream,
                    Err(error) => {
                        tracing::info!(%error, "TLS handshake failed");
                        return;
                    }
                };
                let conn = Conn::new(stream).with_write_timeout(timeout);
                Session::new(conn, peer, listener, services)
                    .serve_and_close()
                    .await;
                return;
            }
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
            let conn = Conn::new(Stream::Plain(stream)).with_write_timeout(timeout);
            Session::new(conn, peer, listener, services)
                .serve_and_close()
                .await;
        }
        .instrument(span)
        .await
    }

    fn new(
        conn: Conn,
        peer: SocketAddr,
        listener: Arc<ListenerConfig>,
        services: Arc<Services>,
    ) -> Session {
        Session {
            conn,
            client_ip: canonical(peer.ip()),
            listener,
            services,
            greeting: Greeting::None,
            transaction: Transaction::default(),
            errors: 0,
            auth_identity: None,
            run: None,
            queue_id: None,
            traced_envelope: None,
            traced_sender: None,
            tenant: None,
            auth_tenant: None,
            tenant_slot: None,
        }
    }

    async fn serve_and_close(mut self) {
        if let Err(error) = self.serve().await {
            tracing::debug!(%error, "session ended with an I/O error");
        }
        // Calls of a transaction the client left (and of connect and helo hooks) are traced too.
        self.end_plugin_run(None);
        self.conn.close_lingering().await;
        tracing::debug!("disconnected");
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
                        // Boxed: a command's state (DATA's is the largest) lives on the heap
                        // while it runs, not inline in every session's task, so a session
                        // waiting for its next command holds only what it needs to wait.
                        Box::pin(self.command(&text)).await?
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
                self.end_plugin_run(None);
                self.transaction = Transaction::default();
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
}

/// Waits up to `delay` for the client to send anything before our greeting.
async fn talks_first(stream: &TcpStream, delay: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(tokio::time::timeout(delay, stream.peek(&mut byte)).await, Ok(Ok(n)) if n > 0)
}
