//! The trace port: what the plugin chain decided, kept beside the queue so an operator can ask
//! why a message was refused, delayed or routed where it went (`switchyard queue trace`).
//!
//! A trace is a list of records, one per SMTP transaction, one per routing and one per delivery
//! attempt of a message (phases `smtp`, `route`, `delivery`); each record lists the hook calls
//! made, in order (a delivery record includes its bounce and delivery-result calls). Records
//! of transactions refused before a message was queued carry no message id and are found by
//! client address, sender and time. Records are written in batches after the fact (see
//! `plugins::trace`), not in the message's own commit: a crash can lose the last fraction of a
//! second of traces, never mail.

use std::borrow::Cow;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{Millis, QueueError};

/// One plugin as a record's calls refer to it: the code that ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TracedPlugin {
    pub name: String,
    /// The tenant whose chain it is in (`""`: the global chain).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tenant: String,
    /// The generation of its chain (global or tenant's).
    pub generation: u64,
    /// The component file's SHA-256, in hex.
    pub sha256: String,
}

/// One hook call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TracedCall {
    /// When the call began (Unix milliseconds).
    pub at: Millis,
    /// The hook (`rcpt-to`, `route`...).
    pub hook: String,
    /// The plugin, by name; its tenant, generation and digest are in the record's `plugins`.
    pub plugin: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tenant: String,
    /// What the call was about, when the hook is about one thing: the sender at `mail-from`,
    /// the recipient at `rcpt-to` and `route`, the HELO name at `helo`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// `continue`, `accept`, `reject`, `tempfail`, `quarantine`, `discard`, `hop`, `text`
    /// (a bounce text), `observed` (delivery-result), `failed` (the plugin trapped, timed out
    /// or overran its memory) or `skipped` (its circuit is open).
    pub verdict: String,
    /// The reply the verdict carries, as the host would send it (`550 5.7.1 ...`), or the next
    /// hop, the quarantine reason, or the failure policy's reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// An address the call rewrote, as rewritten.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<String>,
    /// Edits the call made (data hook), in words.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub edits: Vec<String>,
    /// Time the call took, instantiation included, in microseconds.
    pub micros: u64,
    /// Why the plugin failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// What the chain did in one transaction or one delivery stage of a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceRecord {
    /// The queued message; `None` for a transaction refused before anything was queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// When the record was closed (Unix milliseconds).
    pub at: Millis,
    /// `smtp` (a transaction), `route` (the route hooks), or `delivery` (an attempt, with its
    /// bounce and delivery-result calls).
    pub phase: String,
    /// The SMTP client's address (`smtp` records; empty for the others).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client_ip: String,
    /// The envelope sender as the client gave it (empty: the null sender or not given).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sender: String,
    /// The recipients the transaction or attempt was about.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
    /// How it ended, in words: `queued as ID`, `refused: 550 5.7.1 ...`, `sent`, `deferred`...
    pub outcome: String,
    pub plugins: Vec<TracedPlugin>,
    pub calls: Vec<TracedCall>,
    /// What the content scanners said about the message, before the data hooks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scans: Vec<TracedScan>,
}

/// One scanner's result, in words (`reject, score 1001.50/15.00 (GTUBE)`, `infected: NAME`,
/// `error (timeout): ...`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TracedScan {
    pub scanner: String,
    pub result: String,
    /// Time the scan took, in milliseconds.
    pub millis: u64,
}

impl TraceRecord {
    /// The record of plugin `name` of `tenant`, if one of the calls made it.
    pub fn plugin(&self, name: &str, tenant: &str) -> Option<&TracedPlugin> {
        self.plugins
            .iter()
            .find(|plugin| plugin.name == name && plugin.tenant == tenant)
    }
}

/// Which records of refused transactions to find.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceQuery {
    pub client_ip: Option<String>,
    pub sender: Option<String>,
    /// From this time on (Unix milliseconds).
    pub since: Option<Millis>,
    /// Up to this time.
    pub until: Option<Millis>,
    /// At most this many, newest first.
    pub limit: i64,
}

