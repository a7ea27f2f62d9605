//! The one door from a session into delivery, as chasquid's `Queue.Put`: an accepted message goes
//! in, and the call returns once the message is durable. Behind the door: the queue's rows, the
//! lease the accepting node takes so it can deliver at once without a scan, the plugin instances
//! held for the message's delivery hooks, and the dispatcher. A session knows none of them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::Dispatcher;
use crate::plugins::hooks::HookKind;
use crate::plugins::{PluginManager, PluginRun};
use crate::queue::{
    now_millis, MessageDsn, MessageMeta, NewMessage, Queue, QueueError, QueuedMessage,
    RecipientDsn, RecipientRow, RecipientState,
};

/// A message a session has accepted: stamped, checked and edited, ready to be queued.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// From [`Inbox::new_id`]: the id the message's `Received:` header and hooks already named.
    pub id: String,
    /// The listener that accepted it, for the log.
    pub listener: String,
    /// Envelope sender; empty for the null sender.
    pub sender: String,
    pub recipients: Vec<String>,
    /// NOTIFY and ORCPT of each recipient, in order (recipients a data hook added have none).
    pub recipient_dsn: Vec<RecipientDsn>,
    /// RET, ENVID and REQUIRETLS of MAIL.
    pub dsn: MessageDsn,
    /// The whole message as it will be delivered, CRLF line endings.
    pub content: Bytes,
    /// The client used SMTPUTF8.
    pub smtputf8: bool,
    /// The client declared BODY=8BITMIME.
    pub eight_bit_mime: bool,
    /// Held instead of delivered, for this reason (a data hook said so).
    pub quarantine: Option<String>,
    /// The tenant it belongs to (`""`: none).
    pub tenant: String,
}

pub struct Inbox {
    queue: Arc<dyn Queue>,
    dispatcher: Arc<Dispatcher>,
    plugins: Arc<PluginManager>,
    /// The last write failed and a probe has not yet seen the database answer: sessions are
    /// refused at MAIL rather than after a whole message was sent.
    queue_down: Arc<AtomicBool>,
}

impl Inbox {
    pub fn new(
        queue: Arc<dyn Queue>,
        dispatcher: Arc<Dispatcher>,
        plugins: Arc<PluginManager>,
    ) -> Inbox {
        let inbox = Inbox {
            queue,
            dispatcher,
            plugins,
            queue_down: Arc::new(AtomicBool::new(false)),
        };
        metrics::gauge!("switchyard_queue_available").set(1.0);
        inbox
    }

    /// Whether new mail can be queued: false from a failed write until the database answers
    /// again.
    pub fn queue_available(&self) -> bool {
        !self.queue_down.load(Ordering::Acquire)
    }

    /// Refuses new transactions until a probe (once a second) finds the database answering.
    fn mark_queue_down(&self) {
        if self.queue_down.swap(true, Ordering::AcqRel) {
            return;
        }
        metrics::gauge!("switchyard_queue_available").set(0.0);
        let queue = self.queue.clone();
        let down = self.queue_down.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                match queue.ping().await {
                    Ok(()) => {
                        tracing::info!("queue database answers again; accepting mail");
                        metrics::gauge!("switchyard_queue_available").set(1.0);
                        down.store(false, Ordering::Release);
                        return;
                    }
                    Err(error) => tracing::warn!(%error, "queue database still unavailable"),
                }
            }
        });
    }

    /// A new queue id: sortable by time (a ULID), and known before the message is queued, since
    /// the `Received:` header and the data hooks name it.
    pub fn new_id(&self) -> String {
        ulid::Ulid::new().to_string()
    }

    /// Queues `message` and returns once it is committed (the session may then say 250). A
    /// message that is not quarantined is handed straight to delivery, claimed by this node, with
    /// `run` (the transaction's plugin instances) held for its route, delivery-result and bounce
    /// hooks, so a message costs one instantiation per plugin, not three.
    pub async fn accept(
        &self,
        message: Accepted,
        run: Option<PluginRun>,
    ) -> Result<String, QueueError> {
        let received_at = now_millis();
        let eight_bit = message.eight_bit_mime || message.content.iter().any(|&b| b >= 0x80);
        let meta = MessageMeta {
            id: message.id,
            sender: message.sender,
            received_at,
            size: message.content.len() as u64,
            smtputf8: message.smtputf8,
            eight_bit,
            tenant: message.tenant,
            dsn: message.dsn,
        };
        // The accepting node claims the message at once, under the name the dispatcher records
        // its results under (`node_id`), for one lease length.
        let config = &self.dispatcher.config;
        let lease_until = received_at + config.queue.lease.as_millis() as i64;
        let lease = message
            .quarantine
            .is_none()
            .then(|| (config.node_id().to_string(), lease_until));
        let new = NewMessage {
            meta: meta.clone(),
            recipients: message.recipients.clone(),
            recipient_dsn: message.recipient_dsn.clone(),
            content: message.content.clone(),
            quarantine: message.quarantine.clone(),
        };
        if let Err(error) = self.queue.enqueue(new, lease).await {
            tracing::error!(queue_id = %meta.id, %error, "cannot queue message");
            self.mark_queue_down();
            return Err(error);
        }
        tracing::info!(
            queue_id = %meta.id,
            listener = %message.listener,
            tenant = %meta.tenant,
            from = %meta.sender,
            recipients = message.recipients.len(),
            size = meta.size,
            quarantine = message.quarantine.as_deref().unwrap_or("-"),
            "queued"
        );
        metrics::counter!("switchyard_messages_accepted_total", "tenant" => meta.tenant.clone())
            .increment(1);
        let id = meta.id.clone();
        if message.quarantine.is_none() {
            let queued = QueuedMessage {
                meta,
                recipients: first_attempts(message.recipients, message.recipient_dsn, received_at),
            };
            let run = run.and_then(|run| {
                self.plugins.hold(
                    run,
                    &[HookKind::Route, HookKind::DeliveryResult, HookKind::Bounce],
                )
            });
            self.dispatcher.submit(queued, Some(message.content), run);
        }
        Ok(id)
    }
}

/// The recipients of a message just queued, as a claim hands them to delivery.
fn first_attempts(recipients: Vec<String>, dsn: Vec<RecipientDsn>, due: i64) -> Vec<RecipientRow> {
    recipients
        .into_iter()
        .enumerate()
        .map(|(index, address)| RecipientRow {
            index: index as i64,
            address,
            state: RecipientState::Queued,
            attempts: 0,
            next_attempt: due,
            last_reply: None,
            dsn: dsn.get(index).cloned().unwrap_or_default(),
            delay_warned: false,
            lease: None,
        })
        .collect()
}
