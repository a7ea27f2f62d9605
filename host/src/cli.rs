//! The command line: `serve`, `check-config` and the `queue` commands.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::delivery::dsn::{self, DsnRecipient};
use crate::queue::{Outcome, Queue, QueuedMessage, RecipientResult, RecipientState};

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
            let opened = open_existing(config).await?;
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

#[derive(Subcommand)]
pub enum PluginsAction {
    /// Each plugin's tenant (`-`: the global chain), generation, hooks, limits and call/failure
    /// counts, and the last reload errors.
    List {
        /// Only the global chain and this tenant's.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Load the configured plugins beside the running ones and swap them in; prints the outcome.
    Reload,
}

pub fn plugins_command(config: &Config, action: PluginsAction) -> anyhow::Result<()> {
    let status_file = crate::reload::status_path(config);
    let read_status = || std::fs::read_to_string(&status_file).unwrap_or_default();
    let attempts = |status: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("reload attempts: "))
            .and_then(|count| count.trim().parse::<u64>().ok())
    };
    match action {
        PluginsAction::List { tenant } => {
            let status = read_status();
            if status.is_empty() {
                bail!("no plugin status at {} (is `switchyard serve` running with this configuration?)", status_file.display());
            }
            match tenant {
                None => print!("{status}"),
                Some(tenant) => {
                    // Lines of a chain start with its tenant; the global chain's with `-`,
                    // and the summary lines with neither.
                    let columns = |line: &str| line.split("  ").next().unwrap_or("").to_string();
                    let chains: std::collections::HashSet<String> = status
                        .lines()
                        .filter(|line| line.contains("  "))
                        .map(columns)
                        .collect();
                    if !chains.contains(&tenant) {
                        bail!("no tenant `{tenant}` in the running server's plugin status");
                    }
                    for line in status.lines() {
                        let first = columns(line);
                        if first == tenant || first == "-" || !line.contains("  ") {
                            println!("{line}");
                        }
                    }
                }
            }
            Ok(())
        }
        PluginsAction::Reload => {
            let pid_file = crate::reload::pid_path(config);
            let pid: i32 = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|text| text.trim().parse().ok())
                .with_context(|| {
                    format!("no running server: cannot read {}", pid_file.display())
                })?;
            let before = attempts(&read_status()).unwrap_or(0);
            // SAFETY: kill(2) with a pid read from our own pid file and a valid signal number.
            if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
                bail!(
                    "cannot signal process {pid}: {}",
                    std::io::Error::last_os_error()
                );
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            while std::time::Instant::now() < deadline {
                let status = read_status();
                if attempts(&status).is_some_and(|count| count > before) {
                    print!("{status}");
                    if status.contains("last reload failed") {
                        bail!("reload failed; the previous generation keeps running");
                    }
                    return Ok(());
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            bail!("the server did not report the reload within 120 s")
        }
    }
}

pub fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    match path {
        Some(path) => Ok(Config::load(path)?),
        None => Ok(Config::default()),
    }
}

pub async fn queue_command(config: &Config, action: QueueAction) -> anyhow::Result<()> {
    if let QueueAction::Migrate = action {
        let location = crate::queue::location(&config.queue, &config.data_dir);
        let opened = crate::queue::open(
            &config.queue,
            &config.data_dir,
            crate::queue::Schema::Migrate,
        )
        .await
        .with_context(|| format!("migrating the queue {location}"))?;
        let version = opened.queue.schema_version().await?;
        println!("{location}: schema at version {version}");
        return Ok(());
    }
    let opened = open_existing(config).await?;
    let queue = opened.queue;
    match action {
        QueueAction::Trace { id, json } => {
            let records = opened.traces.message_trace(&id).await?;
            if records.is_empty() {
                bail!("no trace of {id} (tracing off, never traced, or older than [trace] keep)");
            }
            print_traces(&records, json)?;
        }
        QueueAction::Traces {
            client,
            sender,
            since,
            limit,
            json,
        } => {
            let since = since.map(|ago| {
                crate::queue::now_millis() - i64::try_from(ago.as_millis()).unwrap_or(i64::MAX)
            });
            let query = crate::queue::traces::TraceQuery {
                client_ip: client,
                sender,
                since,
                until: None,
                limit: limit.max(1),
            };
            let records = opened.traces.refused_traces(&query).await?;
            print_traces(&records, json)?;
            if !json {
                println!("-- {} refused transaction(s)", records.len());
            }
        }
        QueueAction::Migrate => {}
        QueueAction::List { tenant } => list(queue.as_ref(), tenant.as_deref()).await?,
        QueueAction::Show { id } => show(queue.as_ref(), &id).await?,
        QueueAction::Retry { id, all } => {
            if id.is_none() && !all {
                bail!("give a queue id or --all");
            }
            let count = queue.retry_now(id.as_deref()).await?;
            println!("{count} recipient(s) scheduled for immediate retry");
        }
        QueueAction::Hold { id, all } => {
            if id.is_none() && !all {
                bail!("give a queue id or --all");
            }
            let (held, busy) = queue
                .hold(id.as_deref(), crate::queue::now_millis())
                .await?;
            println!("{held} recipient(s) held");
            if busy > 0 {
                println!("{busy} recipient(s) are being delivered now; hold again after their attempt if they stay queued");
            }
        }
        QueueAction::Release { id, all } => {
            if id.is_none() && !all {
                bail!("give a queue id or --all");
            }
            let released = queue.release(id.as_deref()).await?;
            println!("{released} recipient(s) released");
        }
        QueueAction::Delete { id } => {
            take_from_delivery(queue.as_ref(), &id).await?;
            if !queue.delete(&id).await? {
                bail!("no message {id} in the queue");
            }
            println!("deleted {id}");
        }
        QueueAction::Bounce { id } => bounce(config, queue.as_ref(), &id).await?,
    }
    Ok(())
}

