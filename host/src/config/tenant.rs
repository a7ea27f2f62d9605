//! Tenants: the `[tenants]` section of the main file, and the directory of one file per tenant
//! (`tenants/acme.toml`) that it names. A tenant file gives the tenant's domains (inbound mail to
//! them is the tenant's), its submission users (mail they submit is the tenant's), its plugin
//! chain and its limits. A provider adds a customer by dropping one file into the directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::{
    line_and_column, ArcConfig, CertificateFiles, ConfigError, DkimKeyConfig, PluginManifest,
};
use crate::mail::address::domain_key;

/// `[tenants]` in the main configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantsConfig {
    /// The directory of tenant files (`*.toml`, one per tenant). In a file, relative to the file.
    pub directory: PathBuf,
    /// Every tenant's limits unless its file says otherwise. `plugin_time_limit` and
    /// `plugin_memory_limit` are also caps: no tenant file may raise them.
    #[serde(default)]
    pub limits: TenantLimits,
}

/// What one tenant may use. Every value has a default; see `docs/configuration.md`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantLimits {
    /// SMTP sessions that carry the tenant's mail at once (a session counts from its AUTH, or
    /// its first recipient of the tenant, until it ends). More get 451 4.7.1.
    pub sessions: usize,
    /// Messages accepted for the tenant per hour (a sliding hour). More get 451 4.7.1.
    pub messages_per_hour: u64,
    /// Recipients accepted for the tenant per hour. More get 451 4.7.1.
    pub recipients_per_hour: u64,
    /// Bytes of the tenant's messages in the queue. A transaction that would pass it gets
    /// 452 4.3.1.
    pub queued_bytes: u64,
    /// CPU time per hook call of the tenant's plugins (each plugin's own `time_limit` applies
    /// when lower).
    #[serde(with = "humantime_serde")]
    pub plugin_time_limit: Duration,
    /// Linear memory per instance of the tenant's plugins, in bytes (each plugin's own
    /// `memory_limit` applies when lower).
    pub plugin_memory_limit: u64,
    /// Plugin instances the tenant's transactions hold at once: its share of the instance pool
    /// (8,000 over all tenants), so one tenant cannot take every slot.
    pub plugin_instances: usize,
    /// Calls of the tenant's plugins running at once, over all its transactions: its share of
    /// the CPU, so a plugin that loops until its time limit slows its own tenant, not others.
    /// By default half the machine's cores (at least 1).
    pub plugin_calls_at_once: usize,
    /// Outbound connections carrying the tenant's mail at once: its share of
    /// `delivery.max_connections`, so one tenant's backlog cannot hold every connection.
    pub delivery_connections: usize,
    /// The part of any destination's rate (a `[[shaping]]` rate, or a back-off's) the tenant's
    /// mail may use, in percent: 100 lets it use the whole rate when no other tenant sends
    /// there. Tenants with less take turns with others in proportion.
    pub destination_rate_percent: u32,
    /// Keys each of the tenant's plugins may hold in the kv store (a cap, as
    /// `plugin_memory_limit` is).
    pub kv_keys: u64,
    /// Bytes (keys and values) each of the tenant's plugins may hold in the kv store (a cap).
    pub kv_bytes: u64,
}

impl TenantLimits {
    /// The kv quota of each of the tenant's plugins.
    pub fn kv_quota(&self) -> crate::queue::kv::Quota {
        crate::queue::kv::Quota {
            keys: self.kv_keys,
            bytes: self.kv_bytes,
        }
    }
}

impl Default for TenantLimits {
    fn default() -> Self {
        TenantLimits {
            sessions: 100,
            messages_per_hour: 10_000,
            recipients_per_hour: 50_000,
            queued_bytes: 1024 * 1024 * 1024,
            plugin_time_limit: Duration::from_millis(100),
            plugin_memory_limit: 32 * 1024 * 1024,
            plugin_instances: 400,
            plugin_calls_at_once: std::thread::available_parallelism()
                .map(|cores| (cores.get() / 2).max(1))
                .unwrap_or(1),
            delivery_connections: 50,
            destination_rate_percent: 100,
            kv_keys: 100_000,
            kv_bytes: 64 * 1024 * 1024,
        }
    }
}

