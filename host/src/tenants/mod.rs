//! Tenants at run time: whose a domain or a submission user is, each tenant's limits, and what
//! the tenant uses of them now. The directory is swapped whole when a tenant file changes; what a
//! tenant uses (sessions, the hour's messages, queued bytes) lives beside it and survives the
//! swap, so reloading a tenant never resets its counts.

mod usage;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::config::tenant::check_claims;
use crate::config::{ConfigError, TenantConfig, TenantLimits};
use crate::mail::address::domain_key;
pub use usage::{Limited, SessionSlot, Usage};

/// One tenant as the directory knows it.
pub struct Tenant {
    pub id: Arc<str>,
    pub domains: Vec<String>,
    pub limits: TenantLimits,
    pub usage: Arc<Usage>,
}

impl Tenant {
    /// True when `domain` (any case, with or without a trailing dot) is one of the tenant's.
    pub fn owns_domain(&self, domain: &str) -> bool {
        let key = domain_key(domain);
        self.domains.contains(&key)
    }
}

#[derive(Default)]
struct Directory {
    by_domain: HashMap<String, Arc<Tenant>>,
    by_user: HashMap<String, Arc<Tenant>>,
    by_id: HashMap<Arc<str>, Arc<Tenant>>,
}

/// Every tenant, found by domain, user or id.
pub struct Tenants {
    /// False without a `[tenants]` section: every lookup answers "no tenant".
    enabled: bool,
    directory: ArcSwap<Directory>,
    /// The files as loaded, to check a changed file's claims against the others'.
    configs: Mutex<HashMap<String, TenantConfig>>,
    usage: Mutex<HashMap<String, Arc<Usage>>>,
    relay_domains: Vec<String>,
}

impl Tenants {
    /// No tenants: all mail follows the global configuration.
    pub fn none() -> Tenants {
        Tenants::new(false, Vec::new(), Vec::new())
    }

