//! An attempt's result: each recipient's reply classified (2xx delivered, 5xx failed, 4xx deferred
//! to the next retry, or failed once the message is too old), one log line per recipient, a DSN
//! for the failures, all of it recorded in one queue transaction, and only then the
//! delivery-result hooks told.

use bytes::Bytes;

use super::dsn::{self, Action, DsnRecipient, Report};
use super::{observe, retry, Dispatcher, Job};
use crate::mail::reply::Reply;
use crate::net::verify::TlsState;
use crate::plugins::bindings::types as wit;
use crate::plugins::PluginRun;
use crate::queue::{now_millis, MessageMeta, NewMessage, Outcome, RecipientResult, RecipientRow};

/// The fate of one recipient in one attempt.
pub(super) struct Attempt {
    pub recipient: RecipientRow,
    pub reply: Reply,
    /// Who answered: a host, `mailbox:NAME`, `plugin`, or `none` when nothing was reached.
    pub relay: String,
    /// What protected the connection it went over.
    pub tls: TlsState,
    /// The next hop took the DSN parameters: success and delay notices are its to send.
    pub dsn_passed: bool,
}

/// One recipient's attempt, classified.
struct Classified {
    result: RecipientResult,
    report: wit::DeliveryReport,
    /// What a DSN says of it, when the sender is to be told (RFC 3461 NOTIFY).
    notice: Option<(Notice, DsnRecipient)>,
}

/// The recipients of an attempt and what became of each, for its trace record.
fn attempt_summary(job: &Job, results: &[RecipientResult]) -> (Vec<String>, String) {
    let recipients: Vec<String> = job
        .recipients
        .iter()
        .map(|recipient| recipient.address.clone())
        .collect();
    let outcome = results
        .iter()
        .map(|result| {
            let address = job
                .recipients
                .iter()
                .find(|recipient| recipient.index == result.index)
                .map(|recipient| recipient.address.as_str())
                .unwrap_or("?");
            let what = match result.outcome {
                Outcome::Delivered => "delivered",
                Outcome::Deferred { .. } => "deferred",
                Outcome::Failed => "failed",
            };
            format!("{address}: {what} ({})", result.reply)
        })
        .collect::<Vec<_>>()
        .join("; ");
    (recipients, outcome)
}

/// Which DSN a recipient goes into.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Notice {
    Failure,
    Delay,
    Success,
}

/// How a reply ends an attempt: the outcome, the log's status word and the diagnostic text.
fn classify(
    reply: &Reply,
    attempts: i64,
    config: &crate::config::RetryConfig,
    received_at: i64,
    now: i64,
) -> (Outcome, &'static str, String) {
    let text = reply.one_line();
    if reply.is_positive() {
        return (Outcome::Delivered, "sent", text);
    }
    if reply.is_permanent() {
        return (Outcome::Failed, "bounced", text);
    }
    match retry::next_attempt(config, attempts, received_at, now) {
        Some(next_attempt) => (Outcome::Deferred { next_attempt }, "deferred", text),
        None => {
            let age = (now - received_at).max(0) as f64 / 1000.0;
            (
                Outcome::Failed,
                "expired",
                format!("message expired after {age:.0}s in the queue; last reply: {text}"),
            )
        }
    }
}

impl Dispatcher {
    /// Records recipients settled without a connection (a route hook discarded or failed them).
    pub(super) async fn settle(
        &self,
        meta: &std::sync::Arc<MessageMeta>,
        content: Option<Bytes>,
        settled: Vec<Attempt>,
        plugins: Option<PluginRun>,
    ) {
        let job = Job {
            meta: meta.clone(),
            content,
            recipients: settled
                .iter()
                .map(|attempt| attempt.recipient.clone())
                .collect(),
            plugins,
            share: None,
        };
        self.finish(job, settled).await;
    }

    /// One recipient's attempt: its outcome, its log line and metric, and its DSN entry.
    fn classify_attempt(&self, meta: &MessageMeta, attempt: Attempt, now: i64) -> Classified {
        let count = attempt.recipient.attempts + 1;
        let (outcome, status, diagnostic) = classify(
            &attempt.reply,
            count,
            &self.config.retry,
            meta.received_at,
            now,
        );
        let delay = (now - meta.received_at).max(0) as f64 / 1000.0;
        metrics::counter!(
            "switchyard_deliveries_total",
            "status" => status,
            "tenant" => meta.tenant.clone(),
        )
        .increment(1);
        tracing::info!(
            queue_id = %meta.id,
            tenant = %meta.tenant,
            "to=<{}>, relay={}, tls={}, delay={:.2}s, attempt={}, status={} ({})",
            attempt.recipient.address,
            attempt.relay,
            attempt.tls,
            delay,
            count,
            status,
            diagnostic
        );
        let notify = attempt.recipient.dsn.notify;
        let age = now - meta.received_at;
        let warn_after = self.config.retry.delay_warning.as_millis() as i64;
        let notice = match outcome {
            Outcome::Failed if notify.on_failure() => Some((Notice::Failure, Action::Failed)),
            Outcome::Deferred { .. }
                if notify.on_delay()
                    && !attempt.recipient.delay_warned
                    && warn_after > 0
                    && age >= warn_after =>
            {
                Some((Notice::Delay, Action::Delayed))
            }
            Outcome::Delivered if notify.on_success() && !attempt.dsn_passed => {
                let local = attempt.relay.starts_with("mailbox:");
                let action = if local {
                    Action::Delivered
                } else {
                    Action::Relayed
                };
                Some((Notice::Success, action))
            }
            _ => None,
        };
        let notice = notice.map(|(notice, action)| {
            let entry = DsnRecipient {
                address: attempt.recipient.address.clone(),
                action,
                status: if status == "expired" {
                    "4.4.7".to_string()
                } else {
                    dsn::status_of(attempt.reply.code, &attempt.reply.enhanced)
                },
                diagnostic: diagnostic.clone(),
                remote_mta: (attempt.relay != "none").then(|| attempt.relay.clone()),
                orcpt: attempt.recipient.dsn.orcpt.clone(),
            };
            (notice, entry)
        });
        let report = observe::report(
            meta,
            &attempt.recipient.address,
            &outcome,
            &attempt.relay,
            &diagnostic,
            count,
        );
        Classified {
            result: RecipientResult {
                message_id: meta.id.clone(),
                index: attempt.recipient.index,
                attempts: count,
                outcome,
                reply: diagnostic,
                delay_warned: matches!(notice, Some((Notice::Delay, _))),
            },
            report,
            notice,
        }
    }

