//! The configuration file: TOML, deserialised with serde into typed sections.
//!
//! Every value that can be wrong on its own (an address, a duration, a network) is parsed while
//! deserialising, so the TOML parser reports it with the line and column it came from. Checks that
//! span several values (two listeners on one address, TLS asked for without a certificate) run after,
//! in [`validate`], and also point at a line.

mod admin;
pub mod dkim;
mod kv;
mod plugin;
pub mod rollout;
pub mod tenant;
mod types;
mod validate;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use admin::AdminConfig;
pub use dkim::{ArcConfig, DkimKeyConfig};
pub use kv::KvConfig;
pub use plugin::{BreakerConfig, FailurePolicy, Grant, PluginManifest, ShadowConfig};
use serde::{Deserialize, Serialize};
pub use tenant::{TenantConfig, TenantLimits, TenantsConfig};
pub use types::{ClientPrefixes, HostPort, ListenerRole, TlsPolicy};

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
    /// The plugin chain, in order.
    #[serde(rename = "plugin")]
    pub plugins: Vec<PluginManifest>,
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
            plugins: Vec::new(),
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    /// A name for logs and metrics.
    pub name: String,
    /// Socket address, for example "0.0.0.0:25".
    pub address: toml::Spanned<String>,
    /// `inbound` (mail from the internet: MX role) or `submission` (mail from your users).
    pub role: ListenerRole,
    /// How long to wait before the greeting; a client that talks first is refused.
    #[serde(with = "humantime_serde")]
    pub greeting_delay: Duration,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            name: "inbound".to_string(),
            address: toml::Spanned::new(0..0, "127.0.0.1:2525".to_string()),
            role: ListenerRole::Inbound,
            greeting_delay: Duration::from_millis(500),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpLimits {
    /// Largest message accepted, in bytes (advertised with SIZE).
    pub max_message_size: u64,
    /// Recipients per message; more get 452 4.5.3.
    pub max_recipients: usize,
    /// Concurrent sessions over all listeners; more get 421 4.3.2.
    pub max_sessions: usize,
    /// Concurrent sessions from one client network (see `client_prefix_v4`/`_v6`); more get
    /// 421 4.7.0.
    pub max_sessions_per_ip: usize,
    /// The prefix length an IPv4 client is counted by, wherever a limit keys by client address
    /// (`max_sessions_per_ip`, the AUTH failure budget): 32, each address, by default.
    pub client_prefix_v4: u8,
    /// The same for IPv6 clients: 64 by default, since one host usually holds a whole /64.
    pub client_prefix_v6: u8,
    /// Longest command line, in bytes including CRLF.
    pub max_command_line: usize,
    /// Longest line of message content, in bytes excluding CRLF (RFC 5321: 998).
    pub max_data_line: usize,
    /// How long to wait for the next command before closing with 421 4.4.2.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// How long the whole DATA or BDAT transfer may take.
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    /// Protocol errors tolerated before the session is closed.
    pub max_errors: u32,
    /// More Received headers than this is a mail loop: 554 5.4.6.
    pub max_received_headers: usize,
}

impl SmtpLimits {
    /// The prefix lengths clients are counted by.
    pub fn client_prefixes(&self) -> ClientPrefixes {
        ClientPrefixes {
            v4: self.client_prefix_v4,
            v6: self.client_prefix_v6,
        }
    }
}

