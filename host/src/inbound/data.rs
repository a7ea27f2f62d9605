//! The end of a transaction: DATA and BDAT content read and checked (`data_reader.rs`), then
//! the message refused for a fault, or stamped, checked for SPF, DKIM and DMARC, put to the data
//! hooks, edited as they ask and handed to the inbox. The reply is 250 only once the queue has
//! committed the message.

use bytes::Bytes;

use super::authenticate::{authenticate, Check, Client};
use super::content::{self, Trace};
use super::data_reader::{Chunk, ContentReader, Faults, Framing};
use super::session::{Flow, Greeting, Session, Transaction};
use std::sync::Arc;

use crate::delivery::inbox::Accepted;
use crate::dkim::{Signer, SigningKey};
use crate::mail::edit;
use crate::mail::header;
use crate::mail::reply::Reply;
use crate::net::line::Framer;
use crate::plugins::chain::DataDecision;

impl Session {
    pub(super) async fn data(&mut self, argument: &str) -> std::io::Result<Flow> {
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
        // Boxed, as in BDAT: what follows the content (authentication, scanners, the data hooks,
        // signing, the queue) is the largest state of a session and is held only while it runs,
        // not while the content is read.
        Ok(Box::pin(self.end_of_content(message, faults)).await)
    }

    pub(super) async fn bdat(&mut self, argument: &str) -> std::io::Result<Flow> {
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
        // Boxed: see `data`.
        Ok(Box::pin(self.end_of_content(message, faults)).await)
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
                tracing::info!(tenant = %self.tenant_id(), "{verb} timeout");
                self.reply(Reply::new(
                    421,
                    "4.4.2",
                    format!("Timeout exceeded during {verb}, closing connection"),
                ));
                Ok(Some(Flow::Close))
            }
            Ok(Ok(true)) => Ok(None),
            Ok(Ok(false)) => {
                tracing::info!(tenant = %self.tenant_id(), "client disconnected during {verb}; nothing queued");
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
        tracing::info!(tenant = %self.tenant_id(), reply = %refusal.reply, close = refusal.close, "message refused");
        self.end_plugin_run(Some(&refusal.reply));
        self.transaction = Transaction::default();
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
        self.end_plugin_run(Some(&reply));
        reply
    }

