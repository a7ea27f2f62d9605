//! The delivery-side hooks that observe or decorate: delivery-result (after every attempt) and
//! bounce (the human-readable part of a DSN).

use std::sync::Arc;

use super::dsn::DsnRecipient;
use crate::plugins::bindings::types as wit;
use crate::plugins::hooks::HookKind;
use crate::plugins::{PluginRun, PluginSet, RunContext};
use crate::queue::{MessageMeta, Outcome};

/// The plugin run of a message's delivery stages: the one its transaction left (`held`), or a
/// new one on `set`.
pub fn delivery_run(
    set: &Arc<PluginSet>,
    meta: &MessageMeta,
    held: Option<PluginRun>,
) -> PluginRun {
    PluginRun::resume(
        set,
        held,
        RunContext {
            tenant: meta.tenant.clone(),
            queue_id: Some(meta.id.clone()),
            tape: None,
        },
    )
}

/// The message facts plugins see.
pub(super) fn plugin_facts(meta: &MessageMeta) -> wit::MessageFacts {
    wit::MessageFacts {
        id: meta.id.clone(),
        sender: meta.sender.clone(),
        size: meta.size,
        tenant: meta.tenant.clone(),
    }
}

/// What the delivery-result hook is told about one recipient's attempt.
pub fn report(
    meta: &MessageMeta,
    recipient: &str,
    outcome: &Outcome,
    relay: &str,
    reply: &str,
    attempt: i64,
) -> wit::DeliveryReport {
    wit::DeliveryReport {
        message: plugin_facts(meta),
        recipient: recipient.to_string(),
        status: match outcome {
            Outcome::Delivered => wit::DeliveryStatus::Delivered,
            Outcome::Deferred { .. } => wit::DeliveryStatus::Deferred,
            Outcome::Failed => wit::DeliveryStatus::Failed,
        },
        relay: if relay == "none" {
            String::new()
        } else {
            relay.to_string()
        },
        reply: reply.to_string(),
        attempt: attempt.clamp(0, u32::MAX as i64) as u32,
    }
}

pub async fn delivery_results(run: &mut PluginRun, reports: &[wit::DeliveryReport]) {
    for report in reports {
        run.delivery_result(report).await;
    }
}

/// The bounce hook's subject and text for a DSN, if a plugin offers one.
pub async fn bounce_text(
    run: &mut PluginRun,
    meta: &MessageMeta,
    failed: &[DsnRecipient],
    content: &[u8],
) -> Option<wit::BounceText> {
    if !run.implements(HookKind::Bounce) || meta.sender.is_empty() {
        return None;
    }
    let report = wit::BounceReport {
        message: plugin_facts(meta),
        failed: failed
            .iter()
            .map(|recipient| wit::FailedRecipient {
                address: recipient.address.clone(),
                status: recipient.status.clone(),
                diagnostic: recipient.diagnostic.clone(),
            })
            .collect(),
        headers: crate::plugins::host::parsed_headers(content),
    };
    run.bounce(&report).await
}
