//! What an operator can do to the queue, written once for the CLI (on the queue directly) and
//! the admin API (in the server): list, show, retry, hold, release, delete, bounce, and read
//! traces.

use super::views::{Bounced, Changed, Held, MessageView};
use crate::delivery::dsn::{self, DsnRecipient};
use crate::delivery::observe;
use crate::plugins::PluginManager;
use crate::queue::traces::{TraceQuery, TraceRecord, TraceStore};
use crate::queue::{now_millis, Outcome, Queue, QueueError, QueuedMessage, RecipientResult};

/// Why an action did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("no message {0} in the queue")]
    NoMessage(String),
    #[error("no trace of {0} (tracing off, never traced, or older than [trace] keep)")]
    NoTrace(String),
    #[error(
        "{busy} recipient(s) of {id} are being delivered right now; try again once the attempt \
         is over (`queue show {id}`)"
    )]
    Busy { id: String, busy: usize },
    #[error(
        "{0} was taken back by delivery while this command ran (its lease ran out); nothing was \
         bounced"
    )]
    Stale(String),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// How long an operator's command holds a message away from delivery, at most.
const OPERATOR_LEASE_MILLIS: i64 = 60_000;

/// Every message (or a tenant's: `-` for mail of no tenant), oldest first.
pub async fn list(
    queue: &dyn Queue,
    tenant: Option<&str>,
) -> Result<Vec<MessageView>, ActionError> {
    let mut messages = queue.list().await?;
    if let Some(wanted) = tenant {
        let wanted = if wanted == "-" { "" } else { wanted };
        messages.retain(|message| message.meta.tenant == wanted);
    }
    let now = now_millis();
    Ok(messages
        .iter()
        .map(|message| MessageView::of(message, now))
        .collect())
}

/// One message, with its content.
pub async fn show(queue: &dyn Queue, id: &str) -> Result<MessageView, ActionError> {
    let message = queue
        .get(id)
        .await?
        .ok_or_else(|| ActionError::NoMessage(id.to_string()))?;
    let mut view = MessageView::of(&message, now_millis());
    view.content = queue
        .content(id)
        .await?
        .map(|content| String::from_utf8_lossy(&content).into_owned());
    Ok(view)
}

/// Makes a message's (or every message's) queued recipients due now; releases quarantined ones.
pub async fn retry(queue: &dyn Queue, id: Option<&str>) -> Result<Changed, ActionError> {
    Ok(Changed {
        recipients: queue.retry_now(id).await?,
    })
}

pub async fn hold(queue: &dyn Queue, id: Option<&str>) -> Result<Held, ActionError> {
    let (held, busy) = queue.hold(id, now_millis()).await?;
    if let Some(id) = id {
        if held == 0 && busy == 0 && queue.get(id).await?.is_none() {
            return Err(ActionError::NoMessage(id.to_string()));
        }
    }
    Ok(Held { held, busy })
}

pub async fn release(queue: &dyn Queue, id: Option<&str>) -> Result<Changed, ActionError> {
    let recipients = queue.release(id).await?;
    if let Some(id) = id {
        if recipients == 0 && queue.get(id).await?.is_none() {
            return Err(ActionError::NoMessage(id.to_string()));
        }
    }
    Ok(Changed { recipients })
}

/// Removes a message without delivering or bouncing it.
pub async fn delete(queue: &dyn Queue, id: &str) -> Result<(), ActionError> {
    take_from_delivery(queue, id).await?;
    if !queue.delete(id).await? {
        return Err(ActionError::NoMessage(id.to_string()));
    }
    Ok(())
}

