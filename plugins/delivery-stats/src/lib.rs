//! `delivery-stats`: observes every delivery attempt (the `delivery-result` hook) and counts the
//! outcomes as metrics (grant `metrics`): `delivered_total`, `deferred_total` and `failed_total`,
//! and, for the destination domains listed in `domains`, the same per domain
//! (`delivered_total_example_com`, ...). The host exports them on its Prometheus endpoint as
//! `switchyard_plugin_counter_total{plugin="delivery-stats",name="..."}`.
//!
//! ```toml
//! [[plugin]]
//! name = "delivery-stats"
//! path = "target/wasm32-wasip2/plugin/delivery_stats.wasm"
//! grants = ["metrics"]
//! [plugin.config]
//! domains = ["gmail.com", "outlook.com"]
//! ```
//!
//! Only listed domains get their own series, so the number of metric names stays bounded.

use serde::Deserialize;
use switchyard_plugin_sdk::host::metrics;
use switchyard_plugin_sdk::*;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub domains: Vec<String>,
}

pub struct DeliveryStats {
    domains: Vec<String>,
}

/// The metric name of a status, optionally for one domain: letters, digits and `_` only.
pub fn metric_name(status: &DeliveryStatus, domain: Option<&str>) -> String {
    let status = match status {
        DeliveryStatus::Delivered => "delivered_total",
        DeliveryStatus::Deferred => "deferred_total",
        DeliveryStatus::Failed => "failed_total",
    };
    match domain {
        Some(domain) => {
            let domain: String = domain
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            format!("{status}_{domain}")
        }
        None => status.to_string(),
    }
}

impl Plugin for DeliveryStats {
    type Config = Config;
    const HOOKS: &'static [Hook] = &[Hook::DeliveryResult];

    fn new(config: Config) -> Result<Self, String> {
        if config.domains.len() > 15 {
            return Err("at most 15 domains: each gets three metric series".to_string());
        }
        // The host drops metric names over 64 characters; "deferred_total_" takes 15.
        if let Some(long) = config.domains.iter().find(|domain| domain.len() > 49) {
            return Err(format!(
                "domain `{long}` is too long for a metric name (at most 49 characters)"
            ));
        }
        Ok(DeliveryStats {
            domains: config
                .domains
                .iter()
                .map(|domain| domain.to_ascii_lowercase())
                .collect(),
        })
    }

    fn delivery_result(&self, report: &DeliveryReport) {
        metrics::counter_add(&metric_name(&report.status, None), 1);
        let domain = report
            .recipient
            .rsplit_once('@')
            .map(|(_, domain)| domain.to_ascii_lowercase());
        if let Some(domain) = domain.filter(|domain| self.domains.contains(domain)) {
            metrics::counter_add(&metric_name(&report.status, Some(&domain)), 1);
        }
    }
}

export_plugin!(DeliveryStats);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_are_plain() {
        assert_eq!(metric_name(&DeliveryStatus::Failed, None), "failed_total");
        assert_eq!(
            metric_name(&DeliveryStatus::Delivered, Some("mail-1.example.com")),
            "delivered_total_mail_1_example_com"
        );
    }
}
