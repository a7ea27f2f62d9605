//! The session's questions to the plugin chain: one method per stage, each turning the chain's
//! decision into what the session does. Without plugins every answer is "continue".

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::authenticate::AuthVerdicts;
use super::memory::MemoryGuard;
use super::session::{Greeting, Session};
use crate::mail::address::{parse_path_argument, Mailbox, PathArgument};
use crate::mail::reply::Reply;
use crate::plugins::chain::{DataDecision, Decision};
use crate::plugins::facts;
use crate::plugins::host::{BodyHandle, SessionFacts};
use crate::plugins::record::{data_verdict_of, verdict_of, Input};
use crate::plugins::PluginRun;
use crate::queue::traces::{PendingTrace, StoredCall};
use crate::scan::ScanResult;

/// A refusal to send instead of the normal reply.
pub type Refusal = Reply;

impl Session {
    /// The plugin run of the current transaction, started on the current global generation if
    /// there is none yet.
    pub(super) fn plugin_run(&mut self) -> &mut PluginRun {
        let run = match self.run.take() {
            Some(run) => run,
            None => {
                let queue_id = self.queue_id().to_string();
                self.services.plugins.start_transaction(&queue_id)
            }
        };
        self.run.insert(run)
    }

    /// The id the transaction's message will be queued as: chosen when the transaction's
    /// first plugin call (or its DATA) needs it, since a canary's share is drawn from it
    /// (`plugins/canary.rs`) and the message's delivery draws again from the queued id.
    pub(super) fn queue_id(&mut self) -> &str {
        let inbox = &self.services.inbox;
        self.queue_id.get_or_insert_with(|| inbox.new_id())
    }

    /// The plugin run of the current transaction, on the chain of its tenant (when known).
    /// `Ok(None)` when no plugin is configured for it; `Err` when the tenant's limits refuse it.
    /// Under memory pressure a new run first waits for admission to come back
    /// ([`wait_for_memory`]).
    async fn plugins(&mut self) -> Result<Option<&mut PluginRun>, Refusal> {
        if self.run.is_none() {
            let global_empty = self.services.plugins.current().is_empty();
            match self.current_tenant().cloned() {
                Some(tenant) => {
                    if global_empty && self.services.plugins.set_for(&tenant.id).is_empty() {
                        return Ok(None);
                    }
                    self.bind_tenant(&tenant)?;
                }
                None if global_empty => return Ok(None),
                None => {}
            }
            wait_for_memory(self.services.memory.as_deref()).await?;
        }
        Ok(Some(self.plugin_run()))
    }

    /// Ends the plugin run with the transaction: the next one gets fresh instances, on the
    /// generation current by then. Its trace, if it made calls, is recorded as a transaction
    /// that queued nothing, ended by `reply` (the last reply of the transaction, when there is
    /// one that tells).
    pub(super) fn end_plugin_run(&mut self, reply: Option<&Reply>) {
        self.close_trace(reply);
        self.run = None;
        self.queue_id = None;
        self.tenant = None;
    }

    /// Records the calls noted so far as a transaction that queued nothing (if there were
    /// any), and starts the next record; the run goes on. For a transaction cut short by a new
    /// greeting, STARTTLS or a refused MAIL, whose calls must not be counted to the next one.
    pub(super) fn close_trace(&mut self, reply: Option<&Reply>) {
        let queue_id = self
            .run
            .as_ref()
            .and_then(|run| run.queue_id().map(str::to_string));
        self.finish_recording(reply.is_some_and(|reply| reply.code >= 400));
        if let Some(mut record) = self.take_trace() {
            if !record.calls.is_empty() {
                record.outcome = unqueued_outcome(&record, reply);
                // Told 250 but not queued (discarded, or no recipient left): the client has a
                // queue id, and the trace is found by it.
                if reply.is_some_and(|reply| reply.code < 300) {
                    record.message_id = queue_id;
                }
                self.services.plugins.traces().submit(record);
            }
        }
        self.traced_envelope = None;
        self.traced_sender = None;
    }

    /// Hands the transaction's recording, if it has one, to be written (when sampled, or
    /// refused and refusals are recorded); the run records on into a new one.
    pub(super) fn finish_recording(&mut self, refused: bool) {
        let recording = self.run.as_mut().and_then(PluginRun::take_recording);
        self.services.plugins.records().finish(recording, refused);
    }

