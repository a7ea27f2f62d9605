//! `[[plugin]]` entries: which WebAssembly components make up the chain, in order, and what each
//! may do.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One plugin of the chain. The order of `[[plugin]]` entries is the order of the chain at every
/// stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginManifest {
    /// A unique name, used in logs, metrics and `switchyard plugins list`.
    pub name: String,
    /// The component (`.wasm`). A relative path is relative to the configuration file.
    pub path: PathBuf,
    /// Host interfaces the plugin may import. A component that imports one it is not granted
    /// does not load.
    #[serde(default)]
    pub grants: Vec<Grant>,
    /// CPU time allowed for one hook call (instantiation included on a transaction's first call).
    #[serde(default = "default_time_limit", with = "humantime_serde")]
    pub time_limit: Duration,
    /// Linear memory the plugin may use, in bytes.
    #[serde(default = "default_memory_limit")]
    pub memory_limit: u64,
    /// What a trap, a timeout or a memory overrun turns into.
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    /// The plugin's own configuration, handed to its `init` as JSON.
    #[serde(default)]
    pub config: toml::Table,
    /// Run `init` once when the plugin loads and start every transaction's instance from a
    /// snapshot of the state it left (the default), or run `init` in every instance (`false`):
    /// for a plugin whose `init` must see each transaction's own time or random numbers.
    /// Components above 4 MiB always run `init` per instance (see `plugins::preinit`).
    #[serde(default = "default_preinitialize")]
    pub preinitialize: bool,
}

fn default_preinitialize() -> bool {
    true
}

fn default_time_limit() -> Duration {
    Duration::from_millis(100)
}

fn default_memory_limit() -> u64 {
    32 * 1024 * 1024
}

/// Host interfaces that can be granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Grant {
    Log,
    Metrics,
    Kv,
    Dns,
    Clock,
}

impl Grant {
    pub const ALL: [Grant; 5] = [
        Grant::Log,
        Grant::Metrics,
        Grant::Kv,
        Grant::Dns,
        Grant::Clock,
    ];

    /// The WIT interface name, without package.
    pub fn interface(self) -> &'static str {
        match self {
            Grant::Log => "log",
            Grant::Metrics => "metrics",
            Grant::Kv => "kv",
            Grant::Dns => "dns",
            Grant::Clock => "clock",
        }
    }
}

/// What a failing plugin means for the mail it was deciding about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// 451 4.3.0: the client retries later (delivery: the recipient is deferred). The default.
    #[default]
    Tempfail,
    /// 550 5.3.0: refuse (delivery: the recipient fails).
    Reject,
    /// Skip the plugin, as if it had answered "continue". Only for plugins whose failure is
    /// harmless.
    Continue,
}
