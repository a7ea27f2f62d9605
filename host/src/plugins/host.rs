//! What a plugin instance's store holds, and the host functions it may call.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::{Resource, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::switchyard::plugin::{bag, clock, dns, kv, log, message, metrics, types};
use crate::plugins::kv::KvStore;
pub use crate::plugins::message::BodyHandle;

/// What a hook can learn about the SMTP session through the `session` resource.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionFacts {
    pub client_ip: String,
    pub listener: String,
    pub submission: bool,
    pub helo: Option<String>,
    pub tls: bool,
    pub auth_identity: Option<String>,
    pub tenant: String,
}

/// The `session` lent to one hook call (the host pushes it before the call and takes it back
/// after: a plugin only ever sees it borrowed).
pub struct SessionHandle(pub Arc<SessionFacts>);

/// Most bytes one `body.read` returns.
const MAX_READ: u32 = 64 * 1024;
/// Limits of the transaction bag.
const BAG_ENTRIES: usize = 64;
const BAG_ITEM: usize = 4096;

/// What the host keeps for one plugin of a run.
pub struct PluginState {
    pub name: Arc<str>,
    /// Caps the plugin's linear memories, whichever run's store they are in.
    pub limits: super::limits::MemoryBudget,
    /// The plugin's transaction bag.
    pub bag: HashMap<String, String>,
}

impl PluginState {
    pub fn new(name: Arc<str>, memory_limit: usize) -> PluginState {
        PluginState {
            name,
            limits: super::limits::MemoryBudget::new(memory_limit),
            bag: HashMap::new(),
        }
    }
}

/// The state of one run's store: one store per transaction holds the instances of every plugin
/// of the chain. Each instance still has its own memories, tables and handles (the component
/// model keeps them apart); what the host keeps per plugin is in `plugins`, and `current` says
/// whose call (or instantiation) is under way, so host functions and memory growth are
/// accounted to that plugin.
pub struct HostState {
    /// Built on the first WASI call of any plugin of the run: a pre-initialised plugin that
    /// answers its hooks without printing, reading the clock or drawing random numbers never
    /// needs one, and building it (seeding its random sources) was a noticeable cost.
    pub wasi: Option<WasiCtx>,
    pub table: ResourceTable,
    pub plugins: Vec<PluginState>,
    /// The index in `plugins` of the plugin being called.
    pub current: usize,
    /// When the current call must end.
    pub deadline: Instant,
    pub tenant: String,
    pub queue_id: Option<String>,
    pub kv: Option<Arc<dyn KvStore>>,
    pub resolver: Option<Arc<crate::net::dns::Dns>>,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            // Nothing preopened, no network, no environment: WASI gives clocks and randomness.
            ctx: self
                .wasi
                .get_or_insert_with(|| WasiCtxBuilder::new().build()),
            table: &mut self.table,
        }
    }
}

impl types::Host for HostState {}

impl HostState {
    /// The plugin being called.
    pub fn plugin(&self) -> &PluginState {
        &self.plugins[self.current]
    }

    pub fn plugin_mut(&mut self) -> &mut PluginState {
        &mut self.plugins[self.current]
    }

    /// The facts behind a lent session; a stale handle (which the component model's borrow
    /// rules should make impossible) reads as an empty session rather than trapping the host.
    fn session(&self, session: &Resource<SessionHandle>) -> Arc<SessionFacts> {
        self.table
            .get(session)
            .map(|handle| handle.0.clone())
            .unwrap_or_default()
    }
}

impl types::HostSession for HostState {
    async fn client_ip(&mut self, session: Resource<SessionHandle>) -> String {
        self.session(&session).client_ip.clone()
    }

    async fn listener(&mut self, session: Resource<SessionHandle>) -> String {
        self.session(&session).listener.clone()
    }

    async fn submission(&mut self, session: Resource<SessionHandle>) -> bool {
        self.session(&session).submission
    }

    async fn helo(&mut self, session: Resource<SessionHandle>) -> Option<String> {
        self.session(&session).helo.clone()
    }

    async fn tls(&mut self, session: Resource<SessionHandle>) -> bool {
        self.session(&session).tls
    }

    async fn auth_identity(&mut self, session: Resource<SessionHandle>) -> Option<String> {
        self.session(&session).auth_identity.clone()
    }

    async fn tenant(&mut self, session: Resource<SessionHandle>) -> String {
        self.session(&session).tenant.clone()
    }

    async fn drop(&mut self, session: Resource<SessionHandle>) -> wasmtime::Result<()> {
        self.table.delete(session)?;
        Ok(())
    }
}
impl message::Host for HostState {}

impl message::HostBody for HostState {
    async fn size(&mut self, body: Resource<BodyHandle>) -> u64 {
        self.table
            .get(&body)
            .map(|b| b.content().len() as u64)
            .unwrap_or(0)
    }

    async fn headers(&mut self, body: Resource<BodyHandle>) -> Vec<types::Header> {
        self.table
            .get(&body)
            .map(|b| b.headers().to_vec())
            .unwrap_or_default()
    }

