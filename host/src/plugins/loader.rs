//! Loading one plugin: read and compile the component (off the async workers, through the disk
//! cache), check its imports against its grants, link it, pre-instantiate it, and run its `init`
//! once: in the instance that is snapshotted (see [`super::preinit`]), or, for a plugin that is
//! not pre-initialised, in an instance made to validate its configuration.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::Engine;

use super::bindings::PluginPre;
use super::breaker::Breaker;
use super::engine::MEMORY_CAP;
use super::hooks::{HookIndices, HookSet};
use super::host::{check_imports, linker, HostState, ImportError};
use super::plugin::{LoadedPlugin, PluginStats};
use super::preinit;
use super::run::PluginRun;
use super::store::{new_store, RunContext};
use super::PluginServices;
use crate::config::PluginManifest;
use crate::queue::kv::Quota;

/// Why a plugin did not load. Shown in logs and by `switchyard plugins list`.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("plugin `{plugin}`: cannot read {path}: {message}")]
    Read {
        plugin: String,
        path: String,
        message: String,
    },
    #[error("plugin `{plugin}`: not a valid component: {message}")]
    Compile { plugin: String, message: String },
    #[error("plugin `{plugin}` imports `{import}`, which its manifest does not grant; add \"{grant}\" to its grants if it should have it")]
    NotGranted {
        plugin: String,
        import: String,
        grant: String,
    },
    #[error("plugin `{plugin}` imports `{import}`, which this host does not provide (the plugin may target a newer API)")]
    UnknownImport { plugin: String, import: String },
    #[error("plugin `{plugin}`: cannot link: {message}")]
    Link { plugin: String, message: String },
    #[error("plugin `{plugin}`: memory_limit {limit} is above the host's cap of {cap} bytes")]
    MemoryCap {
        plugin: String,
        limit: u64,
        cap: u64,
    },
    #[error("plugin `{plugin}`: {path} has sha256 {found}, but the manifest pins {pinned}; refusing to load it")]
    DigestMismatch {
        plugin: String,
        path: String,
        pinned: String,
        found: String,
    },
    #[error("{0}")]
    BadPin(String),
    #[error("plugin `{plugin}`: init failed: {message}")]
    Init { plugin: String, message: String },
    #[error("tenant `{tenant}`: {source}")]
    Tenant {
        tenant: String,
        source: Box<LoadError>,
    },
}

impl LoadError {
    /// The error, saying which tenant's chain it is in.
    pub fn in_tenant(self, tenant: &str) -> LoadError {
        LoadError::Tenant {
            tenant: tenant.to_string(),
            source: Box::new(self),
        }
    }
}

/// Components compiled during one load: plugins loaded from the same file (a hosting provider's
/// tenants running one plugin with different configs) share one compiled component, so its code
/// is in memory, and in the CPU's caches, once; and those with the same configuration too share
/// one pre-initialised snapshot.
#[derive(Default)]
pub struct Compiled {
    by_digest: HashMap<[u8; 32], Component>,
    /// Snapshots by plugin digest and configuration; `None` when the plugin cannot be
    /// snapshotted.
    snapshots: HashMap<([u8; 32], String), Option<Snapshot>>,
}

impl Compiled {
    /// Forgets the pre-initialised snapshots, so the next load runs `init` again.
    pub fn forget_snapshots(&mut self) {
        self.snapshots.clear();
    }

    /// Forgets every component whose digest `keep` refuses: after a reload, the ones no loaded
    /// plugin uses any more.
    pub fn retain(&mut self, keep: impl Fn(&[u8; 32]) -> bool) {
        self.by_digest.retain(|digest, _| keep(digest));
        self.snapshots.retain(|(digest, _), _| keep(digest));
    }
}

/// A pre-initialised component and the hooks its `init` named.
type Snapshot = (Component, HookSet);

/// Where a plugin goes: the chain of `owner` (a tenant id, `""` for the global chain), with the
/// kv quota of each of that chain's plugins.
pub struct Place<'a> {
    pub owner: &'a Arc<str>,
    pub kv_quota: Quota,
}

