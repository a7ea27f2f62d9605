//! The wasmtime engine shared by every plugin generation: component model, async calls, the
//! pooling allocator, epoch interruption for time limits, and the on-disk compilation cache.

use std::path::Path;
use std::time::Duration;

use wasmtime::{
    Cache, CacheConfig, Config, Enabled, Engine, InstanceAllocationStrategy,
    PoolingAllocationConfig,
};

/// The largest linear memory any plugin may be given; `memory_limit` above it is refused.
pub const MEMORY_CAP: u64 = 128 * 1024 * 1024;
/// How often the epoch advances: the granularity of time limits.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Instances that may exist at once, over every plugin and transaction: every SMTP session
/// holds one per plugin, and messages on their way to delivery keep theirs (up to a quarter of
/// the pool). With 1000 instances a chain of five plugins ran out at 190 concurrent sessions
/// (new sessions got 451 4.3.0), far below the default `max_sessions` of 1000; 8000 covers
/// that default with six plugins. Slots are address space until used: 8000 reserve about 1 TiB
/// of virtual memory (memories are reserved up to `MEMORY_CAP` each) and cost no resident
/// memory until an instance touches its pages.
pub const POOL_INSTANCES: u32 = 8000;

/// Freed slots kept warm before the pool reuses them. Tables and fiber stacks have no module
/// affinity: while fewer than this many freed ones wait, wasmtime takes a never-used slot, and
/// beyond it the least recently freed one. A large number (it was 4000) therefore made every
/// transaction's tables and stack ones last touched thousands of allocations earlier, cold in
/// every cache; with 100 they are recent. Memories prefer the most recently freed slot of the
/// same module either way.
const WARM_SLOTS: u32 = 100;

pub fn new_engine(cache_dir: &Path) -> anyhow::Result<Engine> {
    new_engine_with_pool(cache_dir, POOL_INSTANCES)
}

/// [`new_engine`] with room for `instances` instances at once. Tools that cannot map the full
/// pool's terabyte of address space use a smaller one: `valgrind`, which counts the
/// instructions of a message's plugin work in `bench/instructions.sh`, refuses it.
pub fn new_engine_with_pool(cache_dir: &Path, instances: u32) -> anyhow::Result<Engine> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    // For profiling plugins under load: `perf` then names the plugins' compiled functions
    // (written to /tmp/perf-PID.map). See docs/benchmarks.md.
    if std::env::var_os("SWITCHYARD_PLUGIN_PERFMAP").is_some() {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    let mut pooling = PoolingAllocationConfig::default();
    pooling
        .total_component_instances(instances)
        .total_core_instances(instances * 4)
        .total_memories(instances)
        .total_tables(instances * 2)
        .total_stacks(instances)
        .max_memory_size(MEMORY_CAP as usize)
        // Reusing a slot resets its first pages with memset instead of returning them to the
        // kernel: instantiation per transaction stays in the microseconds. With PAGEMAP_SCAN
        // (Linux 6.7+; ignored elsewhere) only the pages the instance dirtied are reset, not the
        // whole window, which under load is most of the cost of a short-lived instance.
        .linear_memory_keep_resident(1024 * 1024)
        .pagemap_scan(Enabled::Auto)
        .table_keep_resident(64 * 1024)
        .async_stack_keep_resident(64 * 1024)
        // Slot resets are not batched (`decommit_batch_size` stays 1): with the resident windows
        // above a reset gives nothing back to the kernel, yet every queued reset counted towards
        // a batch, kept its slot out of use until the flush and cost a shared lock and a
        // `process_madvise` call per flush.
        .max_unused_warm_slots(WARM_SLOTS);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
    config.memory_reservation(MEMORY_CAP);
    config.memory_guard_size(64 * 1024);
    config.memory_reservation_for_growth(0);
    std::fs::create_dir_all(cache_dir)?;
    // wasmtime's cache wants an absolute directory.
    let cache_dir = std::path::absolute(cache_dir)?;
    let mut cache = CacheConfig::new();
    cache.with_directory(cache_dir);
    config.cache(Some(
        Cache::new(cache).map_err(|e| anyhow::anyhow!("plugin cache: {e}"))?,
    ));
    let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("plugin engine: {e}"))?;
    start_epoch_ticker(&engine)?;
    Ok(engine)
}

/// Advances the engine's epoch every tick until the engine is gone.
fn start_epoch_ticker(engine: &Engine) -> std::io::Result<()> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("plugin-epoch".to_string())
        .spawn(move || loop {
            std::thread::sleep(EPOCH_TICK);
            match weak.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => return,
            }
        })
        .map(|_| ())
}
