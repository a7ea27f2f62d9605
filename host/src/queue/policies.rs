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

/// One kind of TLS outcome of deliveries to a policy domain (RFC 8460), counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOutcome {
    pub domain: String,
    /// `sts` (the only policy type recorded so far).
    pub policy_type: String,
    /// The policy as fetched, for the report's `policy-string`.
    pub policy_text: String,
    pub mx_host: String,
    /// `success`, or an RFC 8460 result type (`certificate-host-mismatch`...).
    pub result: String,
    /// The MX host's address, empty when none was reached.
    pub receiving_ip: String,
    /// What went wrong, in words (empty for a success).
    pub reason: String,
}

/// Outcomes of one kind, as counted since the last report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountedOutcome {
    pub outcome: TlsOutcome,
    pub count: i64,
    pub first_at: Millis,
    pub last_at: Millis,
}

#[async_trait]
pub trait PolicyStore: Send + Sync {
    /// Counts one delivery's TLS outcome.
    async fn count_tls_outcome(&self, outcome: &TlsOutcome, at: Millis) -> Result<(), QueueError>;
    /// Every outcome counted since the last report.
    async fn tls_outcomes(&self) -> Result<Vec<CountedOutcome>, QueueError>;
    /// Takes reported counts off (once their report is queued); what was counted meanwhile
    /// stays for the next report.
    async fn forget_tls_outcomes(&self, reported: &[CountedOutcome]) -> Result<(), QueueError>;
    /// The policy last stored for `domain`, expired or not.
    async fn sts_policy(&self, domain: &str) -> Result<Option<StoredPolicy>, QueueError>;
    /// Replaces the policy of `domain`.
    async fn store_sts_policy(&self, domain: &str, policy: &StoredPolicy)
        -> Result<(), QueueError>;
}
