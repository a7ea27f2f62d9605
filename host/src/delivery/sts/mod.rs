//! MTA-STS (RFC 8461): which recipient domains publish a policy, the policy itself, and how it
//! shapes a delivery to the domain's MX hosts.
//!
//! A domain's `_mta-sts` TXT record is looked up through the host's resolver (at most once per
//! `recheck` per domain); when its id differs from the cached policy's, or the cached policy has
//! expired, the policy file is fetched over HTTPS and cached in the queue's database for its
//! `max_age`. A failed fetch keeps an unexpired cached policy in force; a domain whose TXT record
//! disappears keeps its cached policy until it expires (RFC 8461 5.1).

mod fetch;
pub mod policy;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub use policy::{Mode, Policy};

use crate::config::MtaStsConfig;
use crate::net::dns::Dns;
use crate::net::verify::ClientTls;
use crate::queue::now_millis;
use crate::queue::policies::{PolicyStore, StoredPolicy};

/// The number of remembered domains at which stale ones are dropped.
const RECENT_PRUNE_AT: usize = 10_000;

/// Per domain: when its record was last looked at, and the policy then in force.
type Recent = HashMap<String, (Instant, Option<Arc<Policy>>)>;

pub struct MtaSts {
    config: MtaStsConfig,
    dns: Arc<Dns>,
    tls: Arc<ClientTls>,
    store: Arc<dyn PolicyStore>,
    recent: Mutex<Recent>,
}

impl MtaSts {
    pub fn new(
        config: MtaStsConfig,
        dns: Arc<Dns>,
        tls: Arc<ClientTls>,
        store: Arc<dyn PolicyStore>,
    ) -> MtaSts {
        MtaSts {
            config,
            dns,
            tls,
            store,
            recent: Mutex::new(HashMap::new()),
        }
    }

    /// The policy in force for `domain` (lower case), if it has one other than `none`.
    pub async fn policy_for(&self, domain: &str) -> Option<Arc<Policy>> {
        if !self.config.enabled {
            return None;
        }
        if let Some((checked, policy)) = self.lock().get(domain) {
            if checked.elapsed() < self.config.recheck {
                return policy.clone();
            }
        }
        let policy = self.look_up(domain).await.map(Arc::new);
        let policy = policy.filter(|policy| policy.mode != Mode::None);
        let mut recent = self.lock();
        // One entry per recipient domain seen: those past their recheck time go once there are
        // many, so the map stays as large as the domains of the last `recheck`.
        if recent.len() >= RECENT_PRUNE_AT {
            let recheck = self.config.recheck;
            recent.retain(|_, (checked, _)| checked.elapsed() < recheck);
        }
        recent.insert(domain.to_string(), (Instant::now(), policy.clone()));
        policy
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn look_up(&self, domain: &str) -> Option<Policy> {
        let now = now_millis();
        let cached = match self.store.sts_policy(domain).await {
            Ok(cached) => cached.filter(|cached| cached.expires_at > now),
            Err(error) => {
                tracing::warn!(%domain, %error, "cannot read the cached MTA-STS policy");
                None
            }
        };
        let cached_policy = cached
            .as_ref()
            .and_then(|cached| Policy::parse(&cached.text).ok());
        let id = match self.dns.txt(&format!("_mta-sts.{domain}")).await {
            Ok(records) => policy::record_id(&records),
            Err(error) => {
                tracing::info!(%domain, %error, "MTA-STS record lookup failed; using the cached policy, if any");
                return cached_policy;
            }
        };
        let Some(id) = id else {
            return cached_policy;
        };
        if cached.as_ref().is_some_and(|cached| cached.id == id) {
            return cached_policy;
        }
        let fetched = fetch::policy_text(
            domain,
            self.config.https_port,
            &self.dns,
            &self.tls,
            self.config.fetch_timeout,
        )
        .await
        .and_then(|text| Policy::parse(&text).map(|policy| (text, policy)));
        match fetched {
            Ok((text, policy)) => {
                tracing::info!(%domain, %id, mode = %policy.mode, max_age = policy.max_age, "MTA-STS policy fetched");
                let stored = StoredPolicy {
                    id,
                    text,
                    fetched_at: now,
                    expires_at: now + (policy.max_age as i64) * 1000,
                };
                if let Err(error) = self.store.store_sts_policy(domain, &stored).await {
                    tracing::warn!(%domain, %error, "cannot cache the MTA-STS policy");
                }
                Some(policy)
            }
            Err(error) => {
                tracing::warn!(%domain, %id, %error, "MTA-STS policy fetch failed; using the cached policy, if any");
                cached_policy
            }
        }
    }
}
