//! `switchyard serve`: opens the queue, binds the listeners and runs sessions, the queue scan and
//! delivery until told to stop.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::config::{Config, TenantConfig};
use crate::delivery::connect::Transports;
use crate::delivery::inbox::Inbox;
use crate::delivery::{run_lease_renewal, run_scanner, Dispatcher};
use crate::dkim::{KeySet, Signer};
use crate::inbound::services::Services;
use crate::inbound::{self, SessionLimits};
use crate::net::dns::Dns;
use crate::net::tls::{CertificateResolver, Certificates};
use crate::plugins::trace::TraceSink;
use crate::plugins::{PluginManager, PluginServices};
use crate::shutdown::{Drained, Shutdown};
use crate::tenants::Tenants;

/// `config_path` is the file the configuration came from (None: the built-in default); plugin
/// reloads read it again.
pub async fn serve(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let opened = crate::queue::open(
        &config.queue,
        &config.data_dir,
        crate::queue::Schema::Migrate,
    )
    .await
    .with_context(|| {
        format!(
            "opening the queue {}",
            crate::queue::location(&config.queue, &config.data_dir)
        )
    })?;
    let queue = opened.queue;
    let node_id = config.node_id().to_string();
    // Leases left by an earlier run of this node (a crash) are void, and their messages are
    // due again at once; a shared queue keeps the other nodes' leases.
    let released = queue.recover_leases(&node_id).await?;
    if released > 0 {
        tracing::info!(
            recipients = released,
            "recovered recipients claimed by an earlier run"
        );
    }
    tracing::info!(node = %node_id, queue = %opened.location, "queue open");
    // Before the plugins load: their call counters register with the recorder.
    crate::metrics::install(&config.metrics)?;
    let dns = Arc::new(Dns::new(&config.dns)?);
    let engine = crate::plugins::engine::new_engine()?;
    let cache_dir = config.data_dir.join("plugin-cache");
    // Without a cache every start compiles every plugin: slower, never wrong.
    let compile_cache = match crate::plugins::compile_cache::CompileCache::open(&cache_dir, &engine)
    {
        Ok(cache) => Some(Arc::new(cache)),
        Err(error) => {
            tracing::warn!(dir = %cache_dir.display(), %error, "plugin compilation cache not used");
            None
        }
    };
    crate::plugins::trace::set_tracing(config.trace.enabled);
    let plugin_services = PluginServices {
        kv: Some(opened.kv.clone()),
        resolver: Some(dns.clone()),
        traces: TraceSink::start(opened.traces.clone(), config.trace.keep),
        records: Default::default(),
        compile_cache: compile_cache.clone(),
        kv_quota: config.kv.quota(),
    };
    tokio::spawn(purge_kv(opened.kv.clone(), config.kv.clone()));
    crate::plugins::record::apply(&plugin_services.records, config.record.settings())?;
    let tenant_configs = config.load_tenants()?;
    for warning in crate::scan::warnings(&config, &tenant_configs) {
        tracing::warn!("{warning}");
    }
    let tenants = Arc::new(Tenants::new(
        config.tenants.is_some(),
        tenant_configs.clone(),
        config.relay.domains.clone(),
    ));
    let plugins =
        PluginManager::start(engine, &config.plugins, &tenant_configs, plugin_services).await?;
    if let Some(cache) = &compile_cache {
        let removed = cache.prune();
        if removed > 0 {
            tracing::info!(
                entries = removed,
                "unused compiled plugins removed from the cache"
            );
        }
    }
    let authenticator = config.authentication.verify.then(|| dns.authenticator());
    let signer = Arc::new(load_signer(&config, &tenant_configs)?);
    let shutdown = Shutdown::new();
    let client_tls = Arc::new(crate::net::verify::ClientTls::new(
        config.delivery.ca_file.as_deref(),
    )?);
    tracing::info!(anchors = ?client_tls.anchors, count = client_tls.anchor_count, "trust anchors for delivery loaded");
    let credentials: crate::delivery::credentials::SharedCredentials = Arc::new(
        arc_swap::ArcSwap::from_pointee(match &config.delivery.credentials_file {
            Some(path) => crate::delivery::credentials::CredentialsFile::load(path)?,
            None => Default::default(),
        }),
    );
    if config.tls_reports.enabled {
        tokio::spawn(send_tls_reports(
            config.clone(),
            opened.policies.clone(),
            queue.clone(),
            opened.kv.clone(),
            dns.clone(),
        ));
    }
    let transport = Arc::new(Transports::new(
        config.clone(),
        dns,
        client_tls,
        credentials.clone(),
        opened.policies.clone(),
    ));
    let dispatcher = Dispatcher::new(
        config.clone(),
        queue.clone(),
        transport,
        plugins.clone(),
        tenants.clone(),
        shutdown.clone(),
    );
    let inbox = Inbox::new(queue.clone(), dispatcher.clone(), plugins.clone());
    let services = Arc::new(session_services(
        &config,
        Arc::new(inbox),
        plugins,
        tenants.clone(),
        authenticator,
        signer.clone(),
        &shutdown,
    )?);
    if let Some(root) = &config.mailboxes.root {
        std::fs::create_dir_all(root)
            .map_err(|error| anyhow::anyhow!("mailboxes.root `{}`: {error}", root.display()))?;
    }
    listen(&config, &services, &shutdown).await?;
    tokio::spawn(run_lease_renewal(dispatcher.clone(), node_id.clone()));
    if config.metrics.listen.is_some() {
        tokio::spawn(report_queue_stats(queue.clone(), node_id.clone()));
        tokio::spawn(crate::delivery::report_destinations(dispatcher.clone()));
    }
    let scanner = tokio::spawn(run_scanner(dispatcher.clone(), node_id));
    if tenants.enabled() {
        tokio::spawn(count_queued_bytes(queue.clone(), tenants.clone()));
    }
    let (reload, triggers) = crate::reload::triggers();
    if let Some(listen) = config.admin.listen {
        let admin = crate::admin::server::AdminState {
            queue: queue.clone(),
            traces: opened.traces.clone(),
            plugins: services.plugins.clone(),
            dispatcher: dispatcher.clone(),
            reload,
            hostname: config.hostname.clone(),
            tokens_file: config.admin.tokens_file.clone().unwrap_or_default(),
        };
        crate::admin::server::start(listen, admin, &shutdown).await?;
    }
    tokio::spawn(crate::reload::run(crate::reload::Reloader {
        plugins: services.plugins.clone(),
        dispatcher,
        scanners: services.scanners.clone(),
        tenants,
        config_path,
        config: config.clone(),
        tenant_configs,
        signer,
        certificates: services.certificates.clone(),
        accounts: services.accounts.clone(),
        credentials,
        triggers,
    }));
    let pid_file = crate::reload::pid_path(&config);
    std::fs::write(&pid_file, format!("{}\n", std::process::id()))
        .with_context(|| format!("writing {}", pid_file.display()))?;
    tracing::info!(queue = %opened.location, hostname = %config.hostname, "switchyard ready");
    shutdown_signal().await;
    stop(&shutdown, config.shutdown.drain_timeout).await;
    let _ = scanner.await;
    let _ = std::fs::remove_file(&pid_file);
    Ok(())
}