/// Fails every pending recipient now and returns the message to its sender (`hostname` signs
/// the DSN). As for any other failure, the message's plugins are asked: the bounce hook for the
/// DSN's words, and once the failure is recorded the delivery-result hook for each recipient.
pub async fn bounce(
    queue: &dyn Queue,
    hostname: &str,
    id: &str,
    plugins: &PluginManager,
) -> Result<Bounced, ActionError> {
    let (message, owner) = take_from_delivery(queue, id).await?;
    let content = queue.content(id).await?.unwrap_or_default();
    let set = plugins.set_for_message(&message.meta.tenant, id);
    let mut run = observe::delivery_run(&set, &message.meta, None);
    let diagnostic = "550 5.0.0 message returned by the administrator".to_string();
    // Recipients that asked not to hear of failures (NOTIFY) are failed without a notice.
    let failed: Vec<DsnRecipient> = message
        .recipients
        .iter()
        .filter(|recipient| recipient.dsn.notify.on_failure())
        .map(|recipient| DsnRecipient {
            address: recipient.address.clone(),
            action: dsn::Action::Failed,
            status: "5.0.0".to_string(),
            diagnostic: diagnostic.clone(),
            remote_mta: None,
            orcpt: recipient.dsn.orcpt.clone(),
        })
        .collect();
    let results: Vec<RecipientResult> = message
        .recipients
        .iter()
        .map(|recipient| RecipientResult {
            message_id: id.to_string(),
            index: recipient.index,
            attempts: recipient.attempts,
            outcome: Outcome::Failed,
            reply: diagnostic.clone(),
            delay_warned: false,
        })
        .collect();
    let text = if failed.is_empty() {
        None
    } else {
        observe::bounce_text(&mut run, &message.meta, &failed, &content).await
    };
    let bounce = dsn::build(
        hostname,
        &message.meta,
        &content,
        &failed,
        dsn::Report::Failure,
        text.as_ref(),
    );
    let dsn_id = bounce.as_ref().map(|b| b.meta.id.clone());
    let reports: Vec<_> = message
        .recipients
        .iter()
        .map(|recipient| {
            observe::report(
                &message.meta,
                &recipient.address,
                &Outcome::Failed,
                "none",
                &diagnostic,
                recipient.attempts,
            )
        })
        .collect();
    let stale = queue
        .record(&owner, results, bounce.into_iter().collect())
        .await?;
    if stale > 0 {
        return Err(ActionError::Stale(id.to_string()));
    }
    // Observers hear of the failure once it is recorded, as after a delivery attempt.
    observe::delivery_results(&mut run, &reports).await;
    Ok(Bounced {
        notified: failed.len(),
        dsn: dsn_id,
    })
}

/// A message's trace, oldest record first.
pub async fn trace(traces: &dyn TraceStore, id: &str) -> Result<Vec<TraceRecord>, ActionError> {
    let records = traces.message_trace(id).await?;
    if records.is_empty() {
        return Err(ActionError::NoTrace(id.to_string()));
    }
    Ok(records)
}

/// Traces of refused transactions, newest first.
pub async fn refused(
    traces: &dyn TraceStore,
    query: &TraceQuery,
) -> Result<Vec<TraceRecord>, ActionError> {
    Ok(traces.refused_traces(query).await?)
}

/// Leases a message's pending recipients to this command so that a running server cannot
/// deliver them while the command bounces or deletes the message (which would deliver and
/// bounce it, or deliver it after the operator removed it). Fails if some are being delivered
/// right now.
async fn take_from_delivery(
    queue: &dyn Queue,
    id: &str,
) -> Result<(QueuedMessage, String), ActionError> {
    // Unique across machines and runs: the command may run anywhere against a shared queue.
    let owner = format!(
        "admin-{}-{}-{:08x}",
        crate::config::machine_name(),
        std::process::id(),
        fastrand::u32(..)
    );
    let now = now_millis();
    let Some((message, busy)) = queue
        .lease_message(id, &owner, now, now + OPERATOR_LEASE_MILLIS)
        .await?
    else {
        return Err(ActionError::NoMessage(id.to_string()));
    };
    if busy > 0 {
        queue.release_leases(&owner).await?;
        return Err(ActionError::Busy {
            id: id.to_string(),
            busy,
        });
    }
    Ok((message, owner))
}
