//! The plugin system: WebAssembly components (WIT package `switchyard:plugin`, in `wit/`) asked
//! for a decision at every stage of the mail path.
//!
//! - [`engine`]: the shared wasmtime engine (pooling allocator, epoch time limits, disk cache).
//! - [`loader`]: compile, check grants, link, pre-instantiate and validate one plugin.
//! - [`run`]: per-transaction instances and limited calls; [`chain`]: the chain semantics.
//! - [`PluginManager`]: the current generation, swapped atomically on reload.

pub mod bindings;
pub mod chain;
pub mod engine;
pub mod hooks;
pub mod host;
pub mod limits;
pub mod loader;
pub mod plugin;
pub mod preinit;
pub mod reload;
pub mod run;
pub mod store;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use wasmtime::Engine;

use tokio::sync::Semaphore;

use crate::config::PluginManifest;
use crate::queue::kv::KvStore;
pub use engine::new_engine;
use loader::LoadError;
use plugin::LoadedPlugin;
pub use run::PluginRun;
pub use store::RunContext;

/// What host functions reach: the kv store and the resolver.
#[derive(Clone, Default)]
pub struct PluginServices {
    pub kv: Option<Arc<dyn KvStore>>,
    pub resolver: Option<Arc<crate::net::dns::Dns>>,
}

/// One generation: the chain as loaded at one moment. Transactions keep the generation they
/// started with until they end.
pub struct PluginSet {
    pub generation: u64,
    pub engine: Engine,
    pub plugins: Vec<Arc<LoadedPlugin>>,
    pub services: PluginServices,
}

impl PluginSet {
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }

    /// True when some plugin of this generation implements `hook`.
    pub fn implements(&self, hook: hooks::HookKind) -> bool {
        self.plugins
            .iter()
            .any(|plugin| plugin.hooks.contains(hook))
    }
}

/// The outcome of reloads, for `plugins list`.
#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    /// Reloads attempted since start (successful or not).
    pub attempts: u64,
    pub last_error: Option<String>,
}

/// Instances that runs held for their messages' delivery stages may keep at once: a quarter of the
/// pool, so messages waiting behind a slow destination never take the slots new SMTP transactions
/// need.
const HELD_INSTANCES: usize = engine::POOL_INSTANCES as usize / 4;

pub struct PluginManager {
    engine: Engine,
    /// Permits for instances kept by held runs ([`PluginManager::hold`]).
    held: Arc<Semaphore>,
    services: PluginServices,
    current: ArcSwap<PluginSet>,
    status: Mutex<ReloadStatus>,
    /// Serialises reloads.
    reloading: tokio::sync::Mutex<()>,
}

impl PluginManager {
    /// Loads the first generation. Any plugin failing to load is an error: a router must not
    /// start without the policy it was configured with.
    pub async fn start(
        engine: Engine,
        manifests: &[PluginManifest],
        services: PluginServices,
    ) -> Result<Arc<PluginManager>, LoadError> {
        let set = load_set(&engine, manifests, &services, 1).await?;
        log_generation(&set);
        Ok(Arc::new(PluginManager {
            engine,
            held: Arc::new(Semaphore::new(HELD_INSTANCES)),
            services,
            current: ArcSwap::from_pointee(set),
            status: Mutex::new(ReloadStatus::default()),
            reloading: tokio::sync::Mutex::new(()),
        }))
    }

    /// The generation new transactions use.
    pub fn current(&self) -> Arc<PluginSet> {
        self.current.load_full()
    }

    /// Starts a run for a new transaction on the current generation.
    pub fn run(&self, context: RunContext) -> PluginRun {
        PluginRun::new(self.current(), context)
    }

    /// Keeps a finished SMTP transaction's (or routing's) run for the later stages of the same
    /// message in this process, the hooks in `ahead` (route, delivery-result, bounce), so they
    /// call the instances it already has instead of instantiating every plugin again. The run's
    /// store keeps all of its instances (a store frees them only together), each against a
    /// permit of the held share of the pool. `None` (the run is dropped, and those stages
    /// instantiate afresh) when no plugin implements them, or when held runs already keep their
    /// share.
    pub fn hold(&self, mut run: PluginRun, ahead: &[hooks::HookKind]) -> Option<PluginRun> {
        // Give back what the run held for earlier stages before taking what it needs now.
        run.hold = None;
        if !run.needed_for(ahead) {
            return None;
        }
        // Every instance of the run stays in its store until the run ends.
        let permits = u32::try_from(run.instance_count().max(1)).ok()?;
        match self.held.clone().try_acquire_many_owned(permits) {
            Ok(permit) => {
                run.hold = Some(permit);
                Some(run)
            }
            Err(_) => {
                // The message's later stages will instantiate afresh: slower, never wrong.
                metrics::counter!("switchyard_plugin_hold_refused_total").increment(1);
                None
            }
        }
    }

