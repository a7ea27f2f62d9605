//! `[queue]` and `[retry]`: where messages wait, and when they are tried again.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

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
    #[serde(with = "super::types::duration_list")]
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
