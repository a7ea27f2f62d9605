//! The host's cost of one hook call for a trivial hook, instantiation included (a new transaction's
//! first call), and of a further call on the same instance.
//!
//!     ./scripts/build-plugins && cargo bench --bench hook_call
//!
//! Uses `plugins/noop` (every hook answers "continue"). Prints median, p90 and p99 in µs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use switchyard::config::{FailurePolicy, PluginManifest};
use switchyard::plugins::bindings::types::Session;
use switchyard::plugins::{engine, PluginManager, PluginServices, RunContext};

const ITERATIONS: usize = 20_000;

fn percentile(sorted: &[Duration], fraction: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index].as_secs_f64() * 1e6
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name:<44} median {:>7.2} µs   p90 {:>7.2} µs   p99 {:>7.2} µs   ({} calls)",
        percentile(&samples, 0.5),
        percentile(&samples, 0.9),
        percentile(&samples, 0.99),
        samples.len()
    );
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let plugin = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/wasm32-wasip2/plugin/noop.wasm");
        anyhow::ensure!(
            plugin.is_file(),
            "{} missing: run scripts/build-plugins",
            plugin.display()
        );
        let manifest = PluginManifest {
            name: "noop".to_string(),
            path: plugin,
            grants: Vec::new(),
            time_limit: Duration::from_millis(100),
            memory_limit: 32 * 1024 * 1024,
            failure_policy: FailurePolicy::Tempfail,
            config: Default::default(),
        };
        let cache = std::env::temp_dir().join("switchyard-bench-cache");
        let engine = engine::new_engine(&cache)?;
        let manager = PluginManager::start(engine, &[manifest], PluginServices::default()).await?;
        let session = Session {
            client_ip: "192.0.2.1".to_string(),
            listener: "bench".to_string(),
            submission: false,
            helo: Some("client.example".to_string()),
            tls: false,
            auth_identity: None,
            tenant: String::new(),
        };
        // Warm up: page in the pool slots and code.
        for _ in 0..1000 {
            let mut run = manager.run(RunContext::default());
            run.connect(&session).await;
        }
        let mut first_calls = Vec::with_capacity(ITERATIONS);
        let mut next_calls = Vec::with_capacity(ITERATIONS);
        for _ in 0..ITERATIONS {
            let started = Instant::now();
            let mut run = manager.run(RunContext::default());
            run.connect(&session).await;
            first_calls.push(started.elapsed());
            let started = Instant::now();
            run.helo(&session, "client.example").await;
            next_calls.push(started.elapsed());
        }
        // The whole life of a transaction's instance, teardown included (the memory slot's
        // reset and the store's drop happen when a transaction ends).
        let mut lifecycles = Vec::with_capacity(ITERATIONS);
        for _ in 0..ITERATIONS {
            let started = Instant::now();
            let mut run = manager.run(RunContext::default());
            run.connect(&session).await;
            drop(run);
            lifecycles.push(started.elapsed());
        }
        report("new transaction: instantiate + init + hook", first_calls);
        report("same transaction: one more hook", next_calls);
        report("whole instance life: the above + teardown", lifecycles);
        Ok(())
    })
}
