//! A mock host for a plugin's unit tests, natively with `cargo test` (no WebAssembly runtime):
//! build the plugin from its config, call a hook with a session and a message made in the test,
//! and look at the verdict, the edits, and what the plugin did with the host functions (kv, log,
//! metrics, bag), which answer from this mock.
//!
//! ```ignore
//! use switchyard_plugin_sdk::testing::Harness;
//!
//! let harness = Harness::<Blocklist>::new(r#"{"blocked": ["spam@example.com"]}"#).unwrap();
//! let decision = harness.rcpt_to("spam@example.com");
//! assert!(matches!(decision.verdict, Verdict::Reject(_)));
//! ```
//!
//! Each test thread has its own mock host, so tests running at once do not share kv keys.

use std::cell::RefCell;
use std::collections::HashMap;

use crate::facts::{Body, Session, SessionFacts};
use crate::{
    AddressDecision, AuthResults, BounceReport, BounceText, DataDecision, DeliveryReport, Envelope,
    Level, MessageFacts, NextHop, Param, Plugin, Verdict,
};

/// What the host functions hold and answer, for the current thread.
#[derive(Debug, Default)]
pub struct MockHost {
    /// The kv store (TTLs are not kept: nothing expires during a test).
    pub kv: HashMap<String, Vec<u8>>,
    /// When set, every kv write is refused with this error (a spent quota, a store that is
    /// down), as the real host refuses one: the `try_` functions return it, `increment`
    /// panics as the real one traps.
    pub kv_refuses: Option<crate::host::kv::KvError>,
    /// The transaction's bag.
    pub bag: HashMap<String, String>,
    /// What `clock::now_millis` answers.
    pub now_millis: u64,
    /// Answers to `dns::txt` and `dns::ip`, by kind (`txt`, `ip`) and lower-case name; a name
    /// not here is an error, as an unknown name is.
    pub dns: HashMap<(String, String), Result<Vec<String>, String>>,
    /// What `scanners::results` answers for any message.
    pub scans: Vec<crate::host::scanners::ScanResult>,
    /// Lines the plugin logged.
    pub logs: Vec<(Level, String)>,
    pub counters: HashMap<String, u64>,
    pub histograms: Vec<(String, f64)>,
}

impl MockHost {
    pub(crate) fn lookup(&self, kind: &str, name: &str) -> Result<Vec<String>, String> {
        self.dns
            .get(&(kind.to_string(), name.to_ascii_lowercase()))
            .cloned()
            .unwrap_or_else(|| Err(format!("{name}: no such name")))
    }
}

thread_local! {
    static HOST: RefCell<MockHost> = RefCell::new(MockHost::default());
}

/// Runs `f` on this thread's mock host (what the host functions do natively).
pub fn mock<R>(f: impl FnOnce(&mut MockHost) -> R) -> R {
    HOST.with(|host| f(&mut host.borrow_mut()))
}

/// A plugin built as the host builds it (`init` with its JSON config), and its hooks.
pub struct Harness<P> {
    plugin: P,
    /// The session lent to every session hook; change it to test another client.
    pub session: SessionFacts,
}

impl<P: Plugin> Harness<P> {
    /// Builds the plugin from `config`, the JSON the host hands `init` (the manifest's
    /// `[plugin.config]` table), on a fresh mock host.
    pub fn new(config: &str) -> Result<Harness<P>, String> {
        let config: P::Config = serde_json::from_str(config)
            .map_err(|error| format!("invalid plugin config: {error}"))?;
        mock(|host| *host = MockHost::default());
        Ok(Harness {
            plugin: P::new(config)?,
            session: SessionFacts {
                client_ip: "192.0.2.1".to_string(),
                listener: "inbound".to_string(),
                helo: Some("client.example".to_string()),
                ..SessionFacts::default()
            },
        })
    }

    /// The plugin, for a hook this harness has no shortcut for.
    pub fn plugin(&self) -> &P {
        &self.plugin
    }

    pub fn connect(&self) -> Verdict {
        self.plugin.connect(&Session::of(&self.session))
    }

    pub fn helo(&self, name: &str) -> Verdict {
        self.plugin.helo(&Session::of(&self.session), name)
    }

    pub fn auth(&self, mechanism: &str, identity: &str) -> Verdict {
        self.plugin
            .auth(&Session::of(&self.session), mechanism, identity)
    }

    pub fn mail_from(&self, sender: &str) -> AddressDecision {
        self.mail_from_with(sender, &[])
    }

    pub fn mail_from_with(&self, sender: &str, params: &[Param]) -> AddressDecision {
        self.plugin
            .mail_from(&Session::of(&self.session), sender, params)
    }

    /// RCPT TO for `recipient`, with an envelope from `sender@example.com` and no recipient yet.
    pub fn rcpt_to(&self, recipient: &str) -> AddressDecision {
        let envelope = Envelope {
            sender: "sender@example.com".to_string(),
            recipients: Vec::new(),
        };
        self.rcpt_to_in(&envelope, recipient, &[])
    }

    pub fn rcpt_to_in(
        &self,
        envelope: &Envelope,
        recipient: &str,
        params: &[Param],
    ) -> AddressDecision {
        self.plugin
            .rcpt_to(&Session::of(&self.session), envelope, recipient, params)
    }

    /// The end of DATA for `message` (headers, a blank line, the body), with authentication
    /// results left empty (as for a message that was not checked).
    pub fn data(&self, envelope: &Envelope, message: &str) -> DataDecision {
        let auth = AuthResults {
            spf: String::new(),
            dkim: String::new(),
            dmarc: String::new(),
        };
        self.data_with(envelope, &auth, message.as_bytes())
    }

    pub fn data_with(
        &self,
        envelope: &Envelope,
        auth: &AuthResults,
        message: &[u8],
    ) -> DataDecision {
        self.plugin.data(
            &Session::of(&self.session),
            envelope,
            auth,
            &Body::of(message),
        )
    }

    pub fn route(&self, message: &MessageFacts, recipient: &str) -> NextHop {
        self.plugin.route(message, recipient)
    }

    pub fn delivery_result(&self, report: &DeliveryReport) {
        self.plugin.delivery_result(report)
    }

    pub fn bounce(&self, report: &BounceReport) -> Option<BounceText> {
        self.plugin.bounce(report)
    }

    /// Reads or changes the mock host (set the clock, give DNS answers, look at kv and logs).
    pub fn host<R>(&self, f: impl FnOnce(&mut MockHost) -> R) -> R {
        mock(f)
    }
}
