//! The plugin system: WebAssembly components (WIT package `switchyard:plugin`, in `wit/`) asked
//! for a decision at every stage of the mail path.
//!
//! - [`engine`]: the shared wasmtime engine (pooling allocator, epoch time limits);
//!   [`compile_cache`]: compilations on disk, keyed and checked by the component's digest.
//! - [`loader`]: compile, check grants, link, pre-instantiate and validate one plugin.
//! - [`run`]: per-transaction instances and limited calls; [`chain`]: the chain semantics.
//! - [`PluginManager`]: the current generation of the global chain and of each tenant's,
//!   swapped atomically on reload (a tenant's alone when only its file changed).

pub mod bindings;
pub mod breaker;
pub mod calls;
pub mod canary;
pub mod chain;
pub mod compile_cache;
pub mod engine;
pub mod facts;
pub mod hooks;
pub mod host;
pub mod limits;
pub mod loader;
pub mod plugin;
pub mod preinit;
pub mod record;
pub mod replay;
pub mod reply;
pub mod run;
pub mod status;
pub mod store;
pub mod trace;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use wasmtime::Engine;

use tokio::sync::Semaphore;

use crate::config::{PluginManifest, TenantConfig};
use crate::queue::kv::KvStore;
pub use engine::new_engine;
use loader::LoadError;
use plugin::LoadedPlugin;
pub use run::PluginRun;
pub use store::RunContext;

/// What host functions reach (the kv store and the resolver), and what loading plugins uses.
#[derive(Clone, Default)]
pub struct PluginServices {
    pub kv: Option<Arc<dyn KvStore>>,
    pub resolver: Option<Arc<crate::net::dns::Dns>>,
    /// Where runs' decision traces go once their transaction or stage ends.
    pub traces: trace::TraceSink,
    /// Where sampled transactions' recordings go (`[record]`).
    pub records: record::RecordSink,
    /// Where compilations are kept between runs; `None` compiles every load afresh.
    pub compile_cache: Option<Arc<compile_cache::CompileCache>>,
    /// The kv quota of each plugin of the global chain (`[kv]`); tenants' plugins have their
    /// tenant's.
    pub kv_quota: crate::queue::kv::Quota,
}

/// One chain as loaded at one moment: the global chain, or the global chain followed by one
/// tenant's. Transactions keep the set they started with until they end.
pub struct PluginSet {
    /// The global chain's generation.
    pub generation: u64,
    /// `""` for the global chain alone.
    pub tenant: Arc<str>,
    /// The tenant chain's generation (0 for the global set).
    pub tenant_generation: u64,
    pub engine: Engine,
    /// The global chain's plugins, then the tenant's.
    pub plugins: Vec<Arc<LoadedPlugin>>,
    /// How many of `plugins` are the global chain's.
    pub global_len: usize,
    pub services: PluginServices,
    /// The tenant's share of the instance pool: a transaction of the tenant holds one permit
    /// per plugin of the tenant's chain.
    pub share: Option<Arc<Semaphore>>,
    /// The tenant's share of the CPU: a call of one of the tenant's plugins holds a permit.
    pub calls: Option<Arc<Semaphore>>,
}

impl PluginSet {
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }

    /// True when some plugin of this set implements `hook`.
    pub fn implements(&self, hook: hooks::HookKind) -> bool {
        self.plugins
            .iter()
            .any(|plugin| plugin.hooks.contains(hook))
    }

    /// The tenant's part of the chain.
    pub fn tenant_plugins(&self) -> &[Arc<LoadedPlugin>] {
        &self.plugins[self.global_len..]
    }

    /// This set with other plugins in the same places (a candidate for a live one).
    pub(crate) fn with_plugins(&self, plugins: Vec<Arc<LoadedPlugin>>) -> PluginSet {
        PluginSet {
            generation: self.generation,
            tenant: self.tenant.clone(),
            tenant_generation: self.tenant_generation,
            engine: self.engine.clone(),
            plugins,
            global_len: self.global_len,
            services: self.services.clone(),
            share: self.share.clone(),
            calls: self.calls.clone(),
        }
    }
}

