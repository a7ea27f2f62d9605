//! `[log]`, `[trace]`, `[record]`, `[shutdown]` and `[metrics]`: running the service and
//! seeing what it does.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

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
