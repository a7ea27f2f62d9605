//! Plugin instances for one transaction (or one delivery job): created lazily from each plugin's
//! `InstancePre` on its first hook call, so one transaction's state never leaks into another's;
//! every call runs under the plugin's time limit (epoch interruption) and memory cap (store
//! limiter), and a failure is counted, logged with the plugin's name and reported as a
//! [`PluginFailure`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{Store, UpdateDeadline};

use super::exports::Hooks;
use super::hooks::{HookKind, HookSet};
use super::host::HostState;
use super::limits::MemoryBudget;
use super::loader::LoadedPlugin;
use super::{PluginServices, PluginSet};
use crate::config::FailurePolicy;

/// Facts every instance of a run shares.
#[derive(Debug, Clone, Default)]
pub struct RunContext {
    pub tenant: String,
    pub queue_id: Option<String>,
}

/// How a plugin call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    Timeout,
    OutOfMemory,
    Trap,
    Init,
}

#[derive(Debug, Clone)]
pub struct PluginFailure {
    pub plugin: Arc<str>,
    pub kind: FailureKind,
    pub message: String,
    pub policy: FailurePolicy,
}

pub(super) struct Instance {
    pub store: Store<HostState>,
    pub hooks: Hooks,
}

/// The instances of one generation's plugins for one transaction.
pub struct PluginRun {
    pub(super) set: Arc<PluginSet>,
    pub(super) instances: Vec<Option<Instance>>,
    context: RunContext,
    /// Present while the run is held for its message's delivery stages (see
    /// [`super::PluginManager::hold`]): the run's share of the bound on held instances.
    pub(super) hold: Option<tokio::sync::OwnedSemaphorePermit>,
}