/// One tenant's chain of one generation.
pub struct TenantChain {
    pub id: Arc<str>,
    pub generation: u64,
    pub plugins: Vec<Arc<LoadedPlugin>>,
    /// The global chain followed by this one: what the tenant's mail runs.
    pub set: Arc<PluginSet>,
    /// The tenant's share of the instance pool (`limits.plugin_instances` permits).
    pub share: Arc<Semaphore>,
    pub share_size: usize,
    /// Calls of the tenant's plugins running at once (`limits.plugin_calls_at_once` permits).
    pub calls: Arc<Semaphore>,
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

type Tenants = HashMap<Arc<str>, Arc<TenantChain>>;

pub struct PluginManager {
    engine: Engine,
    /// Permits for instances kept by held runs ([`PluginManager::hold`]).
    held: Arc<Semaphore>,
    services: PluginServices,
    current: ArcSwap<PluginSet>,
    tenants: ArcSwap<Tenants>,
    status: Mutex<ReloadStatus>,
    /// The last failed reload of each tenant whose file does not load (cleared by a good one).
    tenant_errors: Mutex<HashMap<String, String>>,
    /// Components compiled so far, by digest: tenants running the same plugin file share one,
    /// across reloads too. Pruned to what loaded plugins use after each reload.
    compiled: tokio::sync::Mutex<loader::Compiled>,
    /// Serialises reloads.
    reloading: tokio::sync::Mutex<()>,
}

impl PluginManager {
    /// Loads the first generation of the global chain and of every tenant's. Any plugin failing
    /// to load is an error: a router must not start without the policy it was configured with.
    pub async fn start(
        engine: Engine,
        manifests: &[PluginManifest],
        tenants: &[TenantConfig],
        services: PluginServices,
    ) -> Result<Arc<PluginManager>, LoadError> {
        let mut compiled = loader::Compiled::default();
        let global = Arc::new(load_set(&engine, manifests, &services, 1, &mut compiled).await?);
        log_generation(&global);
        let mut chains = Tenants::new();
        for tenant in tenants {
            let chain = load_tenant(&engine, &global, tenant, &services, 1, &mut compiled).await?;
            chains.insert(chain.id.clone(), Arc::new(chain));
        }
        if !tenants.is_empty() {
            tracing::info!(tenants = tenants.len(), "tenant chains loaded");
        }
        Ok(Arc::new(PluginManager {
            engine,
            held: Arc::new(Semaphore::new(HELD_INSTANCES)),
            services,
            current: ArcSwap::new(global),
            tenants: ArcSwap::from_pointee(chains),
            status: Mutex::new(ReloadStatus::default()),
            tenant_errors: Mutex::new(HashMap::new()),
            compiled: tokio::sync::Mutex::new(compiled),
            reloading: tokio::sync::Mutex::new(()),
        }))
    }

    /// Where finished runs' decision traces go (`queue trace`).
    pub fn traces(&self) -> &trace::TraceSink {
        &self.services.traces
    }

    /// The global chain new transactions start with.
    pub fn current(&self) -> Arc<PluginSet> {
        self.current.load_full()
    }

    /// The chain of `tenant`'s mail: the global chain followed by the tenant's (the global chain
    /// alone for `""` or a tenant without a chain).
    pub fn set_for(&self, tenant: &str) -> Arc<PluginSet> {
        if tenant.is_empty() {
            return self.current();
        }
        match self.tenants.load().get(tenant) {
            Some(chain) => chain.set.clone(),
            None => self.current(),
        }
    }

    /// Starts a run for a new transaction on the current global generation.
    pub fn run(&self, context: RunContext) -> PluginRun {
        PluginRun::new(self.current(), context)
    }

    /// Starts the run of a new SMTP transaction, whose message (if it queues one) will be
    /// queued as `queue_id`: on the current global generation, with the canaries that the
    /// id's draw falls to (see [`canary`]).
    pub fn start_transaction(&self, queue_id: &str) -> PluginRun {
        let draw = canary::draw_of(queue_id);
        let mut context = RunContext::default();
        let recorder = self.services.records.recorder(queue_id);
        if recorder.is_some() {
            context.tape = Some(record::SharedTape::default());
        }
        let mut run = PluginRun::new(self.current().for_draw(draw), context);
        run.draw = Some(draw);
        run.recorder = recorder;
        run
    }

    /// Where finished transactions' recordings go.
    pub fn records(&self) -> &record::RecordSink {
        &self.services.records
    }

    /// The chain of the message queued as `queue_id` for `tenant`: the one its SMTP
    /// transaction ran, the same canaries included.
    pub fn set_for_message(&self, tenant: &str, queue_id: &str) -> Arc<PluginSet> {
        self.set_for(tenant).for_draw(canary::draw_of(queue_id))
    }

