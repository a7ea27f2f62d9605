//! Plugin instances for one transaction (or one delivery job): created lazily from each plugin's
//! `InstancePre` on its first hook call, so one transaction's state never leaks into another's;
//! every call runs under the plugin's time limit (epoch interruption) and memory cap (the store's
//! limiter, with a budget per plugin), and a failure is counted, logged with the plugin's name and
//! reported as a [`PluginFailure`].
//!
//! A run's instances share one store: one store, one fiber stack and one store teardown per
//! transaction instead of one per plugin (`docs/benchmarks.md` has what that saves). The
//! instances stay apart as separate component instances do (own memories, tables
//! and handle tables, and a memory budget per plugin). A plugin that fails is not asked again in
//! the same run: its failure policy answers for it (as Postfix skips a failed milter for the
//! rest of the session). Since wasmtime enters no instance of a store in which one trapped, the
//! run then moves to a fresh store (see [`PluginRun::replace_store`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use wasmtime::Store;

use super::breaker::{Admission, Transition};
use super::hooks::{HookKind, HookSet, Hooks};
use super::host::{CpuPlace, HostState, PluginState};
use super::plugin::LoadedPlugin;
use super::store::{arm, new_store, RunContext};
use super::{PluginServices, PluginSet};
use crate::config::FailurePolicy;

/// How a plugin call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    Timeout,
    OutOfMemory,
    Trap,
    Init,
    /// Not called: its circuit is open (see [`super::breaker`]).
    CircuitOpen,
}

#[derive(Debug, Clone)]
pub struct PluginFailure {
    pub plugin: Arc<str>,
    pub kind: FailureKind,
    pub message: String,
    pub policy: FailurePolicy,
}

/// The instances of one generation's plugins for one transaction.
pub struct PluginRun {
    pub(super) set: Arc<PluginSet>,
    /// Created on the first call: a run whose plugins are never called (a delivery without
    /// delivery hooks) costs no store.
    store: Option<Store<HostState>>,
    /// Each plugin's instance, once created.
    hooks: Vec<Option<Hooks>>,
    /// Each plugin's failure in this run, if it failed: it answers every later call.
    failures: Vec<Option<PluginFailure>>,
    pub(super) context: RunContext,
    /// The calls noted for the decision trace, when tracing is on (see [`super::trace`]).
    pub(super) trace: Option<Box<super::calls::RunTrace>>,
    /// The run of the global chain's shadow candidates (see [`PluginRun::shadow_of`]), made on
    /// the first call of a plugin that has one.
    pub(super) shadow: Option<Box<PluginRun>>,
    /// Present while the run is held for its message's delivery stages (see
    /// [`super::PluginManager::hold`]): the run's share of the bound on held instances.
    pub(super) hold: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The permits a transaction of a tenant holds from the tenant's share of the instance pool
    /// (see [`PluginRun::enter_tenant`]).
    pub(super) tenant_share: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The transaction's canary draw (see [`super::canary`]), when it has one: a tenant's
    /// chain, entered later, takes its canaries by the same draw.
    pub(super) draw: Option<u16>,
    /// The transaction's recording, when `[record]` samples it (see [`super::record`]).
    pub(super) recorder: Option<Box<super::record::Recorder>>,
}

/// A tenant's transactions already hold its whole share of the instance pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShareExhausted {
    pub share: usize,
}

impl PluginRun {
    pub fn new(set: Arc<PluginSet>, context: RunContext) -> PluginRun {
        PluginRun {
            hooks: set.plugins.iter().map(|_| None).collect(),
            failures: set.plugins.iter().map(|_| None).collect(),
            set,
            store: None,
            context,
            trace: PluginRun::new_trace(),
            shadow: None,
            hold: None,
            tenant_share: None,
            draw: None,
            recorder: None,
        }
    }

    /// The tenant whose chain the run follows (`""`: the global chain alone).
    pub fn tenant(&self) -> &str {
        &self.set.tenant
    }

