//! `switchyard plugins`: list and reload the running chains, and finish (`promote`) or undo
//! (`rollback`) a plugin's canary or shadow. Each goes through the admin API when the server
//! serves one, and otherwise through the status file and SIGHUP.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use sha2::{Digest, Sha256};

use crate::admin::client::AdminClient;
use crate::config::rollout::{self, CandidateKind};
use crate::config::Config;
use crate::plugins::status::ChainsStatus;

#[derive(Subcommand)]
pub enum PluginsAction {
    /// Each plugin's tenant (`-`: the global chain), generation, hooks, limits and call/failure
    /// counts, its candidates, and the last reload errors.
    List {
        /// Only the global chain and this tenant's.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Load the configured plugins beside the running ones and swap them in; prints the outcome.
    Reload,
    /// Make a plugin's candidate (its `canary` or `shadow`) its live version: edits the file
    /// that declares the plugin (comments kept) and reloads. A pinned plugin is pinned to the
    /// candidate.
    Promote {
        name: String,
        /// The plugin is in this tenant's chain (its tenant file is edited).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Drop a plugin's candidate (its `canary` or `shadow`): edits the file and reloads.
    Rollback {
        name: String,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Ask the chains of `--config` the questions of recorded transactions (`[record]`), with
    /// the recorded clock and DNS answers, sending nothing; print every verdict that changed.
    /// Exits non-zero when one did.
    Replay {
        /// The directory of recordings.
        #[arg(long)]
        recording: PathBuf,
    },
    /// Write a new plugin project that builds and passes its own tests (with the SDK's mock
    /// host) at once.
    New {
        name: String,
        #[arg(long, value_enum, default_value = "rust")]
        lang: super::scaffold::Lang,
        /// Where to write it (default: ./NAME); must not exist yet, or be empty.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The SDK's directory (default: plugin-sdk/ of the source tree this binary was built
        /// from).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
}

/// `plugins replay`: loads the chains of `config` as a server would, on a kv store of their own
/// (a scratch SQLite file, removed after), and replays every recording of `directory`.
async fn replay(config: &Config, directory: &Path) -> anyhow::Result<()> {
    use crate::plugins::{replay, PluginManager, PluginServices};
    let recordings = replay::read_recordings(directory)?;
    if recordings.is_empty() {
        bail!("no recordings (*.json) in {}", directory.display());
    }
    let tenants = config.load_tenants()?;
    let scratch = std::env::temp_dir().join(format!("switchyard-replay-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&scratch)
        .with_context(|| format!("cannot create {}", scratch.display()))?;
    let replayed = async {
        let kv = crate::queue::open(
            &crate::config::QueueConfig::default(),
            &scratch,
            crate::queue::Schema::Migrate,
        )
        .await?
        .kv;
        let engine = crate::plugins::new_engine()?;
        let services = PluginServices {
            kv: Some(kv),
            kv_quota: config.kv.quota(),
            ..PluginServices::default()
        };
        let manager = PluginManager::start(engine, &config.plugins, &tenants, services).await?;
        anyhow::Ok(replay::replay(&manager, &recordings).await)
    }
    .await;
    let _ = std::fs::remove_dir_all(&scratch);
    let report = replayed?;
    print!("{}", report.to_text());
    if !report.changes.is_empty() {
        bail!(
            "{} verdicts changed against {} transactions recorded",
            report.changes.len(),
            report.transactions
        );
    }
    Ok(())
}

pub async fn plugins_command(
    config_path: Option<&Path>,
    config: &Config,
    action: PluginsAction,
) -> anyhow::Result<()> {
    match action {
        PluginsAction::List { tenant } => {
            let status = running_status(config).await?.with_context(|| {
                format!(
                    "no plugin status at {} (is `switchyard serve` running with this configuration?)",
                    crate::reload::status_path(config).display()
                )
            })?;
            print_listing(&status, tenant.as_deref())
        }
        PluginsAction::Reload => {
            let reloaded = reload(config)
                .await?
                .context("no running server: it has no admin API and no pid file answers")?;
            print!("{}", reloaded.status);
            if reloaded.any_failure() {
                bail!("reload failed; the previous generation keeps running");
            }
            Ok(())
        }
        PluginsAction::Promote { name, tenant } => {
            change(
                config_path,
                config,
                &name,
                tenant.as_deref(),
                Change::Promote,
            )
            .await
        }
        PluginsAction::Rollback { name, tenant } => {
            change(
                config_path,
                config,
                &name,
                tenant.as_deref(),
                Change::Rollback,
            )
            .await
        }
        PluginsAction::New {
            name,
            lang,
            dir,
            sdk,
        } => {
            let directory = dir.unwrap_or_else(|| PathBuf::from(&name));
            super::scaffold::new_plugin(&name, lang, &directory, sdk.as_deref())?;
            let how = match lang {
                super::scaffold::Lang::Rust => {
                    "`cargo test` runs its tests; `cargo build --target wasm32-wasip2 --release` builds it"
                }
                super::scaffold::Lang::Python => "`./test.sh` runs its tests; `./build.sh` builds it",
                super::scaffold::Lang::Js => {
                    "`npm install`, then `npm test` runs its tests and `npm run build` builds it"
                }
            };
            println!("wrote {}: {how}", directory.display());
            Ok(())
        }
        PluginsAction::Replay { recording } => {
            config_path.context("give the configuration to replay against (--config NEW.toml)")?;
            replay(config, &recording).await
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    Promote,
    Rollback,
}

/// Edits the file that declares plugin `name` and has the server reload it. When the reload of
/// that file fails (or cannot be asked for), the file is put back as it was and the server
/// reloads it again, so file and server agree.
async fn change(
    config_path: Option<&Path>,
    config: &Config,
    name: &str,
    tenant: Option<&str>,
    change: Change,
) -> anyhow::Result<()> {
    let file = match tenant {
        None => config_path
            .context("give the configuration file (--config): it declares the plugin")?
            .to_path_buf(),
        Some(tenant) => tenant_file(config, tenant)?,
    };
    let origin = file.display().to_string();
    let before = std::fs::read_to_string(&file).with_context(|| format!("cannot read {origin}"))?;
    let action = match change {
        Change::Promote => "promote",
        Change::Rollback => "roll back",
    };
    let candidate = rollout::candidate(&before, &origin, name, action)?;
    let after = match change {
        Change::Promote => {
            let path = file
                .parent()
                .unwrap_or(Path::new("."))
                .join(&candidate.path);
            let bytes = std::fs::read(&path)
                .with_context(|| format!("cannot read {name}'s candidate {}", path.display()))?;
            let digest = hex::encode(Sha256::digest(&bytes));
            check_running(config, tenant, name, candidate.kind, &digest).await?;
            rollout::promote(&before, &origin, name, &digest)?
        }
        Change::Rollback => rollout::rollback(&before, &origin, name)?,
    };
    write_in_place(&file, &after)?;
    let done = match change {
        Change::Promote => format!(
            "{name}: {} {} promoted in {origin}",
            candidate.kind.key(),
            candidate.path
        ),
        Change::Rollback => format!(
            "{name}: {} {} rolled back in {origin}",
            candidate.kind.key(),
            candidate.path
        ),
    };
    let reloaded = match reload(config).await {
        Ok(reloaded) => reloaded,
        Err(error) => {
            write_in_place(&file, &before)?;
            return Err(error.context(format!(
                "the server was not reloaded, so {origin} is back as it was"
            )));
        }
    };
    let Some(reloaded) = reloaded else {
        println!("{done}; no server is running: it takes effect when one starts");
        return Ok(());
    };
    print!("{}", reloaded.status);
    if let Some(error) = reloaded.failure(tenant) {
        write_in_place(&file, &before)?;
        // The server keeps what ran before the failed reload; one more makes sure it runs the
        // file as it is again.
        let _ = reload(config).await;
        bail!("the reload failed ({error}), so {origin} is back as it was and nothing changed");
    }
    println!("{done}; reloaded");
    Ok(())
}

/// Refuses to promote a candidate whose file is not the code the server has been running as
/// that candidate: what was watched in shadow or canary is what goes live.
async fn check_running(
    config: &Config,
    tenant: Option<&str>,
    name: &str,
    kind: CandidateKind,
    digest: &str,
) -> anyhow::Result<()> {
    let Some(status) = running_status(config).await? else {
        return Ok(());
    };
    let chain = tenant.unwrap_or("-");
    let prefix = format!("{chain}  {name}~{}  ", kind.key());
    let Some(line) = status.lines().find(|line| line.starts_with(&prefix)) else {
        bail!(
            "the running server has no {} of {name}{}: reload first, so that what goes live is what ran",
            kind.key(),
            tenant.map(|t| format!(" in tenant {t}")).unwrap_or_default()
        );
    };
    let running = line
        .split("  ")
        .find_map(|column| column.strip_prefix("sha256="))
        .unwrap_or("");
    if running != digest {
        bail!(
            "the {} file of {name} has sha256 {digest}, but the running {} is {running}: the file changed since it was loaded; reload and watch it again first",
            kind.key(),
            kind.key()
        );
    }
    Ok(())
}

/// The tenant file that declares tenant `id`.
fn tenant_file(config: &Config, id: &str) -> anyhow::Result<PathBuf> {
    let tenants = config
        .tenants
        .as_ref()
        .context("the configuration has no [tenants] directory")?;
    // Each file alone: another tenant's broken file does not stop an edit of this one.
    crate::config::tenant::tenant_files(&tenants.directory)?
        .into_iter()
        .filter_map(|path| crate::config::TenantConfig::load(&path, &tenants.limits).ok())
        .find(|tenant| tenant.id == id)
        .map(|tenant| tenant.path)
        .with_context(|| {
            format!(
                "no tenant `{id}` loads from {}",
                tenants.directory.display()
            )
        })
}

/// Replaces `file`'s content at once: a new file, with the old one's mode and owner, renamed
/// over it, so the server's watcher never reads half of it. A symlink (a configuration kept in
/// a repository) stays a symlink: the file it points to is replaced.
fn write_in_place(file: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let file = std::fs::canonicalize(file)
        .with_context(|| format!("cannot resolve {}", file.display()))?;
    let directory = file.parent().unwrap_or(Path::new("."));
    let name = file
        .file_name()
        .with_context(|| format!("{} is not a file", file.display()))?;
    let metadata =
        std::fs::metadata(&file).with_context(|| format!("cannot read {}", file.display()))?;
    // Hidden, so the tenants' directory does not take it for a tenant; unique, so two commands
    // at once do not write one file.
    let temporary = directory.join(format!(
        ".{}.{}.switchyard-new",
        name.to_string_lossy(),
        ulid::Ulid::new()
    ));
    let written = (|| -> anyhow::Result<()> {
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(metadata.permissions().mode() & 0o7777)
            .open(&temporary)
            .with_context(|| format!("cannot create {}", temporary.display()))?;
        out.write_all(text.as_bytes())
            .and_then(|()| out.sync_all())
            .with_context(|| format!("cannot write {}", temporary.display()))?;
        // The server may run as another user than the one editing (sudo): it keeps its file.
        std::os::unix::fs::chown(&temporary, Some(metadata.uid()), Some(metadata.gid()))
            .with_context(|| format!("cannot give {} its owner back", temporary.display()))?;
        std::fs::rename(&temporary, &file)
            .with_context(|| format!("cannot replace {}", file.display()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

/// A reload's outcome as the server reported it.
struct Reloaded {
    status: String,
    /// Why the global chain did not reload, if it did not.
    global_error: Option<String>,
    /// Tenants whose file does not load, and why.
    tenant_errors: Vec<(String, String)>,
}

impl Reloaded {
    fn from_status(status: ChainsStatus) -> Reloaded {
        Reloaded {
            global_error: status.last_reload_error.clone(),
            tenant_errors: status
                .tenant_errors
                .iter()
                .map(|failed| (failed.tenant.clone(), failed.error.clone()))
                .collect(),
            status: status.to_text(),
        }
    }

    /// The status file's text: `last reload failed: ...` for the global chain, `TENANT  last
    /// reload failed: ...` for a tenant.
    fn from_text(status: String) -> Reloaded {
        let mut reloaded = Reloaded {
            global_error: None,
            tenant_errors: Vec::new(),
            status: String::new(),
        };
        for line in status.lines() {
            if let Some(error) = line.strip_prefix("last reload failed: ") {
                reloaded.global_error = Some(error.to_string());
            } else if let Some((tenant, error)) = line.split_once("  last reload failed: ") {
                reloaded
                    .tenant_errors
                    .push((tenant.to_string(), error.to_string()));
            }
        }
        reloaded.status = status;
        reloaded
    }

    /// Anything that failed to load.
    fn any_failure(&self) -> bool {
        self.global_error.is_some() || !self.tenant_errors.is_empty()
    }

    /// Why the chain an edit was about (the global one, or `tenant`'s) did not reload.
    fn failure(&self, tenant: Option<&str>) -> Option<String> {
        match tenant {
            None => self.global_error.clone(),
            Some(tenant) => self
                .tenant_errors
                .iter()
                .find(|(failed, _)| failed == tenant)
                .map(|(_, error)| error.clone()),
        }
    }
}

/// The running server's plugin status (`None`: no server has written one).
async fn running_status(config: &Config) -> anyhow::Result<Option<String>> {
    if let Some(api) = AdminClient::reach(config).await? {
        let status: ChainsStatus = api.get("/v1/plugins").await?;
        return Ok(Some(status.to_text()));
    }
    let status = std::fs::read_to_string(crate::reload::status_path(config)).unwrap_or_default();
    Ok((!status.is_empty()).then_some(status))
}

/// Has the running server reload everything and waits for the outcome: through the admin API,
/// else by SIGHUP and the status file. `None` when no server runs.
async fn reload(config: &Config) -> anyhow::Result<Option<Reloaded>> {
    if let Some(api) = AdminClient::reach(config).await? {
        let status: ChainsStatus = api.post("/v1/plugins/reload").await?;
        return Ok(Some(Reloaded::from_status(status)));
    }
    let status_file = crate::reload::status_path(config);
    let read_status = || std::fs::read_to_string(&status_file).unwrap_or_default();
    let attempts = |status: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("reload attempts: "))
            .and_then(|count| count.trim().parse::<u64>().ok())
    };
    let pid_file = crate::reload::pid_path(config);
    let Some(pid) = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|text| text.trim().parse::<i32>().ok())
    else {
        return Ok(None);
    };
    let before = attempts(&read_status()).unwrap_or(0);
    // SAFETY: kill(2) with a pid read from our own pid file and a valid signal number.
    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::ESRCH) {
            // A pid file left by a server that is gone.
            return Ok(None);
        }
        bail!("cannot signal process {pid}: {error}");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::time::Instant::now() < deadline {
        let status = read_status();
        if attempts(&status).is_some_and(|count| count > before) {
            return Ok(Some(Reloaded::from_text(status)));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    bail!("the server did not report the reload within 120 s")
}

/// `plugins list`: every chain, or the global chain and one tenant's.
fn print_listing(status: &str, tenant: Option<&str>) -> anyhow::Result<()> {
    let Some(tenant) = tenant else {
        print!("{status}");
        return Ok(());
    };
    // Lines of a chain start with its tenant; the global chain's with `-`, and the summary
    // lines with neither.
    let columns = |line: &str| line.split("  ").next().unwrap_or("").to_string();
    let chains: std::collections::HashSet<String> = status
        .lines()
        .filter(|line| line.contains("  "))
        .map(columns)
        .collect();
    if !chains.contains(tenant) {
        bail!("no tenant `{tenant}` in the running server's plugin status");
    }
    for line in status.lines() {
        let first = columns(line);
        if first == tenant || first == "-" || !line.contains("  ") {
            println!("{line}");
        }
    }
    Ok(())
}