    async fn accept_message(&mut self, message: Vec<u8>) -> Reply {
        let envelope = self.envelope_facts();
        if self.run.is_some() {
            self.traced_envelope = Some(envelope.clone());
        }
        let transaction = std::mem::take(&mut self.transaction);
        let limits = &self.services.config.smtp;
        if header::count(&message, "Received") > limits.max_received_headers {
            return Reply::new(
                554,
                "5.4.6",
                "Too many hops: Received headers suggest a mail loop",
            );
        }
        let queue_id = self.queue_id().to_string();
        let queued = Reply::new(250, "2.0.0", format!("Ok: queued as {queue_id}"));
        let mut stamped = self.stamp(message, &transaction, &queue_id);
        let verdicts = match self.sender_check(&envelope.sender) {
            Some(check) => Some(authenticate(check, &stamped).await),
            None => None,
        };
        if let Some(verdicts) = &verdicts {
            stamped = content::remove_forged_results(&stamped, &self.config().hostname);
            stamped.splice(0..0, verdicts.header.bytes());
        }
        // The message as checked, kept for the ARC seal's results when there is to be one.
        let sealing = verdicts.is_some() && self.seals(&envelope.recipients);
        let arrived = sealing.then(|| Bytes::from(stamped.clone()));
        let sender = envelope.sender.clone();
        let mut recipients = envelope.recipients.clone();
        let envelope_recipients = recipients.clone();
        let mut content = Bytes::from(stamped);
        let mut quarantine = None;
        if let Some((decision, edits)) =
            self.ask_data(&queue_id, envelope, &content, verdicts).await
        {
            match decision {
                DataDecision::Reject(reply) | DataDecision::Tempfail(reply) => {
                    tracing::info!(queue_id = %queue_id, tenant = %self.tenant_id(), reply = %reply, "message refused by plugin");
                    return reply;
                }
                DataDecision::Discard => {
                    tracing::info!(queue_id = %queue_id, tenant = %self.tenant_id(), "message discarded by plugin");
                    return queued;
                }
                DataDecision::Quarantine(reason) => quarantine = Some(reason),
                DataDecision::Accept | DataDecision::Continue => {}
            }
            content = Bytes::from(edit::apply_to_headers(&content, &edits));
            edit::apply_to_recipients(&mut recipients, &edits);
            // A tenant's data hooks may not add another tenant's recipients (whose own chain
            // would never see the message).
            recipients.retain(|recipient| {
                let joins = crate::mail::address::Mailbox::from_stored(recipient)
                    .is_none_or(|mailbox| self.may_join(&mailbox));
                if !joins {
                    tracing::warn!(queue_id = %queue_id, tenant = %self.tenant_id(), to = %recipient, "a data hook added another tenant's recipient; dropped");
                }
                joins
            });
            if recipients.is_empty() {
                tracing::info!(queue_id = %queue_id, tenant = %self.tenant_id(), "plugins removed every recipient; message dropped");
                return queued;
            }
        }
        // After the data hooks' edits, before signing: what is checked is what is signed.
        if let Err(reply) = self.header_from_is_tenants(&content) {
            return reply;
        }
        if let Some((signer, tenant)) = self.dkim_signer() {
            match dkim_sign(signer, tenant, &queue_id, content).await {
                Ok(signed) => content = signed,
                Err(reply) => return reply,
            }
        }
        if let Some((arrived, (key, check))) = arrived.zip(self.arc_sealer(&sender)) {
            if let Some(sealed) = arc_seal(check, &key, &queue_id, &arrived, &content).await {
                content = sealed;
            }
        }
        let tenant = self.current_tenant().cloned();
        if let Some(tenant) = &tenant {
            // The message's real size, now known, against the tenant's queue quota.
            if let Err(limited) = tenant
                .usage
                .check_queued(content.len() as u64, tenant.limits.queued_bytes)
            {
                return limited.reply;
            }
        }
        let size = content.len() as u64;
        let recipient_count = recipients.len();
        let recipient_dsn = dsn_of(&envelope_recipients, &transaction, &recipients);
        let accepted = Accepted {
            tenant: self.tenant_id(),
            id: queue_id,
            listener: self.listener.name.clone(),
            sender,
            recipient_dsn,
            dsn: transaction.dsn.clone(),
            recipients,
            content,
            smtputf8: transaction.smtputf8,
            eight_bit_mime: transaction.eight_bit_mime,
            quarantine,
        };
        let trace = self.take_trace();
        let recording = self.run.as_mut().and_then(|run| run.take_recording());
        // The transaction's plugin instances go on to serve the message's delivery hooks.
        let accepted_id = accepted.id.clone();
        let result = self.services.inbox.accept(accepted, self.run.take()).await;
        let reply = match result {
            Ok(_) => {
                if let Some(tenant) = &tenant {
                    tenant.usage.accepted(recipient_count, size);
                }
                queued
            }
            Err(_) => Reply::new(
                451,
                "4.3.0",
                "Temporary queue failure, please try again later",
            ),
        };
        self.services
            .plugins
            .records()
            .finish(recording, reply.code >= 400);
        if let Some(mut record) = trace {
            if reply.code == 250 {
                record.message_id = Some(accepted_id.clone());
                record.outcome = format!("queued as {accepted_id}");
            } else {
                record.outcome = reply.one_line();
            }
            self.services.plugins.traces().submit(record);
        }
        reply
    }

    /// The signer and owner of this message, when it is to be DKIM-signed: it comes from a
    /// trusted client (an authenticated user or `relay.networks`: mail from strangers claiming
    /// our From: is not ours to sign). It is signed after the data hooks' edits, so the
    /// signature covers what is sent, by a key of its owner that covers its From: domain. A key
    /// that fails to sign is a temporary failure, not unsigned mail that the domain's DMARC
    /// policy would reject.
    fn dkim_signer(&self) -> Option<(Arc<Signer>, String)> {
        let signer = &self.services.signer;
        if signer.is_empty() || !(self.auth_identity.is_some() || self.in_relay_networks()) {
            return None;
        }
        Some((signer.clone(), self.tenant_id()))
    }

    /// The key and the checks for sealing this message (RFC 8617), when its owner seals
    /// checked inbound mail (`[arc] seal`).
    fn arc_sealer(&self, sender: &str) -> Option<(Arc<SigningKey>, Check)> {
        let (key, _) = self.services.signer.sealer(&self.tenant_id())?;
        Some((key, self.sender_check(sender)?))
    }

