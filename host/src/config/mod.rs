//! The configuration file: TOML, deserialised with serde into typed sections.
//!
//! Every value that can be wrong on its own (an address, a duration, a network) is parsed while
//! deserialising, so the TOML parser reports it with the line and column it came from. Checks that
//! span several values (two listeners on one address, TLS asked for without a certificate) run after,
//! in [`validate`], and also point at a line.

mod admin;
mod delivery;
pub mod dkim;
mod kv;
mod plugin;
mod queue;
pub mod rollout;
mod scanner;
mod service;
mod shaping;
mod smtp;
mod submission;
pub mod tenant;
mod types;
mod validate;

use std::path::{Path, PathBuf};

pub use admin::AdminConfig;
pub use delivery::{
    AddressPreference, DeliveryConfig, DnsConfig, MailboxesConfig, MtaStsConfig, RouteConfig,
    TlsReportsConfig,
};
pub use dkim::{ArcConfig, DkimKeyConfig};
pub use kv::KvConfig;
pub use plugin::{BreakerConfig, FailurePolicy, Grant, PluginManifest, ShadowConfig};
pub use queue::{QueueConfig, QueueEngine, RetryConfig};
pub use scanner::{ScannerConfig, ScannerKind};
use serde::{Deserialize, Serialize};
pub use service::{
    LogConfig, MetricsConfig, RecordConfig, RecordSettings, ShutdownConfig, TraceConfig,
};
pub use shaping::{Rate, ShapingConfig};
pub use smtp::{
    AuthenticationConfig, CertificateFiles, ListenerConfig, RelayConfig, SmtpLimits, TlsFiles,
};
pub use submission::{AuthFailureLimits, HeaderFromPolicy, SubmissionConfig};
pub use tenant::{TenantConfig, TenantLimits, TenantsConfig};
pub use types::{ClientPrefixes, Endpoint, HostPort, ListenerRole, TlsPolicy};

/// A configuration problem, with the place in the file where it was found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
}