impl Default for SmtpLimits {
    fn default() -> Self {
        SmtpLimits {
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 1000,
            max_sessions: 1000,
            max_sessions_per_ip: 50,
            client_prefix_v4: 32,
            client_prefix_v6: 64,
            max_command_line: 2048,
            max_data_line: 998,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            max_errors: 20,
            max_received_headers: 50,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM file with the certificate chain.
    pub certificate: PathBuf,
    /// PEM file with the private key.
    pub private_key: PathBuf,
    /// More certificates, each served to clients that ask (by SNI) for a DNS name it carries
    /// (one per hosted domain, say); the one above serves every other client.
    #[serde(default)]
    pub sni: Vec<CertificateFiles>,
}

/// A certificate chain and its key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    /// PEM file with the certificate chain.
    pub certificate: PathBuf,
    /// PEM file with the private key.
    pub private_key: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Domains this server is a final or backup destination for: anyone may send mail to them.
    pub domains: Vec<String>,
    /// Client networks allowed to relay to any domain.
    pub networks: Vec<ipnet::IpNet>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            domains: Vec::new(),
            networks: vec![
                "127.0.0.0/8".parse().expect("literal network"),
                "::1/128".parse().expect("literal network"),
            ],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Where the queue lives: one SQLite file (the default) or a PostgreSQL database that
    /// several nodes share.
    pub engine: QueueEngine,
    /// The SQLite file, relative to `data_dir`.
    pub path: PathBuf,
    /// The PostgreSQL database (`postgres://user:password@host:port/database`); without it the
    /// standard `PG*` environment variables (PGHOST, PGUSER, PGDATABASE...) are read.
    pub url: Option<String>,
    /// The PostgreSQL schema the queue's tables live in (created if missing): one database can
    /// hold several separate queues. Default: the server's search path (`public`).
    pub schema: Option<String>,
    /// Most connections to PostgreSQL each node keeps open.
    pub max_connections: u32,
    /// How often the queue is scanned for messages due for another attempt.
    #[serde(with = "humantime_serde")]
    pub scan_interval: Duration,
    /// How long a claim on a message lasts before another worker may take it over. A node
    /// renews its claims while it holds them (every third of this); a node that dies leaves
    /// them to run out, so this is how long its messages wait for another node.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Longest time to wait to group concurrent commits into one transaction.
    #[serde(with = "humantime_serde")]
    pub commit_window: Duration,
}

/// The queue's storage engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueEngine {
    Sqlite,
    Postgres,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            engine: QueueEngine::Sqlite,
            path: PathBuf::from("queue.db"),
            url: None,
            schema: None,
            max_connections: 16,
            scan_interval: Duration::from_secs(1),
            lease: Duration::from_secs(600),
            commit_window: Duration::from_millis(0),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Waits between attempts; the last one repeats.
    #[serde(with = "types::duration_list")]
    pub intervals: Vec<Duration>,
    /// A message still undelivered this long after it arrived is bounced.
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Duration,
    /// Recipients that asked for delay notices (RCPT ... NOTIFY=DELAY) and are still undelivered
    /// this long after the message arrived get one, once (Postfix's `delay_warning_time`);
    /// `0s` sends none.
    #[serde(with = "humantime_serde")]
    pub delay_warning: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        // Postfix: minimal_backoff_time 300s doubling to maximal_backoff_time 4000s; 5 days lifetime.
        RetryConfig {
            intervals: [300, 600, 1200, 2400, 4000]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
            max_lifetime: Duration::from_secs(5 * 24 * 3600),
            delay_warning: Duration::from_secs(4 * 3600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Name servers ("ip" or "ip:port"); empty means the system's /etc/resolv.conf.
    pub nameservers: Vec<HostPort>,
    /// Time allowed for one query.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// The port of MX hosts (25 on the internet; tests use others).
    pub port: u16,
    /// The name sent in EHLO; defaults to `hostname`.
    pub helo_name: Option<String>,
    /// Send everything through this host instead of looking up MX records.
    pub smarthost: Option<HostPort>,
    /// STARTTLS towards MX hosts and the smarthost.
    pub tls: TlsPolicy,
    /// PEM file of the certificate authorities trusted when a certificate is verified; without
    /// it, the system's store (`SSL_CERT_FILE`, `SSL_CERT_DIR`, else the distribution's bundle).
    pub ca_file: Option<PathBuf>,
    /// DANE (RFC 7672) towards MX hosts with DNSSEC-validated TLSA records, as the resolvers'
    /// AD bit says: only with a validating resolver on this host.
    pub dane: bool,
    /// Passwords for relays that want SMTP AUTH: lines of `HOST[:PORT] USERNAME:PASSWORD`,
    /// used for the smarthost, routes and plugin-chosen relays of that host, sent with AUTH
    /// PLAIN over TLS only.
    pub credentials_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed for each reply of the remote server.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Outbound connections open at once, over all destinations.
    pub max_connections: usize,
    /// Outbound connections open at once to one destination (domain or smarthost).
    pub max_connections_per_destination: usize,
    /// Messages sent over one connection before it is closed.
    pub max_messages_per_connection: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            port: 25,
            helo_name: None,
            smarthost: None,
            tls: TlsPolicy::Opportunistic,
            ca_file: None,
            dane: false,
            credentials_file: None,
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(300),
            max_connections: 200,
            max_connections_per_destination: 20,
            max_messages_per_connection: 100,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MtaStsConfig {
    /// Look for and apply recipient domains' policies.
    pub enabled: bool,
    /// How long a domain's `_mta-sts` record is trusted before it is looked at again.
    #[serde(with = "humantime_serde")]
    pub recheck: Duration,
    /// Time allowed to fetch a policy file.
    #[serde(with = "humantime_serde")]
    pub fetch_timeout: Duration,
    /// The port of policy hosts (443 on the internet; tests use others).
    pub https_port: u16,
}

impl Default for MtaStsConfig {
    fn default() -> Self {
        MtaStsConfig {
            enabled: true,
            recheck: Duration::from_secs(300),
            fetch_timeout: Duration::from_secs(10),
            https_port: 443,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsReportsConfig {
    /// Count deliveries' TLS outcomes to policy domains and send them reports.
    pub enabled: bool,
    /// How often reports go out (RFC 8460 asks for daily ones).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for TlsReportsConfig {
    fn default() -> Self {
        TlsReportsConfig {
            enabled: true,
            interval: Duration::from_secs(24 * 3600),
        }
    }
}

/// A next hop chosen by recipient domain instead of its MX records.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The recipient domain; "*.example.com" also matches every subdomain.
    pub domain: String,
    /// Where to send its mail.
    pub smarthost: HostPort,
    /// STARTTLS policy towards that host; defaults to `delivery.tls`.
    pub tls: Option<TlsPolicy>,
    /// ARC-seal checked inbound mail with a recipient on this route (forwarded through it),
    /// with the `[arc]` key, even when `[arc] seal` is off.
    #[serde(default)]
    pub arc_seal: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: "info", "debug", "switchyard=debug,sqlx=warn", ...
    /// The RUST_LOG environment variable overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
        }
    }
}

/// Decision traces: every hook call of every transaction and delivery attempt, kept beside the
/// queue for `switchyard queue trace` and `queue traces`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceConfig {
    /// Record traces (the default). Off, only plugins' refusals are logged.
    pub enabled: bool,
    /// How long traces are kept, those of refused transactions and of messages alike.
    #[serde(with = "humantime_serde")]
    pub keep: Duration,
}

impl Default for TraceConfig {
    fn default() -> Self {
        TraceConfig {
            enabled: true,
            keep: Duration::from_secs(3 * 24 * 3600),
        }
    }
}

/// Recording transactions for `switchyard plugins replay`: off unless `directory` is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecordConfig {
    /// Where recordings are written, one JSON file per transaction (created if missing). A
    /// relative path is relative to the configuration file.
    pub directory: Option<PathBuf>,
    /// The share of transactions recorded whatever their outcome, in percent (0 to 100).
    pub percent: f64,
    /// Record every refused transaction too.
    pub refused: bool,
    /// Keep message content (what the data hooks saw). Off by default: without it the data
    /// stage is not replayed.
    pub bodies: bool,
}

impl Default for RecordConfig {
    fn default() -> Self {
        RecordConfig {
            directory: None,
            percent: 1.0,
            refused: false,
            bodies: false,
        }
    }
}

/// `[record]` as it applies now (set at start and at every reload).
#[derive(Debug, Clone)]
pub struct RecordSettings {
    pub directory: PathBuf,
    /// Hundredths of a percent of the transactions written whatever their outcome.
    pub basis_points: u32,
    pub refused: bool,
    pub bodies: bool,
}

impl RecordConfig {
    /// What the record sink applies; `None` when recording is off.
    pub fn settings(&self) -> Option<RecordSettings> {
        Some(RecordSettings {
            directory: self.directory.clone()?,
            basis_points: (self.percent * 100.0).round().clamp(0.0, 10_000.0) as u32,
            refused: self.refused,
            bodies: self.bodies,
        })
    }
}

/// Sender authentication of inbound mail.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthenticationConfig {
    /// Check SPF, DKIM and DMARC on mail that inbound listeners receive from clients outside
    /// `relay.networks`, add an Authentication-Results header and give the results to the data
    /// hook.
    pub verify: bool,
}

