//! The envelope commands: HELO/EHLO (and the extensions offered), MAIL FROM with its
//! parameters, RCPT TO with relay control and the recipient limit. Each asks its plugin hook
//! (`policy.rs`) before the host's own rules.

use super::session::{Flow, Greeting, Session, Transaction};
use crate::mail::address::{domain_key, parse_path_argument, Mailbox, PathArgument};
use crate::mail::dsn_params::{check_envid, check_orcpt, Notify, RecipientDsn, Ret};
use crate::mail::reply::Reply;

impl Session {
    pub(super) async fn helo(&mut self, argument: &str, extended: bool) -> Flow {
        let name = argument.trim();
        if name.is_empty() || name.contains(char::is_whitespace) {
            let verb = if extended { "EHLO" } else { "HELO" };
            return self.error(Reply::new(501, "5.5.4", format!("Syntax: {verb} hostname")));
        }
        if self.transaction.sender.is_some() {
            // A new greeting ends the transaction under way: its calls are its own record.
            self.close_trace(None);
        }
        self.leave_tenant();
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
            "DSN".to_string(),
        ];
        // RFC 8689 2: offered only once the session is encrypted.
        if self.conn.stream().is_tls() {
            lines.push("REQUIRETLS".to_string());
        }
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

    pub(super) async fn mail(&mut self, argument: &str) -> Flow {
        if matches!(self.greeting, Greeting::None) {
            return self.error(Reply::new(503, "5.5.1", "Error: send HELO/EHLO first"));
        }
        if self.transaction.sender.is_some() {
            return self.error(Reply::new(503, "5.5.1", "Error: nested MAIL command"));
        }
        if !self.services.inbox.queue_available() {
            self.reply(Reply::new(
                451,
                "4.3.0",
                "Queue unavailable, please try again later",
            ));
            return Flow::Continue;
        }
        let parsed = match path_argument(argument, "FROM:", "Syntax: MAIL FROM:<address>") {
            Ok(parsed) => parsed,
            Err(reply) => return self.error(reply),
        };
        let mut transaction = match self.mail_parameters(&parsed) {
            Ok(transaction) => transaction,
            Err(Refused::Error(reply)) => return self.error(reply),
            Err(Refused::Reply(reply)) => {
                self.reply(reply);
                return Flow::Continue;
            }
        };
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
        if let Err(refusal) =
            self.tenant_at_mail(parsed.mailbox.as_ref(), transaction.declared_size)
        {
            self.reply(refusal);
            return Flow::Continue;
        }
        transaction.params = crate::plugins::facts::Param::from_pairs(&parsed.params);
        self.traced_sender = Some(
            parsed
                .mailbox
                .as_ref()
                .map(|mailbox| mailbox.to_string())
                .unwrap_or_default(),
        );
        let sender = match self.ask_mail_from(&parsed).await {
            Ok(sender) => sender,
            Err(refusal) => {
                // Refused at MAIL: the attempt is a transaction of its own in the trace.
                self.close_trace(Some(&refusal));
                self.reply(refusal);
                return Flow::Continue;
            }
        };
        // A hook's rewrite must not make a tenant's user another tenant's sender either.
        if let Err(refusal) = self.sender_is_tenants(sender.as_ref()) {
            self.reply(refusal);
            return Flow::Continue;
        }
        let shown = sender.as_ref().map(|m| m.to_string()).unwrap_or_default();
        transaction.sender = Some(sender);
        self.transaction = transaction;
        tracing::debug!(from = %shown, "MAIL accepted");
        self.reply(Reply::new(250, "2.1.0", "Ok"));
        Flow::Continue
    }

    /// The transaction MAIL's ESMTP parameters (RFC 1870 SIZE, RFC 6152 BODY, RFC 6531
    /// SMTPUTF8, RFC 4954 AUTH, RFC 3461 RET and ENVID, RFC 8689 REQUIRETLS) start.
    fn mail_parameters(&self, parsed: &PathArgument) -> Result<Transaction, Refused> {
        let extended = matches!(self.greeting, Greeting::Ehlo(_));
        let mut transaction = Transaction::default();
        let syntax = |message: &str| Refused::Error(Reply::new(501, "5.5.4", message));
        for (keyword, value) in &parsed.params {
            if !extended {
                return Err(Refused::Error(Reply::new(
                    555,
                    "5.5.4",
                    "MAIL parameters need EHLO",
                )));
            }
            match (keyword.as_str(), value.as_deref()) {
                ("SIZE", Some(size)) => {
                    let Ok(size) = size.parse::<u64>() else {
                        return Err(Refused::Error(Reply::new(
                            501,
                            "5.5.4",
                            "Bad SIZE parameter",
                        )));
                    };
                    let max = self.config().smtp.max_message_size;
                    transaction.declared_size = size;
                    if size > max {
                        return Err(Refused::Reply(Reply::new(
                            552,
                            "5.3.4",
                            format!(
                                "Message size exceeds fixed maximum message size of {max} bytes"
                            ),
                        )));
                    }
                }
                ("BODY", Some(body)) if body.eq_ignore_ascii_case("8BITMIME") => {
                    transaction.eight_bit_mime = true
                }
                ("BODY", Some(body)) if body.eq_ignore_ascii_case("7BIT") => {}
                ("SMTPUTF8", None) => transaction.smtputf8 = true,
                // RFC 4954 5: the identity the message was submitted by; we know our own.
                ("AUTH", Some(_)) if self.offers_auth() => {}
                ("RET", Some(ret)) if transaction.dsn.ret.is_none() => {
                    transaction.dsn.ret = Some(Ret::parse(ret).map_err(syntax)?);
                }
                ("ENVID", Some(envid)) if transaction.dsn.envid.is_none() => {
                    check_envid(envid).map_err(syntax)?;
                    transaction.dsn.envid = Some(envid.to_string());
                }
                ("REQUIRETLS", None) => {
                    if !self.conn.stream().is_tls() {
                        return Err(Refused::Error(Reply::new(
                            530,
                            "5.7.10",
                            "REQUIRETLS needs a TLS session",
                        )));
                    }
                    transaction.dsn.requiretls = true;
                }
                _ => {
                    return Err(Refused::Error(Reply::new(
                        555,
                        "5.5.4",
                        format!("Unsupported parameter {keyword}"),
                    )))
                }
            }
        }
        Ok(transaction)
    }

