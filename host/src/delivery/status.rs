//! What the admin API and `queue list --by-destination` show of delivery: each destination's
//! rule, connections, pace and back-off, and the operator's cancel of a back-off.

use std::collections::BTreeMap;
use std::time::SystemTime;

use super::shaping::{BackoffStatus, PaceStatus};
use super::Dispatcher;
use crate::admin::views::{BackoffView, DestinationView};
use crate::queue::Millis;

impl Dispatcher {
    /// Every destination with messages waiting, connections open, a pace or a back-off.
    pub fn destinations(&self) -> Vec<DestinationView> {
        let paces: BTreeMap<String, PaceStatus> = self
            .shaper
            .statuses()
            .into_iter()
            .map(|status| (status.key.clone(), status))
            .collect();
        let state = self.state();
        let idle = self.idle.keys();
        let mut keys: Vec<&String> = paces
            .keys()
            .chain(state.destinations.keys())
            .chain(state.open.keys())
            .chain(idle.iter())
            .collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter_map(|key| {
                let pace = paces.get(key);
                let destination = state.destinations.get(key);
                // A destination goes by the rule its workers found (an `mx` rule's, when one
                // applies); a pace alone (a site's, or a destination with nothing waiting) by
                // the rule it is measured against now.
                let rule = match (destination, pace) {
                    (Some(destination), _) => (*destination.rule).clone(),
                    (None, Some(pace)) => pace.rule.clone(),
                    (None, None) => return None,
                };
                let (waiting_messages, waiting_recipients) = destination
                    .map(|destination| {
                        let jobs = destination.queues.values().flatten();
                        let recipients = jobs.map(|job| job.recipients.len()).sum();
                        (destination.waiting(), recipients)
                    })
                    .unwrap_or_default();
                Some(DestinationView {
                    destination: key.clone(),
                    rule: rule.source.clone(),
                    connections_limit: rule.connections,
                    connections_open: state.open.get(key).copied().unwrap_or_default(),
                    connections_idle: self.idle.count(key),
                    messages_per_connection: rule.messages_per_connection,
                    rate_limit: rule.rate.map(String::from),
                    rate_allowed: pace.and_then(|pace| pace.allowed),
                    rate_sending: pace.map(|pace| pace.sending).unwrap_or_default(),
                    next_slot: pace.and_then(|pace| pace.next_slot).map(millis),
                    waiting_messages,
                    waiting_recipients,
                    backoff: pace
                        .and_then(|pace| pace.backoff.as_ref())
                        .map(backoff_view),
                })
            })
            .collect()
    }

    /// Ends the back-off in force for `destination`; `false` when none was.
    pub fn cancel_backoff(&self, destination: &str) -> bool {
        self.shaper.cancel(destination).is_some()
    }

    /// Takes the shaping rules of a reloaded configuration.
    pub fn reload_shaping(&self, config: std::sync::Arc<crate::config::Config>) {
        self.shaper.reload(config);
    }
}

/// Every 5 s, delivery's destinations as gauges by `[[shaping]]` rule (`[delivery]` for the
/// defaults; by rule, not by destination, so the series stay as few as the rules):
/// `shaping_destinations{rule}`, `shaping_backoffs{rule}` (destinations backing off),
/// `shaping_connections_open{rule}` and `shaping_waiting{rule}` (messages waiting in memory).
pub async fn report_destinations(dispatcher: std::sync::Arc<Dispatcher>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    // Rules seen before stay reported (at 0) when their destinations are gone.
    let mut seen: BTreeMap<String, [f64; 4]> = BTreeMap::new();
    loop {
        tick.tick().await;
        for counts in seen.values_mut() {
            *counts = [0.0; 4];
        }
        for destination in dispatcher.destinations() {
            let rule = destination.rule.unwrap_or_else(|| "[delivery]".to_string());
            let counts = seen.entry(rule).or_default();
            counts[0] += 1.0;
            counts[1] += f64::from(u8::from(destination.backoff.is_some()));
            counts[2] += destination.connections_open as f64;
            counts[3] += destination.waiting_messages as f64;
        }
        for (rule, counts) in &seen {
            let names = [
                "switchyard_shaping_destinations",
                "switchyard_shaping_backoffs",
                "switchyard_shaping_connections_open",
                "switchyard_shaping_waiting",
            ];
            for (name, value) in names.into_iter().zip(counts) {
                metrics::gauge!(name, "rule" => rule.clone()).set(*value);
            }
        }
    }
}

fn backoff_view(status: &BackoffStatus) -> BackoffView {
    BackoffView {
        level: status.level,
        rate: status.rate,
        began: millis(status.began),
        step_ends: millis(status.step_ends),
        ends: millis(status.ends),
        triggers: status.triggers,
        reasons: status.reasons.clone(),
    }
}

fn millis(time: SystemTime) -> Millis {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|since| Millis::try_from(since.as_millis()).unwrap_or(Millis::MAX))
        .unwrap_or_default()
}