fn print_traces(records: &[crate::queue::traces::TraceRecord], json: bool) -> anyhow::Result<()> {
    if json {
        for record in records {
            println!("{}", serde_json::to_string(record)?);
        }
    } else {
        print!("{}", crate::queue::traces::timeline(records));
    }
    Ok(())
}

/// Opens the queue of `config` for a command that reads or changes what is in it: an SQLite
/// file must exist already (a typo in the path should not create an empty queue).
async fn open_existing(config: &Config) -> anyhow::Result<crate::queue::Opened> {
    let location = crate::queue::location(&config.queue, &config.data_dir);
    if config.queue.engine == crate::config::QueueEngine::Sqlite && !config.queue_path().exists() {
        bail!("no queue at {location} (has `switchyard serve` run with this configuration?)");
    }
    crate::queue::open(&config.queue, &config.data_dir, crate::queue::Schema::AsIs)
        .await
        .with_context(|| format!("opening the queue {location}"))
}

/// `queue list`: one line per message (with its tenant, `-` for none), one per pending
/// recipient.
async fn list(queue: &dyn Queue, tenant: Option<&str>) -> anyhow::Result<()> {
    let mut messages = queue.list().await?;
    if let Some(wanted) = tenant {
        let wanted = if wanted == "-" { "" } else { wanted };
        messages.retain(|message| message.meta.tenant == wanted);
    }
    for message in &messages {
        let meta = &message.meta;
        let arrived = chrono::DateTime::from_timestamp_millis(meta.received_at)
            .map(|time| time.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_default();
        let sender = if meta.sender.is_empty() {
            "<>"
        } else {
            &meta.sender
        };
        let tenant = if meta.tenant.is_empty() {
            "-"
        } else {
            &meta.tenant
        };
        println!(
            "{}  {:>8}  {}  tenant={tenant}  {}",
            meta.id, meta.size, arrived, sender
        );
        let pending = message.recipients.iter().filter(|r| {
            matches!(
                r.state,
                RecipientState::Queued | RecipientState::Quarantined | RecipientState::Held
            )
        });
        for recipient in pending {
            let reason = recipient
                .last_reply
                .as_deref()
                .map(|r| format!("  ({r})"))
                .unwrap_or_default();
            let held = match recipient.state {
                RecipientState::Quarantined => "  QUARANTINED",
                RecipientState::Held => "  HELD",
                _ => "",
            };
            let now = crate::queue::now_millis();
            let leased = match &recipient.lease {
                Some(lease) if lease.until >= now => format!("  leased-by={}", lease.owner),
                _ => String::new(),
            };
            println!(
                "    {}  attempts={}{leased}{held}{reason}",
                recipient.address, recipient.attempts
            );
        }
    }
    println!("-- {} message(s) in queue", messages.len());
    Ok(())
}

/// `queue show ID`: the message's facts, each recipient's state, and the content.
async fn show(queue: &dyn Queue, id: &str) -> anyhow::Result<()> {
    let Some(message) = queue.get(id).await? else {
        bail!("no message {id} in the queue");
    };
    let meta = &message.meta;
    println!("queue id: {}", meta.id);
    println!("sender: <{}>", meta.sender);
    println!("size: {}", meta.size);
    println!("smtputf8: {}  8bit: {}", meta.smtputf8, meta.eight_bit);
    let dsn = &meta.dsn;
    if dsn.ret.is_some() || dsn.envid.is_some() || dsn.requiretls {
        println!(
            "dsn: ret={} envid={} requiretls={}",
            dsn.ret.map(|ret| ret.as_str()).unwrap_or("-"),
            dsn.envid.as_deref().unwrap_or("-"),
            dsn.requiretls
        );
    }
    for recipient in &message.recipients {
        let mut asked = String::new();
        if recipient.dsn.notify.is_specified() {
            asked.push_str(&format!(" notify={}", recipient.dsn.notify));
        }
        if let Some(orcpt) = &recipient.dsn.orcpt {
            asked.push_str(&format!(" orcpt={orcpt}"));
        }
        let next = chrono::DateTime::from_timestamp_millis(recipient.next_attempt)
            .map(|time| time.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_default();
        println!(
            "recipient: <{}> state={} attempts={} next={}{asked} last={}",
            recipient.address,
            recipient.state.name(),
            recipient.attempts,
            next,
            recipient.last_reply.as_deref().unwrap_or("-")
        );
    }
    if let Some(content) = queue.content(id).await? {
        println!();
        print!("{}", String::from_utf8_lossy(&content));
    }
    Ok(())
}

/// `queue bounce ID`: fails every pending recipient now and returns the message to its sender.
async fn bounce(config: &Config, queue: &dyn Queue, id: &str) -> anyhow::Result<()> {
    let (message, owner) = take_from_delivery(queue, id).await?;
    let content = queue.content(id).await?.unwrap_or_default();
    let diagnostic = "550 5.0.0 message returned by the administrator".to_string();
    // Recipients that asked not to hear of failures (NOTIFY) are failed without a notice.
    let failed: Vec<DsnRecipient> = message
        .recipients
        .iter()
        .filter(|recipient| recipient.dsn.notify.on_failure())
        .map(|recipient| DsnRecipient {
            address: recipient.address.clone(),
            action: dsn::Action::Failed,
            status: "5.0.0".to_string(),
            diagnostic: diagnostic.clone(),
            remote_mta: None,
            orcpt: recipient.dsn.orcpt.clone(),
        })
        .collect();
    let results: Vec<RecipientResult> = message
        .recipients
        .iter()
        .map(|recipient| RecipientResult {
            message_id: id.to_string(),
            index: recipient.index,
            attempts: recipient.attempts,
            outcome: Outcome::Failed,
            reply: diagnostic.clone(),
            delay_warned: false,
        })
        .collect();
    let bounce = dsn::build(
        &config.hostname,
        &message.meta,
        &content,
        &failed,
        dsn::Report::Failure,
        None,
    );
    let dsn_id = bounce.as_ref().map(|b| b.meta.id.clone());
    let stale = queue
        .record(&owner, results, bounce.into_iter().collect())
        .await?;
    if stale > 0 {
        bail!("{id} was taken back by delivery while this command ran (its lease ran out); nothing was bounced");
    }
    match dsn_id {
        Some(dsn_id) => {
            println!("bounced {id}: {} recipient(s), DSN {dsn_id}", failed.len())
        }
        None => println!(
            "bounced {id}: {} recipient(s), no DSN (null sender)",
            failed.len()
        ),
    }
    Ok(())
}

/// This machine's name, for operator leases.
fn config_hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_default()
}

/// How long an operator's command may hold a message away from delivery; if the command dies,
/// delivery takes the message back after this.
const ADMIN_LEASE_MILLIS: i64 = 60_000;

/// Leases a message's pending recipients to this command so that a running server cannot
/// deliver them while the command bounces or deletes the message (which would deliver and bounce
/// it, or deliver a deleted one). Refuses while a delivery of the message is under way.
async fn take_from_delivery(
    queue: &dyn Queue,
    id: &str,
) -> anyhow::Result<(QueuedMessage, String)> {
    // Unique across machines and runs: the command may run anywhere against a shared queue.
    let owner = format!(
        "admin-{}-{}-{:08x}",
        config_hostname(),
        std::process::id(),
        fastrand::u32(..)
    );
    let now = crate::queue::now_millis();
    let Some((message, busy)) = queue
        .lease_message(id, &owner, now, now + ADMIN_LEASE_MILLIS)
        .await?
    else {
        bail!("no message {id} in the queue");
    };
    if busy > 0 {
        queue.release_leases(&owner).await?;
        bail!(
            "{busy} recipient(s) of {id} are being delivered right now; \
             try again once the attempt is over (`queue show {id}`)"
        );
    }
    Ok((message, owner))
}