impl Default for AuthenticationConfig {
    fn default() -> Self {
        AuthenticationConfig { verify: true }
    }
}

/// SMTP AUTH on submission listeners.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubmissionConfig {
    /// The accounts AUTH accepts: one `name:hash` line each, the hash an argon2 PHC string
    /// (`switchyard auth hash` prints one). In a file, relative to the file. Without it AUTH
    /// is not offered.
    pub users_file: Option<PathBuf>,
    /// MAIL on a submission listener needs AUTH first, except from `relay.networks`.
    pub require_auth: bool,
    /// Failed AUTH attempts tolerated per client address across sessions.
    pub auth_failures: AuthFailureLimits,
    /// Which From: a tenant's authenticated user may write (users of no tenant: any).
    pub header_from: HeaderFromPolicy,
}

/// `[submission] header_from`: what the From: header of a tenant user's message may name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeaderFromPolicy {
    /// Every From: address must be of one of the user's tenant's domains, else `550 5.7.1`:
    /// the tenant's DKIM key would otherwise sign mail in another's name.
    #[default]
    OwnDomains,
    /// Any From: (a tenant that sends on behalf of its customers' domains).
    Any,
}

impl Default for SubmissionConfig {
    fn default() -> Self {
        SubmissionConfig {
            users_file: None,
            require_auth: true,
            auth_failures: AuthFailureLimits::default(),
            header_from: HeaderFromPolicy::default(),
        }
    }
}

