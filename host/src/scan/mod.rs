//! Content scanners: after DATA (or BDAT's last chunk) and before the data hooks, the message
//! goes to every `[[scanner]]` that applies to its listener and tenant, all at once, each
//! bounded by its own timeout. What they answer is handed to the plugins as typed results (the
//! `scanners` grant); the host itself decides nothing on them. A scanner that fails, is too slow
//! or is given too large a message is an error result, never "clean".
//!
//! The message is sent from the buffer the session already holds (`Bytes` is shared, not
//! copied): a large message is in memory once however many scanners read it.

mod clamav;
mod rspamd;
mod stream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::config::{ScannerConfig, ScannerKind};

/// What one scanner said about one message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScanResult {
    /// The scanner's configured name.
    pub scanner: String,
    pub outcome: ScanOutcome,
    /// How long the scan took, in milliseconds (connecting included).
    #[serde(default)]
    pub millis: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScanOutcome {
    Rspamd(RspamdVerdict),
    Clamav(ClamavVerdict),
    Failed(ScanError),
}

/// rspamd's answer from `/checkv2`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RspamdVerdict {
    pub score: f64,
    pub required_score: f64,
    /// `no action`, `greylist`, `add header`, `rewrite subject`, `soft reject` or `reject`.
    pub action: String,
    /// The symbols that matched, with their scores, highest score first.
    pub symbols: Vec<Symbol>,
    /// The text rspamd suggests for the SMTP reply (`messages.smtp_message`), if any.
    #[serde(default)]
    pub message: Option<String>,
    /// Header fields rspamd asks to add (its `milter_headers` module: `milter.add_headers`),
    /// as name and value.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Symbol {
    pub name: String,
    pub score: f64,
}

/// clamd's answer to `zINSTREAM`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClamavVerdict {
    Clean,
    /// The signature's name, as clamd reports it (`Eicar-Signature`, `X.UNOFFICIAL`).
    Infected(String),
}

/// Why a scanner gave no verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "kebab-case")]
pub enum ScanError {
    /// No answer within the timeout (in milliseconds).
    #[error("no answer within {0} ms")]
    Timeout(u64),
    /// The scanner could not be reached.
    #[error("cannot connect: {0}")]
    Refused(String),
    /// The message is larger than the scanner's `max_size` (in bytes); it was not sent.
    #[error("message larger than {0} bytes, not scanned")]
    TooLarge(u64),
    /// The scanner answered something that is not a verdict, or reported an error of its own.
    #[error("{0}")]
    Protocol(String),
}

impl ScanError {
    /// A short name for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ScanError::Timeout(_) => "timeout",
            ScanError::Refused(_) => "refused",
            ScanError::TooLarge(_) => "too-large",
            ScanError::Protocol(_) => "protocol",
        }
    }
}

impl ScanResult {
    /// The result in a few words, for the decision trace and logs.
    pub fn summary(&self) -> String {
        match &self.outcome {
            ScanOutcome::Rspamd(verdict) => {
                let mut text = format!(
                    "{}, score {:.2}/{:.2}",
                    verdict.action, verdict.score, verdict.required_score
                );
                let top: Vec<&str> = verdict
                    .symbols
                    .iter()
                    .take(5)
                    .map(|symbol| symbol.name.as_str())
                    .collect();
                if !top.is_empty() {
                    text.push_str(&format!(" ({})", top.join(", ")));
                }
                text
            }
            ScanOutcome::Clamav(ClamavVerdict::Clean) => "clean".to_string(),
            ScanOutcome::Clamav(ClamavVerdict::Infected(name)) => format!("infected: {name}"),
            ScanOutcome::Failed(error) => format!("error ({}): {error}", error.kind()),
        }
    }

    /// The verdict's label in `switchyard_scanner_calls_total`.
    fn verdict_label(&self) -> String {
        match &self.outcome {
            ScanOutcome::Rspamd(verdict) => verdict.action.clone(),
            ScanOutcome::Clamav(ClamavVerdict::Clean) => "clean".to_string(),
            ScanOutcome::Clamav(ClamavVerdict::Infected(_)) => "infected".to_string(),
            ScanOutcome::Failed(_) => "error".to_string(),
        }
    }
}

/// What a scanner may be told about the message besides its content (rspamd uses it; clamd
/// reads only the content).
#[derive(Debug, Clone, Default)]
pub struct Envelope {
    pub client_ip: String,
    pub helo: Option<String>,
    pub sender: String,
    pub recipients: Vec<String>,
    pub auth_identity: Option<String>,
    pub queue_id: String,
    /// This server's name (rspamd's `MTA-Name`).
    pub hostname: String,
}