    /// Compiles and initialises `manifests` beside the running generation and swaps it in. On
    /// any error the running generation stays and the error is kept for `plugins list`.
    pub async fn reload(&self, manifests: &[PluginManifest]) -> Result<u64, LoadError> {
        let _guard = self.reloading.lock().await;
        self.status_mut().attempts += 1;
        let next = self.current().generation + 1;
        match load_set(&self.engine, manifests, &self.services, next).await {
            Ok(set) => {
                log_generation(&set);
                self.current.store(Arc::new(set));
                self.status_mut().last_error = None;
                Ok(next)
            }
            Err(error) => {
                tracing::error!(%error, "plugin reload failed; generation {} stays", next - 1);
                self.status_mut().last_error = Some(error.to_string());
                Err(error)
            }
        }
    }

    /// Records a reload that failed before any plugin was loaded (a bad configuration file).
    pub fn reload_failed(&self, message: String) {
        let mut status = self.status_mut();
        status.attempts += 1;
        status.last_error = Some(message);
    }

    fn status_mut(&self) -> std::sync::MutexGuard<'_, ReloadStatus> {
        self.status
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A human-readable table of the running generation and the last reload error.
    pub fn describe(&self) -> String {
        let set = self.current();
        let mut out = format!("generation {}\n", set.generation);
        for plugin in &set.plugins {
            let stats = &plugin.stats;
            out.push_str(&format!(
                "{}  hooks=[{}]  init={}  time_limit={:?}  memory_limit={}  failure_policy={:?}  calls={}  failures={}  timeouts={}  out_of_memory={}\n",
                plugin.name,
                plugin.hooks.names().join(","),
                if plugin.preinitialized {
                    "snapshot"
                } else {
                    "per-instance"
                },
                plugin.manifest.time_limit,
                plugin.manifest.memory_limit,
                plugin.manifest.failure_policy,
                stats.calls.load(Ordering::Relaxed),
                stats.failures.load(Ordering::Relaxed),
                stats.timeouts.load(Ordering::Relaxed),
                stats.out_of_memory.load(Ordering::Relaxed),
            ));
        }
        let status = self.status_mut().clone();
        out.push_str(&format!("reload attempts: {}\n", status.attempts));
        if let Some(error) = &status.last_error {
            out.push_str(&format!("last reload failed: {error}\n"));
        }
        out
    }
}

/// Compiles and initialises `manifests` as a server would, without serving: for `check-config`.
pub async fn check(manifests: &[PluginManifest]) -> anyhow::Result<()> {
    if manifests.is_empty() {
        return Ok(());
    }
    let engine = engine::new_engine(&std::env::temp_dir().join("switchyard-plugin-cache"))?;
    let set = load_set(&engine, manifests, &PluginServices::default(), 1).await?;
    for plugin in &set.plugins {
        eprintln!(
            "plugin {}: loads; hooks {}",
            plugin.name,
            plugin.hooks.names().join(", ")
        );
    }
    Ok(())
}

async fn load_set(
    engine: &Engine,
    manifests: &[PluginManifest],
    services: &PluginServices,
    generation: u64,
) -> Result<PluginSet, LoadError> {
    let mut plugins = Vec::with_capacity(manifests.len());
    let mut compiled = loader::Compiled::default();
    for manifest in manifests {
        plugins.push(loader::load(engine, manifest, services, &mut compiled).await?);
    }
    Ok(PluginSet {
        generation,
        engine: engine.clone(),
        plugins,
        services: services.clone(),
    })
}

fn log_generation(set: &PluginSet) {
    for plugin in &set.plugins {
        tracing::info!(
            generation = set.generation,
            plugin = %plugin.name,
            hooks = %plugin.hooks.names().join(","),
            "plugin loaded"
        );
    }
}
