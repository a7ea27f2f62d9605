//! A run's store: the host state of every plugin of the chain, the memory limiter, and the epoch
//! deadline that bounds each call.

use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{Engine, Store, UpdateDeadline};

use super::host::{HostState, PluginState};
use super::plugin::LoadedPlugin;
use super::PluginServices;

/// Facts every instance of a run shares.
#[derive(Debug, Clone, Default)]
pub struct RunContext {
    pub tenant: String,
    pub queue_id: Option<String>,
    /// The lookups recorded for a recording, or answered from one on replay (see
    /// [`super::record`]).
    pub tape: Option<super::record::SharedTape>,
}

/// A store for instances of `plugins`, the run's chain in order (one plugin when loading).
pub(super) fn new_store<'a>(
    engine: &Engine,
    plugins: impl IntoIterator<Item = &'a LoadedPlugin>,
    services: &PluginServices,
    context: &RunContext,
) -> Store<HostState> {
    let state = HostState {
        wasi: None,
        wasi_stopped: None,
        table: ResourceTable::new(),
        plugins: plugins.into_iter().map(PluginState::of).collect(),
        current: 0,
        // Set by `arm` before anything runs in the store.
        deadline: Instant::now(),
        tenant: context.tenant.clone(),
        queue_id: context.queue_id.clone(),
        kv: services.kv.clone(),
        resolver: services.resolver.clone(),
        tape: context.tape.clone(),
        cpu: super::host::CpuPlace::default(),
    };
    let mut store = Store::new(engine, state);
    store.limiter(|state| state);
    // Each epoch tick: past the deadline, interrupt; otherwise yield to tokio so a busy plugin
    // never holds a worker thread for long.
    store.epoch_deadline_callback(|context| {
        if Instant::now() >= context.data().deadline {
            Err(wasmtime::format_err!("time limit exceeded"))
        } else {
            Ok(UpdateDeadline::Yield(1))
        }
    });
    store
}

/// Starts the clock for one call. The call is counted as running (the epoch ticks every
/// millisecond) until the returned guard is dropped: keep it for the whole call.
pub(super) fn arm(store: &mut Store<HostState>, limit: Duration) -> super::engine::CallRunning {
    store.data_mut().deadline = Instant::now() + limit;
    store.set_epoch_deadline(1);
    super::engine::CallRunning::start()
}
