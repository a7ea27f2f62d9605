//! `switchyard queue ...`: through the running server's admin API when it has one and answers,
//! else on the queue directly. Either way the same actions run and the same lines are printed.

use std::sync::Arc;

use anyhow::{bail, Context};

use super::{destinations, QueueAction};
use crate::admin::actions;
use crate::admin::client::{encode, AdminClient};
use crate::admin::views::{Bounced, Changed, Held, MessageView};
use crate::config::Config;
use crate::plugins::compile_cache::CompileCache;
use crate::plugins::{PluginManager, PluginServices};
use crate::queue::traces::{TraceQuery, TraceRecord};
use crate::queue::{now_millis, Opened};

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
    let target = match AdminClient::reach(config).await? {
        Some(api) => Target::Api(api),
        None => Target::Queue(open_existing(config).await?),
    };
    match action {
        QueueAction::Migrate => {}
        QueueAction::List {
            by_destination: true,
            ..
        } => match &target {
            Target::Api(api) => destinations::print(&api.get::<Vec<_>>("/v1/destinations").await?),
            Target::Queue(_) => destinations::print_offline(&target.list(None).await?),
        },
        QueueAction::List { tenant, .. } => print_list(&target.list(tenant.as_deref()).await?),
        QueueAction::Backoff {
            destination,
            cancel,
        } => {
            let Target::Api(api) = &target else {
                bail!(
                    "back-offs live in the running server, and it does not answer on its admin \
                     API ([admin] listen)"
                );
            };
            match (destination, cancel) {
                (Some(destination), true) => {
                    api.delete(&format!(
                        "/v1/destinations/{}/backoff",
                        encode(&destination)
                    ))
                    .await?;
                    println!("back-off of {destination} cancelled: its rule's rate applies again");
                }
                (destination, _) => destinations::print_backoffs(
                    &api.get::<Vec<_>>("/v1/destinations").await?,
                    destination.as_deref(),
                ),
            }
        }
        QueueAction::Show { id } => print_show(&target.show(&id).await?),
        QueueAction::Trace { id, json } => print_traces(&target.trace(&id).await?, json)?,
        QueueAction::Traces {
            client,
            sender,
            since,
            limit,
            json,
        } => {
            let since =
                since.map(|ago| now_millis() - i64::try_from(ago.as_millis()).unwrap_or(i64::MAX));
            let query = TraceQuery {
                client_ip: client,
                sender,
                since,
                until: None,
                limit: limit.clamp(1, 1000),
            };
            let records = target.refused(&query).await?;
            print_traces(&records, json)?;
            if !json {
                println!("-- {} refused transaction(s)", records.len());
            }
        }
        QueueAction::Retry { id, all } => {
            let changed = target.retry(one_or_all(id.as_deref(), all)?).await?;
            println!(
                "{} recipient(s) scheduled for immediate retry",
                changed.recipients
            );
        }
        QueueAction::Hold { id, all } => {
            let held = target.hold(one_or_all(id.as_deref(), all)?).await?;
            println!("{} recipient(s) held", held.held);
            if held.busy > 0 {
                println!(
                    "{} recipient(s) are being delivered now; hold again after their attempt if \
                     they stay queued",
                    held.busy
                );
            }
        }
        QueueAction::Release { id, all } => {
            let changed = target.release(one_or_all(id.as_deref(), all)?).await?;
            println!("{} recipient(s) released", changed.recipients);
        }
        QueueAction::Delete { id } => {
            target.delete(&id).await?;
            println!("deleted {id}");
        }
        QueueAction::Bounce { id } => {
            let bounced = target.bounce(config, &id).await?;
            match bounced.dsn {
                Some(dsn) => println!("bounced {id}: {} recipient(s), DSN {dsn}", bounced.notified),
                None => println!(
                    "bounced {id}: {} recipient(s), no DSN (null sender)",
                    bounced.notified
                ),
            }
        }
    }
    Ok(())
}

/// `Some(id)`, or `None` for `--all`; one of the two is required.
fn one_or_all(id: Option<&str>, all: bool) -> anyhow::Result<Option<&str>> {
    if id.is_none() && !all {
        bail!("give a queue id or --all");
    }
    Ok(id)
}

/// Where the command's actions run.
enum Target {
    /// The running server, through its admin API.
    Api(AdminClient),
    /// The queue itself (no server answers).
    Queue(Opened),
}

