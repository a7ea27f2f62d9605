//! Hot reload: SIGHUP, a change to the configuration file, to a plugin file, or to the tenants'
//! directory, and `switchyard plugins reload` (which sends SIGHUP).
//!
//! - The configuration file, a global plugin, a DKIM key or a listener certificate changed: the
//!   global chain is loaded beside the running one and swapped in (every tenant's chain then
//!   follows it), and the DKIM keys and the listeners' certificates are loaded again; anything
//!   that does not load leaves what runs in place.
//! - A tenant file was added, changed or removed (or a plugin or key file only tenants use): that tenant
//!   alone is reloaded; the others' chains keep running untouched. A tenant file that does not
//!   load, or claims another tenant's domain, keeps the tenant's previous generation running,
//!   and the error shows in `switchyard plugins list`.
//! - `[submission] users_file` or `[delivery] credentials_file` changed (or the configuration
//!   file): the accounts AUTH accepts and the relays' passwords are read again; a file that does
//!   not load keeps the previous accounts, logged. New users log in without a restart.
//! - The configuration file changed: the `[[scanner]]` entries are swapped in for the scans that
//!   start from then on.
//! - The configuration file changed: delivery's `[[shaping]]` rules (and the `[delivery]` caps
//!   they default to) are swapped in; each destination goes by its new rule from its next
//!   message, back-offs in force included.
//! - SIGHUP does all of it: the global chain, the account files and every tenant file.
//!
//! Also keeps the status file that `switchyard plugins list` prints.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::accounts::{Accounts, SharedAccounts};
use crate::config::tenant::{is_tenant_file, tenant_files};
use crate::config::{Config, TenantConfig};
use crate::delivery::credentials::{CredentialsFile, SharedCredentials};
use crate::dkim::{KeySet, Signer};
use crate::net::tls::CertificateResolver;
use crate::plugins::PluginManager;
use crate::tenants::Tenants;

/// Changes arriving within this window make one reload (editors and copies write in bursts).
const SETTLE: Duration = Duration::from_millis(300);

pub fn status_path(config: &Config) -> PathBuf {
    config.data_dir.join("plugins.status")
}

pub fn pid_path(config: &Config) -> PathBuf {
    config.data_dir.join("switchyard.pid")
}

/// What set a reload off.
enum Trigger {
    /// SIGHUP: everything.
    Hangup,
    /// The admin API's `POST /v1/plugins/reload`: everything, as SIGHUP; told when done.
    Admin(tokio::sync::oneshot::Sender<()>),
    /// A watched file or a file of the tenants' directory changed.
    Changed(PathBuf),
}

/// What one reload covers.
#[derive(Default)]
struct Plan {
    global: bool,
    /// The users file and the relays' credentials (with `global`, always).
    accounts: bool,
    /// Every tenant file again (added, changed and removed).
    all_tenants: bool,
    /// Tenant files to load again (or to drop, when gone).
    tenant_files: BTreeSet<PathBuf>,
}

/// The files whose change reloads something, and what.
#[derive(Default, PartialEq, Eq)]
struct Watched {
    /// The configuration file, the global chain's plugins and the global DKIM keys.
    global: HashSet<PathBuf>,
    /// The users file and the relays' credentials file.
    accounts: HashSet<PathBuf>,
    /// Plugin and DKIM key files of tenants, with the tenant files that use them.
    tenant_plugins: HashMap<PathBuf, BTreeSet<PathBuf>>,
    /// The tenants' directory: any `*.toml` in it is a tenant file.
    tenants_directory: Option<PathBuf>,
}