/// The budget of failed AUTH attempts per client address, across sessions, in the spirit of
/// Postfix's anvil limits and Stalwart's automatic ban: each failure is answered later than the
/// one before, and an address that spends the budget is refused at connect for a while.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthFailureLimits {
    /// Failures from one address within `window` that get it banned; 0 turns the budget off.
    /// An IPv6 client counts by its /64, which one host usually holds whole.
    pub limit: u32,
    /// How long a failure counts.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How long a banned address's connections to submission listeners get 421 4.7.0.
    #[serde(with = "humantime_serde")]
    pub ban: Duration,
    /// How long the first failure's 535 reply is held back; each further failure of the
    /// address within the window doubles it (up to 16 times).
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
    /// Client networks the budget never applies to: a webmail front end that logs in for many
    /// users from one address, say.
    pub exempt: Vec<ipnet::IpNet>,
}

impl Default for AuthFailureLimits {
    fn default() -> Self {
        AuthFailureLimits {
            limit: 5,
            window: Duration::from_secs(600),
            ban: Duration::from_secs(900),
            delay: Duration::from_secs(1),
            exempt: Vec::new(),
        }
    }
}

/// Local delivery into Maildir folders.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MailboxesConfig {
    /// Where a route hook's `mailbox(name)` delivers: the Maildir `root/name/`. In a file,
    /// relative to the file. Without it such recipients are deferred.
    pub root: Option<PathBuf>,
}

/// What a SIGTERM waits for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long sessions and deliveries under way may take to finish after a SIGTERM before
    /// the process exits anyway (a second SIGTERM or SIGINT exits at once).
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where to serve metrics over HTTP (any path answers), for example "127.0.0.1:9425".
    /// Without it no endpoint is opened.
    pub listen: Option<std::net::SocketAddr>,
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
                "canary percent must be above 0 and at most 100, not 0",
            ),
            (
                "canary = { path = \"v2.wasm\", percent = 150 }\n",
                "canary percent must be above 0 and at most 100, not 150",
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