/// A tenant file's `[limits]`: what it sets replaces the default.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitOverrides {
    pub sessions: Option<usize>,
    pub messages_per_hour: Option<u64>,
    pub recipients_per_hour: Option<u64>,
    pub queued_bytes: Option<u64>,
    #[serde(with = "humantime_serde")]
    pub plugin_time_limit: Option<Duration>,
    pub plugin_memory_limit: Option<u64>,
    pub plugin_instances: Option<usize>,
    pub plugin_calls_at_once: Option<usize>,
    pub delivery_connections: Option<usize>,
    pub destination_rate_percent: Option<u32>,
    pub kv_keys: Option<u64>,
    pub kv_bytes: Option<u64>,
}

impl LimitOverrides {
    fn apply(&self, defaults: &TenantLimits) -> TenantLimits {
        TenantLimits {
            sessions: self.sessions.unwrap_or(defaults.sessions),
            messages_per_hour: self.messages_per_hour.unwrap_or(defaults.messages_per_hour),
            recipients_per_hour: self
                .recipients_per_hour
                .unwrap_or(defaults.recipients_per_hour),
            queued_bytes: self.queued_bytes.unwrap_or(defaults.queued_bytes),
            plugin_time_limit: self.plugin_time_limit.unwrap_or(defaults.plugin_time_limit),
            plugin_memory_limit: self
                .plugin_memory_limit
                .unwrap_or(defaults.plugin_memory_limit),
            plugin_instances: self.plugin_instances.unwrap_or(defaults.plugin_instances),
            plugin_calls_at_once: self
                .plugin_calls_at_once
                .unwrap_or(defaults.plugin_calls_at_once),
            delivery_connections: self
                .delivery_connections
                .unwrap_or(defaults.delivery_connections),
            destination_rate_percent: self
                .destination_rate_percent
                .unwrap_or(defaults.destination_rate_percent),
            kv_keys: self.kv_keys.unwrap_or(defaults.kv_keys),
            kv_bytes: self.kv_bytes.unwrap_or(defaults.kv_bytes),
        }
    }
}

/// A tenant file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantFile {
    /// Must equal the file's name without `.toml` when given.
    id: Option<Spanned<String>>,
    #[serde(default)]
    domains: Vec<Spanned<String>>,
    /// Submission identities (as in the users file) whose mail is the tenant's.
    #[serde(default)]
    users: Vec<Spanned<String>>,
    limits: Option<Spanned<LimitOverrides>>,
    #[serde(default, rename = "plugin")]
    plugins: Vec<PluginManifest>,
    #[serde(default, rename = "dkim")]
    dkim: Vec<DkimKeyConfig>,
    #[serde(default)]
    arc: ArcConfig,
    /// Certificates for the tenant's names, served by SNI on the listeners with `[tls]`.
    #[serde(default, rename = "certificate")]
    certificates: Vec<CertificateFiles>,
}

/// One tenant, loaded from its file, its limits resolved against the defaults.
#[derive(Debug, Clone)]
pub struct TenantConfig {
    pub id: String,
    /// Lower case, without a trailing dot.
    pub domains: Vec<String>,
    pub users: Vec<String>,
    pub limits: TenantLimits,
    /// The tenant's chain, run after the global chain on the tenant's mail. Paths are resolved
    /// against the tenant file's directory; time and memory limits are capped by `limits`.
    pub plugins: Vec<PluginManifest>,
    /// Keys that sign the tenant's outbound mail; each for one of its domains (or below one).
    /// Paths are resolved against the tenant file's directory.
    pub dkim: Vec<DkimKeyConfig>,
    /// ARC sealing of the tenant's checked inbound mail, with one of its own keys.
    pub arc: ArcConfig,
    /// Certificates served to clients that ask (SNI) for one of the tenant's names; every DNS
    /// name in them must be one of its domains or below one. Paths resolved against the file.
    pub certificates: Vec<CertificateFiles>,
    /// The file it came from.
    pub path: PathBuf,
    /// Where in the file each domain and user was written, for errors about claims.
    claims: Vec<(String, usize)>,
    text: String,
}