/// The whole configuration. Every field has a default, so an empty file is a valid configuration
/// (the same one `switchyard serve` uses when given no file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The name this server uses in its greeting, EHLO, Received headers and Message-IDs.
    pub hostname: String,
    /// This node's name in a shared queue: the owner written on the leases it takes; unique per
    /// node. A restarted node takes back what it held under it. Default: this machine's name
    /// (`/etc/hostname`), not the configured `hostname`; two processes on one machine sharing a
    /// queue must each set their own.
    pub node_id: Option<String>,
    /// Where the queue and other state live. In a file, a relative path is relative to the file.
    pub data_dir: PathBuf,
    /// Where to listen for SMTP.
    #[serde(rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    /// Limits applied to every SMTP session.
    pub smtp: SmtpLimits,
    /// Certificates for STARTTLS and implicit TLS on the listeners (a default, more chosen by
    /// SNI). Without it STARTTLS is not offered.
    pub tls: Option<TlsFiles>,
    /// Which recipients are accepted, and for whom the server relays.
    pub relay: RelayConfig,
    pub queue: QueueConfig,
    pub retry: RetryConfig,
    pub dns: DnsConfig,
    pub delivery: DeliveryConfig,
    /// Per-domain next hops that override MX lookup.
    #[serde(rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// How mail goes to each destination: connections, messages per connection, rate.
    #[serde(rename = "shaping")]
    pub shaping: Vec<ShapingConfig>,
    /// The plugin chain, in order.
    #[serde(rename = "plugin")]
    pub plugins: Vec<PluginManifest>,
    /// Content scanners (rspamd, clamd) asked about each message before the data hooks.
    #[serde(rename = "scanner")]
    pub scanners: Vec<ScannerConfig>,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    /// The plugins' decision traces (`switchyard queue trace`).
    pub trace: TraceConfig,
    /// Recording sampled transactions for replay.
    pub record: RecordConfig,
    /// Bounds of the plugins' key-value store.
    pub kv: KvConfig,
    /// The admin HTTP API (off unless `listen` is set).
    pub admin: AdminConfig,
    pub authentication: AuthenticationConfig,
    pub submission: SubmissionConfig,
    pub mailboxes: MailboxesConfig,
    pub shutdown: ShutdownConfig,
    /// Many customers on one router: their files' directory and default limits. Without it
    /// all mail follows the global configuration (the tenant is `""`).
    pub tenants: Option<TenantsConfig>,
    /// MTA-STS (RFC 8461) towards recipient domains that publish a policy.
    pub mta_sts: MtaStsConfig,
    /// TLS reports (RFC 8460) to domains with a policy.
    pub tls_reports: TlsReportsConfig,
    /// Keys that DKIM-sign mail of no tenant sent by trusted clients (`relay.networks` and
    /// authenticated users).
    #[serde(rename = "dkim")]
    pub dkim: Vec<DkimKeyConfig>,
    /// ARC sealing of checked inbound mail of no tenant.
    pub arc: ArcConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hostname: default_hostname(),
            node_id: None,
            data_dir: PathBuf::from("./switchyard-data"),
            listeners: vec![ListenerConfig::default()],
            smtp: SmtpLimits::default(),
            tls: None,
            relay: RelayConfig::default(),
            queue: QueueConfig::default(),
            retry: RetryConfig::default(),
            dns: DnsConfig::default(),
            delivery: DeliveryConfig::default(),
            routes: Vec::new(),
            shaping: Vec::new(),
            plugins: Vec::new(),
            scanners: Vec::new(),
            log: LogConfig::default(),
            metrics: MetricsConfig::default(),
            trace: TraceConfig::default(),
            record: RecordConfig::default(),
            kv: KvConfig::default(),
            admin: AdminConfig::default(),
            authentication: AuthenticationConfig::default(),
            submission: SubmissionConfig::default(),
            mailboxes: MailboxesConfig::default(),
            shutdown: ShutdownConfig::default(),
            tenants: None,
            mta_sts: MtaStsConfig::default(),
            tls_reports: TlsReportsConfig::default(),
            dkim: Vec::new(),
            arc: ArcConfig::default(),
        }
    }
}

fn default_hostname() -> String {
    machine_name().to_string()
}