    /// The calls the transaction's run noted so far, as a record of this client and envelope
    /// (the envelope as the transaction had it, or as it was when DATA began; the sender as the
    /// client gave it).
    pub(super) fn take_trace(&mut self) -> Option<PendingTrace> {
        let mut record = self.run.as_mut()?.take_trace("smtp")?;
        let envelope = self
            .traced_envelope
            .take()
            .unwrap_or_else(|| self.envelope_facts());
        record.message_id = None;
        record.client_ip = self.client_ip.to_string();
        record.sender = self.traced_sender.take().unwrap_or(envelope.sender);
        record.recipients = envelope.recipients;
        Some(record)
    }

    pub(super) fn wit_session(&self) -> Arc<SessionFacts> {
        let helo = match &self.greeting {
            Greeting::Ehlo(name) | Greeting::Helo(name) => Some(name.clone()),
            Greeting::None => None,
        };
        Arc::new(SessionFacts {
            client_ip: self.client_ip.to_string(),
            listener: self.listener.name.clone(),
            submission: self.listener.role.is_submission(),
            helo,
            tls: self.conn.stream().is_tls(),
            auth_identity: self.auth_identity.clone(),
            tenant: self.tenant_id(),
        })
    }

    /// The connect hook: `Some(reply)` refuses the session.
    pub(super) async fn ask_connect(&mut self) -> Option<Refusal> {
        let session = self.wit_session();
        let run = match self.plugins().await {
            Ok(run) => run?,
            // Before the greeting only a memory refusal can come (no tenant is known yet), and
            // a refusal there is 421, the server closing (RFC 5321 3.8).
            Err(mut refused) => {
                refused.code = 421;
                return Some(refused);
            }
        };
        run.begin_step();
        let decision = run.connect(&session).await;
        run.record(
            || Input::Connect {
                session: (*session).clone(),
            },
            || verdict_of(&decision, None, None),
        );
        refusal(decision)
    }

    pub(super) async fn ask_helo(&mut self, name: &str) -> Option<Refusal> {
        let session = self.wit_session();
        let run = match self.plugins().await {
            Ok(run) => run?,
            Err(refused) => return Some(refused),
        };
        run.begin_step();
        let decision = run.helo(&session, name).await;
        run.record(
            || Input::Helo {
                session: (*session).clone(),
                name: name.to_string(),
            },
            || verdict_of(&decision, None, None),
        );
        refusal(decision)
    }

    /// The auth hook, after the host checked the password: `Some(reply)` refuses the identity.
    pub(super) async fn ask_auth(&mut self, mechanism: &str, identity: &str) -> Option<Refusal> {
        let session = self.wit_session();
        let run = match self.plugins().await {
            Ok(run) => run?,
            Err(refused) => return Some(refused),
        };
        run.begin_step();
        let decision = run.auth(&session, mechanism, identity).await;
        run.record(
            || Input::Auth {
                session: (*session).clone(),
                mechanism: mechanism.to_string(),
                identity: identity.to_string(),
            },
            || verdict_of(&decision, None, None),
        );
        refusal(decision)
    }

    /// The mail-from hook: the sender to use (possibly rewritten), or a refusal.
    pub(super) async fn ask_mail_from(
        &mut self,
        parsed: &PathArgument,
    ) -> Result<Option<Mailbox>, Refusal> {
        let session = self.wit_session();
        let sender = parsed
            .mailbox
            .as_ref()
            .map(Mailbox::to_string)
            .unwrap_or_default();
        let params = facts::Param::from_pairs(&parsed.params);
        let Some(run) = self.plugins().await? else {
            return Ok(parsed.mailbox.clone());
        };
        run.begin_step();
        let (decision, rewritten) = run.mail_from(&session, &sender, &params).await;
        run.record(
            || Input::MailFrom {
                session: (*session).clone(),
                sender: sender.clone(),
                params: params.clone(),
            },
            || verdict_of(&decision, Some(&sender), Some(&rewritten)),
        );
        if let Some(reply) = refusal(decision) {
            return Err(reply);
        }
        if rewritten == sender {
            return Ok(parsed.mailbox.clone());
        }
        if rewritten.is_empty() {
            return Ok(None);
        }
        reparse(&rewritten).map(Some)
    }