    /// The message's content for its notices: the job's, or the queue's copy.
    async fn content_for_notices(&self, meta: &MessageMeta, content: Option<Bytes>) -> Bytes {
        match content {
            Some(content) => content,
            None => self
                .queue
                .content(&meta.id)
                .await
                .ok()
                .flatten()
                .unwrap_or_default(),
        }
    }

    /// The DSN for `failed` recipients, with the bounce hook's words if a plugin offers them;
    /// none for a bounce (null sender), which is never bounced.
    async fn bounce(
        &self,
        run: &mut PluginRun,
        meta: &MessageMeta,
        content: &Bytes,
        failed: &[DsnRecipient],
    ) -> Option<NewMessage> {
        let text = observe::bounce_text(run, meta, failed, content).await;
        let bounce = dsn::build(
            &self.config.hostname,
            meta,
            content,
            failed,
            Report::Failure,
            text.as_ref(),
        );
        match &bounce {
            Some(bounce) => {
                tracing::info!(queue_id = %meta.id, dsn = %bounce.meta.id, "sender non-delivery notification")
            }
            None if meta.sender.is_empty() => {
                tracing::info!(queue_id = %meta.id, "undeliverable bounce discarded (null sender)")
            }
            None => {}
        }
        bounce
    }

    /// Turns replies into outcomes, logs one line per recipient, queues a DSN for failures and
    /// records it all in one transaction; then the delivery-result hooks hear of it.
    pub(super) async fn finish(&self, mut job: Job, attempts: Vec<Attempt>) {
        let now = now_millis();
        let meta = job.meta.clone();
        let classified: Vec<Classified> = attempts
            .into_iter()
            .map(|attempt| self.classify_attempt(&meta, attempt, now))
            .collect();
        let notices = |wanted: Notice| -> Vec<DsnRecipient> {
            classified
                .iter()
                .filter_map(|one| one.notice.clone())
                .filter(|(notice, _)| *notice == wanted)
                .map(|(_, recipient)| recipient)
                .collect()
        };
        let (failed, delayed, succeeded) = (
            notices(Notice::Failure),
            notices(Notice::Delay),
            notices(Notice::Success),
        );
        let set = self.plugins.set_for_message(&meta.tenant, &meta.id);
        let mut run = self.plugin_run(&set, &meta, job.plugins.take());
        let mut bounces = Vec::new();
        if !failed.is_empty() || !delayed.is_empty() || !succeeded.is_empty() {
            let content = self.content_for_notices(&meta, job.content.take()).await;
            if !failed.is_empty() {
                bounces.extend(self.bounce(&mut run, &meta, &content, &failed).await);
            }
            let retry_until = meta.received_at + self.config.retry.max_lifetime.as_millis() as i64;
            for (recipients, report, what) in [
                (&delayed, Report::Delay { retry_until }, "delay"),
                (&succeeded, Report::Success, "success"),
            ] {
                let notice = dsn::build(
                    &self.config.hostname,
                    &meta,
                    &content,
                    recipients,
                    report,
                    None,
                );
                if let Some(notice) = notice {
                    tracing::info!(queue_id = %meta.id, dsn = %notice.meta.id, "sender {what} notification");
                    bounces.push(notice);
                }
            }
        }
        let (results, reports): (Vec<_>, Vec<_>) = classified
            .into_iter()
            .map(|one| (one.result, one.report))
            .unzip();
        let traced = (run.traced() && !set.is_empty()).then(|| attempt_summary(&job, &results));
        let recorded = self
            .queue
            .record(self.config.node_id(), results, bounces)
            .await;
        self.forget(&job);
        match recorded {
            // Observers hear of an outcome once it is recorded, never of one that a crash could
            // undo.
            Ok(0) => observe::delivery_results(&mut run, &reports).await,
            // Another holder (a node that took the lease over, an operator's command) decides.
            Ok(stale) => tracing::warn!(
                queue_id = %meta.id,
                stale,
                "results not recorded: the recipients' lease had passed to another holder"
            ),
            // The recipients stay leased and are tried again once the lease expires.
            Err(error) => {
                tracing::error!(queue_id = %meta.id, %error, "cannot record delivery results")
            }
        }
        if let (Some((recipients, outcome)), Some(mut record)) =
            (traced, run.take_trace("delivery"))
        {
            record.sender = meta.sender.clone();
            record.recipients = recipients;
            record.outcome = outcome;
            self.plugins.traces().submit(record);
        }
    }
}