impl TenantConfig {
    /// Reads one tenant file. Errors carry `FILE:LINE:COLUMN`.
    pub fn load(path: &Path, defaults: &TenantLimits) -> Result<TenantConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        TenantConfig::parse(&text, path, defaults)
    }

    /// Parses tenant-file text as if it were `path`.
    pub fn parse(
        text: &str,
        path: &Path,
        defaults: &TenantLimits,
    ) -> Result<TenantConfig, ConfigError> {
        let origin = path.display().to_string();
        let invalid = |offset: usize, message: String| {
            let (line, column) = line_and_column(text, offset);
            ConfigError::Invalid {
                path: origin.clone(),
                line,
                column,
                message,
            }
        };
        let file: TenantFile = toml::from_str(text).map_err(|error| {
            invalid(
                error.span().map(|span| span.start).unwrap_or(0),
                error.message().to_string(),
            )
        })?;
        let stem = path
            .file_stem()
            .and_then(|stem| stem.to_str())
            .unwrap_or_default()
            .to_string();
        if !is_tenant_id(&stem) {
            return Err(invalid(
                0,
                format!(
                    "`{stem}` is not a tenant id: the file name must be letters, digits, `-` or `_` \
                     (at most 64), then `.toml`"
                ),
            ));
        }
        if let Some(id) = &file.id {
            if id.get_ref() != &stem {
                return Err(invalid(
                    id.span().start,
                    format!(
                        "id `{}` differs from the file name `{stem}.toml`: a tenant's id is its \
                         file's name",
                        id.get_ref()
                    ),
                ));
            }
        }
        let mut claims = Vec::new();
        let mut domains = Vec::new();
        for domain in &file.domains {
            let key = domain_key(domain.get_ref().trim());
            if !crate::mail::address::is_domain(&key) {
                return Err(invalid(
                    domain.span().start,
                    format!("invalid domain `{}`", domain.get_ref()),
                ));
            }
            if domains.contains(&key) {
                return Err(invalid(
                    domain.span().start,
                    format!("domain `{key}` is listed twice"),
                ));
            }
            claims.push((format!("domain `{key}`"), domain.span().start));
            domains.push(key);
        }
        let mut users = Vec::new();
        for user in &file.users {
            let name = user.get_ref().trim().to_string();
            if name.is_empty() || !crate::mail::text::is_header_value(&name) {
                return Err(invalid(
                    user.span().start,
                    format!("invalid user `{}`", user.get_ref()),
                ));
            }
            claims.push((format!("user `{name}`"), user.span().start));
            users.push(name);
        }
        if domains.is_empty() && users.is_empty() {
            return Err(invalid(
                0,
                "a tenant needs at least one of `domains` and `users`: otherwise no mail is its"
                    .to_string(),
            ));
        }
        let (limits, limits_at) = match &file.limits {
            Some(limits) => (limits.get_ref().apply(defaults), limits.span().start),
            None => (defaults.clone(), 0),
        };
        if limits.plugin_time_limit > defaults.plugin_time_limit
            || limits.plugin_memory_limit > defaults.plugin_memory_limit
            || limits.kv_keys > defaults.kv_keys
            || limits.kv_bytes > defaults.kv_bytes
        {
            return Err(invalid(
                limits_at,
                format!(
                    "limits: plugin_time_limit, plugin_memory_limit, kv_keys and kv_bytes may \
                     not exceed the provider's caps in [tenants.limits] ({}, {} bytes, {} keys \
                     and {} bytes)",
                    humantime::format_duration(defaults.plugin_time_limit),
                    defaults.plugin_memory_limit,
                    defaults.kv_keys,
                    defaults.kv_bytes
                ),
            ));
        }
        if limits.sessions == 0
            || limits.messages_per_hour == 0
            || limits.recipients_per_hour == 0
            || limits.queued_bytes == 0
            || limits.plugin_time_limit.is_zero()
            || limits.plugin_memory_limit < 1024 * 1024
            || limits.plugin_instances == 0
            || limits.plugin_calls_at_once == 0
            || limits.delivery_connections == 0
        {
            return Err(invalid(
                limits_at,
                "limits must be at least 1 (plugin_memory_limit at least 1 MiB)".to_string(),
            ));
        }
        if !(1..=100).contains(&limits.destination_rate_percent) {
            return Err(invalid(
                limits_at,
                format!(
                    "destination_rate_percent {} must be from 1 to 100",
                    limits.destination_rate_percent
                ),
            ));
        }
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut plugins = file.plugins;
        let mut names = Vec::new();
        for plugin in &mut plugins {
            if plugin.name.is_empty() || names.contains(&plugin.name) {
                return Err(invalid(
                    offset_of_name(text, &plugin.name),
                    format!(
                        "plugin names must be unique and not empty: `{}`",
                        plugin.name
                    ),
                ));
            }
            names.push(plugin.name.clone());
            if plugin.shadow.is_some() {
                return Err(invalid(
                    offset_of_name(text, &plugin.name),
                    format!(
                        "plugin `{}`: shadow is only supported in the global chain for now",
                        plugin.name
                    ),
                ));
            }
            plugin
                .check_candidates()
                .map_err(|message| invalid(offset_of_name(text, &plugin.name), message))?;
            if plugin.path.is_relative() {
                plugin.path = base.join(&plugin.path);
            }
            if let Some(canary) = &mut plugin.canary {
                if canary.path.is_relative() {
                    canary.path = base.join(&canary.path);
                }
            }
            // The tenant's caps bound its plugins whatever their manifests ask.
            plugin.time_limit = plugin.time_limit.min(limits.plugin_time_limit);
            plugin.memory_limit = plugin.memory_limit.min(limits.plugin_memory_limit);
            // A snapshot is a compiled copy of the code per configuration (a thousand tenants
            // would hold a thousand), and one taken in another chain's store would carry that
            // chain's kv reads: every instance of a tenant's plugin runs `init` itself.
            plugin.preinitialize = false;
        }
        if limits.plugin_instances < plugins.len() {
            return Err(invalid(
                limits_at,
                format!(
                    "limits: plugin_instances ({}) is below the number of plugins of the chain                      ({}): a transaction holds one per plugin, so none could run",
                    limits.plugin_instances,
                    plugins.len()
                ),
            ));
        }
        let mut dkim = file.dkim;
        for key in &mut dkim {
            if key.private_key.is_relative() {
                key.private_key = base.join(&key.private_key);
            }
            let at = offset_of_dkim(text, &key.selector);
            if let Some(message) = key.problem() {
                return Err(invalid(at, message));
            }
            let domain = domain_key(&key.domain);
            let owned = domains.iter().any(|own| {
                domain == *own
                    || domain
                        .strip_suffix(own.as_str())
                        .is_some_and(|prefix| prefix.ends_with('.'))
            });
            if !owned {
                return Err(invalid(
                    at,
                    format!(
                        "dkim: `{domain}` is not one of the tenant's domains (or below one): a \
                         tenant signs only its own mail"
                    ),
                ));
            }
        }
        if let Some(message) = super::dkim::duplicate(&dkim) {
            return Err(invalid(0, message));
        }
        if let Some(message) = file.arc.problem(&dkim, false) {
            return Err(invalid(text.find("[arc]").unwrap_or(0), message));
        }
        let mut certificates = file.certificates;
        for files in &mut certificates {
            for path in [&mut files.certificate, &mut files.private_key] {
                if path.is_relative() {
                    *path = base.join(&*path);
                }
                if !path.is_file() {
                    return Err(invalid(
                        text.find("[[certificate]]").unwrap_or(0),
                        format!("certificate: no such file `{}`", path.display()),
                    ));
                }
            }
        }
        Ok(TenantConfig {
            id: stem,
            domains,
            users,
            limits,
            plugins,
            dkim,
            arc: file.arc,
            certificates,
            path: path.to_path_buf(),
            claims,
            text: text.to_string(),
        })
    }

    /// An error about the claim (`domain `x``, `user `y``) this file makes at `index`.
    fn claim_error(&self, index: usize, message: String) -> ConfigError {
        let (line, column) = line_and_column(&self.text, self.claims[index].1);
        ConfigError::Invalid {
            path: self.path.display().to_string(),
            line,
            column,
            message,
        }
    }
}

