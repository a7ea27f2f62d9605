//! The `metrics` interface (granted with "metrics"): counters and histograms on the host's
//! Prometheus endpoint.
use wasmtime::component::{HasSelf, Linker};

use super::HostState;
use crate::plugins::bindings::switchyard::plugin::metrics;

impl metrics::Host for HostState {
    async fn counter_add(&mut self, name: String, value: u64) {
        if let Some(name) = crate::metrics::plugin_metric_name(&self.plugin().name, &name) {
            ::metrics::counter!("switchyard_plugin_counter_total", "plugin" => self.plugin().name.to_string(), "tenant" => self.tenant.clone(), "name" => name)
                .increment(value);
        }
    }

    async fn histogram_record(&mut self, name: String, value: f64) {
        if let Some(name) = crate::metrics::plugin_metric_name(&self.plugin().name, &name) {
            ::metrics::histogram!("switchyard_plugin_histogram", "plugin" => self.plugin().name.to_string(), "tenant" => self.tenant.clone(), "name" => name)
                .record(value);
        }
    }
}

/// Adds the `metrics` interface to `linker`.
pub(super) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    metrics::add_to_linker::<_, HasSelf<HostState>>(linker, |state| state)
}
