//! The command line: `serve`, `check-config` and the `queue` commands.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use crate::config::Config;

mod destinations;
mod plugins;
mod queue;
mod scaffold;
pub use plugins::{plugins_command, PluginsAction};
pub use queue::queue_command;

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "A mail transfer agent whose policy lives in WebAssembly plugins"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the mail router.
    Serve {
        /// Configuration file; without one, the built-in default (127.0.0.1:2525, ./switchyard-data).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and print the effective configuration.
    CheckConfig { file: PathBuf },
    /// List the running plugin chain, or reload it (on the running `serve`).
    Plugins {
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: PluginsAction,
    },
    /// SMTP AUTH accounts.
    Auth {
        #[command(subcommand)]
        action: AuthAction,
    },
    /// DKIM signing keys: make one, or print the records to publish.
    Dkim {
        #[command(subcommand)]
        action: DkimAction,
    },
    /// TLS reports (RFC 8460) to the domains deliveries went to under a policy.
    TlsReports {
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: TlsReportsAction,
    },
    /// Inspect and act on the queue (works while `serve` runs).
    Queue {
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: QueueAction,
    },
}

#[derive(Subcommand)]
pub enum QueueAction {
    /// One line per queued message.
    List {
        /// Only this tenant's messages (`-` for mail of no tenant).
        #[arg(long)]
        tenant: Option<String>,
        /// One line per destination instead: its shaping rule, connections, rate and back-off
        /// (from the running server; without one, queued recipients by recipient domain).
        #[arg(long, conflicts_with = "tenant")]
        by_destination: bool,
    },
    /// The back-offs in force (destinations that answered "slow down" in bulk) and why; with
    /// `--cancel`, end one at once.
    Backoff {
        /// Only this destination (as `queue list --by-destination` names it).
        destination: Option<String>,
        /// End the destination's back-off now: its rule's rate applies again.
        #[arg(long, requires = "destination")]
        cancel: bool,
    },
    /// A message's envelope, recipients and content.
    Show { id: String },
    /// Try a message (or every message with --all) again now; releases quarantined ones too.
    Retry {
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Hold a message (or every message with --all): its queued recipients are not delivered,
    /// and do not expire, until released. Recipients being delivered finish their attempt.
    Hold {
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Release a held message (or every held message with --all): due at once.
    Release {
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Remove a message without delivering or bouncing it.
    Delete { id: String },
    /// Fail a message's remaining recipients and return it to its sender with a DSN.
    Bounce { id: String },
    /// Create the queue's schema or bring it up to this version's (also done by `serve`).
    Migrate,
    /// What the plugins decided about a message, as a timeline: every hook call of its SMTP
    /// transaction, routing and delivery attempts (kept for `[trace] keep`, also after
    /// delivery).
    Trace {
        id: String,
        /// Print the records as JSON, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Traces of transactions refused before a message was queued, newest first.
    Traces {
        /// Only those from this client address.
        #[arg(long)]
        client: Option<String>,
        /// Only those with this envelope sender (as the client gave it).
        #[arg(long)]
        sender: Option<String>,
        /// Only those of the last ... (`30m`, `2h`, `1d`).
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Print the records as JSON, one per line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum AuthAction {
    /// Read a password from standard input (one line) and print its argon2id hash, for a
    /// `name:hash` line of `[submission] users_file`.
    Hash,
}

/// Runs an `auth` command.
pub fn auth_command(action: AuthAction) -> anyhow::Result<()> {
    match action {
        AuthAction::Hash => {
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .context("cannot read the password from standard input")?;
            let password = password.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                bail!("empty password");
            }
            println!("{}", crate::accounts::hash_password(password)?);
            Ok(())
        }
    }
}

#[derive(Subcommand)]
pub enum TlsReportsAction {
    /// Build the reports of everything counted so far and queue them now (a running `serve`
    /// delivers them at its next queue scan).
    Send,
}

/// Runs a `tls-reports` command.
pub async fn tls_reports_command(config: &Config, action: TlsReportsAction) -> anyhow::Result<()> {
    match action {
        TlsReportsAction::Send => {
            let opened = queue::open_existing(config).await?;
            let dns = crate::net::dns::Dns::new(&config.dns)?;
            let sent = crate::delivery::tls_report::send_reports(
                config,
                opened.policies.as_ref(),
                opened.queue.as_ref(),
                &dns,
            )
            .await?;
            for report in &sent {
                println!(
                    "queued {}: TLS report for {} to {}",
                    report.queue_id,
                    report.domain,
                    report.to.join(", ")
                );
            }
            println!("-- {} report(s)", sent.len());
            Ok(())
        }
    }
}

#[derive(Subcommand)]
pub enum DkimAction {
    /// Write a new private key to `DIR/DOMAIN.SELECTOR.key` and print the DNS TXT record and
    /// the `[[dkim]]` entry that uses it.
    Keygen {
        domain: String,
        selector: String,
        #[arg(long, value_enum, default_value = "rsa")]
        algorithm: KeyAlgorithm,
        /// RSA key size (2048 or more; RFC 8301).
        #[arg(long, default_value_t = 2048)]
        bits: usize,
        /// Directory for the key file.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// The TXT record of every configured key (the global ones and the tenants'), active or
    /// retired: what must be published.
    Records {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum KeyAlgorithm {
    Rsa,
    Ed25519,
}

/// Runs a `dkim` command.
pub fn dkim_command(action: DkimAction) -> anyhow::Result<()> {
    use crate::dkim::keygen::{generate, zone_text};
    use crate::dkim::{Algorithm, KeySet};
    match action {
        DkimAction::Keygen {
            domain,
            selector,
            algorithm,
            bits,
            out,
        } => {
            let algorithm = match algorithm {
                KeyAlgorithm::Rsa => Algorithm::Rsa,
                KeyAlgorithm::Ed25519 => Algorithm::Ed25519,
            };
            if algorithm == Algorithm::Rsa && !(2048..=8192).contains(&bits) {
                bail!("--bits {bits}: RSA keys for DKIM are 2048 to 8192 bits (RFC 8301)");
            }
            let entry = crate::config::DkimKeyConfig {
                domain: domain.clone(),
                selector: selector.clone(),
                private_key: out.join(format!("{domain}.{selector}.key")),
                active: true,
                headers: None,
                oversign: None,
                expire: None,
            };
            if let Some(problem) = entry.naming_problem() {
                bail!("{problem}");
            }
            let path = &entry.private_key;
            let generated = generate(algorithm, bits).context("generating the key")?;
            write_private(path, &generated.private_pem)?;
            let record = format!(
                "v=DKIM1; k={}; p={}",
                algorithm.record_tag(),
                generated.public_key
            );
            eprintln!("wrote {}", path.display());
            println!(
                "{selector}._domainkey.{domain}. IN TXT {}",
                zone_text(&record)
            );
            eprintln!(
                "\n[[dkim]]\ndomain = \"{domain}\"\nselector = \"{selector}\"\nprivate_key = \"{}\"",
                path.display()
            );
            Ok(())
        }
        DkimAction::Records { config } => {
            let config = load_config(config.as_ref())?;
            let mut sets = vec![("-".to_string(), KeySet::load(&config.dkim)?)];
            for tenant in config.load_tenants()? {
                sets.push((tenant.id.clone(), KeySet::load(&tenant.dkim)?));
            }
            for (owner, keys) in sets {
                for key in keys.keys() {
                    let state = if key.active { "active" } else { "retired" };
                    println!("; tenant {owner}, {state}");
                    println!("{}. IN TXT {}", key.record_name(), zone_text(&key.record()));
                }
            }
            Ok(())
        }
    }
}

/// Writes a private key readable by its owner only, refusing to replace an existing file.
fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

pub fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    match path {
        Some(path) => Ok(Config::load(path)?),
        None => Ok(Config::default()),
    }
}
