//! The queue scan: claims recipients that are due (retries, bounces, messages left over from a
//! previous run) and hands them to the dispatcher.

use std::sync::Arc;

use super::Dispatcher;
use crate::queue::now_millis;

/// Most messages claimed per scan; a full batch is followed by another scan at once.
const CLAIM_BATCH: i64 = 500;

pub async fn run_scanner(dispatcher: Arc<Dispatcher>, node_id: String) {
    let interval = dispatcher.config.queue.scan_interval;
    let lease = dispatcher.config.queue.lease.as_millis() as i64;
    while !dispatcher.shutdown.is_stopping() {
        let now = now_millis();
        match dispatcher
            .queue
            .claim_due(&node_id, now, now + lease, CLAIM_BATCH)
            .await
        {
            Ok(messages) => {
                // The limit counts messages on one engine and recipients on the other: either
                // count reaching it means more may be due.
                let recipients: usize = messages.iter().map(|m| m.recipients.len()).sum();
                let full = messages.len() as i64 >= CLAIM_BATCH || recipients as i64 >= CLAIM_BATCH;
                if !messages.is_empty() {
                    tracing::debug!(messages = messages.len(), "claimed due messages");
                }
                for message in messages {
                    dispatcher.submit(message, None, None);
                }
                if full {
                    continue;
                }
            }
            Err(error) => tracing::error!(%error, "queue scan failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = dispatcher.queue.work_arrived() => {}
            _ = dispatcher.shutdown.stopping() => {}
        }
    }
}

/// Renews this node's leases on the messages it holds in memory, every third of their length,
/// for as long as the process runs: what it works on stays its own however long delivery
/// takes. A lease on a message it no longer holds (a result that could not be recorded) runs
/// out within one lease length of the last of that message's recipients leaving memory, and
/// those of a node that died within one lease length; then any node claims them.
pub async fn run_lease_renewal(dispatcher: Arc<Dispatcher>, node_id: String) {
    let lease = dispatcher.config.queue.lease;
    let mut ticks = tokio::time::interval(lease / 3);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let held = dispatcher.in_flight_messages();
        if held.is_empty() {
            continue;
        }
        let until = now_millis() + lease.as_millis() as i64;
        match dispatcher.queue.renew_leases(&node_id, &held, until).await {
            Ok(renewed) => tracing::debug!(renewed, "queue leases renewed"),
            Err(error) => tracing::warn!(%error, "cannot renew queue leases"),
        }
    }
}