    /// RCPT's parameters: NOTIFY and ORCPT of RFC 3461, each once.
    fn rcpt_parameters(&self, parsed: &PathArgument) -> Result<RecipientDsn, Reply> {
        let mut dsn = RecipientDsn::default();
        let mut seen_orcpt = false;
        for (keyword, value) in &parsed.params {
            if !matches!(self.greeting, Greeting::Ehlo(_)) {
                return Err(Reply::new(555, "5.5.4", "RCPT parameters need EHLO"));
            }
            match (keyword.as_str(), value.as_deref()) {
                ("NOTIFY", Some(notify)) if !dsn.notify.is_specified() => {
                    dsn.notify = Notify::parse(notify)
                        .map_err(|message| Reply::new(501, "5.5.4", message))?;
                }
                ("ORCPT", Some(orcpt)) if !seen_orcpt => {
                    check_orcpt(orcpt).map_err(|message| Reply::new(501, "5.5.4", message))?;
                    dsn.orcpt = Some(orcpt.to_string());
                    seen_orcpt = true;
                }
                _ => {
                    return Err(Reply::new(
                        555,
                        "5.5.4",
                        format!("Unsupported parameter {keyword}"),
                    ))
                }
            }
        }
        Ok(dsn)
    }

    pub(super) async fn rcpt(&mut self, argument: &str) -> Flow {
        if self.transaction.sender.is_none() {
            return self.error(Reply::new(503, "5.5.1", "Error: need MAIL command"));
        }
        let parsed = match path_argument(argument, "TO:", "Syntax: RCPT TO:<address>") {
            Ok(parsed) => parsed,
            Err(reply) => return self.error(reply),
        };
        let dsn = match self.rcpt_parameters(&parsed) {
            Ok(dsn) => dsn,
            Err(reply) => return self.error(reply),
        };
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
        if let Err(refusal) = self.tenant_at_rcpt(&recipient).await {
            tracing::info!(to = %recipient, reply = %refusal, "recipient refused for its tenant");
            self.reply(refusal);
            return Flow::Continue;
        }
        let (recipient, accepted_by_plugin) = match self.ask_rcpt_to(&recipient, &parsed).await {
            Ok(answer) => answer,
            Err(refusal) => {
                tracing::info!(to = %recipient, tenant = %self.tenant_id(), reply = %refusal, "recipient refused by plugin");
                self.refused_recipient();
                self.reply(refusal);
                return Flow::Continue;
            }
        };
        if !self.may_join(&recipient) {
            tracing::warn!(to = %recipient, tenant = %self.tenant_id(), "a plugin rewrote a recipient into another tenant's domain");
            self.refused_recipient();
            self.reply(Reply::new(
                550,
                "5.7.1",
                format!("<{recipient}>: Rewritten into another tenant's domain"),
            ));
            return Flow::Continue;
        }
        if !accepted_by_plugin && !self.may_send_to(&recipient) {
            tracing::info!(to = %recipient, tenant = %self.tenant_id(), "relay denied");
            self.refused_recipient();
            self.reply(Reply::new(
                550,
                "5.7.1",
                format!("<{recipient}>: Relay access denied"),
            ));
            return Flow::Continue;
        }
        self.transaction.recipients.push(recipient);
        self.transaction.recipient_dsn.push(dsn);
        self.reply(Reply::new(250, "2.1.5", "Ok"));
        Flow::Continue
    }

    /// No open relay: anyone may send to the domains we accept (relay domains and tenants'
    /// domains); only listed networks and authenticated clients elsewhere.
    fn may_send_to(&self, recipient: &Mailbox) -> bool {
        let domain = recipient.domain_key();
        self.config()
            .relay
            .domains
            .iter()
            .any(|accepted| domain_key(accepted) == domain)
            || self.services.tenants.of_domain(&domain).is_some()
            || self.in_relay_networks()
            || self.auth_identity.is_some()
    }

    /// A refused first recipient does not choose the transaction's tenant.
    fn refused_recipient(&mut self) {
        if self.transaction.recipients.is_empty() {
            self.leave_tenant();
        }
    }
}

/// The path after MAIL's `FROM:` or RCPT's `TO:` (`keyword`, any case), parsed; `syntax` is
/// the 501 text when the keyword is missing.
fn path_argument(argument: &str, keyword: &str, syntax: &str) -> Result<PathArgument, Reply> {
    let path = argument
        .get(..keyword.len())
        .filter(|given| given.eq_ignore_ascii_case(keyword))
        .map(|_| &argument[keyword.len()..])
        .ok_or_else(|| Reply::new(501, "5.5.4", syntax))?;
    parse_path_argument(path)
}

/// Why MAIL's parameters were refused: a protocol error (counted towards `max_errors`) or a plain
/// refusal (a message too big is not the client's mistake).
enum Refused {
    Error(Reply),
    Reply(Reply),
}