    /// Extends a run of the global chain with a tenant's chain (`set`, the tenant's set), once
    /// the transaction's tenant is known: the global plugins keep their instances and bags, the
    /// tenant's plugins follow them in the chain. Takes the tenant's share of the instance pool
    /// for the rest of the run; `Err` when the tenant's other transactions hold all of it.
    /// A run already in another tenant leaves it first (see [`PluginRun::leave_tenant`]).
    pub fn enter_tenant(&mut self, set: &Arc<PluginSet>) -> Result<(), ShareExhausted> {
        if *self.set.tenant == *set.tenant {
            return Ok(());
        }
        let set = &match self.draw {
            Some(draw) => set.for_draw(draw),
            None => set.clone(),
        };
        self.leave_tenant();
        if set.tenant.is_empty() {
            return Ok(());
        }
        let wanted = set.tenant_plugins().len();
        if let (Some(share), true) = (&set.share, wanted > 0) {
            let permits = u32::try_from(wanted).unwrap_or(u32::MAX);
            match share.clone().try_acquire_many_owned(permits) {
                Ok(permit) => self.tenant_share = Some(permit),
                Err(_) => {
                    metrics::counter!(
                        "switchyard_tenant_limited_total",
                        "tenant" => set.tenant.to_string(),
                        "limit" => "plugin_instances",
                    )
                    .increment(1);
                    return Err(ShareExhausted {
                        share: share.available_permits(),
                    });
                }
            }
        }
        let global_len = self.set.global_len;
        let same_global = set.global_len == global_len
            && self.set.plugins[..global_len]
                .iter()
                .zip(&set.plugins[..global_len])
                .all(|(ours, theirs)| Arc::ptr_eq(ours, theirs));
        let combined = if same_global {
            set.clone()
        } else {
            // The global chain was reloaded since the transaction began: the transaction keeps
            // its global generation, followed by the tenant's chain.
            let mut plugins = self.set.plugins.clone();
            plugins.extend(set.tenant_plugins().iter().cloned());
            Arc::new(PluginSet {
                generation: self.set.generation,
                tenant: set.tenant.clone(),
                tenant_generation: set.tenant_generation,
                engine: self.set.engine.clone(),
                plugins,
                global_len,
                services: self.set.services.clone(),
                share: set.share.clone(),
                calls: set.calls.clone(),
            })
        };
        self.record(
            || super::record::Input::EnterTenant {
                tenant: combined.tenant.to_string(),
            },
            String::new,
        );
        self.context.tenant = combined.tenant.to_string();
        if let Some(store) = &mut self.store {
            let state = store.data_mut();
            state.tenant = combined.tenant.to_string();
            state.plugins.extend(
                combined
                    .tenant_plugins()
                    .iter()
                    .map(|plugin| PluginState::of(plugin)),
            );
        }
        self.hooks.resize_with(combined.plugins.len(), || None);
        self.failures.resize_with(combined.plugins.len(), || None);
        self.set = combined;
        Ok(())
    }

    /// Goes back to the global chain alone (the first recipient, which chose the tenant, was
    /// refused): the tenant's instances are never called again, and its share is given back.
    pub fn leave_tenant(&mut self) {
        if self.set.tenant.is_empty() {
            return;
        }
        self.record(|| super::record::Input::LeaveTenant, String::new);
        let global_len = self.set.global_len;
        // The tenant's instances (and their memory) live in the store until it is dropped: if
        // any was made, the run moves to a fresh store, so a client that keeps choosing and
        // refusing a tenant cannot pile them up.
        let instantiated = self.hooks[global_len..]
            .iter()
            .zip(&self.failures[global_len..])
            .any(|(hooks, failure)| hooks.is_some() || failure.is_some());
        self.set = Arc::new(PluginSet {
            generation: self.set.generation,
            tenant: Arc::from(""),
            tenant_generation: 0,
            engine: self.set.engine.clone(),
            plugins: self.set.plugins[..global_len].to_vec(),
            global_len,
            services: self.set.services.clone(),
            share: None,
            calls: None,
        });
        self.hooks.truncate(global_len);
        self.failures.truncate(global_len);
        self.tenant_share = None;
        self.context.tenant.clear();
        if let Some(store) = &mut self.store {
            let state = store.data_mut();
            state.plugins.truncate(global_len);
            state.tenant.clear();
        }
        if instantiated {
            self.replace_store();
        }
    }

    /// Ends recording for good (the run goes on to a message's delivery stages, which are not
    /// recorded): no steps kept, no lookups noted.
    pub(super) fn stop_recording(&mut self) {
        self.recorder = None;
        self.context.tape = None;
        if let Some(store) = &mut self.store {
            store.data_mut().tape = None;
        }
    }

    /// The run's store, created if it has none yet.
    fn store(&mut self) -> &mut Store<HostState> {
        let PluginRun {
            store,
            set,
            context,
            ..
        } = self;
        store.get_or_insert_with(|| {
            let plugins = set.plugins.iter().map(|plugin| &**plugin);
            new_store(&set.engine, plugins, &set.services, context)
        })
    }

