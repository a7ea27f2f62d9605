//! The host side of the plugin API: what a run's store holds ([`HostState`]), and the host
//! functions, one module per WIT interface, each owning its linking (as Spin's host components
//! and wasmtime's per-interface `add_to_linker` do). [`linker`] links the always-present
//! interfaces and the granted ones only; [`check_imports`] refuses a component that imports one
//! it was not granted, naming it.

mod bag;
mod clock;
mod dns;
mod kv;
mod log;
mod message;
mod metrics;
mod scanners;
mod session;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::config::Grant;
use crate::queue::kv::KvStore;
pub use message::{parsed_headers, BodyHandle};
pub use session::{SessionFacts, SessionHandle};

/// What the host keeps for one plugin of a run.
pub struct PluginState {
    pub name: Arc<str>,
    /// Its kv keys' name (see [`crate::plugins::plugin::LoadedPlugin::kv_name`]).
    pub kv_name: Arc<str>,
    /// The tenant whose chain the plugin is in: its kv keys are that tenant's.
    pub owner: Arc<str>,
    /// What its kv keys may hold.
    pub kv_quota: crate::queue::kv::Quota,
    /// Granted `clock`: WASI's clocks tell it the real time.
    pub clock: bool,
    /// Granted `scanners`: it may read the scanners' results.
    pub scanners: bool,
    /// Caps the plugin's linear memories, whichever run's store they are in.
    pub limits: crate::plugins::limits::MemoryBudget,
    /// The plugin's transaction bag.
    pub bag: HashMap<String, String>,
}

impl PluginState {
    /// The state of `plugin`'s instance in a run.
    pub fn of(plugin: &crate::plugins::plugin::LoadedPlugin) -> PluginState {
        PluginState {
            name: plugin.name.clone(),
            kv_name: plugin.kv_name.clone(),
            owner: plugin.owner.clone(),
            kv_quota: plugin.kv_quota,
            clock: plugin.manifest.grants.contains(&Grant::Clock),
            scanners: plugin.manifest.grants.contains(&Grant::Scanners),
            limits: crate::plugins::limits::MemoryBudget::new(
                plugin.manifest.memory_limit as usize,
            ),
            bag: HashMap::new(),
        }
    }
}

/// A tenant plugin's place among its tenant's calls running at once (taken for each call by
/// `PluginRun::instance`), given up while a host function waits for I/O.
#[derive(Default)]
pub struct CpuPlace {
    pub semaphore: Option<Arc<tokio::sync::Semaphore>>,
    pub permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// The state of one run's store: one store per transaction holds the instances of every plugin
/// of the chain. Each instance still has its own memories, tables and handles (the component
/// model keeps them apart); what the host keeps per plugin is in `plugins`, and `current` says
/// whose call (or instantiation) is under way, so host functions and memory growth are
/// accounted to that plugin.
pub struct HostState {
    /// Built on the first WASI call of any plugin of the run: a pre-initialised plugin that
    /// answers its hooks without printing, reading the clock or drawing random numbers never
    /// needs one, and building it (seeding its random sources) was a noticeable cost. This one
    /// serves the plugins granted `clock`; `wasi_stopped` the others (see [`clock`]).
    pub wasi: Option<WasiCtx>,
    pub wasi_stopped: Option<WasiCtx>,
    pub table: ResourceTable,
    pub plugins: Vec<PluginState>,
    /// The index in `plugins` of the plugin being called.
    pub current: usize,
    /// When the current call must end.
    pub deadline: Instant,
    /// The tenant of the transaction or message (what `session.tenant` and `message.tenant`
    /// say); `""` for mail of no tenant.
    pub tenant: String,
    pub queue_id: Option<String>,
    pub kv: Option<Arc<dyn KvStore>>,
    pub resolver: Option<Arc<crate::net::dns::Dns>>,
    /// Recording: lookups are noted on it. Replaying: lookups and the clock are answered from it.
    pub tape: Option<crate::plugins::record::SharedTape>,
    /// The current call's place in its tenant's share of the CPU, if it is a tenant's plugin.
    pub cpu: CpuPlace,
}

impl HostState {
    /// Runs `io` (a kv write waiting for its commit, a DNS lookup) with the call's place in its
    /// tenant's CPU share given up, and takes a place again after: the share bounds the
    /// tenant's computing, not its waiting.
    pub(crate) async fn off_cpu<T>(&mut self, io: impl std::future::Future<Output = T>) -> T {
        let released = self.cpu.permit.take().is_some();
        let output = io.await;
        if released {
            if let Some(semaphore) = self.cpu.semaphore.clone() {
                self.cpu.permit = semaphore.acquire_owned().await.ok();
            }
        }
        output
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        // Nothing preopened, no network, no environment: WASI gives clocks (real ones with the
        // `clock` grant only) and randomness.
        let granted = self
            .plugins
            .get(self.current)
            .is_some_and(|plugin| plugin.clock);
        let tape = self.tape.clone();
        let ctx = if granted {
            self.wasi
                .get_or_insert_with(|| clock::wasi_context(true, tape))
        } else {
            self.wasi_stopped
                .get_or_insert_with(|| clock::wasi_context(false, tape))
        };
        WasiCtxView {
            ctx,
            table: &mut self.table,
        }
    }
}

impl HostState {
    /// The plugin being called.
    pub fn plugin(&self) -> &PluginState {
        &self.plugins[self.current]
    }

