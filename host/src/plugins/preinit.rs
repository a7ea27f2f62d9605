//! Pre-initialisation: a plugin's `init` runs once when its generation loads, inside an instance
//! that Wizer has instrumented, and the state `init` leaves (every core instance's memories and
//! globals) is written back into a new component. Transactions instantiate that snapshot, so
//! their instances start initialised: no guest start-up, no config parsing and no `init` call
//! per transaction.
//!
//! Each instance still gets its own copy of that state (copy-on-write pages of the pooling
//! allocator), so nothing a transaction does reaches another one. Not every component can be
//! snapshotted (Wizer refuses some shapes); the loader then falls back to calling `init` in each
//! instance, which is slower and otherwise the same.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Instance, Lift, Linker, WasmList};
use wasmtime::{Engine, Store};
use wasmtime_wizer::{ComponentInstanceState, Wizer};

use super::bindings::types::PluginInfo;
use super::bindings::Plugin;
use super::compile_cache::CompileCache;
use super::host::HostState;
use super::plugin::LoadedPlugin;
use super::store::arm;

/// Components above this size are not pre-initialised: a snapshot costs two more compilations
/// of the whole component at every load, seconds for an interpreter such as componentize-py's
/// 18 MB Python (whose toolchain already ships it pre-initialised, so little is left to save).
pub const MAX_COMPONENT_BYTES: usize = 4 * 1024 * 1024;

/// How long reading an initialised instance's state may take.
const SNAPSHOT_READ_LIMIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Why a plugin could not be pre-initialised (the loader logs it and falls back).
#[derive(Debug, thiserror::Error)]
pub enum PreinitError {
    #[error("cannot instrument the component: {0}")]
    Instrument(String),
    #[error("cannot compile: {0}")]
    Compile(String),
    #[error("cannot instantiate: {0}")]
    Instantiate(String),
    #[error("init failed: {0}")]
    Init(String),
    #[error("init keeps host handles open, which a snapshot cannot carry")]
    HeldHandles,
    #[error("cannot read the instance's state: {0}")]
    Snapshot(String),
}

/// Runs `plugin`'s `init` with its configuration in an instrumented instance of `bytes` and
/// returns the compiled snapshot with what `init` answered (the hooks the plugin implements), so
/// the loader need not run `init` a second time to learn them.
pub async fn snapshot(
    engine: &Engine,
    cache: Option<Arc<CompileCache>>,
    linker: &Linker<HostState>,
    bytes: &[u8],
    plugin: &LoadedPlugin,
    mut store: Store<HostState>,
) -> Result<(Component, PluginInfo), PreinitError> {
    let mut wizer = Wizer::new();
    // Our `init` is an export of the `hooks` interface, which must stay: the bindings check it.
    wizer.keep_init_func(true);
    let (context, instrumented) = wizer
        .instrument_component(bytes)
        .map_err(|error| PreinitError::Instrument(format!("{error:#}")))?;
    let component = compile(engine, cache.clone(), instrumented).await?;
    // The time limit covers instantiation (start functions) and `init`, as in a transaction.
    let running = arm(&mut store, plugin.manifest.time_limit);
    let instance = linker
        .instantiate_async(&mut store, &component)
        .await
        .map_err(|error| PreinitError::Instantiate(format!("{error:#}")))?;
    let bindings = Plugin::new(&mut store, &instance)
        .map_err(|error| PreinitError::Instantiate(format!("{error:#}")))?;
    drop(running);
    let running = arm(&mut store, plugin.manifest.time_limit);
    let info = bindings
        .switchyard_plugin_hooks()
        .call_init(&mut store, &plugin.config_json)
        .await
        .map_err(|error| PreinitError::Init(format!("{error:#}")))?
        .map_err(PreinitError::Init)?;
    // A handle the plugin still holds (a WASI stream, say) lives in the host's table, not in the
    // instance's memory: a snapshot would carry a dangling handle into every transaction.
    if !store.data().table.is_empty() {
        return Err(PreinitError::HeldHandles);
    }
    // Reading the state out runs only Wizer's getters, not the plugin's code, and must not be
    // cut short by `init`'s deadline: a read that fails gives Wizer an empty memory, which it
    // cannot handle (on a slow or loaded machine, or under valgrind, it did).
    drop(running);
    let _running = arm(&mut store, SNAPSHOT_READ_LIMIT);
    let mut state = InstanceState {
        store: &mut store,
        instance,
        error: None,
    };
    let snapshot = wizer
        .snapshot_component(&context, &mut state)
        .await
        .map_err(|error| PreinitError::Snapshot(format!("{error:#}")))?;
    if let Some(error) = state.error {
        return Err(PreinitError::Snapshot(error));
    }
    Ok((compile(engine, cache, snapshot).await?, info))
}