    /// `held` if it is a run of `set`'s chain (generation and canaries), otherwise a fresh run on `set`: the delivery
    /// stages of a message reuse the instances of its SMTP transaction (or of its routing) when
    /// they can, and never mix generations. A reused run starts with empty bags, as a fresh one
    /// does, so what a plugin sees never depends on whether the host could reuse its instance.
    pub fn resume(set: &Arc<PluginSet>, held: Option<PluginRun>, context: RunContext) -> PluginRun {
        match held {
            Some(mut run) if run.set.same_chain(set) => {
                run.clear_bags();
                if let Some(queue_id) = &context.queue_id {
                    run.set_queue_id(queue_id);
                }
                run
            }
            _ => PluginRun::new(set.clone(), context),
        }
    }

    fn clear_bags(&mut self) {
        if let Some(store) = &mut self.store {
            for plugin in &mut store.data_mut().plugins {
                plugin.bag.clear();
            }
        }
    }

    /// True when some plugin of the run implements one of the hooks in `ahead`: only then is
    /// the run worth keeping for those stages.
    pub(super) fn needed_for(&self, ahead: &[HookKind]) -> bool {
        self.set
            .plugins
            .iter()
            .any(|plugin| ahead.iter().any(|hook| plugin.hooks.contains(*hook)))
    }

    /// How many instances the run's store holds, at most (a failed plugin's counted too: one
    /// whose `init` answered an error stays in the store until the run ends).
    pub(super) fn instance_count(&self) -> usize {
        self.hooks.iter().flatten().count() + self.failures.iter().flatten().count()
    }

    pub fn generation(&self) -> u64 {
        self.set.generation
    }

    /// The run in which plugin `index`'s shadow candidate answers the same call, if it has one
    /// that implements `hook`: a run of its own (its own store, instances and failures), whose
    /// answers are compared, traced and counted but never applied. Global plugins only.
    pub(super) fn shadow_of(&mut self, index: usize, hook: HookKind) -> Option<&mut PluginRun> {
        if index >= self.set.global_len {
            return None;
        }
        let candidate = self.set.plugins[index].shadow.as_ref()?;
        if !candidate.hooks.contains(hook) {
            return None;
        }
        if self.shadow.is_none() {
            // The global chain with each plugin that has a candidate replaced by it: the
            // indices stay the chain's, and only the candidates are ever called.
            let plugins = self.set.plugins[..self.set.global_len]
                .iter()
                .map(|plugin| plugin.shadow.clone().unwrap_or_else(|| plugin.clone()))
                .collect::<Vec<_>>();
            let set = Arc::new(PluginSet {
                tenant: Arc::from(""),
                tenant_generation: 0,
                global_len: plugins.len(),
                share: None,
                calls: None,
                ..self.set.with_plugins(plugins)
            });
            let mut run = PluginRun::new(set, self.context.clone());
            run.trace = None;
            self.shadow = Some(Box::new(run));
        }
        self.shadow.as_deref_mut()
    }

    /// The queue id of the message the run works for, once known.
    pub fn queue_id(&self) -> Option<&str> {
        self.context.queue_id.as_deref()
    }

    /// Sets the queue id that plugin log lines carry from now on.
    pub fn set_queue_id(&mut self, queue_id: &str) {
        if let Some(shadow) = &mut self.shadow {
            shadow.set_queue_id(queue_id);
        }
        self.context.queue_id = Some(queue_id.to_string());
        if let Some(store) = &mut self.store {
            store.data_mut().queue_id = Some(queue_id.to_string());
        }
    }

    /// True when some plugin of this run's generation implements `hook`.
    pub fn implements(&self, hook: HookKind) -> bool {
        self.set.implements(hook)
    }

    /// Indices of the plugins implementing `hook`, in chain order. The iterator holds its own
    /// reference to the set, so the caller may call into the run while it walks the chain (no
    /// list is built for every stage of every message).
    pub(super) fn implementing(&self, hook: HookKind) -> impl Iterator<Item = usize> {
        let set = Arc::clone(&self.set);
        (0..set.plugins.len()).filter(move |&index| set.plugins[index].hooks.contains(hook))
    }

