//! The host's cost of one hook call for a trivial hook, instantiation included (a new transaction's
//! first call), and of a further call on the same instance.
//!
//!     ./scripts/build-plugins && cargo bench --bench hook_call
//!
//! Uses `plugins/noop` (every hook answers "continue"). Prints median, p90 and p99 in µs.
//! `HOOK_CALL_PAGEMAP_SCAN=1` runs it with the pool's PAGEMAP_SCAN on, which the server leaves off.
//! `HOOK_CALL_TRACE=1` runs every message with the decision trace on: its calls noted, its three
//! records (smtp, route, delivery) taken and turned into the JSON the store keeps, as the server
//! does before a record is written (the write itself is not in it).
//!
//! The last line is one message's whole plugin work with a chain of five noop plugins, as
//! `bench/relay-plugins.sh` runs it under SMTP load: five instances, the session hooks (connect,
//! helo, mail-from, rcpt-to, data with a relayed message's headers), the delivery hooks (route,
//! delivery-result) and the teardown. It has none of that script's noise, so it is the number to
//! watch when changing the plugin runtime. The line after it keeps 200 messages' instances alive
//! at once, as a loaded server does, which makes every message's pool slots and stacks cold.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use std::sync::Arc;
use switchyard::config::{FailurePolicy, PluginManifest};

use switchyard::plugins::bindings::types::{DeliveryReport, DeliveryStatus, MessageFacts};
use switchyard::plugins::facts::{Auth, Envelope};
use switchyard::plugins::host::{BodyHandle, SessionFacts};
use switchyard::plugins::{engine, PluginManager, PluginRun, PluginServices, RunContext};

const ITERATIONS: usize = 20_000;
/// Messages whose plugin instances are alive at once in the loaded variant of the last line.
const IN_FLIGHT: usize = 200;

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
        let manifest = |name: &str| PluginManifest {
            name: name.to_string(),
            path: plugin.clone(),
            grants: Vec::new(),
            time_limit: Duration::from_millis(100),
            memory_limit: 32 * 1024 * 1024,
            failure_policy: FailurePolicy::Tempfail,
            config: Default::default(),
            preinitialize: true,
            sha256: None,
            breaker: Default::default(),
            shadow: None,
            canary: None,
        };
        // `HOOK_CALL_MESSAGES=N`: only N messages through five plugins, untimed, for
        // `bench/instructions.sh`, which counts their instructions under valgrind: a count that
        // does not depend on what else the machine is doing. Valgrind cannot map the full pool.
        let counted: Option<usize> = match std::env::var("HOOK_CALL_MESSAGES") {
            Ok(count) => Some(count.parse()?),
            Err(_) => None,
        };
        // `HOOK_CALL_PAGEMAP_SCAN=1`: the pool as it was before the server turned PAGEMAP_SCAN
        // off, to measure what that costs (docs/benchmarks.md).
        let pagemap_scan = std::env::var_os("HOOK_CALL_PAGEMAP_SCAN").is_some();
        switchyard::plugins::trace::set_tracing(std::env::var_os("HOOK_CALL_TRACE").is_some());
        let tuning = engine::PoolTuning {
            instances: match counted {
                Some(_) => 100,
                None => engine::POOL_INSTANCES,
            },
            pagemap_scan,
        };
        let engine = engine::new_engine_with(tuning)?;
        let session = Arc::new(SessionFacts {
            client_ip: "192.0.2.1".to_string(),
            listener: "bench".to_string(),
            submission: false,
            helo: Some("client.example".to_string()),
            tls: false,
            auth_identity: None,
            tenant: String::new(),
        });
        if let Some(count) = counted {
            let five: Vec<_> = (1..=5).map(|n| manifest(&format!("noop-{n}"))).collect();
            let chain = PluginManager::start(engine, &five, &[], PluginServices::default()).await?;
            let message = Message::new();
            // One message first, so that lazy one-time set-up is outside the count.
            drop(message.run_through(&chain, &session).await);
            for _ in 0..count {
                drop(message.run_through(&chain, &session).await);
            }
            return Ok(());
        }
        let manager = PluginManager::start(
            engine.clone(),
            &[manifest("noop")],
            &[],
            PluginServices::default(),
        )
        .await?;
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

        let five: Vec<_> = (1..=5).map(|n| manifest(&format!("noop-{n}"))).collect();
        let chain = PluginManager::start(engine, &five, &[], PluginServices::default()).await?;
        let message = Message::new();
        for _ in 0..1000 {
            drop(message.run_through(&chain, &session).await);
        }
        let mut messages = Vec::with_capacity(ITERATIONS / 4);
        for _ in 0..ITERATIONS / 4 {
            let started = Instant::now();
            drop(message.run_through(&chain, &session).await);
            messages.push(started.elapsed());
        }
        report("one message through five plugins", messages);

        // The same with IN_FLIGHT messages' instances alive at once, as in a loaded server
        // (sessions under way, messages waiting for delivery): each message's instances are
        // dropped IN_FLIGHT messages later, so the pool's slots and fiber stacks rotate.
        let mut in_flight = VecDeque::with_capacity(IN_FLIGHT + 1);
        let mut loaded = Vec::with_capacity(ITERATIONS / 4);
        for round in 0..IN_FLIGHT + ITERATIONS / 4 {
            let started = Instant::now();
            in_flight.push_back(message.run_through(&chain, &session).await);
            if in_flight.len() > IN_FLIGHT {
                drop(in_flight.pop_front());
            }
            if round >= IN_FLIGHT {
                loaded.push(started.elapsed());
            }
        }
        report(&format!("the same, {IN_FLIGHT} messages in flight"), loaded);
        Ok(())
    })
}

