//! The wasmtime engine shared by every plugin generation: component model, async calls, the
//! pooling allocator and epoch interruption for time limits. (Compilations are cached on disk by
//! [`super::compile_cache`], not by wasmtime's own cache, whose entries are not checked against
//! the digest a plugin is pinned to.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// The largest linear memory any plugin may be given; `memory_limit` above it is refused.
pub const MEMORY_CAP: u64 = 128 * 1024 * 1024;
/// How often the epoch advances while a plugin call runs: the granularity of time limits, and
/// how long a busy plugin may hold a worker thread before it yields.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);
/// How often it advances while no call runs. A call that starts then waits at most this long for
/// its first tick (the ticker is not woken for it: that would cost a wake-up per call), after
/// which ticks come every [`EPOCH_TICK`] again. A server with little mail is not woken a thousand
/// times a second (at 120 messages a second, those wake-ups were 9 % of its CPU).
pub const IDLE_TICK: Duration = Duration::from_millis(10);

/// Plugin calls running now, over every engine.
static CALLS_RUNNING: AtomicUsize = AtomicUsize::new(0);

/// One plugin call counted as running until dropped (see [`IDLE_TICK`]).
#[must_use = "the call counts as running only while this is kept"]
pub struct CallRunning(());

impl CallRunning {
    pub fn start() -> CallRunning {
        CALLS_RUNNING.fetch_add(1, Ordering::Relaxed);
        CallRunning(())
    }
}

impl Drop for CallRunning {
    fn drop(&mut self) {
        CALLS_RUNNING.fetch_sub(1, Ordering::Relaxed);
    }
}

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

/// How the instance pool is set up; the server uses [`PoolTuning::default`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolTuning {
    /// Instances at once. Tools that cannot map the full pool's terabyte of address space use
    /// fewer: `valgrind`, which counts the instructions of a message's plugin work in
    /// `bench/instructions.sh`, refuses it.
    pub instances: u32,
    /// Let wasmtime find the pages an instance dirtied with Linux's PAGEMAP_SCAN instead of
    /// wiping a fixed window. Off in the server, because wasmtime 48 can then leave a previous
    /// instance's data in a reused slot (see [`new_engine_with`]); `hook_call` turns it on only
    /// to measure what leaving it off costs.
    pub pagemap_scan: bool,
}

impl Default for PoolTuning {
    fn default() -> Self {
        PoolTuning {
            instances: POOL_INSTANCES,
            pagemap_scan: false,
        }
    }
}

pub fn new_engine() -> anyhow::Result<Engine> {
    new_engine_with(PoolTuning::default())
}

/// [`new_engine`] with another pool.
///
/// Why PAGEMAP_SCAN stays off: with it, wasmtime 48 resets only the pages the scan reports as
/// present and written, and gives back to the kernel only what lies beyond where the scan
/// stopped. A written page that is not present at that moment (swapped out, or being moved by
/// the kernel's compaction or NUMA balancing, which use the same non-present entries) is neither
/// reset nor given back, so the next instance in the slot reads the previous one's data: another
/// transaction's, and with tenants another customer's. wasmtime fixed this in 50.0.0 (PR #14357),
/// which needs a newer Rust than this project's 1.95. Without the scan, the first
/// `linear_memory_keep_resident` bytes of a slot are wiped whole and the rest is given back to
/// the kernel, whatever the pages' state. The e2e test `reused_slots_never_show_what_the_last_instance_wrote`
/// checks that every transaction starts clean (it cannot make a page absent at the right moment,
/// so it guards the wipe in general, not this case); `docs/benchmarks.md` gives what it costs.
pub fn new_engine_with(tuning: PoolTuning) -> anyhow::Result<Engine> {
    let instances = tuning.instances;
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
        // kernel: instantiation per transaction stays in the microseconds.
        .linear_memory_keep_resident(1024 * 1024)
        .pagemap_scan(if tuning.pagemap_scan {
            Enabled::Auto
        } else {
            Enabled::No
        })
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
    let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("plugin engine: {e}"))?;
    start_epoch_ticker(&engine)?;
    Ok(engine)
}

/// Advances the engine's epoch every tick until the engine is gone: every [`EPOCH_TICK`] while
/// a call runs, every [`IDLE_TICK`] while none does.
fn start_epoch_ticker(engine: &Engine) -> std::io::Result<()> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("plugin-epoch".to_string())
        .spawn(move || loop {
            let running = CALLS_RUNNING.load(Ordering::Relaxed) > 0;
            std::thread::sleep(if running { EPOCH_TICK } else { IDLE_TICK });
            match weak.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => return,
            }
        })
        .map(|_| ())
}