    /// Whether this message is to be sealed: its owner seals all checked mail, or one of its
    /// recipients is routed through a `[[route]]` with `arc_seal` (mail forwarded through it).
    fn seals(&self, recipients: &[String]) -> bool {
        let Some((_, all)) = self.services.signer.sealer(&self.tenant_id()) else {
            return false;
        };
        all || recipients.iter().any(|recipient| {
            let domain = recipient.rsplit_once('@').map_or("", |(_, domain)| domain);
            crate::delivery::route::route_for(self.config(), domain)
                .is_some_and(|route| route.arc_seal)
        })
    }

    /// What SPF, DKIM and DMARC checks of this message need, if it is to be checked: verification
    /// is on, an inbound listener got it, from a client outside `relay.networks`.
    fn sender_check(&self, sender: &str) -> Option<Check> {
        let authenticator = self.services.authenticator.clone()?;
        if self.in_relay_networks() || self.listener.role.is_submission() {
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

    /// Prepends the Received header (and a Message-ID if missing).
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
}

/// NOTIFY and ORCPT for each final recipient: those its RCPT gave, found by address after the
/// data hooks' edits (a recipient a hook added asked for nothing).
fn dsn_of(
    envelope_recipients: &[String],
    transaction: &Transaction,
    recipients: &[String],
) -> Vec<crate::mail::dsn_params::RecipientDsn> {
    recipients
        .iter()
        .map(|recipient| {
            envelope_recipients
                .iter()
                .position(|given| given == recipient)
                .and_then(|index| transaction.recipient_dsn.get(index).cloned())
                .unwrap_or_default()
        })
        .collect()
}

/// The message with an ARC set in front. Sealing is the last change to the message, after the
/// data hooks and DKIM signing. A seal that fails leaves the message unsealed, with a log line:
/// ARC helps the next hop, and its absence loses no mail.
async fn arc_seal(
    check: Check,
    key: &SigningKey,
    queue_id: &str,
    arrived: &Bytes,
    content: &Bytes,
) -> Option<Bytes> {
    match super::authenticate::seal(check, arrived, content, key).await {
        Ok(Some(set)) => {
            let mut out = Vec::with_capacity(set.len() + content.len());
            out.extend_from_slice(set.as_bytes());
            out.extend_from_slice(content);
            Some(Bytes::from(out))
        }
        Ok(None) => {
            tracing::info!(queue_id = %queue_id, "not ARC-sealed: the chain it arrived with is broken");
            None
        }
        Err(error) => {
            tracing::warn!(queue_id = %queue_id, %error, "ARC sealing failed; sent unsealed");
            None
        }
    }
}

/// `content` with its DKIM signatures in front (unchanged when no key covers its From:
/// domain). The RSA operation takes about a millisecond: it runs on the blocking pool, not on
/// the session's worker.
async fn dkim_sign(
    signer: Arc<Signer>,
    tenant: String,
    queue_id: &str,
    content: Bytes,
) -> Result<Bytes, Reply> {
    let original = content.clone();
    let owner = tenant.clone();
    let signed = tokio::task::spawn_blocking(move || {
        // RFC 6376 5.3: what is signed is the 7-bit form, so that no hop without 8BITMIME has
        // to convert it (and break the signature). A message that cannot be converted is signed
        // as it is.
        let signing = match crate::mail::seven_bit::seven_bit(&content) {
            Ok(std::borrow::Cow::Owned(converted)) => Bytes::from(converted),
            _ => content,
        };
        signer
            .sign(&owner, &signing)
            .map(|signed| (signed, signing))
    })
    .await
    .map_err(|error| error.to_string())
    .and_then(|signed| signed.map_err(|error| error.to_string()));
    match signed {
        Ok((None, _)) => Ok(original),
        Ok((Some(signed), signing)) => {
            tracing::debug!(queue_id = %queue_id, keys = ?signed.keys, "DKIM-signed");
            let mut out = Vec::with_capacity(signed.headers.len() + signing.len());
            out.extend_from_slice(signed.headers.as_bytes());
            out.extend_from_slice(&signing);
            Ok(Bytes::from(out))
        }
        Err(error) => {
            tracing::error!(queue_id = %queue_id, %tenant, %error, "message refused: cannot sign");
            Err(Reply::new(
                451,
                "4.3.0",
                "Temporary failure: the message cannot be signed, please try again later",
            ))
        }
    }
}