impl Target {
    async fn list(&self, tenant: Option<&str>) -> anyhow::Result<Vec<MessageView>> {
        match self {
            Target::Api(api) => {
                let query = tenant
                    .map(|tenant| format!("?tenant={}", encode(tenant)))
                    .unwrap_or_default();
                api.get(&format!("/v1/queue{query}")).await
            }
            Target::Queue(opened) => Ok(actions::list(opened.queue.as_ref(), tenant).await?),
        }
    }

    async fn show(&self, id: &str) -> anyhow::Result<MessageView> {
        match self {
            Target::Api(api) => api.get(&format!("/v1/queue/{}", encode(id))).await,
            Target::Queue(opened) => Ok(actions::show(opened.queue.as_ref(), id).await?),
        }
    }

    async fn trace(&self, id: &str) -> anyhow::Result<Vec<TraceRecord>> {
        match self {
            Target::Api(api) => api.get(&format!("/v1/queue/{}/trace", encode(id))).await,
            Target::Queue(opened) => Ok(actions::trace(opened.traces.as_ref(), id).await?),
        }
    }

    async fn refused(&self, query: &TraceQuery) -> anyhow::Result<Vec<TraceRecord>> {
        match self {
            Target::Api(api) => {
                let mut path = format!("/v1/traces?limit={}", query.limit);
                for (key, value) in [
                    ("client", query.client_ip.clone()),
                    ("sender", query.sender.clone()),
                    ("since", query.since.map(|since| since.to_string())),
                ] {
                    if let Some(value) = value {
                        path.push_str(&format!("&{key}={}", encode(&value)));
                    }
                }
                api.get(&path).await
            }
            Target::Queue(opened) => Ok(actions::refused(opened.traces.as_ref(), query).await?),
        }
    }

    async fn retry(&self, id: Option<&str>) -> anyhow::Result<Changed> {
        match self {
            Target::Api(api) => api.post(&action_path(id, "retry")).await,
            Target::Queue(opened) => Ok(actions::retry(opened.queue.as_ref(), id).await?),
        }
    }

    async fn hold(&self, id: Option<&str>) -> anyhow::Result<Held> {
        match self {
            Target::Api(api) => api.post(&action_path(id, "hold")).await,
            Target::Queue(opened) => Ok(actions::hold(opened.queue.as_ref(), id).await?),
        }
    }

    async fn release(&self, id: Option<&str>) -> anyhow::Result<Changed> {
        match self {
            Target::Api(api) => api.post(&action_path(id, "release")).await,
            Target::Queue(opened) => Ok(actions::release(opened.queue.as_ref(), id).await?),
        }
    }

    async fn delete(&self, id: &str) -> anyhow::Result<()> {
        match self {
            Target::Api(api) => api.delete(&format!("/v1/queue/{}", encode(id))).await,
            Target::Queue(opened) => Ok(actions::delete(opened.queue.as_ref(), id).await?),
        }
    }

    async fn bounce(&self, config: &Config, id: &str) -> anyhow::Result<Bounced> {
        match self {
            Target::Api(api) => api.post(&format!("/v1/queue/{}/bounce", encode(id))).await,
            Target::Queue(opened) => {
                // No server to ask: the message's plugins are loaded here, so the bounce runs
                // their bounce and delivery-result hooks as the server would.
                let plugins = load_plugins(config, opened).await?;
                Ok(actions::bounce(opened.queue.as_ref(), &config.hostname, id, &plugins).await?)
            }
        }
    }
}

/// The plugin chains of `config` (global and tenants'), with the queue's kv store, for a command
/// that runs hooks without a server. Metrics that plugins count here stay in this process.
async fn load_plugins(config: &Config, opened: &Opened) -> anyhow::Result<Arc<PluginManager>> {
    use crate::plugins::engine::{new_engine_with, PoolTuning};
    // A few instances are plenty for one command, and reserve far less address space.
    let engine = new_engine_with(PoolTuning {
        instances: 64,
        pagemap_scan: false,
    })?;
    let compile_cache = CompileCache::open(&config.data_dir.join("plugin-cache"), &engine)
        .ok()
        .map(Arc::new);
    let services = PluginServices {
        kv: Some(opened.kv.clone()),
        compile_cache,
        kv_quota: config.kv.quota(),
        ..PluginServices::default()
    };
    let tenants = config.load_tenants()?;
    Ok(PluginManager::start(engine, &config.plugins, &tenants, services).await?)
}

