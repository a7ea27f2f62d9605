//! The `log` interface (granted with "log"): structured log lines in the host's log, with the
//! plugin's name.
use wasmtime::component::{HasSelf, Linker};

use super::HostState;
use crate::plugins::bindings::switchyard::plugin::{log, types};

impl log::Host for HostState {
    async fn write(&mut self, level: types::Level, message: String) {
        let plugin = &*self.plugin().name;
        let queue_id = self.queue_id.as_deref().unwrap_or("-");
        let tenant = &*self.tenant;
        // One log line per call: a plugin cannot forge lines that look like the host's.
        let message = crate::mail::text::one_line(&message);
        match level {
            types::Level::Trace => tracing::trace!(plugin, tenant, queue_id, "{message}"),
            types::Level::Debug => tracing::debug!(plugin, tenant, queue_id, "{message}"),
            types::Level::Info => tracing::info!(plugin, tenant, queue_id, "{message}"),
            types::Level::Warn => tracing::warn!(plugin, tenant, queue_id, "{message}"),
            types::Level::Error => tracing::error!(plugin, tenant, queue_id, "{message}"),
        }
    }
}

/// Adds the `log` interface to `linker`.
pub(super) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    log::add_to_linker::<_, HasSelf<HostState>>(linker, |state| state)
}
