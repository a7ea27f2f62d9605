//! A loaded plugin: its manifest, its pre-instantiated component, the hooks it implements, and
//! its counters.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use wasmtime::component::InstancePre;

use super::breaker::Breaker;
use super::hooks::{HookIndices, HookKind, HookSet};
use super::host::HostState;
use crate::config::PluginManifest;

/// Calls and failures of one plugin, for `plugins list` and metrics.
#[derive(Debug)]
pub struct PluginStats {
    /// `switchyard_plugin_calls_total` for this plugin: a handle made once, so counting a call
    /// costs an atomic add, not a registry lookup.
    pub exported_calls: metrics::Counter,
    pub calls: AtomicU64,
    pub failures: AtomicU64,
    pub timeouts: AtomicU64,
    pub out_of_memory: AtomicU64,
    /// Calls not made because the plugin's circuit was open (its failure policy answered).
    pub skipped: AtomicU64,
    /// Calls of its shadow candidate that answered as it did, and that did not.
    pub shadow_agree: AtomicU64,
    pub shadow_disagree: AtomicU64,
    /// `switchyard_plugin_call_seconds{plugin,tenant,hook}`, one handle per hook (indexed by
    /// [`HookKind::index`]).
    pub latency: [metrics::Histogram; HookKind::ALL.len()],
}

impl PluginStats {
    pub(super) fn new(plugin: &str, owner: &str) -> PluginStats {
        PluginStats {
            exported_calls: metrics::counter!(
                "switchyard_plugin_calls_total",
                "plugin" => plugin.to_string(),
                "tenant" => owner.to_string(),
            ),
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            out_of_memory: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            shadow_agree: AtomicU64::new(0),
            shadow_disagree: AtomicU64::new(0),
            latency: HookKind::ALL.map(|hook| {
                metrics::histogram!(
                    "switchyard_plugin_call_seconds",
                    "plugin" => plugin.to_string(),
                    "tenant" => owner.to_string(),
                    "hook" => hook.name(),
                )
            }),
        }
    }
}

/// A compiled, linked and validated plugin.
pub struct LoadedPlugin {
    pub manifest: PluginManifest,
    pub name: Arc<str>,
    /// The name its kv keys are kept under: its own, except a canary's, which are the live
    /// plugin's (a new version of a greylist or a rate limit must see the state the old one
    /// keeps).
    pub kv_name: Arc<str>,
    /// The tenant whose chain it is in (`""`: the global chain). Its kv keys are the owner's,
    /// so two tenants running one plugin under one name never see each other's.
    pub owner: Arc<str>,
    /// What its kv keys may hold: the owner tenant's `kv_keys`/`kv_bytes`, or `[kv]`'s for the
    /// global chain.
    pub kv_quota: crate::queue::kv::Quota,
    /// SHA-256 of the component file: plugins with the same digest share one compiled component.
    pub digest: [u8; 32],
    /// `digest` in hex, made once for traces and listings.
    pub sha256: Arc<str>,
    /// Instantiates the plugin (or its pre-initialised snapshot) for a transaction.
    pub pre: InstancePre<HostState>,
    /// Where `pre`'s component exports each hook.
    pub indices: Arc<HookIndices>,
    pub hooks: HookSet,
    /// The manifest's `config`, as JSON for `init`.
    pub config_json: String,
    /// True when `pre` instantiates a snapshot taken after `init` (see [`super::preinit`]):
    /// instances then start initialised and `init` is not called again.
    pub preinitialized: bool,
    pub stats: PluginStats,
    pub breaker: Breaker,
    /// The candidate run beside it (`shadow` in the manifest), never applied.
    pub shadow: Option<Arc<LoadedPlugin>>,
    /// The candidate deciding for a share of the transactions (`canary` in the manifest).
    pub canary: Option<super::canary::Canary>,
}

impl LoadedPlugin {
    /// The component's digest as `sha256sum` prints it.
    pub fn digest_hex(&self) -> String {
        self.sha256.to_string()
    }
}