impl Watched {
    fn new(config_path: &Path, config: &Config, tenants: &[TenantConfig]) -> Watched {
        // Each file counts under both its names: the one written in the configuration (a
        // symlink that a certificate renewal repoints) and the file it resolves to (which an
        // editor may rewrite in place).
        let mut global: HashSet<PathBuf> = HashSet::new();
        let mut watch = |path: &Path| global.extend(both_names(path));
        for plugin in &config.plugins {
            watch(&plugin.path);
            if let Some(shadow) = &plugin.shadow {
                watch(&shadow.path);
            }
            if let Some(canary) = &plugin.canary {
                watch(&canary.path);
            }
        }
        watch(config_path);
        config.dkim.iter().for_each(|key| watch(&key.private_key));
        if let Some(tls) = &config.tls {
            watch(&tls.certificate);
            watch(&tls.private_key);
            for extra in &tls.sni {
                watch(&extra.certificate);
                watch(&extra.private_key);
            }
        }
        let mut tenant_plugins: HashMap<PathBuf, BTreeSet<PathBuf>> = HashMap::new();
        for tenant in tenants {
            let files = tenant
                .plugins
                .iter()
                .flat_map(|plugin| {
                    std::iter::once(&plugin.path)
                        .chain(plugin.canary.as_ref().map(|canary| &canary.path))
                })
                .chain(tenant.dkim.iter().map(|key| &key.private_key))
                .chain(
                    tenant
                        .certificates
                        .iter()
                        .flat_map(|files| [&files.certificate, &files.private_key]),
                );
            for file in files {
                for name in both_names(file) {
                    tenant_plugins
                        .entry(name)
                        .or_default()
                        .insert(absolute(&tenant.path));
                }
            }
        }
        let accounts = [
            &config.submission.users_file,
            &config.delivery.credentials_file,
        ]
        .into_iter()
        .flatten()
        .flat_map(|file| both_names(file))
        .collect();
        Watched {
            global,
            accounts,
            tenant_plugins,
            tenants_directory: config.tenants.as_ref().map(|t| absolute(&t.directory)),
        }
    }

    fn files(&self) -> HashSet<PathBuf> {
        self.global
            .iter()
            .chain(&self.accounts)
            .chain(self.tenant_plugins.keys())
            .cloned()
            .collect()
    }

    /// What a change of `path` reloads; nothing for a file nobody uses.
    fn plan(&self, path: &Path, plan: &mut Plan) -> bool {
        let names = both_names(path);
        let mut relevant = false;
        if names.iter().any(|name| self.global.contains(name)) {
            plan.global = true;
            relevant = true;
        }
        if names.iter().any(|name| self.accounts.contains(name)) {
            plan.accounts = true;
            relevant = true;
        }
        for name in &names {
            if let Some(users) = self.tenant_plugins.get(name) {
                plan.tenant_files.extend(users.iter().cloned());
                relevant = true;
            }
        }
        let path = absolute(path);
        let in_tenants = self.tenants_directory.as_deref() == path.parent()
            && path
                .extension()
                .is_some_and(|extension| extension == "toml")
            && !path
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with('.'));
        if in_tenants {
            plan.tenant_files.insert(path);
            relevant = true;
        }
        relevant
    }
}

/// A file's path with its directory resolved but the file itself not (a symlink stays a
/// symlink), and the path it resolves to.
fn both_names(path: &Path) -> [PathBuf; 2] {
    let joined = std::env::current_dir()
        .map(|dir| dir.join(path))
        .unwrap_or_else(|_| path.to_path_buf());
    let as_written = match (joined.parent(), joined.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|parent| parent.join(name))
            .unwrap_or(joined.clone()),
        _ => joined,
    };
    [as_written, absolute(path)]
}

fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| {
        let joined = std::env::current_dir()
            .map(|dir| dir.join(path))
            .unwrap_or_else(|_| path.to_path_buf());
        // A removed file cannot be resolved; its directory can.
        match (joined.parent(), joined.file_name()) {
            (Some(parent), Some(name)) => std::fs::canonicalize(parent)
                .map(|parent| parent.join(name))
                .unwrap_or(joined.clone()),
            _ => joined,
        }
    })
}

/// What the reload loop works on.
pub struct Reloader {
    pub plugins: Arc<PluginManager>,
    /// Takes the reloaded `[[shaping]]` rules.
    pub dispatcher: Arc<crate::delivery::Dispatcher>,
    /// Takes the reloaded `[[scanner]]` entries.
    pub scanners: Arc<crate::scan::Scanners>,
    pub tenants: Arc<Tenants>,
    pub config_path: Option<PathBuf>,
    pub config: Arc<Config>,
    /// The tenant files loaded at start.
    pub tenant_configs: Vec<TenantConfig>,
    /// The DKIM keys, loaded again with the configuration and the tenant files.
    pub signer: Arc<Signer>,
    /// The listeners' certificates (when `[tls]` is set), loaded again with the configuration
    /// and when their files change (a renewal).
    pub certificates: Option<Arc<CertificateResolver>>,
    /// The accounts AUTH accepts (when `users_file` is set), read again when it changes.
    pub accounts: Option<SharedAccounts>,
    /// The relays' passwords, read again when `credentials_file` changes.
    pub credentials: SharedCredentials,
    pub triggers: Triggers,
}

