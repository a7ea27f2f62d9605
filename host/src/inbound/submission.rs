//! SMTP AUTH on submission listeners (RFC 4954), in the spirit of Postfix's submission service
//! with `smtpd_tls_auth_only`: mechanisms are offered only over TLS, the host checks the password
//! against `[submission] users_file`, then the `auth` hooks may still refuse the identity. An
//! authenticated client may relay; on a submission listener MAIL needs authentication unless the
//! client is in `relay.networks` (or `require_auth` is off).

use super::sasl::{self, Credentials, Mechanism, MAX_AUTH_LINE};
use super::session::{Flow, Greeting, Session};
use crate::mail::reply::Reply;
use crate::net::line::LineEnd;

impl Session {
    /// True when this listener offers AUTH at all (a submission listener with accounts).
    pub(super) fn offers_auth(&self) -> bool {
        self.listener.role.is_submission() && self.services.accounts.is_some()
    }

    /// The EHLO keyword, when AUTH may be used right now: never before TLS.
    pub(super) fn auth_keyword(&self) -> Option<String> {
        (self.offers_auth() && self.conn.stream().is_tls()).then(|| "AUTH PLAIN LOGIN".to_string())
    }

    pub(super) fn in_relay_networks(&self) -> bool {
        self.config()
            .relay
            .networks
            .iter()
            .any(|network| network.contains(&self.client_ip))
    }

    /// `Some(reply)` when MAIL must be refused because the client has not authenticated.
    pub(super) fn authentication_required(&self) -> Option<Reply> {
        let required = self.listener.role.is_submission()
            && self.config().submission.require_auth
            && self.auth_identity.is_none()
            && !self.in_relay_networks();
        required.then(|| Reply::new(530, "5.7.0", "Authentication required"))
    }

    /// The AUTH command and the exchange that follows it.
    pub(super) async fn auth_command(&mut self, argument: &str) -> std::io::Result<Flow> {
        if !self.offers_auth() {
            return Ok(self.error(Reply::new(
                503,
                "5.5.1",
                "Error: authentication not enabled",
            )));
        }
        if matches!(self.greeting, Greeting::None) {
            return Ok(self.error(Reply::new(503, "5.5.1", "Error: send EHLO first")));
        }
        if self.auth_identity.is_some() {
            return Ok(self.error(Reply::new(503, "5.5.1", "Error: already authenticated")));
        }
        if self.transaction.sender.is_some() {
            return Ok(self.error(Reply::new(
                503,
                "5.5.1",
                "Error: AUTH not permitted during a mail transaction",
            )));
        }
        let mut words = argument.split_whitespace();
        let Some(mechanism) = words.next() else {
            return Ok(self.error(Reply::new(501, "5.5.4", "Syntax: AUTH mechanism")));
        };
        let Some(mechanism) = Mechanism::parse(mechanism) else {
            return Ok(self.error(Reply::new(504, "5.5.4", "Unrecognized authentication type")));
        };
        if let Some(refusal) = self.services.auth_budget.refusal(self.client_ip) {
            // Banned while this session was open (by its own or another session's failures).
            self.reply(refusal);
            return Ok(Flow::Close);
        }
        if !self.conn.stream().is_tls() {
            return Ok(self.error(Reply::new(
                538,
                "5.7.11",
                "Encryption required for requested authentication mechanism",
            )));
        }
        let initial = words.next().map(str::to_string);
        if words.next().is_some() {
            return Ok(self.error(Reply::new(
                501,
                "5.5.4",
                "Syntax: AUTH mechanism [response]",
            )));
        }
        let credentials = match self.exchange(mechanism, initial).await? {
            Exchange::Done(credentials) => credentials,
            Exchange::Refused(reply) => return Ok(self.error(reply)),
            Exchange::Closed => return Ok(Flow::Close),
        };
        let reply = match self.check(mechanism, credentials).await {
            Ok(reply) => reply,
            Err(refusal) => {
                // Banned meanwhile, or too many of this address's checks under way.
                self.reply(refusal);
                return Ok(Flow::Close);
            }
        };
        if reply.is_positive() {
            self.reply(reply);
            return Ok(Flow::Continue);
        }
        // Failures count as errors: `max_errors` ends a session that keeps guessing, and the
        // address's budget ends the guessing across sessions.
        let flow = self.error(reply);
        if let Some(banned) = self.services.auth_budget.refusal(self.client_ip) {
            self.reply(banned);
            return Ok(Flow::Close);
        }
        Ok(flow)
    }