/// Loads `manifest` into its place.
pub async fn load(
    engine: &Engine,
    manifest: &PluginManifest,
    place: &Place<'_>,
    services: &PluginServices,
    compiled: &mut Compiled,
) -> Result<Arc<LoadedPlugin>, LoadError> {
    let mut loaded = load_one(engine, manifest, place, services, compiled).await?;
    if let Some(candidate) = manifest.shadow_manifest() {
        let shadow = load_one(engine, &candidate, place, services, compiled).await?;
        loaded.shadow = Some(Arc::new(shadow));
    }
    if let (Some(candidate), Some(canary)) = (manifest.canary_manifest(), &manifest.canary) {
        let mut plugin = load_one(engine, &candidate, place, services, compiled).await?;
        plugin.kv_name = loaded.name.clone();
        loaded.canary = Some(super::canary::Canary {
            plugin: Arc::new(plugin),
            basis_points: canary.basis_points(),
        });
    }
    Ok(Arc::new(loaded))
}

/// Loads one component (a plugin, or one of its candidates).
async fn load_one(
    engine: &Engine,
    manifest: &PluginManifest,
    place: &Place<'_>,
    services: &PluginServices,
    compiled: &mut Compiled,
) -> Result<LoadedPlugin, LoadError> {
    let owner = place.owner;
    let plugin = manifest.name.clone();
    if manifest.memory_limit > MEMORY_CAP {
        return Err(LoadError::MemoryCap {
            plugin,
            limit: manifest.memory_limit,
            cap: MEMORY_CAP,
        });
    }
    let bytes = tokio::fs::read(&manifest.path)
        .await
        .map_err(|error| LoadError::Read {
            plugin: plugin.clone(),
            path: manifest.path.display().to_string(),
            message: error.to_string(),
        })?;
    let digest: [u8; 32] = Sha256::digest(&bytes).into();
    if let Some(pinned) = manifest.pinned_digest().map_err(LoadError::BadPin)? {
        if pinned != digest {
            return Err(LoadError::DigestMismatch {
                plugin,
                path: manifest.path.display().to_string(),
                pinned: hex::encode(pinned),
                found: hex::encode(digest),
            });
        }
    }
    let component = compile(engine, &plugin, digest, bytes.clone(), services, compiled).await?;
    let called_only =
        check_imports(engine, &component, &manifest.grants).map_err(|error| match error {
            ImportError::NotGranted { import, grant } => LoadError::NotGranted {
                plugin: plugin.clone(),
                import,
                grant: grant.interface().to_string(),
            },
            ImportError::Unknown { import } => LoadError::UnknownImport {
                plugin: plugin.clone(),
                import,
            },
        })?;
    // Noted, not warned: a plugin such as content-filter imports `scanners` whether or not its
    // configuration reads it, and a read without the grant fails loudly where it happens.
    for grant in called_only {
        tracing::info!(
            plugin = %plugin,
            tenant = %owner,
            "the plugin can read `{}` but is not granted it: a call fails the plugin (its failure policy answers); add \"{}\" to its grants if its configuration reads it",
            grant.interface(),
            grant.interface()
        );
    }
    let linker = linker(engine, &manifest.grants).map_err(|error| LoadError::Link {
        plugin: plugin.clone(),
        message: format!("{error:#}"),
    })?;
    let (pre, indices) = prepare(&linker, &component).map_err(|message| LoadError::Link {
        plugin: plugin.clone(),
        message,
    })?;
    let config_json = serde_json::to_string(&manifest.config).unwrap_or_else(|_| "{}".to_string());
    let mut loaded = LoadedPlugin {
        manifest: manifest.clone(),
        name: Arc::from(plugin.as_str()),
        kv_name: Arc::from(plugin.as_str()),
        owner: owner.clone(),
        kv_quota: place.kv_quota,
        digest,
        sha256: Arc::from(hex::encode(digest)),
        pre,
        indices,
        hooks: HookSet::default(),
        config_json,
        preinitialized: false,
        stats: PluginStats::new(&plugin, owner),
        breaker: Breaker::new(manifest.breaker),
        shadow: None,
        canary: None,
    };
    // A loaded plugin starts with its circuit closed, whatever its previous generation's was.
    metrics::gauge!(
        "switchyard_plugin_circuit_open",
        "plugin" => plugin.clone(),
        "tenant" => owner.to_string(),
    )
    .set(0.0);
    initialise(engine, &linker, &mut loaded, bytes, services, compiled).await?;
    Ok(loaded)
}