    /// Instantiates and initialises a plugin for `validate`, returning the hooks it implements.
    pub async fn validate(
        plugin: &LoadedPlugin,
        services: &PluginServices,
        context: RunContext,
    ) -> Result<HookSet, String> {
        let mut store = new_store(plugin.pre.engine(), [plugin], services, &context);
        // The time limit covers instantiation (start functions) and `init`, as in a transaction.
        let running = arm(&mut store, plugin.manifest.time_limit);
        let instance = plugin
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|error| format!("cannot instantiate: {error:#}"))?;
        let hooks = Hooks::new(instance, plugin.indices.clone());
        drop(running);
        let _running = arm(&mut store, plugin.manifest.time_limit);
        let info = hooks
            .call_init(&mut store, &plugin.config_json)
            .await
            .map_err(|error| format!("init trapped: {error:#}"))??;
        HookSet::from_names(&info.hooks)
    }

    /// The store and plugin `index`'s instance, created (and initialised) if the run has none
    /// yet, ready for a call of that plugin; its failure if it failed earlier in the run.
    pub(super) async fn instance(
        &mut self,
        index: usize,
    ) -> Result<(&mut Store<HostState>, Hooks), PluginFailure> {
        if let Some(failure) = &self.failures[index] {
            return Err(failure.clone());
        }
        let plugin = &self.set.plugins[index];
        if plugin.breaker.admit(Instant::now()) == Admission::Skip {
            plugin.stats.skipped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(
                "switchyard_plugin_skipped_total",
                "plugin" => plugin.name.to_string(),
                "tenant" => plugin.owner.to_string(),
            )
            .increment(1);
            return Err(PluginFailure {
                plugin: plugin.name.clone(),
                kind: FailureKind::CircuitOpen,
                message: "its circuit is open after repeated failures".to_string(),
                policy: plugin.manifest.failure_policy,
            });
        }
        // A tenant's plugin runs within the tenant's share of the CPU: so many of its calls at
        // once, over all its transactions (a host function waiting for I/O gives its place up
        // meanwhile). The wait is the tenant's own: no deadline runs yet.
        let calls = (index >= self.set.global_len)
            .then(|| self.set.calls.clone())
            .flatten();
        let place = match &calls {
            Some(calls) => calls.clone().acquire_owned().await.ok(),
            None => None,
        };
        let state = self.store().data_mut();
        state.cpu = CpuPlace {
            semaphore: calls,
            permit: place,
        };
        state.current = index;
        let hooks = match &self.hooks[index] {
            Some(hooks) => hooks.clone(),
            None => {
                let plugin = self.set.plugins[index].clone();
                let store = self.store();
                let _running = arm(store, plugin.manifest.time_limit);
                let created = async {
                    let instance = plugin.pre.instantiate_async(&mut *store).await?;
                    let hooks = Hooks::new(instance, plugin.indices.clone());
                    if plugin.preinitialized {
                        return Ok((hooks, Ok(())));
                    }
                    let info = hooks.call_init(&mut *store, &plugin.config_json).await?;
                    Ok::<_, wasmtime::Error>((hooks, info.map(|_| ())))
                }
                .await;
                match created {
                    Ok((hooks, Ok(_))) => {
                        self.hooks[index] = Some(hooks.clone());
                        hooks
                    }
                    Ok((_, Err(message))) => {
                        return Err(self.failed(
                            index,
                            FailureKind::Init,
                            format!("init failed: {message}"),
                        ));
                    }
                    Err(error) => return Err(self.call_failed(index, error)),
                }
            }
        };
        Ok((self.store(), hooks))
    }

    /// Accounts for a finished call: counts it, and on failure logs it, marks the plugin failed
    /// for the rest of the run, moves the run to a fresh store and describes the failure.
    pub(super) fn finish<R>(
        &mut self,
        index: usize,
        hook: HookKind,
        started: Instant,
        result: wasmtime::Result<R>,
    ) -> Result<R, PluginFailure> {
        if let Some(store) = &mut self.store {
            store.data_mut().cpu = CpuPlace::default();
        }
        let plugin = &self.set.plugins[index];
        let stats = &plugin.stats;
        stats.calls.fetch_add(1, Ordering::Relaxed);
        stats.exported_calls.increment(1);
        stats.latency[hook.index()].record(started.elapsed().as_secs_f64());
        match result {
            Ok(value) => {
                if plugin.breaker.succeeded() == Some(Transition::Closed) {
                    circuit_changed(plugin, false);
                }
                Ok(value)
            }
            Err(error) => Err(self.call_failed(index, error)),
        }
    }

    /// A call into plugin `index` (or its instantiation) returned `error`: the failure, with
    /// the run moved to a fresh store.
    fn call_failed(&mut self, index: usize, error: wasmtime::Error) -> PluginFailure {
        let kind = classify(self.store(), &error);
        // The cause first (a trap's reason, the memory limit it hit): the wasm backtrace that
        // follows is long, and the message is cut to one bounded line.
        let cause = error.root_cause().to_string();
        let whole = format!("{error:#}");
        let message = match whole.strip_suffix(cause.as_str()) {
            Some(context) if !cause.is_empty() => format!("{cause}; {context}"),
            _ => whole,
        };
        let failure = self.failed(index, kind, message);
        self.replace_store();
        failure
    }

    /// Moves the run to a fresh store after a failed call. Wasmtime enters no instance of a
    /// store in which one has trapped, so the other plugins of the chain go on in new instances
    /// (created on their next call) in a new store; their bags move with them, and the old store
    /// and its memories (an overrun one too) are freed now rather than when the run ends.
    fn replace_store(&mut self) {
        let mut old = self.store.take();
        let fresh = self.store();
        if let Some(old) = &mut old {
            let moved = old.data_mut().plugins.iter_mut();
            for (plugin, old) in fresh.data_mut().plugins.iter_mut().zip(moved) {
                plugin.bag = std::mem::take(&mut old.bag);
            }
        }
        for hooks in &mut self.hooks {
            *hooks = None;
        }
    }

    fn failed(&mut self, index: usize, kind: FailureKind, message: String) -> PluginFailure {
        let plugin = self.set.plugins[index].clone();
        plugin.stats.failures.fetch_add(1, Ordering::Relaxed);
        if plugin.breaker.failed(Instant::now()) == Some(Transition::Opened) {
            circuit_changed(&plugin, true);
        }
        metrics::counter!(
            "switchyard_plugin_failures_total",
            "plugin" => plugin.name.to_string(),
            "tenant" => plugin.owner.to_string(),
            "kind" => format!("{kind:?}"),
        )
        .increment(1);
        match kind {
            FailureKind::Timeout => plugin.stats.timeouts.fetch_add(1, Ordering::Relaxed),
            FailureKind::OutOfMemory => plugin.stats.out_of_memory.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        // Wasm backtraces span many lines: one line, bounded, for the log and the operator.
        let mut message = message.split_whitespace().collect::<Vec<_>>().join(" ");
        if message.len() > 400 {
            let cut = (0..=400)
                .rev()
                .find(|&at| message.is_char_boundary(at))
                .unwrap_or(0);
            message.truncate(cut);
            message.push_str("...");
        }
        tracing::error!(
            plugin = %plugin.name,
            tenant = %self.context.tenant,
            kind = ?kind,
            policy = ?plugin.manifest.failure_policy,
            queue_id = self.context.queue_id.as_deref().unwrap_or("-"),
            "plugin failed: {message}"
        );
        let failure = PluginFailure {
            plugin: plugin.name.clone(),
            kind,
            message,
            policy: plugin.manifest.failure_policy,
        };
        // The instance may be mid-call, out of memory or poisoned by its trap: never entered
        // again in this run.
        self.hooks[index] = None;
        self.failures[index] = Some(failure.clone());
        failure
    }
}

