//! The policy port: domains' MTA-STS policies as fetched, cached beside the queue so a restart
//! (or another process on the same database) does not fetch them again before they expire, and
//! a policy fetched once still protects the domain while its web server is down (RFC 8461 5.1).

use async_trait::async_trait;

use super::{Millis, QueueError};

/// A policy as fetched: the TXT record's id it was fetched for, its text, and when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPolicy {
    pub id: String,
    pub text: String,
    pub fetched_at: Millis,
    pub expires_at: Millis,
}

#[async_trait]
pub trait PolicyStore: Send + Sync {
    /// The policy last stored for `domain`, expired or not.
    async fn sts_policy(&self, domain: &str) -> Result<Option<StoredPolicy>, QueueError>;
    /// Replaces the policy of `domain`.
    async fn store_sts_policy(&self, domain: &str, policy: &StoredPolicy)
        -> Result<(), QueueError>;
}