/// The configured scanners, swapped whole at a reload.
#[derive(Debug, Default)]
pub struct Scanners {
    scanners: arc_swap::ArcSwap<Vec<Arc<Scanner>>>,
}

/// One scanner: its configuration, and its connections kept for the next scan.
#[derive(Debug)]
struct Scanner {
    config: ScannerConfig,
    clamd_sessions: clamav::Sessions,
}

impl std::ops::Deref for Scanner {
    type Target = ScannerConfig;

    fn deref(&self) -> &ScannerConfig {
        &self.config
    }
}

impl Scanners {
    pub fn new(configs: &[ScannerConfig]) -> Scanners {
        let scanners = Scanners::default();
        scanners.reload(configs);
        scanners
    }

    /// Takes the `[[scanner]]` entries of a reloaded configuration: scans that start from now
    /// on use them (those under way finish with the scanners they began with). A scanner whose
    /// entry did not change keeps its open clamd sessions.
    pub fn reload(&self, configs: &[ScannerConfig]) {
        let running = self.scanners.load_full();
        let same = |a: &ScannerConfig, b: &ScannerConfig| {
            serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
        };
        let scanners = configs
            .iter()
            .map(|config| {
                running
                    .iter()
                    .find(|scanner| same(&scanner.config, config))
                    .cloned()
                    .unwrap_or_else(|| {
                        Arc::new(Scanner {
                            config: config.clone(),
                            clamd_sessions: clamav::Sessions::default(),
                        })
                    })
            })
            .collect();
        self.scanners.store(Arc::new(scanners));
    }

    /// Whether any scanner applies to mail on `listener` for `tenant`.
    pub fn apply_to(&self, listener: &str, tenant: &str) -> bool {
        self.scanners
            .load()
            .iter()
            .any(|scanner| scanner.applies_to(listener, tenant))
    }

    /// Sends the message to every scanner that applies, at once, and returns their results in
    /// the order of the configuration.
    ///
    /// The scans run in the caller's task, polled together: no task is spawned, and a scanner's
    /// answer wakes the session waiting for it directly rather than a task that then wakes it.
    pub async fn scan(
        &self,
        listener: &str,
        tenant: &str,
        envelope: &Envelope,
        content: &Bytes,
    ) -> Vec<ScanResult> {
        let scanners = self.scanners.load_full();
        let scans = scanners
            .iter()
            .filter(|scanner| scanner.applies_to(listener, tenant))
            .map(|scanner| guarded(scanner, envelope, content.clone()));
        futures_util::future::join_all(scans).await
    }
}

/// One scan whose panic, should one ever happen, is its scanner's error result: never a missing
/// (and so unseen) verdict, and never the session's end.
async fn guarded(scanner: &Scanner, envelope: &Envelope, content: Bytes) -> ScanResult {
    use futures_util::FutureExt;
    std::panic::AssertUnwindSafe(scan_one(scanner, envelope, content))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| {
            tracing::error!(scanner = %scanner.name, "a scan panicked");
            ScanResult {
                scanner: scanner.name.clone(),
                outcome: ScanOutcome::Failed(ScanError::Protocol("the scan failed".to_string())),
                millis: 0,
            }
        })
}

/// What `check-config` and the server's start warn about: scanners that no plugin (of the
/// global chain or a tenant's) is granted to read, which cost every message their time and
/// decide nothing; and a `max_size` below the largest message accepted, whose larger messages
/// are never scanned.
pub fn warnings(
    config: &crate::config::Config,
    tenants: &[crate::config::TenantConfig],
) -> Vec<String> {
    let mut warnings: Vec<String> = unread_warning(config, tenants).into_iter().collect();
    for scanner in &config.scanners {
        if scanner.max_size < config.smtp.max_message_size {
            warnings.push(format!(
                "scanner `{}`: max_size {} is below [smtp] max_message_size {}: larger messages are not scanned (a too-large result)",
                scanner.name, scanner.max_size, config.smtp.max_message_size
            ));
        }
    }
    warnings
}

fn unread_warning(
    config: &crate::config::Config,
    tenants: &[crate::config::TenantConfig],
) -> Option<String> {
    use crate::config::Grant;
    let granted = |plugins: &[crate::config::PluginManifest]| {
        plugins
            .iter()
            .any(|plugin| plugin.grants.contains(&Grant::Scanners))
    };
    let read = granted(&config.plugins) || tenants.iter().any(|tenant| granted(&tenant.plugins));
    (!config.scanners.is_empty() && !read).then(|| {
        "scanners are configured ([[scanner]]) but no plugin is granted \"scanners\": every message is scanned and nothing decides on the results".to_string()
    })
}

