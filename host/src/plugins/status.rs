//! What `plugins list` and the admin API show of the running chains: each plugin's code
//! (digest), limits, counters and circuit, each tenant's chain, and the last reloads' outcome.

use serde::{Deserialize, Serialize};

/// The running chains at one moment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChainsStatus {
    /// The global chain's generation.
    pub generation: u64,
    /// The global chain, in order.
    pub plugins: Vec<PluginStatus>,
    pub tenants: Vec<TenantStatus>,
    /// Tenants whose file does not load now (their previous chain, if any, keeps running).
    pub tenant_errors: Vec<TenantError>,
    pub reload_attempts: u64,
    pub last_reload_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantStatus {
    pub tenant: String,
    pub generation: u64,
    pub instance_share: usize,
    pub instances_in_use: usize,
    pub plugins: Vec<PluginStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantError {
    pub tenant: String,
    pub error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PluginStatus {
    pub name: String,
    /// The tenant whose chain it is in (`""`: the global chain).
    pub tenant: String,
    pub generation: u64,
    /// The component file's SHA-256, in hex.
    pub sha256: String,
    pub hooks: Vec<String>,
    /// `snapshot` (instances start from a pre-initialised snapshot) or `per-instance`.
    pub init: String,
    pub time_limit_ms: u64,
    pub memory_limit: u64,
    /// `tempfail`, `reject` or `continue`.
    pub failure_policy: String,
    #[serde(flatten)]
    pub health: Health,
    /// Its shadow candidate, if it has one.
    pub shadow: Option<ShadowStatus>,
    /// Its canary, if it has one.
    #[serde(default)]
    pub canary: Option<CanaryStatus>,
}

/// A plugin's canary: its code, its share of the transactions and how it has fared.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CanaryStatus {
    pub sha256: String,
    /// The share of transactions it decides for, in percent.
    pub percent: f64,
    #[serde(flatten)]
    pub health: Health,
}

/// How a plugin's calls have gone since it loaded, and its circuit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub calls: u64,
    pub failures: u64,
    pub timeouts: u64,
    pub out_of_memory: u64,
    /// `closed`, `open(Ns)` (N seconds of cool-down left) or `half-open`.
    pub circuit: String,
    /// Times the circuit opened.
    pub trips: u64,
    /// Calls not made while the circuit was open.
    pub skipped: u64,
}

impl Health {
    /// The columns `plugins list` prints.
    fn columns(&self) -> String {
        format!(
            "calls={}  failures={}  timeouts={}  out_of_memory={}  circuit={}  trips={}  skipped={}",
            self.calls,
            self.failures,
            self.timeouts,
            self.out_of_memory,
            self.circuit,
            self.trips,
            self.skipped
        )
    }
}

/// A plugin's shadow candidate: its code and how often it answered as the live plugin did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShadowStatus {
    pub sha256: String,
    pub agree: u64,
    pub disagree: u64,
    pub failures: u64,
}

impl ChainsStatus {
    /// The table `plugins list` prints: one line per plugin, the first column its tenant (`-`
    /// for the global chain), a line per tenant chain, then the reload outcome.
    pub fn to_text(&self) -> String {
        let mut out = format!("generation {}\n", self.generation);
        for plugin in &self.plugins {
            plugin_line(&mut out, "-", plugin);
        }
        for tenant in &self.tenants {
            out.push_str(&format!(
                "{}  tenant  generation={}  plugins={}  instance_share={}  instances_in_use={}\n",
                tenant.tenant,
                tenant.generation,
                tenant.plugins.len(),
                tenant.instance_share,
                tenant.instances_in_use,
            ));
            for plugin in &tenant.plugins {
                plugin_line(&mut out, &tenant.tenant, plugin);
            }
        }
        for error in &self.tenant_errors {
            out.push_str(&format!(
                "{}  last reload failed: {}\n",
                error.tenant, error.error
            ));
        }
        out.push_str(&format!("reload attempts: {}\n", self.reload_attempts));
        if let Some(error) = &self.last_reload_error {
            out.push_str(&format!("last reload failed: {error}\n"));
        }
        out
    }
}

fn plugin_line(out: &mut String, tenant: &str, plugin: &PluginStatus) {
    out.push_str(&format!(
        "{tenant}  {}  generation={}  sha256={}  hooks=[{}]  init={}  time_limit={}ms  memory_limit={}  failure_policy={}  {}\n",
        plugin.name,
        plugin.generation,
        plugin.sha256,
        plugin.hooks.join(","),
        plugin.init,
        plugin.time_limit_ms,
        plugin.memory_limit,
        plugin.failure_policy,
        plugin.health.columns(),
    ));
    if let Some(shadow) = &plugin.shadow {
        out.push_str(&format!(
            "{tenant}  {}~shadow  candidate of {}  sha256={}  agree={}  disagree={}  failures={}\n",
            plugin.name, plugin.name, shadow.sha256, shadow.agree, shadow.disagree, shadow.failures,
        ));
    }
    if let Some(canary) = &plugin.canary {
        out.push_str(&format!(
            "{tenant}  {}~canary  canary of {}  percent={}  sha256={}  {}\n",
            plugin.name,
            plugin.name,
            canary.percent,
            canary.sha256,
            canary.health.columns(),
        ));
    }
}