pub(super) fn new_store(
    plugin: &LoadedPlugin,
    services: &PluginServices,
    context: &RunContext,
) -> Store<HostState> {
    let limit = plugin.manifest.memory_limit as usize;
    let state = HostState {
        wasi: None,
        table: ResourceTable::new(),
        limits: MemoryBudget::new(limit),
        deadline: Instant::now() + plugin.manifest.time_limit,
        plugin: plugin.name.clone(),
        tenant: context.tenant.clone(),
        queue_id: context.queue_id.clone(),
        bag: Default::default(),
        kv: services.kv.clone(),
        resolver: services.resolver.clone(),
    };
    let mut store = Store::new(plugin.pre.engine(), state);
    store.limiter(|state| &mut state.limits);
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

/// Starts the clock for one call.
pub(super) fn arm(store: &mut Store<HostState>, limit: Duration) {
    store.data_mut().deadline = Instant::now() + limit;
    store.set_epoch_deadline(1);
}

impl PluginRun {
    pub fn new(set: Arc<PluginSet>, context: RunContext) -> PluginRun {
        let instances = set.plugins.iter().map(|_| None).collect();
        PluginRun {
            set,
            instances,
            context,
            hold: None,
        }
    }

    /// `held` if it is a run of `set`'s generation, otherwise a fresh run on `set`: the delivery
    /// stages of a message reuse the instances of its SMTP transaction (or of its routing) when
    /// they can, and never mix generations. A reused run starts with empty bags, as a fresh one
    /// does, so what a plugin sees never depends on whether the host could reuse its instance.
    pub fn resume(set: &Arc<PluginSet>, held: Option<PluginRun>, context: RunContext) -> PluginRun {
        match held {
            Some(mut run) if Arc::ptr_eq(&run.set, set) => {
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
        for instance in self.instances.iter_mut().flatten() {
            instance.store.data_mut().bag.clear();
        }
    }

    /// Drops the instances of plugins that implement none of the hooks in `ahead` and returns
    /// how many plugins implement one of them: what a run held for those stages may keep.
    pub(super) fn keep_instances_for(&mut self, ahead: &[HookKind]) -> usize {
        let mut kept = 0;
        for (plugin, instance) in self.set.plugins.iter().zip(self.instances.iter_mut()) {
            if ahead.iter().any(|hook| plugin.hooks.contains(*hook)) {
                kept += 1;
            } else {
                *instance = None;
            }
        }
        kept
    }

    pub fn generation(&self) -> u64 {
        self.set.generation
    }

    /// Sets the queue id that plugin log lines carry from now on.
    pub fn set_queue_id(&mut self, queue_id: &str) {
        self.context.queue_id = Some(queue_id.to_string());
        for instance in self.instances.iter_mut().flatten() {
            instance.store.data_mut().queue_id = Some(queue_id.to_string());
        }
    }

    /// True when some plugin of this run's generation implements `hook`.
    pub fn implements(&self, hook: HookKind) -> bool {
        self.set.implements(hook)
    }

    /// Indices of the plugins implementing `hook`, in chain order.
    pub(super) fn implementing(&self, hook: HookKind) -> Vec<usize> {
        (0..self.set.plugins.len())
            .filter(|&index| self.set.plugins[index].hooks.contains(hook))
            .collect()
    }

    /// Instantiates and initialises a plugin for `validate`, returning the hooks it implements.
    pub async fn validate(
        plugin: &LoadedPlugin,
        services: &PluginServices,
        context: RunContext,
    ) -> Result<HookSet, String> {
        let mut store = new_store(plugin, services, &context);
        let instance = plugin
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|error| format!("cannot instantiate: {error:#}"))?;
        let hooks = Hooks::new(instance, plugin.indices.clone());
        arm(&mut store, plugin.manifest.time_limit);
        let info = hooks
            .call_init(&mut store, &plugin.config_json)
            .await
            .map_err(|error| format!("init trapped: {error:#}"))??;
        let mut hooks = HookSet::default();
        for name in &info.hooks {
            match HookKind::from_name(name) {
                Some(hook) => hooks.insert(hook),
                None => return Err(format!("init lists unknown hook `{name}`")),
            }
        }
        Ok(hooks)
    }

    /// The instance of plugin `index`, created and initialised if this run has none yet.
    pub(super) async fn instance(&mut self, index: usize) -> Result<&mut Instance, PluginFailure> {
        if self.instances[index].is_none() {
            let plugin = self.set.plugins[index].clone();
            let mut store = new_store(&plugin, &self.set.services, &self.context);
            arm(&mut store, plugin.manifest.time_limit);
            let created = async {
                let instance = plugin.pre.instantiate_async(&mut store).await?;
                let hooks = Hooks::new(instance, plugin.indices.clone());
                if plugin.preinitialized {
                    return Ok((hooks, Ok(())));
                }
                let info = hooks.call_init(&mut store, &plugin.config_json).await?;
                Ok::<_, wasmtime::Error>((hooks, info.map(|_| ())))
            }
            .await;
            match created {
                Ok((hooks, Ok(_))) => self.instances[index] = Some(Instance { store, hooks }),
                Ok((_, Err(message))) => {
                    return Err(self.failed(
                        index,
                        FailureKind::Init,
                        format!("init failed: {message}"),
                    ));
                }
                Err(error) => {
                    let kind = classify(&store, &error);
                    return Err(self.failed(index, kind, format!("{error:#}")));
                }
            }
        }
        self.instances[index].as_mut().ok_or_else(|| PluginFailure {
            plugin: self.set.plugins[index].name.clone(),
            kind: FailureKind::Init,
            message: "no instance".to_string(),
            policy: self.set.plugins[index].manifest.failure_policy,
        })
    }

    /// Accounts for a finished call: counts it, and on failure logs it, drops the (now unusable)
    /// instance and describes the failure.
    pub(super) fn finish<R>(
        &mut self,
        index: usize,
        result: wasmtime::Result<R>,
    ) -> Result<R, PluginFailure> {
        let plugin = self.set.plugins[index].clone();
        plugin.stats.calls.fetch_add(1, Ordering::Relaxed);
        plugin.stats.exported_calls.increment(1);
        match result {
            Ok(value) => Ok(value),
            Err(error) => {
                let kind = match &self.instances[index] {
                    Some(instance) => classify(&instance.store, &error),
                    None => FailureKind::Trap,
                };
                Err(self.failed(index, kind, format!("{error:#}")))
            }
        }
    }

    fn failed(&mut self, index: usize, kind: FailureKind, message: String) -> PluginFailure {
        let plugin = self.set.plugins[index].clone();
        plugin.stats.failures.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(
            "switchyard_plugin_failures_total",
            "plugin" => plugin.name.to_string(),
            "kind" => format!("{kind:?}"),
        )
        .increment(1);
        match kind {
            FailureKind::Timeout => plugin.stats.timeouts.fetch_add(1, Ordering::Relaxed),
            FailureKind::OutOfMemory => plugin.stats.out_of_memory.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        self.instances[index] = None;
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
            kind = ?kind,
            policy = ?plugin.manifest.failure_policy,
            queue_id = self.context.queue_id.as_deref().unwrap_or("-"),
            "plugin failed: {message}"
        );
        PluginFailure {
            plugin: plugin.name.clone(),
            kind,
            message,
            policy: plugin.manifest.failure_policy,
        }
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