/// A 1 KiB message with the header fields of one smtp-source sends, as Switchyard queues it.
fn relayed_message() -> Vec<u8> {
    let mut message = concat!(
        "Received: from client.example ([192.0.2.1]) by switchyard.bench.test with ESMTP id\r\n",
        "\t01JBENCHMESSAGE0000000000; Wed, 25 Nov 2026 23:00:00 +0000\r\n",
        "From: <bench@source.test>\r\n",
        "To: <sink@sink.test>\r\n",
        "Date: Wed, 25 Nov 2026 23:00:00 +0000\r\n",
        "Message-Id: <20261125230000.1@source.test>\r\n",
        "\r\n",
    )
    .as_bytes()
    .to_vec();
    message.resize(1024 - 2, b'x');
    message.extend_from_slice(b"\r\n");
    message
}

/// What the hooks of one relayed message see (as smtp-source sends it).
struct Message {
    envelope: Envelope,
    auth: Auth,
    content: Bytes,
    facts: MessageFacts,
    report: DeliveryReport,
}

impl Message {
    fn new() -> Message {
        let facts = MessageFacts {
            id: "01JBENCHMESSAGE0000000000".to_string(),
            sender: "bench@source.test".to_string(),
            size: 1024,
            tenant: String::new(),
        };
        Message {
            envelope: Envelope {
                sender: "bench@source.test".to_string(),
                recipients: vec!["sink@sink.test".to_string()],
            },
            auth: Auth {
                spf: "none".to_string(),
                dkim: "none".to_string(),
                dmarc: "none".to_string(),
            },
            content: Bytes::from(relayed_message()),
            report: DeliveryReport {
                message: facts.clone(),
                recipient: "sink@sink.test".to_string(),
                status: DeliveryStatus::Delivered,
                relay: "127.0.0.1:2700".to_string(),
                reply: "250 2.0.0 Ok: queued".to_string(),
                attempt: 1,
            },
            facts,
        }
    }

    /// One message's hooks; returns its run, whose drop is the instances' teardown.
    async fn run_through(&self, chain: &PluginManager, session: &Arc<SessionFacts>) -> PluginRun {
        let mut run = chain.run(RunContext::default());
        run.connect(session).await;
        run.helo(session, "client.example").await;
        run.mail_from(session, &self.envelope.sender, &[]).await;
        run.rcpt_to(session, &self.envelope, "sink@sink.test", &[])
            .await;
        // A new message each time: its header fields are parsed only if a plugin asks.
        let body = BodyHandle::new(self.content.clone());
        run.data(session, &self.envelope, &self.auth, &body).await;
        keep_trace(&mut run, "smtp");
        run.route(&self.facts, "sink@sink.test").await;
        keep_trace(&mut run, "route");
        run.delivery_result(&self.report).await;
        keep_trace(&mut run, "delivery");
        run
    }
}

/// With the trace on, takes the record of `phase` and makes the JSON a stored row holds.
fn keep_trace(run: &mut PluginRun, phase: &'static str) {
    if let Some(record) = run.take_trace(phase) {
        let body = serde_json::to_string(&(&record.plugins, &record.calls));
        std::hint::black_box(body.map(|text| text.len()).unwrap_or(0));
    }
}