/// Asks the reload task for a reload of everything, as SIGHUP does.
#[derive(Clone)]
pub struct ReloadHandle(mpsc::UnboundedSender<Trigger>);

impl ReloadHandle {
    /// Asks for a reload; the answer resolves once it is over (with an error if the reload
    /// task dropped it, which also means it is over). `None` when the reload task has stopped.
    pub fn request(&self) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let (done, over) = tokio::sync::oneshot::channel();
        self.0.send(Trigger::Admin(done)).ok()?;
        Some(over)
    }
}

/// The reload task's inbox, made before the task so others can hold a [`ReloadHandle`].
pub struct Triggers {
    sender: mpsc::UnboundedSender<Trigger>,
    receiver: mpsc::UnboundedReceiver<Trigger>,
}

pub fn triggers() -> (ReloadHandle, Triggers) {
    let (sender, receiver) = mpsc::unbounded_channel();
    (ReloadHandle(sender.clone()), Triggers { sender, receiver })
}

/// Runs forever: waits for reload triggers and refreshes the status file every second.
pub async fn run(reloader: Reloader) {
    let Reloader {
        signer,
        certificates,
        accounts,
        credentials,
        plugins: manager,
        dispatcher,
        scanners,
        tenants,
        config_path,
        config,
        tenant_configs,
        triggers:
            Triggers {
                sender: trigger,
                receiver: mut triggers,
            },
    } = reloader;
    let status_file = status_path(&config);
    let hangups = trigger.clone();
    tokio::spawn(async move {
        let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::error!("cannot listen for SIGHUP: reload by signal is off");
            return;
        };
        while hangup.recv().await.is_some() {
            if hangups.send(Trigger::Hangup).is_err() {
                return;
            }
        }
    });
    let mut watched = config_path
        .as_ref()
        .map(|path| Watched::new(path, &config, &tenant_configs))
        .unwrap_or_default();
    let mut watcher = config_path
        .as_ref()
        .and_then(|_| start_watcher(&watched, trigger.clone()));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_status = std::time::Instant::now() - Duration::from_secs(3600);
    loop {
        tokio::select! {
            Some(first) = triggers.recv() => {
                tokio::time::sleep(SETTLE).await;
                let mut plan = Plan::default();
                let mut reasons = Vec::new();
                // Told once this reload is over, status file written (dropped early: told too).
                let mut waiting = Vec::new();
                let mut next = Some(first);
                while let Some(trigger) = next.take().or_else(|| triggers.try_recv().ok()) {
                    match trigger {
                        Trigger::Hangup => {
                            plan.global = true;
                            plan.all_tenants = true;
                            reasons.push("SIGHUP".to_string());
                        }
                        Trigger::Admin(done) => {
                            plan.global = true;
                            plan.all_tenants = true;
                            reasons.push("admin API".to_string());
                            waiting.push(done);
                        }
                        Trigger::Changed(path) => {
                            if watched.plan(&path, &mut plan) {
                                reasons.push(format!("{} changed", path.display()));
                            }
                        }
                    }
                }
                if reasons.is_empty() {
                    continue;
                }
                let Some(path) = &config_path else {
                    tracing::warn!(reason = %reasons.join(", "), "reload asked, but serve runs without a configuration file");
                    continue;
                };
                tracing::info!(reason = %reasons.join(", "), "reloading");
                let loaded = match Config::load(path) {
                    Err(error) => {
                        tracing::error!(%error, "configuration does not load; what runs stays as it was");
                        manager.reload_failed(error.to_string());
                        write_status(&status_file, &manager);
                        continue;
                    }
                    Ok(loaded) => loaded,
                };
                if plan.global {
                    // The plugin chains, tracing on or off, the DKIM keys, the shaping rules and
                    // the scanners change live; the rest needs a restart.
                    let _ = manager.reload(&loaded.plugins).await;
                    crate::plugins::trace::set_tracing(loaded.trace.enabled);
                    if let Err(error) =
                        crate::plugins::record::apply(manager.records(), loaded.record.settings())
                    {
                        tracing::error!(%error, "recording stays as it was");
                    }
                    reload_certificates(certificates.as_deref(), &loaded);
                    dispatcher.reload_shaping(Arc::new(loaded.clone()));
                    scanners.reload(&loaded.scanners);
                    tracing::info!(scanners = loaded.scanners.len(), "scanners reloaded");
                    match KeySet::load(&loaded.dkim).and_then(|keys| keys.with_sealer(&loaded.arc)) {
                        Ok(keys) => {
                            tracing::info!(keys = keys.keys().len(), "DKIM keys reloaded");
                            signer.set_global(keys);
                        }
                        Err(error) => tracing::error!(%error, "DKIM keys do not load; the previous keys keep signing"),
                    }
                }
                if plan.global || plan.accounts {
                    reload_accounts(&loaded, accounts.as_ref(), &credentials);
                }
                if let Some(section) = &config.tenants {
                    let files = if plan.all_tenants {
                        known_and_present(section, &tenants)
                    } else {
                        plan.tenant_files
                    };
                    // Removals first: a new file may claim a domain a removed one gave up.
                    let (gone, present): (Vec<PathBuf>, Vec<PathBuf>) =
                        files.into_iter().partition(|file| !is_tenant_file(file));
                    for file in gone.iter().chain(&present) {
                        reload_tenant(
                            file,
                            section,
                            &manager,
                            &tenants,
                            &signer,
                            certificates.as_deref(),
                        )
                        .await;
                    }
                }
                let files = Watched::new(path, &loaded, &tenants.configs());
                if files != watched {
                    watched = files;
                    watcher = start_watcher(&watched, trigger.clone());
                }
                write_status(&status_file, &manager);
                for done in waiting {
                    let _ = done.send(());
                }
            }
            _ = tick.tick() => {
                // The status of a thousand tenants' chains is a large file: it is refreshed less
                // often the more tenants there are (every 10 s with 1,000), always after a reload.
                let period = Duration::from_millis(10 * tenants.count() as u64).max(Duration::from_secs(1));
                if last_status.elapsed() >= period {
                    write_status(&status_file, &manager);
                    last_status = std::time::Instant::now();
                }
            }
        }
        let _ = &watcher;
    }
}

