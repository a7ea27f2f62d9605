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
    /// Wall-clock time allowed for one hook call, the host calls it makes (a DNS lookup, a kv
    /// write) included: a host call is not cut short, but a plugin that gets its answer past the
    /// limit is stopped there. A transaction's first call gets the same budget once more for
    /// instantiation (and `init`, when the plugin is not pre-initialised).
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
    /// The SHA-256 of the component file, in hex: when set, a file with any other digest is
    /// refused at start and at reload (the running generation keeps serving), so the code that
    /// runs is the code that was reviewed. A pinned plugin's shadow and canary must be pinned too.
    #[serde(default)]
    pub sha256: Option<String>,
    /// When the plugin's failures open its circuit: it is then skipped, answering with its
    /// failure policy, until the cool-down has passed.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// A candidate version of the component, run beside this one on the same inputs (with the
    /// same config, limits and grants): its answers are recorded in the trace and counted as
    /// agreeing or not, never applied. Global chain only. Relative to the configuration file.
    #[serde(default)]
    pub shadow: Option<ShadowConfig>,
    /// A candidate version that decides for a share of the transactions (chosen per
    /// transaction, and kept through that message's delivery), with the same config, limits and
    /// grants and the same kv keys as this one. Not together with `shadow`.
    #[serde(default)]
    pub canary: Option<CanaryConfig>,
}

/// `shadow = "v2.wasm"` or `shadow = { path = "v2.wasm", sha256 = "..." }`: the candidate run
/// beside the plugin, and its pinned digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "ShadowForm")]
pub struct ShadowConfig {
    /// The candidate component. A relative path is relative to the file that names it.
    pub path: PathBuf,
    /// The candidate's pinned digest, as the plugin's own `sha256`.
    pub sha256: Option<String>,
}

/// The two ways of writing a shadow.
#[derive(Deserialize)]
#[serde(untagged)]
enum ShadowForm {
    Path(PathBuf),
    Table(ShadowTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShadowTable {
    path: PathBuf,
    #[serde(default)]
    sha256: Option<String>,
}

impl From<ShadowForm> for ShadowConfig {
    fn from(form: ShadowForm) -> ShadowConfig {
        match form {
            ShadowForm::Path(path) => ShadowConfig { path, sha256: None },
            ShadowForm::Table(ShadowTable { path, sha256 }) => ShadowConfig { path, sha256 },
        }
    }
}

/// `canary = { path = "...", percent = 10 }`: the candidate and the share of transactions it
/// decides for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryConfig {
    /// The candidate component. A relative path is relative to the file that names it.
    pub path: PathBuf,
    /// The share of transactions, from 0.01 to 100 (hundredths count: 0.5 is one in
    /// two hundred).
    pub percent: f64,
    /// The candidate's pinned digest, as the plugin's own `sha256`.
    #[serde(default)]
    pub sha256: Option<String>,
}

impl CanaryConfig {
    /// The share in ten-thousandths, the unit of a transaction's draw
    /// ([`crate::plugins::canary::draw_of`]).
    pub fn basis_points(&self) -> u16 {
        // Validated to (0, 100]: at most 10,000.
        (self.percent * 100.0).round().clamp(0.0, 10_000.0) as u16
    }
}

/// A plugin's circuit breaker: after `failures` failures (traps, timeouts, memory overruns)
/// within `window`, the plugin is not called for `cooldown`; its failure policy answers for it.
/// Then one call is let through: a success closes the circuit, a failure opens it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Failures within the window that open the circuit; 0 turns the breaker off.
    #[serde(default = "default_breaker_failures")]
    pub failures: u32,
    #[serde(default = "default_breaker_window", with = "humantime_serde")]
    pub window: Duration,
    #[serde(default = "default_breaker_cooldown", with = "humantime_serde")]
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: default_breaker_failures(),
            window: default_breaker_window(),
            cooldown: default_breaker_cooldown(),
        }
    }
}