#[async_trait]
pub trait TraceStore: Send + Sync {
    /// Stores records, in one transaction.
    async fn append_traces(&self, records: &[PendingTrace]) -> Result<(), QueueError>;
    /// Every record of a message, oldest first.
    async fn message_trace(&self, message_id: &str) -> Result<Vec<TraceRecord>, QueueError>;
    /// Records of refused transactions (no message id) matching `query`, newest first.
    async fn refused_traces(&self, query: &TraceQuery) -> Result<Vec<TraceRecord>, QueueError>;
    /// Forgets records closed before `before`; returns how many.
    async fn prune_traces(&self, before: Millis) -> Result<u64, QueueError>;
}

/// One hook call as a run notes it and the store keeps it: a JSON array, not an object, with
/// the plugin as an index into its record's `plugins` and the times relative to the record's,
/// so a message's record costs a few hundred bytes instead of kilobytes (every message of a
/// busy router writes three). Made on the hot path without allocating for names: the hook and
/// verdict are static strings, the subject is shared with the neighbouring calls about the same
/// address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCall(
    /// Milliseconds from the record's `at` to the call's start (negative: before it).
    pub i64,
    /// The hook.
    pub Cow<'static, str>,
    /// The plugin: its index in the record's `plugins`.
    pub u16,
    /// The verdict (see [`TracedCall::verdict`]).
    pub Cow<'static, str>,
    /// Microseconds taken.
    pub u64,
    /// Subject, detail, rewrite, failure (see [`TracedCall`]), null when absent.
    pub Option<Arc<str>>,
    pub Option<String>,
    pub Option<String>,
    pub Option<String>,
    /// Edits.
    pub Vec<String>,
);

impl StoredCall {
    pub fn hook(&self) -> &str {
        &self.1
    }

    pub fn verdict(&self) -> &str {
        &self.3
    }

    pub fn detail(&self) -> Option<&str> {
        self.6.as_deref()
    }

    pub fn plugin(&self) -> usize {
        usize::from(self.2)
    }
}

/// A record on its way to the store: what [`TraceRecord`] reads back, with its calls in their
/// stored form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingTrace {
    pub message_id: Option<String>,
    pub at: Millis,
    pub phase: &'static str,
    pub client_ip: String,
    pub sender: String,
    pub recipients: Vec<String>,
    pub outcome: String,
    pub plugins: Vec<TracedPlugin>,
    pub calls: Vec<StoredCall>,
    pub scans: Vec<TracedScan>,
}

/// The JSON kept in a record's row (what is not a column of its own).
#[derive(Serialize, Deserialize)]
struct StoredBody<'a> {
    #[serde(default, rename = "r")]
    recipients: Cow<'a, [String]>,
    #[serde(rename = "o")]
    outcome: Cow<'a, str>,
    #[serde(rename = "p")]
    plugins: Cow<'a, [TracedPlugin]>,
    #[serde(rename = "c")]
    calls: Cow<'a, [StoredCall]>,
    #[serde(
        default,
        rename = "s",
        skip_serializing_if = "<[TracedScan]>::is_empty"
    )]
    scans: Cow<'a, [TracedScan]>,
}

impl PendingTrace {
    /// What goes into the row's body, borrowed.
    fn stored_body(&self) -> StoredBody<'_> {
        StoredBody {
            recipients: Cow::Borrowed(&self.recipients),
            outcome: Cow::Borrowed(&self.outcome),
            plugins: Cow::Borrowed(&self.plugins),
            calls: Cow::Borrowed(&self.calls),
            scans: Cow::Borrowed(&self.scans),
        }
    }

    /// The row's JSON body.
    pub(super) fn body(&self) -> String {
        serde_json::to_string(&self.stored_body()).unwrap_or_else(|_| "{}".to_string())
    }

    /// The record as it reads back.
    pub fn expand(&self) -> TraceRecord {
        let body = self.stored_body();
        expand(
            self.message_id.clone(),
            self.at,
            self.phase.to_string(),
            self.client_ip.clone(),
            self.sender.clone(),
            body,
        )
    }
}