    /// The rcpt-to hook: the recipient to use and whether a plugin accepted it outright (which
    /// skips the host's relay check), or a refusal.
    pub(super) async fn ask_rcpt_to(
        &mut self,
        recipient: &Mailbox,
        parsed: &PathArgument,
    ) -> Result<(Mailbox, bool), Refusal> {
        let session = self.wit_session();
        let envelope = self.envelope_facts();
        let params = facts::Param::from_pairs(&parsed.params);
        let address = recipient.to_string();
        let Some(run) = self.plugins().await? else {
            return Ok((recipient.clone(), false));
        };
        run.begin_step();
        let (decision, rewritten) = run.rcpt_to(&session, &envelope, &address, &params).await;
        run.record(
            || Input::RcptTo {
                session: (*session).clone(),
                envelope: envelope.clone(),
                recipient: address.clone(),
                params: params.clone(),
            },
            || verdict_of(&decision, Some(&address), Some(&rewritten)),
        );
        let accepted = decision == Decision::Accept;
        if let Some(reply) = refusal(decision) {
            return Err(reply);
        }
        let mailbox = if rewritten == address {
            recipient.clone()
        } else {
            reparse(&rewritten)?
        };
        Ok((mailbox, accepted))
    }

    /// The envelope as the plugins are told it.
    pub(super) fn envelope_facts(&self) -> facts::Envelope {
        facts::Envelope {
            sender: self
                .transaction
                .sender
                .clone()
                .flatten()
                .map(|m| m.to_string())
                .unwrap_or_default(),
            recipients: self
                .transaction
                .recipients
                .iter()
                .map(Mailbox::to_string)
                .collect(),
        }
    }

    /// The data hook, with the message as it will be queued.
    pub(super) async fn ask_data(
        &mut self,
        queue_id: &str,
        envelope: facts::Envelope,
        content: &Bytes,
        verdicts: Option<AuthVerdicts>,
    ) -> Option<(DataDecision, Vec<crate::mail::edit::Edit>)> {
        let session = self.wit_session();
        // Empty results when the message was not checked (verification off, a trusted client).
        let verdicts = verdicts.unwrap_or_default();
        let auth = facts::Auth {
            spf: verdicts.spf,
            dkim: verdicts.dkim,
            dmarc: verdicts.dmarc,
        };
        let bodies = self.services.plugins.records().bodies();
        match self.plugins().await {
            Ok(Some(run)) => run.set_queue_id(queue_id),
            Ok(None) => return None,
            Err(refused) => return Some((DataDecision::Tempfail(refused), Vec::new())),
        }
        let scans = self.scan(queue_id, &session, &envelope, content).await;
        // The run `plugins()` started is still the transaction's (scanning only notes in it).
        let run = self.plugin_run();
        run.begin_step();
        let (decision, edits) = run
            .data(
                &session,
                &envelope,
                &auth,
                &BodyHandle::scanned(content.clone(), scans.clone()),
            )
            .await;
        if run.recording() {
            run.record(
                || Input::Data {
                    session: (*session).clone(),
                    envelope: envelope.clone(),
                    auth: auth.clone(),
                    content: bodies.then(|| content.clone()),
                    scans: scans.to_vec(),
                },
                || data_verdict_of(&decision, &edits),
            );
        }
        Some((decision, edits))
    }

    /// Sends the message to the scanners that apply to it, all at once, and notes their
    /// results in the transaction's trace.
    async fn scan(
        &mut self,
        queue_id: &str,
        session: &SessionFacts,
        envelope: &facts::Envelope,
        content: &Bytes,
    ) -> Arc<[ScanResult]> {
        let scanners = self.services.scanners.clone();
        let tenant = self.tenant_id();
        if !scanners.apply_to(&self.listener.name, &tenant) {
            return Arc::from([]);
        }
        let scanned = crate::scan::Envelope {
            client_ip: session.client_ip.clone(),
            helo: session.helo.clone(),
            sender: envelope.sender.clone(),
            recipients: envelope.recipients.clone(),
            auth_identity: session.auth_identity.clone(),
            queue_id: queue_id.to_string(),
            hostname: self.config().hostname.clone(),
        };
        let results: Arc<[ScanResult]> = scanners
            .scan(&self.listener.name, &tenant, &scanned, content)
            .await
            .into();
        if let Some(run) = self.run.as_mut() {
            run.note_scans(&results);
        }
        results
    }
}