/// Reports a plugin's circuit opening or closing, in the log and the metrics.
fn circuit_changed(plugin: &LoadedPlugin, open: bool) {
    metrics::gauge!(
        "switchyard_plugin_circuit_open",
        "plugin" => plugin.name.to_string(),
        "tenant" => plugin.owner.to_string(),
    )
    .set(if open { 1.0 } else { 0.0 });
    let config = plugin.breaker.config();
    if open {
        metrics::counter!(
            "switchyard_plugin_circuit_trips_total",
            "plugin" => plugin.name.to_string(),
            "tenant" => plugin.owner.to_string(),
        )
        .increment(1);
        tracing::warn!(
            plugin = %plugin.name,
            tenant = %plugin.owner,
            failures = config.failures,
            window = ?config.window,
            cooldown = ?config.cooldown,
            policy = ?plugin.manifest.failure_policy,
            "plugin circuit opened: the plugin is skipped, its failure policy answers, until the cool-down ends"
        );
    } else {
        tracing::info!(plugin = %plugin.name, tenant = %plugin.owner, "plugin circuit closed: the plugin is called again");
    }
}

/// Tells a timeout and an out-of-memory from other traps.
fn classify(store: &Store<HostState>, error: &wasmtime::Error) -> FailureKind {
    let text = format!("{error:#}");
    if Instant::now() >= store.data().deadline || text.contains("time limit exceeded") {
        FailureKind::Timeout
    } else if text.contains("memory")
        && (text.contains("grow") || text.contains("limit") || text.contains("out of"))
    {
        FailureKind::OutOfMemory
    } else {
        FailureKind::Trap
    }
}