/// Every `[kv] purge_interval`: deletes expired kv keys in batches of `purge_batch` (each its own
/// short transaction, with a pause between them), then exports what each plugin holds as the
/// gauges `switchyard_kv_keys` and `switchyard_kv_bytes` (by tenant and plugin).
async fn purge_kv(kv: Arc<dyn crate::queue::kv::KvStore>, settings: crate::config::KvConfig) {
    let mut tick = tokio::time::interval(settings.purge_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = crate::queue::now_millis();
        let mut purged = 0;
        // A batch may be one owner's (PostgreSQL purges one owner at a time): go on until a
        // batch finds nothing, at most a bounded number of batches per interval.
        for _ in 0..10_000 {
            match kv.purge_expired(now, settings.purge_batch).await {
                Ok(count) => {
                    purged += count;
                    if count == 0 {
                        break;
                    }
                    // Room for the mail between two batches.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(error) => {
                    tracing::warn!(%error, "kv purge failed; trying again at the next interval");
                    break;
                }
            }
        }
        if purged > 0 {
            tracing::info!(keys = purged, "expired kv keys purged");
            metrics::counter!("switchyard_kv_purged_total").increment(purged);
        }
        match kv.usage().await {
            Ok(owners) => {
                for owner in owners {
                    let labels = [("tenant", owner.tenant), ("plugin", owner.plugin)];
                    metrics::gauge!("switchyard_kv_keys", &labels).set(owner.keys as f64);
                    metrics::gauge!("switchyard_kv_bytes", &labels).set(owner.bytes as f64);
                }
            }
            Err(error) => tracing::warn!(%error, "cannot read the kv usage"),
        }
    }
}

/// Queues the TLS reports every `[tls_reports] interval`.
/// The host's own scope in the kv store: no plugin has an empty name.
const HOST_KV_SCOPE: (&str, &str) = ("", "");