/// The listeners' certificates from the reloaded configuration. Turning TLS on or off needs a
/// restart (the listeners' offers change); a certificate that does not load keeps the old.
fn reload_certificates(resolver: Option<&crate::net::tls::CertificateResolver>, loaded: &Config) {
    match (resolver, &loaded.tls) {
        (Some(resolver), Some(files)) => match resolver.reload(files) {
            Ok(()) => tracing::info!(
                certificates = 1 + files.sni.len(),
                "TLS certificates reloaded"
            ),
            Err(error) => {
                tracing::error!(%error, "TLS certificates do not load; the previous ones stay")
            }
        },
        (None, None) => {}
        _ => tracing::warn!("[tls] was added or removed: restart to apply"),
    }
}

/// The users file and the relays' credentials from the reloaded configuration. Offering AUTH or
/// not is decided at start (the listeners' EHLO changes): adding or removing `users_file` needs
/// a restart. A file that does not load keeps what was loaded before.
fn reload_accounts(
    loaded: &Config,
    accounts: Option<&SharedAccounts>,
    credentials: &SharedCredentials,
) {
    match (accounts, &loaded.submission.users_file) {
        (Some(accounts), Some(path)) => match Accounts::load(path) {
            Ok(fresh) => {
                tracing::info!(users = fresh.len(), file = %path.display(), "SMTP AUTH accounts reloaded");
                accounts.store(Arc::new(fresh));
            }
            Err(error) => {
                tracing::error!(%error, "users file does not load; the previous accounts stay")
            }
        },
        (None, None) => {}
        _ => tracing::warn!("[submission] users_file was added or removed: restart to apply"),
    }
    let fresh = match &loaded.delivery.credentials_file {
        Some(path) => CredentialsFile::load(path),
        None => Ok(CredentialsFile::default()),
    };
    match fresh {
        Ok(fresh) => {
            tracing::info!(hosts = fresh.len(), "relay credentials reloaded");
            credentials.store(Arc::new(fresh));
        }
        Err(error) => {
            tracing::error!(%error, "credentials file does not load; the previous passwords stay")
        }
    }
}

/// Every tenant file in the directory now, and the files of the tenants loaded (to drop those
/// whose file is gone).
fn known_and_present(
    section: &crate::config::TenantsConfig,
    tenants: &Tenants,
) -> BTreeSet<PathBuf> {
    let mut files: BTreeSet<PathBuf> = tenants
        .configs()
        .iter()
        .map(|tenant| absolute(&tenant.path))
        .collect();
    match tenant_files(&section.directory) {
        Ok(present) => files.extend(present.iter().map(|file| absolute(file))),
        Err(error) => tracing::error!(%error, "cannot read the tenants' directory"),
    }
    files
}

