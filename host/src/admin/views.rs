//! The JSON of the admin API, which the CLI prints from whether it asked the API or the queue.

use serde::{Deserialize, Serialize};

use crate::queue::{Millis, QueuedMessage};

/// A queued message and its recipients.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessageView {
    pub id: String,
    /// Empty for the null sender.
    pub sender: String,
    pub received_at: Millis,
    pub size: u64,
    pub smtputf8: bool,
    pub eight_bit: bool,
    /// `""`: no tenant.
    pub tenant: String,
    pub dsn_ret: Option<String>,
    pub dsn_envid: Option<String>,
    pub requiretls: bool,
    pub recipients: Vec<RecipientView>,
    /// The message itself (headers and body, lossily as UTF-8): only when one message is shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecipientView {
    pub index: i64,
    pub address: String,
    /// `queued`, `delivered`, `failed`, `quarantined` or `held`.
    pub state: String,
    pub attempts: i64,
    pub next_attempt: Millis,
    pub last_reply: Option<String>,
    /// NOTIFY as the sender gave it, when given.
    pub notify: Option<String>,
    pub orcpt: Option<String>,
    /// The node (or operator command) delivering it now, if its lease is live.
    pub leased_by: Option<String>,
}

impl MessageView {
    pub fn of(message: &QueuedMessage, now: Millis) -> MessageView {
        let meta = &message.meta;
        MessageView {
            id: meta.id.clone(),
            sender: meta.sender.clone(),
            received_at: meta.received_at,
            size: meta.size,
            smtputf8: meta.smtputf8,
            eight_bit: meta.eight_bit,
            tenant: meta.tenant.clone(),
            dsn_ret: meta.dsn.ret.map(|ret| ret.as_str().to_string()),
            dsn_envid: meta.dsn.envid.clone(),
            requiretls: meta.dsn.requiretls,
            recipients: message
                .recipients
                .iter()
                .map(|recipient| RecipientView {
                    index: recipient.index,
                    address: recipient.address.clone(),
                    state: recipient.state.name().to_string(),
                    attempts: recipient.attempts,
                    next_attempt: recipient.next_attempt,
                    last_reply: recipient.last_reply.clone(),
                    notify: recipient
                        .dsn
                        .notify
                        .is_specified()
                        .then(|| recipient.dsn.notify.to_string()),
                    orcpt: recipient.dsn.orcpt.clone(),
                    leased_by: recipient
                        .lease
                        .as_ref()
                        .filter(|lease| lease.until >= now)
                        .map(|lease| lease.owner.clone()),
                })
                .collect(),
            content: None,
        }
    }
}

/// How many recipients an action changed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Changed {
    pub recipients: u64,
}

/// What `hold` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Held {
    pub held: u64,
    /// Recipients being delivered now, left to finish their attempt.
    pub busy: u64,
}

/// What `bounce` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bounced {
    /// Recipients failed with a notice (those that asked not to hear of failures are failed
    /// without one).
    pub notified: usize,
    /// The DSN's queue id; none for a message of the null sender.
    pub dsn: Option<String>,
}

/// An error the API answers with (and the CLI prints).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorView {
    pub error: String,
}

/// One destination of this node's delivery: its rule, connections, pace and back-off.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DestinationView {
    /// The destination: a recipient domain, `[host:port]` for a relay, `lmtp:...` or
    /// `mailbox:...`.
    pub destination: String,
    /// The `[[shaping]]` rule that applies (its domain pattern); `null`: the `[delivery]`
    /// defaults alone.
    pub rule: Option<String>,
    pub connections_limit: usize,
    /// Connections sending now, and connections idle (kept open for the next message).
    pub connections_open: usize,
    pub connections_idle: usize,
    pub messages_per_connection: usize,
    /// The rule's rate (`10/s`), if it has one.
    pub rate_limit: Option<String>,
    /// Messages per second allowed now: the back-off's cut rate while one is in force, else
    /// the rule's; `null`: not limited.
    pub rate_allowed: Option<f64>,
    /// Messages per second sent to it over the back-off window.
    pub rate_sending: f64,
    /// The next send time already given out, when it is still to come (Unix ms).
    pub next_slot: Option<Millis>,
    /// Messages waiting in this node's memory for a connection to it, and their recipients
    /// (recipients waiting for their retry time are in the queue, not here).
    pub waiting_messages: usize,
    pub waiting_recipients: usize,
    pub backoff: Option<BackoffView>,
}

/// A back-off in force: the destination answered "slow down" in bulk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackoffView {
    /// Steps cut: the rate is the rule's (or the rate sent at) × factor^level, at least the
    /// floor.
    pub level: u32,
    /// Messages per second allowed while it lasts.
    pub rate: f64,
    /// Unix ms: when it began, when its current step ends (the rate then comes back one step),
    /// and when the rate is back in full if nothing triggers it again.
    pub began: Millis,
    pub step_ends: Millis,
    pub ends: Millis,
    /// The replies counted since it began, and the last few of them (oldest first).
    pub triggers: u64,
    pub reasons: Vec<String>,
}