/// Whether this node's turn to send TLS reports has come: the turn is a kv key that expires
/// after one interval, taken by compare-and-swap, so on a shared queue one node sends each
/// interval's reports (they cover every node's counts) instead of each sending part of them.
async fn reports_turn(kv: &dyn crate::queue::kv::KvStore, config: &Config, take: bool) -> bool {
    let ttl = u32::try_from(config.tls_reports.interval.as_secs().max(1)).unwrap_or(u32::MAX);
    let swap = crate::queue::kv::Swap {
        key: "tls-reports-turn",
        expected: None,
        value: config.node_id().as_bytes(),
        ttl_seconds: Some(ttl),
        quota: crate::queue::kv::Quota::UNLIMITED,
    };
    match kv
        .compare_and_swap(HOST_KV_SCOPE.0, HOST_KV_SCOPE.1, swap)
        .await
    {
        Ok(taken) => taken && take,
        Err(error) => {
            tracing::warn!(%error, "cannot take the TLS reports' turn");
            false
        }
    }
}

async fn send_tls_reports(
    config: Arc<Config>,
    store: Arc<dyn crate::queue::policies::PolicyStore>,
    queue: Arc<dyn crate::queue::Queue>,
    kv: Arc<dyn crate::queue::kv::KvStore>,
    dns: Arc<Dns>,
) {
    // The first reports go out one interval after the first node started: its start takes a
    // turn without sending.
    reports_turn(kv.as_ref(), &config, false).await;
    let mut tick = tokio::time::interval(config.tls_reports.interval.min(Duration::from_secs(60)));
    tick.tick().await;
    loop {
        tick.tick().await;
        if !reports_turn(kv.as_ref(), &config, true).await {
            continue;
        }
        let sent = crate::delivery::tls_report::send_reports(
            &config,
            store.as_ref(),
            queue.as_ref(),
            &dns,
        )
        .await;
        if let Err(error) = sent {
            tracing::warn!(%error, "TLS reports not sent; the counts wait for the next round");
        }
    }
}

/// Keeps each tenant's queued bytes up to date from the queue (which counts what delivery,
/// bounces and operators removed, here or in another process); accepted messages count at once
/// in between.
/// The queue's counts as gauges, every 5 s: `queue_messages`, `queue_recipients{state}`
/// (`queued`, `quarantined`, `leased`: by any node) and `queue_leased_here` (by this node). On a
/// shared queue every node reports the whole queue's counts; sum only `queue_leased_here`.
async fn report_queue_stats(queue: Arc<dyn crate::queue::Queue>, node_id: String) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tick.tick().await;
        match queue.stats(&node_id, crate::queue::now_millis()).await {
            Ok(stats) => {
                metrics::gauge!("switchyard_queue_messages").set(stats.messages as f64);
                for (state, count) in [
                    ("queued", stats.queued),
                    ("quarantined", stats.quarantined),
                    ("held", stats.held),
                    ("leased", stats.leased),
                ] {
                    metrics::gauge!("switchyard_queue_recipients", "state" => state)
                        .set(count as f64);
                }
                metrics::gauge!("switchyard_queue_leased_here").set(stats.leased_here as f64);
            }
            Err(error) => tracing::warn!(%error, "cannot count the queue"),
        }
    }
}

async fn count_queued_bytes(queue: Arc<dyn crate::queue::Queue>, tenants: Arc<Tenants>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tick.tick().await;
        match queue.queued_bytes().await {
            Ok(bytes) => tenants.set_queued(&bytes),
            Err(error) => tracing::warn!(%error, "cannot count the tenants' queued bytes"),
        }
    }
}

/// What every SMTP session shares: TLS, the accounts for AUTH, the AUTH failure budget.
fn session_services(
    config: &Arc<Config>,
    inbox: Arc<Inbox>,
    plugins: Arc<PluginManager>,
    tenants: Arc<Tenants>,
    authenticator: Option<mail_auth::MessageAuthenticator>,
    signer: Arc<Signer>,
    shutdown: &Shutdown,
) -> anyhow::Result<Services> {
    let certificates = match &config.tls {
        Some(files) => {
            let resolver = CertificateResolver::new(Certificates::load(files)?);
            for tenant in tenants.configs() {
                let served =
                    CertificateResolver::load_tenant(&tenant.certificates, &tenant.domains)?;
                resolver.set_tenant(&tenant.id, Some(served));
            }
            Some(Arc::new(resolver))
        }
        None => None,
    };
    let tls_acceptor = match &certificates {
        Some(resolver) => Some(tokio_rustls::TlsAcceptor::from(
            crate::net::tls::server_config(resolver.clone())?,
        )),
        None => None,
    };
    let accounts = match &config.submission.users_file {
        Some(path) => {
            let accounts = crate::accounts::Accounts::load(path)?;
            tracing::info!(users = accounts.len(), file = %path.display(), "SMTP AUTH accounts loaded");
            Some(Arc::new(arc_swap::ArcSwap::from_pointee(accounts)))
        }
        None => None,
    };
    Ok(Services {
        config: config.clone(),
        inbox,
        plugins,
        tenants,
        tls_acceptor,
        certificates,
        authenticator,
        accounts,
        scanners: Arc::new(crate::scan::Scanners::new(&config.scanners)),
        auth_budget: Arc::new(inbound::AuthBudget::new(
            config.submission.auth_failures.clone(),
            config.smtp.client_prefixes(),
        )),
        signer,
        memory: memory_guard(config)?,
        shutdown: shutdown.clone(),
    })
}

