//! Canaries: a candidate version of a plugin (`canary = { path, percent }` in its manifest) that
//! decides instead of the live one for a share of the transactions.
//!
//! Which transactions is decided by a draw made from the message's queue id, which a
//! transaction gets when its plugin run starts (before the connect or MAIL hook): the SMTP
//! stages, routing and every delivery attempt of that message (in this process or another node,
//! after a restart too) make the same draw, so one message is decided by one version from its
//! first hook to its last. A draw is a number of ten-thousandths; the canary takes the
//! transactions whose draw is below its share. All canaries of a chain read the same draw, so
//! with several the smaller share's transactions are among the larger's: one cohort of traffic
//! meets every candidate at once, and the rest meets none.

use std::sync::Arc;

use super::plugin::LoadedPlugin;
use super::PluginSet;

/// Draws are in `0..DRAWS`: ten-thousandths.
pub const DRAWS: u16 = 10_000;

/// A plugin's candidate and its share.
pub struct Canary {
    pub plugin: Arc<LoadedPlugin>,
    /// Transactions whose draw is below this decide by the candidate.
    pub basis_points: u16,
}

impl Canary {
    pub fn takes(&self, draw: u16) -> bool {
        draw < self.basis_points
    }
}

/// The draw of the transaction that queues (or queued) `queue_id`: FNV-1a of the id, so it is
/// the same on every node and across versions (std's hasher promises neither).
pub fn draw_of(queue_id: &str) -> u16 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in queue_id.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // The high bits mix every byte; the remainder's bias is below one in 10^15.
    ((hash >> 16) % u64::from(DRAWS)) as u16
}

impl PluginSet {
    /// The chain that a transaction with `draw` runs: this one, with each plugin whose canary
    /// takes the draw replaced by the candidate (the same set, shared, when none does).
    pub fn for_draw(self: &Arc<Self>, draw: u16) -> Arc<PluginSet> {
        let taken = |plugin: &LoadedPlugin| plugin.canary.as_ref().is_some_and(|c| c.takes(draw));
        if !self.plugins.iter().any(|plugin| taken(plugin)) {
            return self.clone();
        }
        let plugins = self
            .plugins
            .iter()
            .map(|plugin| match &plugin.canary {
                Some(canary) if canary.takes(draw) => canary.plugin.clone(),
                _ => plugin.clone(),
            })
            .collect();
        Arc::new(self.with_plugins(plugins))
    }

    /// The same plugins, in the same order, as `other`: a run made on either serves the other.
    pub fn same_chain(&self, other: &PluginSet) -> bool {
        self.generation == other.generation
            && self.tenant == other.tenant
            && self.tenant_generation == other.tenant_generation
            && self.global_len == other.global_len
            && self.plugins.len() == other.plugins.len()
            && self
                .plugins
                .iter()
                .zip(&other.plugins)
                .all(|(ours, theirs)| Arc::ptr_eq(ours, theirs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_stable_and_spread_evenly() {
        // Pinned values: a draw must never change between versions, or messages in the queue
        // would switch version at their next delivery attempt.
        // (9083 is FNV-1a computed apart, in Python.)
        assert_eq!(draw_of("01JDX5Z8Q0R5V0W1X2Y3Z4A5B6"), 9083);
        let ids: Vec<String> = (0..20_000).map(|_| ulid::Ulid::new().to_string()).collect();
        let below_half = ids.iter().filter(|id| draw_of(id) < DRAWS / 2).count();
        // 20,000 fair coin flips: 10,000 ± 3 standard deviations (212).
        assert!((9_788..=10_212).contains(&below_half), "{below_half}");
        let below_tenth = ids.iter().filter(|id| draw_of(id) < DRAWS / 10).count();
        assert!((1_880..=2_120).contains(&below_tenth), "{below_tenth}");
        assert!(ids.iter().all(|id| draw_of(id) < DRAWS));
    }
}