/// The record of a row's columns and body; a body that does not parse (written by a newer
/// version, or damaged) still shows the columns.
pub(super) fn record_of_row(
    message_id: Option<String>,
    at: Millis,
    phase: String,
    client_ip: String,
    sender: String,
    body: &str,
) -> TraceRecord {
    match serde_json::from_str::<StoredBody>(body) {
        Ok(body) => expand(message_id, at, phase, client_ip, sender, body),
        Err(error) => TraceRecord {
            message_id,
            at,
            phase,
            client_ip,
            sender,
            recipients: Vec::new(),
            outcome: format!("(unreadable trace: {error})"),
            plugins: Vec::new(),
            calls: Vec::new(),
            scans: Vec::new(),
        },
    }
}

/// The record of a row's columns and its body.
fn expand(
    message_id: Option<String>,
    at: Millis,
    phase: String,
    client_ip: String,
    sender: String,
    body: StoredBody<'_>,
) -> TraceRecord {
    let plugins = body.plugins.into_owned();
    let calls = body
        .calls
        .iter()
        .map(|call| {
            let plugin = plugins.get(call.plugin());
            TracedCall {
                at: at + call.0,
                hook: call.1.to_string(),
                plugin: plugin.map(|p| p.name.clone()).unwrap_or_default(),
                tenant: plugin.map(|p| p.tenant.clone()).unwrap_or_default(),
                subject: call.5.as_deref().map(str::to_string),
                verdict: call.3.to_string(),
                detail: call.6.clone(),
                rewrite: call.7.clone(),
                edits: call.9.clone(),
                micros: call.4,
                failure: call.8.clone(),
            }
        })
        .collect();
    TraceRecord {
        message_id,
        at,
        phase,
        client_ip,
        sender,
        recipients: body.recipients.into_owned(),
        outcome: body.outcome.into_owned(),
        plugins,
        calls,
        scans: body.scans.into_owned(),
    }
}

/// Records as a readable timeline: one block per record, one line per call, and the plugins'
/// digests under each block.
pub fn timeline(records: &[TraceRecord]) -> String {
    let mut out = String::new();
    for record in records {
        let mut head = format!("{}  {}", clock(record.at), record.phase);
        if let Some(id) = &record.message_id {
            head.push_str(&format!("  message {id}"));
        }
        if !record.client_ip.is_empty() {
            head.push_str(&format!("  client {}", record.client_ip));
        }
        head.push_str(&format!("  from <{}>", record.sender));
        if !record.recipients.is_empty() {
            let to: Vec<String> = record.recipients.iter().map(|r| format!("<{r}>")).collect();
            head.push_str(&format!("  to {}", to.join(" ")));
        }
        out.push_str(&head);
        out.push('\n');
        for scan in &record.scans {
            out.push_str(&format!(
                "  scanner {}: {}  {}ms\n",
                scan.scanner, scan.result, scan.millis
            ));
        }
        for call in &record.calls {
            let mut line = format!("  {}  {:<15} {}", clock(call.at), call.hook, call.plugin);
            if !call.tenant.is_empty() {
                line.push_str(&format!(" (tenant {})", call.tenant));
            }
            if let Some(subject) = &call.subject {
                line.push_str(&format!("  <{subject}>"));
            }
            line.push_str(&format!("  {}", call.verdict));
            if let Some(detail) = &call.detail {
                line.push_str(&format!(" {detail}"));
            }
            if let Some(rewrite) = &call.rewrite {
                line.push_str(&format!("  rewrite <{rewrite}>"));
            }
            for edit in &call.edits {
                line.push_str(&format!("  [{edit}]"));
            }
            line.push_str(&format!("  {:.3}ms", call.micros as f64 / 1000.0));
            if let Some(failure) = &call.failure {
                line.push_str(&format!("  failure: {failure}"));
            }
            out.push_str(&line);
            out.push('\n');
        }
        out.push_str(&format!("  => {}\n", record.outcome));
        for plugin in &record.plugins {
            let tenant = if plugin.tenant.is_empty() {
                String::new()
            } else {
                format!(" tenant {}", plugin.tenant)
            };
            out.push_str(&format!(
                "     {}{tenant}: generation {}, sha256 {}\n",
                plugin.name, plugin.generation, plugin.sha256
            ));
        }
    }
    out
}

/// A time as the timeline shows it (UTC, milliseconds).
fn clock(at: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(at)
        .map(|time| time.format("%Y-%m-%d %H:%M:%S%.3f").to_string())
        .unwrap_or_else(|| at.to_string())
}