/// The soft limit on resident memory, started; `None` (logged) when it is a percentage of a
/// total that cannot be read.
fn memory_guard(config: &Config) -> anyhow::Result<Option<Arc<inbound::memory::MemoryGuard>>> {
    let available = inbound::memory::available_bytes();
    let limit = config
        .smtp
        .memory_limit_bytes(available)
        .map_err(anyhow::Error::msg)?;
    match limit {
        Some(limit) => {
            tracing::info!(
                limit,
                available,
                "new sessions are refused above this resident memory"
            );
            Ok(Some(inbound::memory::MemoryGuard::start(limit)))
        }
        None => {
            tracing::warn!("the memory this process may use is unknown: [smtp] memory_limit as a percentage is off");
            Ok(None)
        }
    }
}

/// The global DKIM keys and every tenant's.
fn load_signer(config: &Config, tenants: &[TenantConfig]) -> anyhow::Result<Signer> {
    let signer = Signer::new(KeySet::load(&config.dkim)?.with_sealer(&config.arc)?);
    for tenant in tenants {
        signer.set_tenant(
            &tenant.id,
            Some(KeySet::load(&tenant.dkim)?.with_sealer(&tenant.arc)?),
        );
    }
    let keys = config.dkim.len() + tenants.iter().map(|t| t.dkim.len()).sum::<usize>();
    if keys > 0 {
        tracing::info!(keys, "DKIM signing keys loaded");
    }
    Ok(signer)
}

/// Binds every listener (all before any serves, so a bad address fails the start), then serves
/// each under the stop's watch, which waits for a listener to answer its backlog and close.
async fn listen(
    config: &Config,
    services: &Arc<Services>,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let mut sockets = Vec::new();
    for listener in &config.listeners {
        sockets.push((inbound::bind(listener).await?, listener.clone()));
    }
    let limits = SessionLimits::new(
        config.smtp.max_sessions,
        config.smtp.max_sessions_per_ip,
        config.smtp.client_prefixes(),
    );
    for (socket, listener) in sockets {
        tracing::info!(listener = %listener.name, address = %listener.address.get_ref(), role = ?listener.role, "listening");
        shutdown.spawn_session(inbound::serve(
            socket,
            listener,
            services.clone(),
            limits.clone(),
        ));
    }
    Ok(())
}

/// The graceful stop (see `shutdown.rs`), logged so an operator can tell how it ended.
async fn stop(shutdown: &Shutdown, drain_timeout: std::time::Duration) {
    let (sessions, deliveries) = shutdown.running();
    tracing::info!(
        sessions,
        deliveries,
        drain_timeout = %humantime::format_duration(drain_timeout),
        "stopping: no new connections or deliveries; waiting for those under way"
    );
    shutdown.begin();
    let drained = shutdown.drain(drain_timeout, shutdown_signal()).await;
    let (sessions, deliveries) = shutdown.running();
    match drained {
        Drained::Completely => {
            tracing::info!(
                "stopped: every session and delivery finished; queued mail stays in the queue"
            )
        }
        Drained::TimedOut => tracing::warn!(
            sessions,
            deliveries,
            "stopped at the end of the drain time; cut deliveries are tried again after a restart"
        ),
        Drained::Interrupted => tracing::warn!(
            sessions,
            deliveries,
            "stopped at once on a second signal; cut deliveries are tried again after a restart"
        ),
    }
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One turn per interval, however many nodes ask: the first start takes a turn without
    /// sending, and the turn comes round again once the interval is over.
    #[tokio::test]
    async fn tls_reports_take_one_turn_per_interval() {
        let dir = tempfile::tempdir().expect("tempdir");
        let queue =
            crate::queue::sqlite::SqliteQueue::open(&dir.path().join("queue.db"), Duration::ZERO)
                .await
                .expect("queue");
        let mut config = Config::default();
        config.tls_reports.interval = Duration::from_secs(1);
        assert!(
            !reports_turn(&queue, &config, false).await,
            "the start sends nothing"
        );
        assert!(
            !reports_turn(&queue, &config, true).await,
            "turn taken for this interval"
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(
            reports_turn(&queue, &config, true).await,
            "the next interval's turn"
        );
        assert!(!reports_turn(&queue, &config, true).await, "taken once");
    }
}
