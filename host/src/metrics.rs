//! Prometheus metrics: the HTTP endpoint, the host's own series and the plugins' counters and
//! histograms (the `metrics` import).
//!
//! Series, all prefixed `switchyard_`:
//! - `smtp_sessions_total{listener}`: sessions started (refused ones included);
//! - `smtp_refused_total{listener,reason}`: sessions refused at connect (`auth_ban`, `memory`);
//! - `resident_bytes` and `memory_pressure` (1 while new sessions are refused for memory, see
//!   `inbound::memory`);
//! - `messages_accepted_total{tenant}`: messages that got their 250 (committed to the queue);
//! - `deliveries_total{status,tenant}`: attempt outcomes per recipient, `sent`, `deferred`,
//!   `bounced` or `expired`, as in the delivery log line;
//! - `plugin_calls_total{plugin,tenant}` and `plugin_failures_total{plugin,tenant,kind}` (the
//!   tenant whose chain the plugin is in, `""` for the global chain);
//! - `plugin_call_seconds{plugin,tenant,hook}`: a histogram of hook calls' durations;
//! - `plugin_circuit_open{plugin,tenant}` (1 while open), `plugin_circuit_trips_total` and
//!   `plugin_skipped_total` (calls an open circuit answered), per plugin (see `plugins::breaker`);
//! - `trace_dropped_total`: decision-trace records not stored (a backlog, a failed write);
//! - `tenant_limited_total{tenant,limit}`: transactions refused by a tenant's limit;
//! - `plugin_hold_refused_total`: messages whose delivery stages had to instantiate their plugins
//!   afresh because held runs already kept their share of the instance pool (see `plugins::hold`);
//! - `auth_total{result}`: SMTP AUTH attempts, `ok`, `failed` (password) or `refused` (a plugin);
//! - `plugin_counter_total{plugin,tenant,name}` and `plugin_histogram{plugin,tenant,name}`: what
//!   plugins record (the tenant of the mail they were deciding on);
//! - `queue_messages`, `queue_recipients{state}` (`queued`, `quarantined`, `held`, `leased`) and
//!   `queue_leased_here`: the queue's counts every 5 s (on a shared queue, the whole queue's,
//!   as every node sees it, except `queue_leased_here`: this node's leases);
//! - `queue_available`: 0 from a failed queue write until the database answers again, else 1;
//! - `scanner_calls_total{scanner,verdict}` (`clean`, `infected`, rspamd's action, or `error`),
//!   `scanner_errors_total{scanner,error}` (`timeout`, `refused`, `too-large`, `protocol`) and
//!   `scanner_seconds{scanner}`: the content scanners (see `scan`).
//! - `backoff_steps_total{rule}`: back-offs begun or cut a step deeper, by `[[shaping]]` rule
//!   (`[delivery]` without one), and every 5 s by rule: `shaping_destinations`,
//!   `shaping_backoffs` (destinations backing off), `shaping_connections_open` and
//!   `shaping_waiting` (messages waiting in memory) (see `delivery::status`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::config::MetricsConfig;

/// Distinct metric names one plugin may create: a plugin must not be able to grow the host's
/// memory (or a scrape) without bound by inventing names.
const MAX_NAMES_PER_PLUGIN: usize = 64;
const MAX_NAME_LENGTH: usize = 64;

/// True once the endpoint runs: without it, plugins' metric calls return at once.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Starts the endpoint, if configured. Must run inside the tokio runtime.
pub fn install(config: &MetricsConfig) -> anyhow::Result<()> {
    let Some(listen) = config.listen else {
        return Ok(());
    };
    PrometheusBuilder::new()
        .with_http_listener(listen)
        // Real buckets (not a summary) for hook calls: quantiles can then be summed over
        // nodes and plugins. From 10 µs (a call into a warm instance) to the longest limits.
        .set_buckets_for_metric(
            Matcher::Full("switchyard_plugin_call_seconds".to_string()),
            &[
                0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ],
        )
        .map_err(|error| anyhow::anyhow!("metrics buckets: {error}"))?
        // Scans: from a clamd answer on loopback to a scanner's longest timeouts.
        .set_buckets_for_metric(
            Matcher::Full("switchyard_scanner_seconds".to_string()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        )
        .map_err(|error| anyhow::anyhow!("metrics buckets: {error}"))?
        .install()
        .map_err(|error| anyhow::anyhow!("cannot serve metrics on {listen}: {error}"))?;
    EXPORTING.store(true, Ordering::Relaxed);
    tracing::info!(address = %listen, "serving Prometheus metrics");
    Ok(())
}

/// `name` if a plugin may record under it: letters, digits and `_`, at most 64 characters, and
/// within the plugin's budget of distinct names. `None` also when no endpoint runs (nothing would
/// read the value).
pub fn plugin_metric_name(plugin: &str, name: &str) -> Option<String> {
    if !EXPORTING.load(Ordering::Relaxed) {
        return None;
    }
    checked_name(plugin, name)
}

fn checked_name(plugin: &str, name: &str) -> Option<String> {
    static NAMES: OnceLock<Mutex<HashMap<String, HashSet<String>>>> = OnceLock::new();
    let well_formed = !name.is_empty()
        && name.len() <= MAX_NAME_LENGTH
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_');
    if !well_formed {
        tracing::debug!(plugin, metric = name, "plugin metric dropped: invalid name");
        return None;
    }
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let known = names.entry(plugin.to_string()).or_default();
    if known.contains(name) {
        return Some(name.to_string());
    }
    if known.len() >= MAX_NAMES_PER_PLUGIN {
        tracing::warn!(
            plugin,
            metric = name,
            "plugin metric dropped: the plugin already has {MAX_NAMES_PER_PLUGIN} metric names"
        );
        return None;
    }
    known.insert(name.to_string());
    Some(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_metric_names_are_checked_and_bounded() {
        assert_eq!(
            checked_name("p1", "limited_total").as_deref(),
            Some("limited_total")
        );
        assert_eq!(checked_name("p1", "bad name"), None);
        assert_eq!(checked_name("p1", ""), None);
        assert_eq!(checked_name("p1", &"x".repeat(65)), None);
        for index in 0..MAX_NAMES_PER_PLUGIN {
            assert!(checked_name("p2", &format!("m{index}")).is_some());
        }
        assert!(checked_name("p2", "one_too_many").is_none());
        // Names it already has stay usable, and other plugins have their own budget.
        assert!(checked_name("p2", "m0").is_some());
        assert!(checked_name("p3", "one_too_many").is_some());
    }
}