    /// The tenants of `configs` (already checked against each other, as
    /// [`crate::config::Config::load_tenants`] does).
    pub fn new(enabled: bool, configs: Vec<TenantConfig>, relay_domains: Vec<String>) -> Tenants {
        let tenants = Tenants {
            enabled,
            directory: ArcSwap::from_pointee(Directory::default()),
            configs: Mutex::new(
                configs
                    .into_iter()
                    .map(|config| (config.id.clone(), config))
                    .collect(),
            ),
            usage: Mutex::new(HashMap::new()),
            relay_domains,
        };
        tenants.rebuild();
        tenants
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The tenant whose domain `domain` is.
    pub fn of_domain(&self, domain: &str) -> Option<Arc<Tenant>> {
        if !self.enabled {
            return None;
        }
        self.directory
            .load()
            .by_domain
            .get(&domain_key(domain))
            .cloned()
    }

    /// The tenant whose submission user `identity` is.
    pub fn of_user(&self, identity: &str) -> Option<Arc<Tenant>> {
        if !self.enabled {
            return None;
        }
        self.directory.load().by_user.get(identity).cloned()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Tenant>> {
        self.directory.load().by_id.get(id).cloned()
    }

    /// How many tenants there are.
    pub fn count(&self) -> usize {
        self.directory.load().by_id.len()
    }

    /// Every tenant, by id.
    pub fn all(&self) -> Vec<Arc<Tenant>> {
        let mut tenants: Vec<Arc<Tenant>> = self.directory.load().by_id.values().cloned().collect();
        tenants.sort_by(|a, b| a.id.cmp(&b.id));
        tenants
    }

    /// Checks that `config` (a tenant file added or changed) claims no domain or user another
    /// tenant has.
    pub fn check(&self, config: &TenantConfig) -> Result<(), ConfigError> {
        let configs = self.lock_configs();
        let mut next: Vec<TenantConfig> = configs
            .values()
            .filter(|other| other.id != config.id)
            .cloned()
            .collect();
        next.sort_by(|a, b| a.id.cmp(&b.id));
        next.push(config.clone());
        check_claims(&next, &self.relay_domains)
    }

    /// Adds or replaces one tenant (its file was added or changed). A file that claims a
    /// domain or user another tenant has is refused, and the tenant stays as it was.
    pub fn upsert(&self, config: TenantConfig) -> Result<(), ConfigError> {
        self.check(&config)?;
        self.lock_configs().insert(config.id.clone(), config);
        self.rebuild();
        Ok(())
    }

    /// The tenant files as loaded.
    pub fn configs(&self) -> Vec<TenantConfig> {
        let mut configs: Vec<TenantConfig> = self.lock_configs().values().cloned().collect();
        configs.sort_by(|a, b| a.id.cmp(&b.id));
        configs
    }

    /// Removes a tenant (its file was removed): its domains and users are nobody's from now.
    pub fn remove(&self, id: &str) {
        self.lock_configs().remove(id);
        self.rebuild();
    }

    /// The tenant's usage, kept across reloads of its file.
    fn usage_of(&self, id: &str) -> Arc<Usage> {
        let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        usage
            .entry(id.to_string())
            .or_insert_with(|| Arc::new(Usage::new(id)))
            .clone()
    }

    /// Sets every tenant's queued bytes from a count of the queue (`bytes` by tenant id; a
    /// tenant missing from it has nothing queued).
    pub fn set_queued(&self, bytes: &HashMap<String, u64>) {
        for tenant in self.all() {
            tenant
                .usage
                .set_queued(bytes.get(&*tenant.id).copied().unwrap_or(0));
        }
    }

    fn lock_configs(&self) -> std::sync::MutexGuard<'_, HashMap<String, TenantConfig>> {
        self.configs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn rebuild(&self) {
        let configs = self.lock_configs().clone();
        let mut directory = Directory::default();
        for config in configs.into_values() {
            let tenant = Arc::new(Tenant {
                id: Arc::from(config.id.as_str()),
                domains: config.domains.clone(),
                limits: config.limits.clone(),
                usage: self.usage_of(&config.id),
            });
            for domain in &config.domains {
                directory.by_domain.insert(domain.clone(), tenant.clone());
            }
            for user in &config.users {
                directory.by_user.insert(user.clone(), tenant.clone());
            }
            directory.by_id.insert(tenant.id.clone(), tenant);
        }
        self.directory.store(Arc::new(directory));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn tenant(id: &str, text: &str) -> TenantConfig {
        TenantConfig::parse(
            text,
            Path::new(&format!("/t/{id}.toml")),
            &TenantLimits::default(),
        )
        .expect("valid tenant")
    }

    #[test]
    fn domains_and_users_find_their_tenant_and_reloads_keep_usage() {
        let tenants = Tenants::new(
            true,
            vec![
                tenant("acme", "domains = [\"acme.test\"]\nusers = [\"alice\"]\n"),
                tenant("bravo", "domains = [\"bravo.test\"]\n"),
            ],
            Vec::new(),
        );
        assert_eq!(&*tenants.of_domain("ACME.test.").expect("acme").id, "acme");
        assert_eq!(&*tenants.of_user("alice").expect("alice").id, "acme");
        assert!(tenants.of_domain("other.test").is_none());
        let slot = tenants
            .of_domain("acme.test")
            .expect("acme")
            .usage
            .open_session(10)
            .expect("a slot");
        // A changed file that claims bravo's domain is refused; acme stays as it was.
        let error = tenants
            .upsert(tenant("acme", "domains = [\"bravo.test\"]\n"))
            .expect_err("claimed");
        assert!(error
            .to_string()
            .contains("already claimed by tenant `bravo`"));
        assert!(tenants.of_domain("acme.test").is_some());
        tenants
            .upsert(tenant(
                "acme",
                "domains = [\"acme.test\", \"acme2.test\"]\n",
            ))
            .expect("reload");
        let acme = tenants.of_domain("acme2.test").expect("new domain");
        assert_eq!(acme.usage.sessions(), 1, "usage survives the reload");
        assert!(
            tenants.of_user("alice").is_none(),
            "the new file lists no users"
        );
        drop(slot);
        assert_eq!(acme.usage.sessions(), 0);
        tenants.remove("acme");
        assert!(tenants.of_domain("acme.test").is_none());
        assert!(Tenants::none().of_domain("acme.test").is_none());
    }
}