/// How long a new plugin run waits for memory before its transaction is deferred.
const RUN_WAITS_FOR_MEMORY: Duration = Duration::from_secs(5);

/// While new sessions are refused for memory, a new plugin run (the transaction's instances,
/// which take memory) waits for admission to come back, [`RUN_WAITS_FOR_MEMORY`] at most; then
/// its transaction gets `451 4.3.2`. Counted in `switchyard_plugin_runs_waiting_total{outcome}`.
async fn wait_for_memory(memory: Option<&MemoryGuard>) -> Result<(), Refusal> {
    let Some(memory) = memory.filter(|memory| !memory.runs_may_start()) else {
        return Ok(());
    };
    tracing::info!("memory is short: a new plugin run waits until new sessions are admitted again");
    let deadline = tokio::time::Instant::now() + RUN_WAITS_FOR_MEMORY;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if memory.runs_may_start() {
            metrics::counter!("switchyard_plugin_runs_waiting_total", "outcome" => "started")
                .increment(1);
            return Ok(());
        }
    }
    metrics::counter!("switchyard_plugin_runs_waiting_total", "outcome" => "deferred").increment(1);
    tracing::warn!(
        waited = ?RUN_WAITS_FOR_MEMORY,
        "memory is still short: the transaction is deferred (451 4.3.2) instead of starting its plugins"
    );
    Err(Reply::new(
        451,
        "4.3.2",
        "Too busy (memory is short), try again later",
    ))
}

/// How a transaction that queued nothing ended: its last reply when given (with the plugin
/// that gave it, if one did), else the last refusal or failure among its calls.
fn unqueued_outcome(record: &PendingTrace, reply: Option<&Reply>) -> String {
    let decisive = record.calls.iter().rev().find(|call| {
        matches!(
            call.verdict(),
            "reject" | "tempfail" | "failed" | "skipped" | "discard"
        )
    });
    let by = |call: &StoredCall| {
        format!(
            "{} at {} by plugin {}",
            call.verdict(),
            call.hook(),
            record
                .plugins
                .get(call.plugin())
                .map(|plugin| plugin.name.as_str())
                .unwrap_or("?"),
        )
    };
    match (reply, decisive) {
        (Some(reply), decisive) => {
            let text = reply.one_line();
            let from_plugin = decisive.filter(|call| {
                call.verdict() == "discard" || call.detail().is_some_and(|detail| detail == text)
            });
            let prefix = if reply.code < 300 { "not queued: " } else { "" };
            match from_plugin {
                Some(call) => format!("{prefix}{text} ({})", by(call)),
                None => format!("{prefix}{text}"),
            }
        }
        (None, Some(call)) => format!(
            "{}{}",
            by(call),
            call.detail()
                .map(|detail| format!(": {detail}"))
                .unwrap_or_default()
        ),
        (None, None) => "no message queued".to_string(),
    }
}

fn refusal(decision: Decision) -> Option<Refusal> {
    match decision {
        Decision::Reject(reply) | Decision::Tempfail(reply) => Some(reply),
        Decision::Continue | Decision::Accept => None,
    }
}

/// A rewritten address must be as valid as one a client sends.
pub(super) fn reparse(address: &str) -> Result<Mailbox, Refusal> {
    parse_path_argument(&format!("<{address}>"))
        .ok()
        .and_then(|parsed| parsed.mailbox)
        .ok_or_else(|| {
            tracing::error!(rewrite = %crate::mail::text::one_line(address), "a plugin rewrote an address into an invalid one");
            Reply::new(451, "4.3.0", "Temporary policy failure, try again later")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plugin's rewrite cannot smuggle a command, a header line or a NUL in an address.
    #[test]
    fn rewrites_with_control_characters_are_refused() {
        for bad in [
            "a@b.test>\r\nRCPT TO:<x@y.test",
            "a@b.test\r\nBcc: x@y.test",
            "a\0b@b.test",
            "a@b.test\0",
            "\"a\r\nb\"@b.test",
            "a@b.te\nst",
        ] {
            let refusal = reparse(bad).expect_err(bad);
            assert_eq!(refusal.code, 451, "{bad:?}");
        }
        assert_eq!(
            reparse("team@example.test").map(|m| m.to_string()),
            Ok("team@example.test".to_string())
        );
    }
}