    /// Keeps a finished SMTP transaction's (or routing's) run for the later stages of the same
    /// message in this process, the hooks in `ahead` (route, delivery-result, bounce), so they
    /// call the instances it already has instead of instantiating every plugin again. The run's
    /// store keeps all of its instances (a store frees them only together), each against a
    /// permit of the held share of the pool. `None` (the run is dropped, and those stages
    /// instantiate afresh) when no plugin implements them, or when held runs already keep their
    /// share.
    pub fn hold(&self, mut run: PluginRun, ahead: &[hooks::HookKind]) -> Option<PluginRun> {
        // Give back what the run held for earlier stages before taking what it needs now: the
        // held share bounds held runs, not the tenant's share, which is for new transactions.
        run.hold = None;
        run.tenant_share = None;
        run.stop_recording();
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

    /// Compiles and initialises `manifests` beside the running global chain and swaps it in,
    /// with every tenant's chain now following it (the tenants' own plugins are kept, not
    /// reloaded). On any error the running generation stays and the error is kept for
    /// `plugins list`.
    pub async fn reload(&self, manifests: &[PluginManifest]) -> Result<u64, LoadError> {
        let _guard = self.reloading.lock().await;
        self.status_mut().attempts += 1;
        let next = self.current().generation + 1;
        let mut compiled = self.compiled.lock().await;
        // `init` runs again at every reload of the global chain (the plugin guide says so), so
        // its snapshots are taken afresh; compiled components are kept.
        compiled.forget_snapshots();
        match load_set(&self.engine, manifests, &self.services, next, &mut compiled).await {
            Ok(set) => {
                log_generation(&set);
                let global = Arc::new(set);
                let tenants: Tenants = self
                    .tenants
                    .load()
                    .iter()
                    .map(|(id, chain)| (id.clone(), Arc::new(follow(&global, chain))))
                    .collect();
                self.current.store(global);
                self.tenants.store(Arc::new(tenants));
                self.status_mut().last_error = None;
                self.prune(&mut compiled);
                Ok(next)
            }
            Err(error) => {
                tracing::error!(%error, "plugin reload failed; generation {} stays", next - 1);
                self.status_mut().last_error = Some(error.to_string());
                Err(error)
            }
        }
    }

    /// Loads one tenant's chain (its file was added or changed) and swaps it in; every other
    /// tenant's chain keeps running untouched. On error the tenant's previous chain (if any)
    /// stays, and the error shows in `plugins list`.
    pub async fn reload_tenant(&self, tenant: &TenantConfig) -> Result<u64, LoadError> {
        let _guard = self.reloading.lock().await;
        let id: Arc<str> = Arc::from(tenant.id.as_str());
        let next = self
            .tenants
            .load()
            .get(&id)
            .map(|chain| chain.generation + 1)
            .unwrap_or(1);
        let mut compiled = self.compiled.lock().await;
        let global = self.current();
        match load_tenant(
            &self.engine,
            &global,
            tenant,
            &self.services,
            next,
            &mut compiled,
        )
        .await
        {
            Ok(mut chain) => {
                // Transactions under way hold permits of the running chain's share: the new
                // chain keeps counting on the same semaphore, resized to the new limit.
                if let Some(running) = self.tenants.load().get(&id) {
                    if running.share_size < chain.share_size {
                        running
                            .share
                            .add_permits(chain.share_size - running.share_size);
                    } else {
                        running
                            .share
                            .forget_permits(running.share_size - chain.share_size);
                    }
                    chain.share = running.share.clone();
                    chain = follow(&global, &chain);
                }
                let mut tenants = Tenants::clone(&self.tenants.load());
                tenants.insert(id, Arc::new(chain));
                self.tenants.store(Arc::new(tenants));
                self.tenant_errors_mut().remove(&tenant.id);
                self.prune(&mut compiled);
                tracing::info!(tenant = %tenant.id, generation = next, "tenant chain loaded");
                Ok(next)
            }
            Err(error) => {
                tracing::error!(tenant = %tenant.id, %error, "tenant reload failed; its previous chain stays");
                self.tenant_failed(&tenant.id, error.to_string());
                Err(error)
            }
        }
    }

    /// Drops a tenant's chain (its file was removed).
    pub async fn remove_tenant(&self, id: &str) {
        let _guard = self.reloading.lock().await;
        let mut tenants = Tenants::clone(&self.tenants.load());
        if tenants.remove(id).is_some() {
            tracing::info!(tenant = %id, "tenant removed");
        }
        self.tenants.store(Arc::new(tenants));
        self.tenant_errors_mut().remove(id);
        self.prune(&mut *self.compiled.lock().await);
    }

    /// Records a tenant file that does not load; its previous chain (if any) keeps running.
    pub fn tenant_failed(&self, id: &str, message: String) {
        self.tenant_errors_mut().insert(id.to_string(), message);
    }

    /// Forgets compiled components that no loaded plugin uses any more.
    fn prune(&self, compiled: &mut loader::Compiled) {
        // A plugin's candidates are compiled components too.
        let digests = |plugin: &Arc<LoadedPlugin>| {
            [
                Some(plugin.digest),
                plugin.shadow.as_ref().map(|shadow| shadow.digest),
                plugin.canary.as_ref().map(|canary| canary.plugin.digest),
            ]
            .into_iter()
            .flatten()
        };
        let mut used: HashSet<[u8; 32]> = self.current().plugins.iter().flat_map(digests).collect();
        for chain in self.tenants.load().values() {
            used.extend(chain.plugins.iter().flat_map(digests));
        }
        compiled.retain(|digest| used.contains(digest));
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

    fn tenant_errors_mut(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.tenant_errors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The running chains, their plugins' counters and circuits, and the reloads' outcome.
    pub fn status(&self) -> status::ChainsStatus {
        let set = self.current();
        let tenants = self.tenants.load();
        let mut ids: Vec<&Arc<str>> = tenants.keys().collect();
        ids.sort();
        let tenant_chains = ids
            .into_iter()
            .map(|id| {
                let chain = &tenants[id];
                status::TenantStatus {
                    tenant: id.to_string(),
                    generation: chain.generation,
                    instance_share: chain.share_size,
                    instances_in_use: chain.share_size - chain.share.available_permits(),
                    plugins: chain
                        .plugins
                        .iter()
                        .map(|plugin| plugin_status(chain.generation, plugin))
                        .collect(),
                }
            })
            .collect();
        let mut tenant_errors: Vec<status::TenantError> = self
            .tenant_errors_mut()
            .iter()
            .map(|(tenant, error)| status::TenantError {
                tenant: tenant.clone(),
                error: error.clone(),
            })
            .collect();
        tenant_errors.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        let reloads = self.status_mut().clone();
        status::ChainsStatus {
            generation: set.generation,
            plugins: set
                .plugins
                .iter()
                .map(|plugin| plugin_status(set.generation, plugin))
                .collect(),
            tenants: tenant_chains,
            tenant_errors,
            reload_attempts: reloads.attempts,
            last_reload_error: reloads.last_error,
        }
    }

    /// The running chains as `plugins list` prints them.
    pub fn describe(&self) -> String {
        self.status().to_text()
    }
}

/// One plugin's line of the status.
fn plugin_status(generation: u64, plugin: &LoadedPlugin) -> status::PluginStatus {
    let stats = &plugin.stats;
    status::PluginStatus {
        name: plugin.name.to_string(),
        tenant: plugin.owner.to_string(),
        generation,
        sha256: plugin.digest_hex(),
        hooks: plugin
            .hooks
            .names()
            .into_iter()
            .map(str::to_string)
            .collect(),
        init: if plugin.preinitialized {
            "snapshot"
        } else {
            "per-instance"
        }
        .to_string(),
        time_limit_ms: u64::try_from(plugin.manifest.time_limit.as_millis()).unwrap_or(u64::MAX),
        memory_limit: plugin.manifest.memory_limit,
        failure_policy: match plugin.manifest.failure_policy {
            crate::config::FailurePolicy::Tempfail => "tempfail",
            crate::config::FailurePolicy::Reject => "reject",
            crate::config::FailurePolicy::Continue => "continue",
        }
        .to_string(),
        health: health(plugin),
        shadow: plugin.shadow.as_ref().map(|shadow| status::ShadowStatus {
            sha256: shadow.digest_hex(),
            agree: stats.shadow_agree.load(Ordering::Relaxed),
            disagree: stats.shadow_disagree.load(Ordering::Relaxed),
            failures: shadow.stats.failures.load(Ordering::Relaxed),
        }),
        canary: plugin.canary.as_ref().map(|canary| status::CanaryStatus {
            sha256: canary.plugin.digest_hex(),
            percent: f64::from(canary.basis_points) / 100.0,
            health: health(&canary.plugin),
        }),
    }
}

/// A plugin's counters and circuit.
fn health(plugin: &LoadedPlugin) -> status::Health {
    let stats = &plugin.stats;
    status::Health {
        calls: stats.calls.load(Ordering::Relaxed),
        failures: stats.failures.load(Ordering::Relaxed),
        timeouts: stats.timeouts.load(Ordering::Relaxed),
        out_of_memory: stats.out_of_memory.load(Ordering::Relaxed),
        circuit: plugin.breaker.state(std::time::Instant::now()).to_string(),
        trips: plugin.breaker.trips(),
        skipped: stats.skipped.load(Ordering::Relaxed),
    }
}

/// Compiles and initialises the global chain and every tenant's as a server would, without
/// serving: for `check-config`.
/// Compilations go through the server's cache in `cache_dir` when it can be opened, so a
/// check before a start or reload also saves that start the compiling.
pub async fn check(
    manifests: &[PluginManifest],
    tenants: &[TenantConfig],
    cache_dir: &std::path::Path,
) -> anyhow::Result<()> {
    if manifests.is_empty() && tenants.iter().all(|tenant| tenant.plugins.is_empty()) {
        return Ok(());
    }
    let engine = engine::new_engine()?;
    let services = PluginServices {
        compile_cache: compile_cache::CompileCache::open(cache_dir, &engine)
            .ok()
            .map(Arc::new),
        ..PluginServices::default()
    };
    let manager = PluginManager::start(engine, manifests, tenants, services).await?;
    let global = manager.current();
    for plugin in &global.plugins {
        eprintln!(
            "plugin {}: loads; hooks {}; sha256 {}",
            plugin.name,
            plugin.hooks.names().join(", "),
            plugin.digest_hex()
        );
    }
    for tenant in tenants {
        for plugin in manager.set_for(&tenant.id).tenant_plugins() {
            eprintln!(
                "tenant {} plugin {}: loads; hooks {}",
                tenant.id,
                plugin.name,
                plugin.hooks.names().join(", ")
            );
        }
    }
    Ok(())
}

async fn load_set(
    engine: &Engine,
    manifests: &[PluginManifest],
    services: &PluginServices,
    generation: u64,
    compiled: &mut loader::Compiled,
) -> Result<PluginSet, LoadError> {
    let owner: Arc<str> = Arc::from("");
    let place = loader::Place {
        owner: &owner,
        kv_quota: services.kv_quota,
    };
    let mut plugins = Vec::with_capacity(manifests.len());
    for manifest in manifests {
        plugins.push(loader::load(engine, manifest, &place, services, compiled).await?);
    }
    Ok(PluginSet {
        generation,
        tenant: owner,
        tenant_generation: 0,
        engine: engine.clone(),
        global_len: plugins.len(),
        plugins,
        services: services.clone(),
        share: None,
        calls: None,
    })
}

/// Loads one tenant's chain on top of `global`.
async fn load_tenant(
    engine: &Engine,
    global: &Arc<PluginSet>,
    tenant: &TenantConfig,
    services: &PluginServices,
    generation: u64,
    compiled: &mut loader::Compiled,
) -> Result<TenantChain, LoadError> {
    let owner: Arc<str> = Arc::from(tenant.id.as_str());
    let place = loader::Place {
        owner: &owner,
        kv_quota: tenant.limits.kv_quota(),
    };
    let mut plugins = Vec::with_capacity(tenant.plugins.len());
    for manifest in &tenant.plugins {
        plugins.push(
            loader::load(engine, manifest, &place, services, compiled)
                .await
                .map_err(|error| error.in_tenant(&tenant.id))?,
        );
    }
    let share_size = tenant.limits.plugin_instances;
    let chain = TenantChain {
        set: Arc::new(PluginSet {
            generation: 0,
            tenant: owner.clone(),
            tenant_generation: generation,
            engine: engine.clone(),
            plugins: Vec::new(),
            global_len: 0,
            services: services.clone(),
            share: None,
            calls: None,
        }),
        id: owner,
        generation,
        plugins,
        share: Arc::new(Semaphore::new(share_size)),
        share_size,
        calls: Arc::new(Semaphore::new(tenant.limits.plugin_calls_at_once)),
    };
    Ok(follow(global, &chain))
}

/// `chain` with its set rebuilt on top of `global`.
fn follow(global: &Arc<PluginSet>, chain: &TenantChain) -> TenantChain {
    let mut plugins = global.plugins.clone();
    plugins.extend(chain.plugins.iter().cloned());
    TenantChain {
        id: chain.id.clone(),
        generation: chain.generation,
        plugins: chain.plugins.clone(),
        set: Arc::new(PluginSet {
            generation: global.generation,
            tenant: chain.id.clone(),
            tenant_generation: chain.generation,
            engine: global.engine.clone(),
            plugins,
            global_len: global.plugins.len(),
            services: global.services.clone(),
            share: Some(chain.share.clone()),
            calls: Some(chain.calls.clone()),
        }),
        share: chain.share.clone(),
        share_size: chain.share_size,
        calls: chain.calls.clone(),
    }
}

fn log_generation(set: &PluginSet) {
    for plugin in &set.plugins {
        tracing::info!(
            generation = set.generation,
            plugin = %plugin.name,
            hooks = %plugin.hooks.names().join(","),
            sha256 = %plugin.digest_hex(),
            "plugin loaded"
        );
    }
}