fn default_breaker_failures() -> u32 {
    10
}

fn default_breaker_window() -> Duration {
    Duration::from_secs(60)
}

fn default_breaker_cooldown() -> Duration {
    Duration::from_secs(30)
}

impl PluginManifest {
    /// The manifest of this plugin's shadow candidate, if it has one: the same plugin under the
    /// name `NAME~shadow` (its own kv keys, log lines and counters), pinned by the shadow's own
    /// `sha256`.
    pub fn shadow_manifest(&self) -> Option<PluginManifest> {
        let shadow = self.shadow.clone()?;
        Some(PluginManifest {
            name: format!("{}~shadow", self.name),
            path: shadow.path,
            sha256: shadow.sha256,
            shadow: None,
            canary: None,
            ..self.clone()
        })
    }

    /// The manifest of this plugin's canary, if it has one: the same plugin under the name
    /// `NAME~canary` (its own log lines and counters; its kv keys are the plugin's), pinned by
    /// the canary's own `sha256`.
    pub fn canary_manifest(&self) -> Option<PluginManifest> {
        let canary = self.canary.clone()?;
        Some(PluginManifest {
            name: format!("{}~canary", self.name),
            path: canary.path,
            sha256: canary.sha256,
            shadow: None,
            canary: None,
            ..self.clone()
        })
    }

    /// The candidates' settings checked: a percent in (0, 100], not both a shadow and a canary,
    /// and a pinned plugin's candidates pinned too: otherwise whoever can write the plugin
    /// directory could run code of their own as the shadow or the canary of a pinned plugin.
    pub fn check_candidates(&self) -> Result<(), String> {
        let pinned = self.pinned_digest()?.is_some();
        for (kind, candidate) in [
            ("shadow", self.shadow_manifest()),
            ("canary", self.canary_manifest()),
        ] {
            let Some(candidate) = candidate else {
                continue;
            };
            if candidate.pinned_digest()?.is_none() && pinned {
                return Err(format!(
                    "plugin `{}` is pinned (sha256), so its {kind} must be pinned too: give \
                     {kind} a sha256, the digest of {}",
                    self.name,
                    candidate.path.display()
                ));
            }
        }
        if let Some(canary) = &self.canary {
            if self.shadow.is_some() {
                return Err(format!(
                    "plugin `{}`: a plugin may have a shadow or a canary, not both",
                    self.name
                ));
            }
            if !(canary.percent > 0.0 && canary.percent <= 100.0) || canary.basis_points() == 0 {
                return Err(format!(
                    "plugin `{}`: canary percent must be from 0.01 to 100, not {}",
                    self.name, canary.percent
                ));
            }
        }
        Ok(())
    }

    /// The pinned digest, lowercased, when it is well formed: 64 hexadecimal digits.
    pub fn pinned_digest(&self) -> Result<Option<[u8; 32]>, String> {
        let Some(text) = &self.sha256 else {
            return Ok(None);
        };
        let text = text.trim().to_ascii_lowercase();
        let mut digest = [0u8; 32];
        if text.len() != 64 || hex::decode_to_slice(&text, &mut digest).is_err() {
            return Err(format!(
                "plugin `{}`: sha256 must be 64 hexadecimal digits, as `sha256sum` prints them",
                self.name
            ));
        }
        Ok(Some(digest))
    }
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
    Scanners,
}

impl Grant {
    pub const ALL: [Grant; 6] = [
        Grant::Log,
        Grant::Metrics,
        Grant::Kv,
        Grant::Dns,
        Grant::Clock,
        Grant::Scanners,
    ];

    /// The WIT interface name, without package.
    pub fn interface(self) -> &'static str {
        match self {
            Grant::Log => "log",
            Grant::Metrics => "metrics",
            Grant::Kv => "kv",
            Grant::Dns => "dns",
            Grant::Clock => "clock",
            Grant::Scanners => "scanners",
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