    pub fn plugin_mut(&mut self) -> &mut PluginState {
        &mut self.plugins[self.current]
    }
}

const PACKAGE: &str = "switchyard:plugin/";
/// Interfaces every plugin may import.
const ALWAYS: [&str; 3] = ["types", "message", "bag"];

/// An import the host refuses to link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportError {
    /// One of the host's interfaces that the manifest does not grant.
    NotGranted { import: String, grant: Grant },
    /// An interface of the package that this host does not know.
    Unknown { import: String },
}

/// Refuses a component that imports a host interface it was not granted, naming the interface.
/// `scanners` is the exception (see [`scanners`]): the grants imported but not granted that
/// only fail when called are returned, for the loader to warn about.
pub fn check_imports(
    engine: &Engine,
    component: &Component,
    grants: &[Grant],
) -> Result<Vec<Grant>, ImportError> {
    let mut called_only = Vec::new();
    for (name, _) in component.component_type().imports(engine) {
        let Some(rest) = name.strip_prefix(PACKAGE) else {
            continue; // wasi:* and friends: provided, with nothing granted behind them.
        };
        let interface = rest.split('@').next().unwrap_or(rest);
        if ALWAYS.contains(&interface) {
            continue;
        }
        match Grant::ALL
            .into_iter()
            .find(|grant| grant.interface() == interface)
        {
            Some(grant) if grants.contains(&grant) => {}
            Some(Grant::Scanners) => called_only.push(Grant::Scanners),
            Some(grant) => {
                return Err(ImportError::NotGranted {
                    import: name.to_string(),
                    grant,
                })
            }
            None => {
                return Err(ImportError::Unknown {
                    import: name.to_string(),
                })
            }
        }
    }
    Ok(called_only)
}

/// A linker with WASI (no files, no network: nothing is preopened or allowed), the always-present
/// interfaces, and the granted ones only.
pub fn linker(engine: &Engine, grants: &[Grant]) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    session::link(&mut linker)?;
    message::link(&mut linker)?;
    bag::link(&mut linker)?;
    // Linked for every plugin; reading it needs the grant (see `scanners`).
    scanners::link(&mut linker)?;
    for grant in grants {
        match grant {
            Grant::Log => log::link(&mut linker)?,
            Grant::Metrics => metrics::link(&mut linker)?,
            Grant::Kv => kv::link(&mut linker)?,
            Grant::Dns => dns::link(&mut linker)?,
            Grant::Clock => clock::link(&mut linker)?,
            Grant::Scanners => {}
        }
    }
    Ok(linker)
}

/// Core instances, tables and memories one component instance may create: far above what a
/// plugin built by wit-bindgen or componentize-py needs, and a bound on the bookkeeping a
/// hostile component can ask for.
const MAX_INSTANCES: usize = 16;
const MAX_TABLES: usize = 16;
const MAX_MEMORIES: usize = 4;
/// Table elements (function references): generous for any real plugin.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// The store's limiter: each plugin's own budget, and counts that scale with the chain.
impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.plugin_mut().limits.grow(current, desired, maximum)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        Err(error.context("memory growth failed"))
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS && maximum.is_none_or(|maximum| desired <= maximum))
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES * self.plugins.len()
    }

    fn tables(&self) -> usize {
        MAX_TABLES * self.plugins.len()
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES * self.plugins.len()
    }
}