/// This machine's name (`/etc/hostname`), read once: the default greeting name, and the default
/// node id, which unlike a configured `hostname` (often the same greeting name on every node of
/// a cluster) differs from machine to machine.
pub fn machine_name() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|name| name.trim().to_string())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "localhost".to_string())
    })
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let origin = path.display().to_string();
        let mut config = Config::deserialize_text(&text, &origin)?;
        // Paths in a file are relative to the file, like an include; they are resolved before
        // validation so that a check of a file is a check of the file the server will open.
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolve = |file: &mut PathBuf| {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        };
        resolve(&mut config.data_dir);
        if let Some(tls) = &mut config.tls {
            resolve(&mut tls.certificate);
            resolve(&mut tls.private_key);
            for extra in &mut tls.sni {
                resolve(&mut extra.certificate);
                resolve(&mut extra.private_key);
            }
        }
        if let Some(root) = &mut config.mailboxes.root {
            resolve(root);
        }
        if let Some(users) = &mut config.submission.users_file {
            resolve(users);
        }
        if let Some(tokens) = &mut config.admin.tokens_file {
            resolve(tokens);
        }
        if let Some(ca_file) = &mut config.delivery.ca_file {
            resolve(ca_file);
        }
        if let Some(credentials) = &mut config.delivery.credentials_file {
            resolve(credentials);
        }
        for key in &mut config.dkim {
            resolve(&mut key.private_key);
        }
        for plugin in &mut config.plugins {
            resolve(&mut plugin.path);
            if let Some(shadow) = &mut plugin.shadow {
                resolve(&mut shadow.path);
            }
            if let Some(canary) = &mut plugin.canary {
                resolve(&mut canary.path);
            }
        }
        if let Some(tenants) = &mut config.tenants {
            resolve(&mut tenants.directory);
        }
        if let Some(directory) = &mut config.record.directory {
            resolve(directory);
        }
        config.validate_against(&text, &origin)?;
        Ok(config)
    }

    /// Parses and validates configuration text; `origin` names it in errors. Relative paths
    /// are taken from the working directory.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config = Config::deserialize_text(text, origin)?;
        config.validate_against(text, origin)?;
        Ok(config)
    }

    fn deserialize_text(text: &str, origin: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|error| {
            let offset = error.span().map(|span| span.start).unwrap_or(0);
            let (line, column) = line_and_column(text, offset);
            ConfigError::Invalid {
                path: origin.to_string(),
                line,
                column,
                message: error.message().to_string(),
            }
        })
    }

    /// Checks what the types cannot; `text` locates a problem's key for the error.
    fn validate_against(&self, text: &str, origin: &str) -> Result<(), ConfigError> {
        validate::validate(self, text).map_err(|problem| {
            let (line, column) = line_and_column(text, problem.offset);
            ConfigError::Invalid {
                path: origin.to_string(),
                line,
                column,
                message: problem.message,
            }
        })
    }

    /// The effective configuration, every default filled in, as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|error| format!("# cannot render: {error}\n"))
    }

    pub fn queue_path(&self) -> PathBuf {
        self.data_dir.join(&self.queue.path)
    }

    /// This node's name on queue leases.
    pub fn node_id(&self) -> &str {
        self.node_id.as_deref().unwrap_or_else(|| machine_name())
    }

    /// Every tenant file of `[tenants]`, loaded and checked against each other (none without
    /// the section).
    pub fn load_tenants(&self) -> Result<Vec<TenantConfig>, ConfigError> {
        match &self.tenants {
            Some(tenants) => tenant::load_all(tenants, &self.relay.domains),
            None => Ok(Vec::new()),
        }
    }

    pub fn helo_name(&self) -> &str {
        self.delivery.helo_name.as_deref().unwrap_or(&self.hostname)
    }
}