/// One scan, bounded by the scanner's timeout and size, counted in the metrics.
async fn scan_one(scanner: &Scanner, envelope: &Envelope, content: Bytes) -> ScanResult {
    let started = Instant::now();
    let outcome = if content.len() as u64 > scanner.max_size {
        ScanOutcome::Failed(ScanError::TooLarge(scanner.max_size))
    } else {
        let scan = async {
            match scanner.kind {
                ScannerKind::Rspamd => rspamd::check(&scanner.address, envelope, content)
                    .await
                    .map(ScanOutcome::Rspamd),
                ScannerKind::Clamav => {
                    clamav::instream(&scanner.address, &scanner.clamd_sessions, &content)
                        .await
                        .map(ScanOutcome::Clamav)
                }
            }
        };
        match tokio::time::timeout(scanner.timeout, scan).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(error)) => ScanOutcome::Failed(error),
            Err(_) => ScanOutcome::Failed(ScanError::Timeout(millis(scanner.timeout))),
        }
    };
    let elapsed = started.elapsed();
    let result = ScanResult {
        scanner: scanner.name.clone(),
        outcome,
        millis: millis(elapsed),
    };
    record_metrics(scanner, &result, elapsed);
    if let ScanOutcome::Failed(error) = &result.outcome {
        tracing::warn!(scanner = %scanner.name, address = %scanner.address, queue_id = %envelope.queue_id, %error, "scan failed");
    }
    result
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn record_metrics(scanner: &ScannerConfig, result: &ScanResult, elapsed: Duration) {
    let name = scanner.name.clone();
    metrics::counter!("switchyard_scanner_calls_total", "scanner" => name.clone(), "verdict" => result.verdict_label())
        .increment(1);
    metrics::histogram!("switchyard_scanner_seconds", "scanner" => name.clone())
        .record(elapsed.as_secs_f64());
    if let ScanOutcome::Failed(error) = &result.outcome {
        metrics::counter!("switchyard_scanner_errors_total", "scanner" => name, "error" => error.kind())
            .increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Endpoint;

    fn scanner(kind: ScannerKind, address: &str, max_size: u64) -> Scanner {
        Scanner {
            config: scanner_config(kind, address, max_size),
            clamd_sessions: clamav::Sessions::default(),
        }
    }

    fn scanner_config(kind: ScannerKind, address: &str, max_size: u64) -> ScannerConfig {
        ScannerConfig {
            name: "s".to_string(),
            kind,
            address: Endpoint::try_from(address.to_string()).expect("address"),
            timeout: Duration::from_secs(2),
            max_size,
            listeners: Vec::new(),
            tenants: None,
        }
    }

    #[test]
    fn scanners_that_no_plugin_reads_are_warned_about() {
        let mut config = crate::config::Config::default();
        assert_eq!(unread_warning(&config, &[]), None, "no scanners");
        config
            .scanners
            .push(scanner_config(ScannerKind::Rspamd, "127.0.0.1:11333", 1024));
        let plugin = |grants: &str| -> crate::config::PluginManifest {
            toml::from_str(&format!(
                "name = \"p\"\npath = \"p.wasm\"\ngrants = [{grants}]"
            ))
            .expect("manifest")
        };
        config.plugins.push(plugin("\"kv\""));
        assert!(unread_warning(&config, &[]).is_some_and(|w| w.contains("no plugin is granted")));
        config.plugins.push(plugin("\"scanners\""));
        assert_eq!(unread_warning(&config, &[]), None);
        // Its max_size (1 KiB) is below the largest message accepted.
        let warned = warnings(&config, &[]);
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(
            warned[0].contains("larger messages are not scanned"),
            "{warned:?}"
        );
        config.scanners[0].max_size = config.smtp.max_message_size;
        assert!(warnings(&config, &[]).is_empty());
    }

    #[tokio::test]
    async fn a_message_over_the_size_is_not_sent_and_says_so() {
        // Nothing listens on the address: a too-large message must not even try to connect.
        let config = scanner(ScannerKind::Clamav, "127.0.0.1:9", 4);
        let result = scan_one(&config, &Envelope::default(), Bytes::from_static(b"12345")).await;
        assert_eq!(result.outcome, ScanOutcome::Failed(ScanError::TooLarge(4)));
    }

    #[tokio::test]
    async fn a_scanner_that_is_down_is_an_error_not_clean() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        drop(listener);
        for kind in [ScannerKind::Clamav, ScannerKind::Rspamd] {
            let config = scanner(kind, &address, 1024);
            let result = scan_one(&config, &Envelope::default(), Bytes::from_static(b"x")).await;
            assert!(
                matches!(result.outcome, ScanOutcome::Failed(ScanError::Refused(_))),
                "{kind:?}: {result:?}"
            );
        }
    }
}