/// `/v1/queue/ID/ACTION`, or `/v1/queue/ACTION` for every message.
fn action_path(id: Option<&str>, action: &str) -> String {
    match id {
        Some(id) => format!("/v1/queue/{}/{action}", encode(id)),
        None => format!("/v1/queue/{action}"),
    }
}

/// Opens the queue of `config` for a command that reads or changes what is in it: an SQLite
/// file must exist already (a typo in the path should not create an empty queue).
pub(super) async fn open_existing(config: &Config) -> anyhow::Result<Opened> {
    let location = crate::queue::location(&config.queue, &config.data_dir);
    if config.queue.engine == crate::config::QueueEngine::Sqlite && !config.queue_path().exists() {
        bail!("no queue at {location} (has `switchyard serve` run with this configuration?)");
    }
    crate::queue::open(&config.queue, &config.data_dir, crate::queue::Schema::AsIs)
        .await
        .with_context(|| format!("opening the queue {location}"))
}

/// A Unix-millisecond time as the CLI prints it (UTC).
pub(super) fn clock(at: i64) -> String {
    chrono::DateTime::from_timestamp_millis(at)
        .map(|time| time.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

/// `queue list`: one line per message (with its tenant, `-` for none), one per pending
/// recipient.
fn print_list(messages: &[MessageView]) {
    for message in messages {
        let sender = if message.sender.is_empty() {
            "<>"
        } else {
            &message.sender
        };
        let tenant = if message.tenant.is_empty() {
            "-"
        } else {
            &message.tenant
        };
        println!(
            "{}  {:>8}  {}  tenant={tenant}  {}",
            message.id,
            message.size,
            clock(message.received_at),
            sender
        );
        let pending = message
            .recipients
            .iter()
            .filter(|r| matches!(r.state.as_str(), "queued" | "quarantined" | "held"));
        for recipient in pending {
            let reason = recipient
                .last_reply
                .as_deref()
                .map(|r| format!("  ({r})"))
                .unwrap_or_default();
            let held = match recipient.state.as_str() {
                "quarantined" => "  QUARANTINED",
                "held" => "  HELD",
                _ => "",
            };
            let leased = recipient
                .leased_by
                .as_deref()
                .map(|owner| format!("  leased-by={owner}"))
                .unwrap_or_default();
            println!(
                "    {}  attempts={}{leased}{held}{reason}",
                recipient.address, recipient.attempts
            );
        }
    }
    println!("-- {} message(s) in queue", messages.len());
}

/// `queue show`: the envelope, each recipient, and the content.
fn print_show(message: &MessageView) {
    println!("queue id: {}", message.id);
    println!("sender: <{}>", message.sender);
    println!("size: {}", message.size);
    println!(
        "smtputf8: {}  8bit: {}",
        message.smtputf8, message.eight_bit
    );
    if message.dsn_ret.is_some() || message.dsn_envid.is_some() || message.requiretls {
        println!(
            "dsn: ret={} envid={} requiretls={}",
            message.dsn_ret.as_deref().unwrap_or("-"),
            message.dsn_envid.as_deref().unwrap_or("-"),
            message.requiretls
        );
    }
    for recipient in &message.recipients {
        let mut asked = String::new();
        if let Some(notify) = &recipient.notify {
            asked.push_str(&format!(" notify={notify}"));
        }
        if let Some(orcpt) = &recipient.orcpt {
            asked.push_str(&format!(" orcpt={orcpt}"));
        }
        println!(
            "recipient: <{}> state={} attempts={} next={}{asked} last={}",
            recipient.address,
            recipient.state,
            recipient.attempts,
            clock(recipient.next_attempt),
            recipient.last_reply.as_deref().unwrap_or("-")
        );
    }
    if let Some(content) = &message.content {
        println!();
        print!("{content}");
    }
}

fn print_traces(records: &[TraceRecord], json: bool) -> anyhow::Result<()> {
    if json {
        for record in records {
            println!("{}", serde_json::to_string(record)?);
        }
    } else {
        print!("{}", crate::queue::traces::timeline(records));
    }
    Ok(())
}