    /// Reads the client's side of the exchange for `mechanism`.
    async fn exchange(
        &mut self,
        mechanism: Mechanism,
        initial: Option<String>,
    ) -> std::io::Result<Exchange> {
        match mechanism {
            Mechanism::Plain => {
                let message = match initial {
                    Some(response) => sasl::decode_response(&response),
                    None => match self.ask("").await? {
                        Some(answer) => answer,
                        None => return Ok(Exchange::Closed),
                    },
                };
                Ok(match message.and_then(|message| sasl::plain(&message)) {
                    Ok(credentials) => Exchange::Done(credentials),
                    Err(reply) => Exchange::Refused(reply),
                })
            }
            Mechanism::Login => {
                let identity = match initial {
                    Some(response) => sasl::decode_response(&response),
                    None => match self.ask("Username:").await? {
                        Some(answer) => answer,
                        None => return Ok(Exchange::Closed),
                    },
                };
                let identity = match identity.and_then(sasl::login_text) {
                    Ok(identity) => identity,
                    Err(reply) => return Ok(Exchange::Refused(reply)),
                };
                let password = match self.ask("Password:").await? {
                    Some(answer) => answer.and_then(sasl::login_text),
                    None => return Ok(Exchange::Closed),
                };
                Ok(match password {
                    Ok(password) => Exchange::Done(Credentials { identity, password }),
                    Err(reply) => Exchange::Refused(reply),
                })
            }
        }
    }

    /// Sends a 334 challenge and reads the answer: `None` when the client went away or timed
    /// out (the session then ends), `Some(Err)` when the answer ends the exchange.
    async fn ask(&mut self, challenge: &str) -> std::io::Result<Option<Result<Vec<u8>, Reply>>> {
        self.reply(Reply::plain(334, sasl::challenge(challenge)));
        self.conn.flush().await?;
        let timeout = self.config().smtp.command_timeout;
        let shutdown = self.services.shutdown.clone();
        // Waiting for the client's answer is waiting for a command: a stop ends it at once.
        let read = tokio::select! {
            read = tokio::time::timeout(timeout, self.conn.read_line(MAX_AUTH_LINE)) => read,
            _ = shutdown.stopping() => {
                self.reply_shutting_down();
                return Ok(None);
            }
        };
        let line = match read {
            Ok(line) => line?,
            Err(_) => {
                self.reply(Reply::new(
                    421,
                    "4.4.2",
                    "Timeout exceeded, closing connection",
                ));
                return Ok(None);
            }
        };
        Ok(match line.end {
            LineEnd::Eof => None,
            LineEnd::Crlf if !line.too_long && !line.has_bare_cr() => {
                Some(match std::str::from_utf8(&line.bytes) {
                    Ok(text) => sasl::decode_response(text),
                    Err(_) => Err(Reply::new(501, "5.5.2", "Response is not base64")),
                })
            }
            _ if line.too_long => Some(Err(Reply::new(
                500,
                "5.5.6",
                "Authentication exchange line too long",
            ))),
            _ => Some(Err(Reply::new(500, "5.5.2", "Lines must end with CRLF"))),
        })
    }

    /// Checks the password, then asks the `auth` hooks; the reply ends the exchange. `Err` when
    /// the address's failure budget refuses the check itself (the session then closes).
    async fn check(
        &mut self,
        mechanism: Mechanism,
        credentials: Credentials,
    ) -> Result<Reply, Reply> {
        let Some(accounts) = self
            .services
            .accounts
            .as_ref()
            .map(|shared| shared.load_full())
        else {
            return Ok(Reply::new(454, "4.7.0", "Temporary authentication failure"));
        };
        let services = self.services.clone();
        let attempt = services.auth_budget.attempt(self.client_ip)?;
        let Credentials { identity, password } = credentials;
        if !accounts.verify(&identity, &password).await {
            tracing::warn!(identity = %crate::mail::text::one_line(&identity), mechanism = mechanism.name(), "authentication failed");
            metrics::counter!("switchyard_auth_total", "result" => "failed").increment(1);
            let penalty = attempt.failed();
            // The wait is cut short by a stop: the session is about to be told 421 anyway.
            tokio::select! {
                _ = tokio::time::sleep(penalty.delay) => {}
                _ = services.shutdown.stopping() => {}
            }
            return Ok(Reply::new(
                535,
                "5.7.8",
                "Authentication credentials invalid",
            ));
        }
        drop(attempt);
        if let Err(refusal) = self.tenant_at_auth(&identity) {
            metrics::counter!("switchyard_auth_total", "result" => "refused").increment(1);
            return Ok(refusal);
        }
        if let Some(refusal) = self.ask_auth(mechanism.name(), &identity).await {
            tracing::warn!(identity = %identity, reply = %refusal, "authentication refused by plugin");
            metrics::counter!("switchyard_auth_total", "result" => "refused").increment(1);
            self.auth_tenant = None;
            self.tenant_slot = None;
            self.end_plugin_run(Some(&refusal));
            return Ok(refusal);
        }
        tracing::info!(identity = %identity, mechanism = mechanism.name(), tenant = %self.tenant_id(), "authenticated");
        metrics::counter!("switchyard_auth_total", "result" => "ok").increment(1);
        self.auth_identity = Some(identity);
        Ok(Reply::new(235, "2.7.0", "Authentication successful"))
    }
}

enum Exchange {
    Done(Credentials),
    Refused(Reply),
    Closed,
}
