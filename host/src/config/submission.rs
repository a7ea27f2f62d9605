//! `[submission]`: SMTP AUTH, its failure budget, and what a tenant's user may send as.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// SMTP AUTH on submission listeners.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubmissionConfig {
    /// The accounts AUTH accepts: one `name:hash` line each, the hash an argon2 PHC string
    /// (`switchyard auth hash` prints one). In a file, relative to the file. Without it AUTH
    /// is not offered.
    pub users_file: Option<PathBuf>,
    /// MAIL on a submission listener needs AUTH first, except from `relay.networks`.
    pub require_auth: bool,
    /// Failed AUTH attempts tolerated per client address across sessions.
    pub auth_failures: AuthFailureLimits,
    /// Which From: a tenant's authenticated user may write (users of no tenant: any).
    pub header_from: HeaderFromPolicy,
}

/// `[submission] header_from`: what the From: header of a tenant user's message may name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeaderFromPolicy {
    /// Every From: address must be of one of the user's tenant's domains, else `550 5.7.1`:
    /// the tenant's DKIM key would otherwise sign mail in another's name.
    #[default]
    OwnDomains,
    /// Any From: (a tenant that sends on behalf of its customers' domains).
    Any,
}

impl Default for SubmissionConfig {
    fn default() -> Self {
        SubmissionConfig {
            users_file: None,
            require_auth: true,
            auth_failures: AuthFailureLimits::default(),
            header_from: HeaderFromPolicy::default(),
        }
    }
}

/// The budget of failed AUTH attempts per client address, across sessions, in the spirit of
/// Postfix's anvil limits and Stalwart's automatic ban: each failure is answered later than the
/// one before, and an address that spends the budget is refused at connect for a while.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthFailureLimits {
    /// Failures from one address within `window` that get it banned; 0 turns the budget off.
    /// An IPv6 client counts by its /64, which one host usually holds whole.
    pub limit: u32,
    /// How long a failure counts.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How long a banned address's connections to submission listeners get 421 4.7.0.
    #[serde(with = "humantime_serde")]
    pub ban: Duration,
    /// How long the first failure's 535 reply is held back; each further failure of the
    /// address within the window doubles it (up to 16 times).
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
    /// Client networks the budget never applies to: a webmail front end that logs in for many
    /// users from one address, say.
    pub exempt: Vec<ipnet::IpNet>,
}

impl Default for AuthFailureLimits {
    fn default() -> Self {
        AuthFailureLimits {
            limit: 5,
            window: Duration::from_secs(600),
            ban: Duration::from_secs(900),
            delay: Duration::from_secs(1),
            exempt: Vec::new(),
        }
    }
}