/// 1-based line and column of a byte offset.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map(|at| at + 1).unwrap_or(0) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn empty_file_is_the_default() {
        let config = Config::parse("", "test.toml").expect("empty config is valid");
        assert_eq!(config.listeners.len(), 1);
        assert_eq!(config.listeners[0].address.get_ref(), "127.0.0.1:2525");
        assert_eq!(config.retry.max_lifetime, Duration::from_secs(432000));
    }

    #[test]
    fn unknown_key_names_its_line() {
        let text = "hostname = \"mx.example\"\n\n[smtp]\nmax_sizes = 10\n";
        let error = Config::parse(text, "test.toml").expect_err("unknown key");
        let message = error.to_string();
        assert!(
            message.starts_with("test.toml:4:1: unknown field `max_sizes`"),
            "{message}"
        );
    }

    #[test]
    fn bad_duration_names_its_line() {
        let text = "[retry]\nmax_lifetime = \"five days\"\n";
        let message = Config::parse(text, "c.toml")
            .expect_err("bad duration")
            .to_string();
        assert!(message.starts_with("c.toml:2:"), "{message}");
    }

    #[test]
    fn bad_network_names_its_line() {
        let text = "[relay]\nnetworks = [\"10.0.0.0/33\"]\n";
        let message = Config::parse(text, "c.toml")
            .expect_err("bad network")
            .to_string();
        assert!(message.starts_with("c.toml:2:"), "{message}");
    }

    /// A well-formed pin.
    const PIN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn bad_candidates_and_record_shares_are_refused_with_a_reason() {
        let plugin = "[[plugin]]\nname = \"gate\"\npath = \"gate.wasm\"\n";
        for (extra, expected) in [
            (
                "canary = { path = \"v2.wasm\", percent = 0 }\n",
                "canary percent must be from 0.01 to 100, not 0",
            ),
            (
                "canary = { path = \"v2.wasm\", percent = 0.001 }\n",
                "canary percent must be from 0.01 to 100, not 0.001",
            ),
            (
                "canary = { path = \"v2.wasm\", percent = 150 }\n",
                "canary percent must be from 0.01 to 100, not 150",
            ),
            (
                "shadow = \"v2.wasm\"\ncanary = { path = \"v3.wasm\", percent = 5 }\n",
                "a plugin may have a shadow or a canary, not both",
            ),
            (
                "canary = { path = \"v2.wasm\", percent = 5, sha256 = \"abc\" }\n",
                "sha256 must be 64 hexadecimal digits",
            ),
            (
                &format!("sha256 = \"{PIN}\"\ncanary = {{ path = \"v2.wasm\", percent = 5 }}\n"),
                "plugin `gate` is pinned (sha256), so its canary must be pinned too: give canary a sha256, the digest of",
            ),
            (
                &format!("sha256 = \"{PIN}\"\nshadow = \"v2.wasm\"\n"),
                "plugin `gate` is pinned (sha256), so its shadow must be pinned too",
            ),
            (
                &format!("sha256 = \"{PIN}\"\nshadow = {{ path = \"v2.wasm\" }}\n"),
                "so its shadow must be pinned too",
            ),
            (
                "shadow = { path = \"v2.wasm\", sha256 = \"abc\" }\n",
                "sha256 must be 64 hexadecimal digits",
            ),
        ] {
            let message = Config::parse(&format!("{plugin}{extra}"), "c.toml")
                .expect_err(extra)
                .to_string();
            assert!(message.contains(expected), "{extra}: {message}");
        }
        let accepted = Config::parse(
            &format!("{plugin}canary = {{ path = \"v2.wasm\", percent = 0.5 }}\n"),
            "c.toml",
        )
        .expect("a half percent");
        let canary = accepted.plugins[0].canary.as_ref().expect("canary");
        assert_eq!(canary.basis_points(), 50);
        let pinned = Config::parse(
            &format!("{plugin}sha256 = \"{PIN}\"\nshadow = {{ path = \"v2.wasm\", sha256 = \"{PIN}\" }}\n"),
            "c.toml",
        )
        .expect("a pinned plugin with a pinned shadow");
        let shadow = pinned.plugins[0].shadow_manifest().expect("shadow");
        assert_eq!(shadow.sha256.as_deref(), Some(PIN));
        assert!(shadow.path.ends_with("v2.wasm"));
        let message = Config::parse("[record]\ndirectory = \"r\"\npercent = 101\n", "c.toml")
            .expect_err("share above 100")
            .to_string();
        assert!(
            message.contains("record: percent must be from 0 to 100"),
            "{message}"
        );
    }

    #[test]
    fn effective_config_round_trips() {
        let config = Config::parse("[delivery]\nport = 2526\n", "c.toml").expect("valid");
        let again = Config::parse(&config.to_toml(), "effective").expect("effective config parses");
        assert_eq!(again.delivery.port, 2526);
    }

    #[test]
    fn relative_tls_files_are_found_beside_the_config_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("cert.pem"), "cert").expect("write cert");
        std::fs::write(dir.path().join("key.pem"), "key").expect("write key");
        let file = dir.path().join("switchyard.toml");
        std::fs::write(
            &file,
            "[tls]\ncertificate = \"cert.pem\"\nprivate_key = \"key.pem\"\n",
        )
        .expect("write config");
        // Checked from another working directory: the files are beside the config, not here.
        let config = Config::load(&file).expect("relative TLS paths resolve beside the file");
        let tls = config.tls.expect("tls section");
        assert_eq!(tls.certificate, dir.path().join("cert.pem"));

        std::fs::write(
            &file,
            "[tls]\ncertificate = \"missing.pem\"\nprivate_key = \"key.pem\"\n",
        )
        .expect("write config");
        let message = Config::load(&file).expect_err("missing cert").to_string();
        assert!(message.contains(":2:"), "{message}");
        assert!(message.contains("missing.pem"), "{message}");
    }
}
