//! What the host hands the plugin chain about a transaction, in host types: the SMTP session
//! and the delivery side speak these, the chain turns them into the WIT's types for the calls,
//! and recordings keep them as they are. (The WIT's own types stay behind `plugins/`.)

use serde::{Deserialize, Serialize};

use super::bindings::types as wit;

/// A MAIL or RCPT parameter: `KEY` or `KEY=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Param {
    pub key: String,
    pub value: Option<String>,
}

/// The sender and the recipients accepted so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub sender: String,
    pub recipients: Vec<String>,
}

/// SPF, DKIM and DMARC results of an inbound message (empty when not checked).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Auth {
    pub spf: String,
    pub dkim: String,
    pub dmarc: String,
}

impl Param {
    /// Parameters as a parsed command gives them.
    pub fn from_pairs(pairs: &[(String, Option<String>)]) -> Vec<Param> {
        pairs
            .iter()
            .map(|(key, value)| Param {
                key: key.clone(),
                value: value.clone(),
            })
            .collect()
    }

    pub(super) fn to_wit(params: &[Param]) -> Vec<wit::Param> {
        params
            .iter()
            .map(|param| wit::Param {
                key: param.key.clone(),
                value: param.value.clone(),
            })
            .collect()
    }
}

impl Envelope {
    pub(super) fn to_wit(&self) -> wit::Envelope {
        wit::Envelope {
            sender: self.sender.clone(),
            recipients: self.recipients.clone(),
        }
    }
}

impl Auth {
    pub(super) fn to_wit(&self) -> wit::AuthResults {
        wit::AuthResults {
            spf: self.spf.clone(),
            dkim: self.dkim.clone(),
            dmarc: self.dmarc.clone(),
        }
    }
}