/// Where a `[[dkim]]` entry with `selector` is written, for errors about it.
fn offset_of_dkim(text: &str, selector: &str) -> usize {
    text.find(&format!("\"{selector}\""))
        .or_else(|| text.find("[[dkim]]"))
        .unwrap_or(0)
}

/// A tenant id: the name of its file, and a label in logs and metrics.
pub fn is_tenant_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
}

/// Offset of the `name = "NAME"` line of a plugin, for errors.
fn offset_of_name(text: &str, name: &str) -> usize {
    let wanted = format!("\"{name}\"");
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if trimmed.starts_with("name") && trimmed.contains(&wanted) {
            return offset + (line.len() - trimmed.len());
        }
        offset += line.len();
    }
    0
}

/// The tenant files of `directory`: every `*.toml` in it, in name order.
pub fn tenant_files(directory: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let entries = std::fs::read_dir(directory).map_err(|source| ConfigError::Read {
        path: directory.display().to_string(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| is_tenant_file(path))
        .collect();
    files.sort();
    Ok(files)
}

/// A `*.toml` file that is not hidden (editors' swap and backup files are not tenants).
pub fn is_tenant_file(path: &Path) -> bool {
    path.extension()
        .is_some_and(|extension| extension == "toml")
        && path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| !name.starts_with('.'))
        && path.is_file()
}

/// Loads every tenant of `config`, and checks that no domain or user is claimed twice (or is
/// also one of `relay.domains`). The first error found is returned.
pub fn load_all(
    config: &TenantsConfig,
    relay_domains: &[String],
) -> Result<Vec<TenantConfig>, ConfigError> {
    let mut tenants = Vec::new();
    for path in tenant_files(&config.directory)? {
        tenants.push(TenantConfig::load(&path, &config.limits)?);
    }
    check_claims(&tenants, relay_domains)?;
    Ok(tenants)
}

/// No domain or user belongs to two tenants, and no tenant domain is also a relay domain (whose
/// mail follows the global policy): each message has exactly one owner. The error points at the
/// later claim.
pub fn check_claims(tenants: &[TenantConfig], relay_domains: &[String]) -> Result<(), ConfigError> {
    let relay: Vec<String> = relay_domains.iter().map(|d| domain_key(d)).collect();
    let mut owners: HashMap<&str, &str> = HashMap::new();
    for tenant in tenants {
        for (index, (claim, _)) in tenant.claims.iter().enumerate() {
            if let Some(owner) = owners.insert(claim.as_str(), tenant.id.as_str()) {
                if owner != tenant.id {
                    return Err(tenant.claim_error(
                        index,
                        format!("{claim} is already claimed by tenant `{owner}`"),
                    ));
                }
            }
            if let Some(domain) = claim
                .strip_prefix("domain `")
                .and_then(|d| d.strip_suffix('`'))
            {
                if relay.iter().any(|relay| relay == domain) {
                    return Err(tenant.claim_error(
                        index,
                        format!(
                            "{claim} is also in relay.domains: a domain is a tenant's or the \
                             global policy's, not both"
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str, text: &str) -> Result<TenantConfig, ConfigError> {
        TenantConfig::parse(
            text,
            Path::new(&format!("/etc/switchyard/tenants/{name}.toml")),
            &TenantLimits::default(),
        )
    }

    #[test]
    fn a_tenant_file_gives_domains_users_limits_and_a_chain() {
        let tenant = parse(
            "acme",
            "domains = [\"Acme.TEST.\"]\nusers = [\"alice@acme.test\"]\n[limits]\nsessions = 5\n\n[[plugin]]\nname = \"rate\"\npath = \"../plugins/rate.wasm\"\ntime_limit = \"5s\"\n",
        )
        .expect("valid tenant");
        assert_eq!(tenant.id, "acme");
        assert_eq!(tenant.domains, ["acme.test"]);
        assert_eq!(tenant.limits.sessions, 5);
        assert_eq!(tenant.limits.messages_per_hour, 10_000);
        assert_eq!(
            tenant.plugins[0].path,
            Path::new("/etc/switchyard/tenants/../plugins/rate.wasm")
        );
        // The manifest asked for 5 s; the tenant's cap is 100 ms.
        assert_eq!(tenant.plugins[0].time_limit, Duration::from_millis(100));
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let message = parse("acme", "domains = [\"acme.test\"]\n[limits]\nsesions = 5\n")
            .expect_err("unknown key")
            .to_string();
        assert!(
            message.starts_with("/etc/switchyard/tenants/acme.toml:3:1: unknown field `sesions`"),
            "{message}"
        );
        let message = parse("acme", "domains = [\"acme.test\", \"bad domain\"]\n")
            .expect_err("bad domain")
            .to_string();
        assert!(
            message.contains("acme.toml:1:25: invalid domain"),
            "{message}"
        );
        let message = parse("acme", "id = \"other\"\ndomains = [\"acme.test\"]\n")
            .expect_err("id")
            .to_string();
        assert!(
            message.contains("acme.toml:1:6: id `other` differs"),
            "{message}"
        );
        let message = parse("acme", "users = []\n")
            .expect_err("no mail")
            .to_string();
        assert!(message.contains("needs at least one"), "{message}");
        let message = parse(
            "acme",
            "domains = [\"a.test\"]\n[limits]\nplugin_time_limit = \"1s\"\n",
        )
        .expect_err("above the cap")
        .to_string();
        assert!(
            message.contains("acme.toml:2:1: limits: plugin_time_limit"),
            "{message}"
        );
        let message = parse("bad.name", "domains = [\"a.test\"]\n")
            .expect_err("bad id")
            .to_string();
        assert!(message.contains("is not a tenant id"), "{message}");
    }

    #[test]
    fn a_domain_or_user_claimed_twice_is_an_error_at_the_second_claim() {
        let acme = parse("acme", "domains = [\"acme.test\"]\nusers = [\"ops\"]\n").expect("acme");
        let bravo =
            parse("bravo", "domains = [\"bravo.test\",\n  \"ACME.test\"]\n").expect("bravo");
        let message = check_claims(&[acme.clone(), bravo], &[])
            .expect_err("claimed twice")
            .to_string();
        assert_eq!(
            message,
            "/etc/switchyard/tenants/bravo.toml:2:3: domain `acme.test` is already claimed by tenant `acme`"
        );
        let charlie = parse("charlie", "users = [\"ops\"]\n").expect("charlie");
        let message = check_claims(&[acme.clone(), charlie], &[])
            .expect_err("user claimed twice")
            .to_string();
        assert!(
            message.contains("charlie.toml:1:10: user `ops` is already claimed"),
            "{message}"
        );
        let message = check_claims(&[acme], &["acme.test".to_string()])
            .expect_err("relay domain")
            .to_string();
        assert!(message.contains("also in relay.domains"), "{message}");
    }
}