/// Runs `init` once per load: in the instance that becomes the snapshot when the plugin can be
/// pre-initialised (the snapshot then replaces `loaded.pre`), otherwise in an instance made only
/// to run it. Either way a bad configuration is refused here, before the plugin takes traffic.
async fn initialise(
    engine: &Engine,
    linker: &Linker<HostState>,
    loaded: &mut LoadedPlugin,
    bytes: Vec<u8>,
    services: &PluginServices,
    compiled: &mut Compiled,
) -> Result<(), LoadError> {
    let plugin = loaded.manifest.name.clone();
    let preinitialize = loaded.manifest.preinitialize;
    let key = (loaded.digest, loaded.config_json.clone());
    let snapshot = match compiled.snapshots.get(&key) {
        _ if !preinitialize || bytes.len() > preinit::MAX_COMPONENT_BYTES => None,
        Some(snapshot) => snapshot.clone(),
        None => {
            let store = new_store(engine, [&*loaded], services, &RunContext::default());
            let cache = services.compile_cache.clone();
            let snapshot = match preinit::snapshot(engine, cache, linker, &bytes, loaded, store)
                .await
            {
                Ok((snapshot, info)) => match HookSet::from_names(&info.hooks) {
                    Ok(hooks) => Some((snapshot, hooks)),
                    Err(message) => {
                        return Err(LoadError::Init {
                            plugin: plugin.clone(),
                            message,
                        })
                    }
                },
                // A failed `init` is reported by the validation below, in the same words as for
                // a plugin that is not pre-initialised.
                Err(preinit::PreinitError::Init(_)) => None,
                Err(error) => {
                    tracing::warn!(
                        plugin = %plugin,
                        %error,
                        "plugin cannot be pre-initialised; each transaction's instance runs init"
                    );
                    None
                }
            };
            compiled.snapshots.insert(key, snapshot.clone());
            snapshot
        }
    };
    match snapshot {
        Some((snapshot, hooks)) => {
            let (pre, indices) = prepare(linker, &snapshot).map_err(|message| LoadError::Link {
                plugin: plugin.clone(),
                message: format!("pre-initialised: {message}"),
            })?;
            loaded.pre = pre;
            loaded.indices = indices;
            loaded.preinitialized = true;
            loaded.hooks = hooks;
        }
        None => {
            loaded.hooks = PluginRun::validate(loaded, services, RunContext::default())
                .await
                .map_err(|message| LoadError::Init {
                    plugin: plugin.clone(),
                    message,
                })?;
        }
    }
    Ok(())
}

/// The component of `bytes` (whose SHA-256 is `digest`): compiled once for identical bytes, off
/// the async workers (compilation is CPU-heavy), through the disk cache when there is one.
async fn compile(
    engine: &Engine,
    plugin: &str,
    digest: [u8; 32],
    source: Vec<u8>,
    services: &PluginServices,
    compiled: &mut Compiled,
) -> Result<Component, LoadError> {
    if let Some(component) = compiled.by_digest.get(&digest) {
        return Ok(component.clone());
    }
    let compile_engine = engine.clone();
    let cache = services.compile_cache.clone();
    let compile_error = |message: String| LoadError::Compile {
        plugin: plugin.to_string(),
        message,
    };
    let component = tokio::task::spawn_blocking(move || {
        super::compile_cache::compile(&compile_engine, cache.as_deref(), &digest, &source)
    })
    .await
    .map_err(|error| compile_error(error.to_string()))?
    .map_err(|error| compile_error(format!("{error:#}")))?;
    compiled.by_digest.insert(digest, component.clone());
    Ok(component)
}

/// Links `component` and checks its exports against the WIT package (the bindings' check, made
/// once here so instances need not repeat it; see [`super::hooks`]).
fn prepare(
    linker: &Linker<HostState>,
    component: &Component,
) -> Result<(InstancePre<HostState>, Arc<HookIndices>), String> {
    let pre = linker
        .instantiate_pre(component)
        .map_err(|error| format!("{error:#}"))?;
    PluginPre::new(pre.clone()).map_err(|error| format!("{error:#}"))?;
    let indices = HookIndices::new(component)?;
    Ok((pre, Arc::new(indices)))
}