    async fn read(&mut self, body: Resource<BodyHandle>, offset: u64, length: u32) -> Vec<u8> {
        let Ok(handle) = self.table.get(&body) else {
            return Vec::new();
        };
        let content = handle.content();
        let start = (offset.min(content.len() as u64)) as usize;
        let end = start
            .saturating_add(length.min(MAX_READ) as usize)
            .min(content.len());
        content[start..end].to_vec()
    }

    async fn drop(&mut self, body: Resource<BodyHandle>) -> wasmtime::Result<()> {
        self.table.delete(body)?;
        Ok(())
    }
}

impl bag::Host for HostState {
    async fn get(&mut self, key: String) -> Option<String> {
        self.plugin().bag.get(&key).cloned()
    }

    async fn set(&mut self, key: String, value: String) {
        if key.len() > BAG_ITEM || value.len() > BAG_ITEM {
            tracing::warn!(plugin = %self.plugin().name, "bag entry over {BAG_ITEM} bytes ignored");
            return;
        }
        let bag = &mut self.plugin_mut().bag;
        if bag.len() >= BAG_ENTRIES && !bag.contains_key(&key) {
            tracing::warn!(plugin = %self.plugin().name, "bag full ({BAG_ENTRIES} entries); entry ignored");
            return;
        }
        self.plugin_mut().bag.insert(key, value);
    }
}

impl log::Host for HostState {
    async fn write(&mut self, level: types::Level, message: String) {
        let plugin = &*self.plugin().name;
        let queue_id = self.queue_id.as_deref().unwrap_or("-");
        // One log line per call: a plugin cannot forge lines that look like the host's.
        let message = crate::mail::text::one_line(&message);
        match level {
            types::Level::Trace => tracing::trace!(plugin, queue_id, "{message}"),
            types::Level::Debug => tracing::debug!(plugin, queue_id, "{message}"),
            types::Level::Info => tracing::info!(plugin, queue_id, "{message}"),
            types::Level::Warn => tracing::warn!(plugin, queue_id, "{message}"),
            types::Level::Error => tracing::error!(plugin, queue_id, "{message}"),
        }
    }
}

impl metrics::Host for HostState {
    async fn counter_add(&mut self, name: String, value: u64) {
        if let Some(name) = crate::metrics::plugin_metric_name(&self.plugin().name, &name) {
            ::metrics::counter!("switchyard_plugin_counter_total", "plugin" => self.plugin().name.to_string(), "name" => name)
                .increment(value);
        }
    }

    async fn histogram_record(&mut self, name: String, value: f64) {
        if let Some(name) = crate::metrics::plugin_metric_name(&self.plugin().name, &name) {
            ::metrics::histogram!("switchyard_plugin_histogram", "plugin" => self.plugin().name.to_string(), "name" => name)
                .record(value);
        }
    }
}

impl kv::Host for HostState {
    async fn get(&mut self, key: String) -> Option<Vec<u8>> {
        let store = self.kv.clone()?;
        store
            .get(&self.tenant, &self.plugin().name, &key)
            .await
            .unwrap_or_else(|error| {
                tracing::warn!(plugin = %self.plugin().name, %error, "kv get failed");
                None
            })
    }

    async fn set(&mut self, key: String, value: Vec<u8>, ttl_seconds: Option<u32>) {
        if let Some(store) = self.kv.clone() {
            if let Err(error) = store
                .set(&self.tenant, &self.plugin().name, &key, &value, ttl_seconds)
                .await
            {
                tracing::warn!(plugin = %self.plugin().name, %error, "kv set failed");
            }
        }
    }

    async fn increment(&mut self, key: String, delta: i64, ttl_seconds: u32) -> i64 {
        let Some(store) = self.kv.clone() else {
            return 0;
        };
        store
            .increment(&self.tenant, &self.plugin().name, &key, delta, ttl_seconds)
            .await
            .unwrap_or_else(|error| {
                tracing::warn!(plugin = %self.plugin().name, %error, "kv increment failed");
                0
            })
    }

    async fn delete(&mut self, key: String) {
        if let Some(store) = self.kv.clone() {
            if let Err(error) = store.delete(&self.tenant, &self.plugin().name, &key).await {
                tracing::warn!(plugin = %self.plugin().name, %error, "kv delete failed");
            }
        }
    }
}

impl dns::Host for HostState {
    async fn txt(&mut self, name: String) -> Result<Vec<String>, String> {
        match &self.resolver {
            Some(resolver) => resolver.txt(&name).await,
            None => Err("no resolver".to_string()),
        }
    }

    async fn ip(&mut self, name: String) -> Result<Vec<String>, String> {
        match &self.resolver {
            Some(resolver) => resolver.ips(&name).await,
            None => Err("no resolver".to_string()),
        }
    }
}

impl clock::Host for HostState {
    async fn now_millis(&mut self) -> u64 {
        crate::queue::now_millis().max(0) as u64
    }
}