/// Compiles off the async workers, through the disk cache (keyed by the digest of these bytes:
/// the instrumented component, or the snapshot).
async fn compile(
    engine: &Engine,
    cache: Option<Arc<CompileCache>>,
    bytes: Vec<u8>,
) -> Result<Component, PreinitError> {
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || {
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        super::compile_cache::compile(&engine, cache.as_deref(), &digest, &bytes)
    })
    .await
    .map_err(|error| PreinitError::Compile(error.to_string()))?
    .map_err(|error| PreinitError::Compile(format!("{error:#}")))
}

/// Wizer reads the initialised instance through functions its instrumentation exported. Its
/// interface cannot return errors, so the first one is kept here and the snapshot is refused.
struct InstanceState<'a> {
    store: &'a mut Store<HostState>,
    instance: Instance,
    error: Option<String>,
}

impl InstanceState<'_> {
    async fn call<R: Lift + Send + Sync + 'static, V: Default>(
        &mut self,
        interface: &str,
        func: &str,
        take: impl FnOnce(&Store<HostState>, R) -> V,
    ) -> V {
        match self.try_call::<R>(interface, func).await {
            Ok(value) => take(self.store, value),
            Err(error) => {
                self.error
                    .get_or_insert_with(|| format!("{interface}#{func}: {error:#}"));
                V::default()
            }
        }
    }

    async fn try_call<R: Lift + Send + Sync + 'static>(
        &mut self,
        interface: &str,
        func: &str,
    ) -> wasmtime::Result<R> {
        let (_, exported) = self
            .instance
            .get_export(&mut *self.store, None, interface)
            .ok_or_else(|| wasmtime::format_err!("no such export"))?;
        let (_, index) = self
            .instance
            .get_export(&mut *self.store, Some(&exported), func)
            .ok_or_else(|| wasmtime::format_err!("no such function"))?;
        let typed = self
            .instance
            .get_typed_func::<(), (R,)>(&mut *self.store, index)?;
        Ok(typed.call_async(&mut *self.store, ()).await?.0)
    }
}

impl ComponentInstanceState for InstanceState<'_> {
    async fn call_func_ret_list_u8(
        &mut self,
        instance: &str,
        func: &str,
        contents: impl FnOnce(&[u8]) + Send,
    ) {
        let mut contents = Some(contents);
        self.call(instance, func, |store, list: WasmList<u8>| {
            if let Some(contents) = contents.take() {
                contents(list.as_le_slice(store));
            }
        })
        .await;
        // On a failed call (recorded, and the snapshot refused) Wizer still expects its bytes.
        if let Some(contents) = contents.take() {
            contents(&[]);
        }
    }

    async fn call_func_ret_s32(&mut self, instance: &str, func: &str) -> i32 {
        self.call(instance, func, |_, value: i32| value).await
    }

    async fn call_func_ret_s64(&mut self, instance: &str, func: &str) -> i64 {
        self.call(instance, func, |_, value: i64| value).await
    }

    async fn call_func_ret_f32(&mut self, instance: &str, func: &str) -> u32 {
        self.call(instance, func, |_, value: f32| value.to_bits())
            .await
    }

    async fn call_func_ret_f64(&mut self, instance: &str, func: &str) -> u64 {
        self.call(instance, func, |_, value: f64| value.to_bits())
            .await
    }
}