/// Loads one tenant file again: a new generation of its chain, its domains and limits; or
/// drops the tenant when its file is gone. On any error the tenant keeps what it had.
async fn reload_tenant(
    file: &Path,
    section: &crate::config::TenantsConfig,
    manager: &PluginManager,
    tenants: &Tenants,
    signer: &Signer,
    certificates: Option<&CertificateResolver>,
) {
    let id = file
        .file_stem()
        .and_then(|stem| stem.to_str())
        .unwrap_or_default()
        .to_string();
    if !is_tenant_file(file) {
        // Gone: the tenant (if it loaded) and any error its file left.
        manager.remove_tenant(&id).await;
        tenants.remove(&id);
        signer.set_tenant(&id, None);
        if let Some(certificates) = certificates {
            certificates.set_tenant(&id, None);
        }
        return;
    }
    let config = match TenantConfig::load(file, &section.limits) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(tenant = %id, %error, "tenant file does not load; its previous generation keeps running");
            manager.tenant_failed(&id, error.to_string());
            return;
        }
    };
    if let Err(error) = tenants.check(&config) {
        tracing::error!(tenant = %id, %error, "tenant file refused; its previous generation keeps running");
        manager.tenant_failed(&id, error.to_string());
        return;
    }
    let keys = match KeySet::load(&config.dkim).and_then(|keys| keys.with_sealer(&config.arc)) {
        Ok(keys) => keys,
        Err(error) => {
            tracing::error!(tenant = %id, %error, "tenant's DKIM keys do not load; its previous generation keeps running");
            manager.tenant_failed(&id, error.to_string());
            return;
        }
    };
    let served = match certificates {
        Some(_) => match CertificateResolver::load_tenant(&config.certificates, &config.domains) {
            Ok(served) => Some(served),
            Err(error) => {
                tracing::error!(tenant = %id, %error, "tenant's certificates do not load; its previous generation keeps running");
                manager.tenant_failed(&id, error.to_string());
                return;
            }
        },
        None => None,
    };
    if manager.reload_tenant(&config).await.is_ok() {
        match tenants.upsert(config) {
            Ok(()) => {
                signer.set_tenant(&id, Some(keys));
                if let Some(certificates) = certificates {
                    certificates.set_tenant(&id, served);
                }
            }
            Err(error) => manager.tenant_failed(&id, error.to_string()),
        }
    }
}

/// Watches the directories of the watched files and the tenants' directory (so a file replaced
/// by rename, or a new tenant file, is seen) and reports changes that concern them.
fn start_watcher(
    watched: &Watched,
    trigger: mpsc::UnboundedSender<Trigger>,
) -> Option<notify::RecommendedWatcher> {
    let wanted = watched.files();
    let tenants_directory = watched.tenants_directory.clone();
    // The watched directories may hold busy files (a log written on every message): only a
    // path with a watched file's name, or in the tenants' directory, is worth resolving.
    let names: HashSet<std::ffi::OsString> = wanted
        .iter()
        .filter_map(|file| file.file_name().map(Into::into))
        .collect();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        for path in &event.paths {
            let named = path.file_name().is_some_and(|name| names.contains(name))
                && both_names(path).iter().any(|name| wanted.contains(name));
            let tenant_file = tenants_directory.is_some()
                && path.parent().map(absolute) == tenants_directory
                && path
                    .extension()
                    .is_some_and(|extension| extension == "toml");
            if named || tenant_file {
                let _ = trigger.send(Trigger::Changed(path.clone()));
            }
        }
    })
    .map_err(|error| tracing::error!(%error, "cannot watch files: reload on change is off"))
    .ok()?;
    let mut directories: HashSet<PathBuf> = watched
        .files()
        .iter()
        .filter_map(|file| file.parent().map(Path::to_path_buf))
        .collect();
    directories.extend(watched.tenants_directory.clone());
    for directory in directories {
        if let Err(error) = watcher.watch(&directory, RecursiveMode::NonRecursive) {
            tracing::warn!(%error, directory = %directory.display(), "cannot watch directory");
        }
    }
    Some(watcher)
}

/// Replaces the status file atomically.
fn write_status(path: &Path, manager: &PluginManager) {
    let text = format!(
        "{}updated: {}\n",
        manager.describe(),
        chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC")
    );
    let temporary = path.with_extension("status.tmp");
    if let Err(error) =
        std::fs::write(&temporary, text).and_then(|()| std::fs::rename(&temporary, path))
    {
        tracing::debug!(%error, "cannot write the plugin status file");
    }
}
