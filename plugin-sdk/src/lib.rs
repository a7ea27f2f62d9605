//! The Switchyard plugin SDK: implement [`Plugin`] for a type, write only the hooks you need, and
//! export it with [`export_plugin!`]. Build with `cargo build --target wasm32-wasip2 --release`.
//!
//! ```ignore
//! use switchyard_plugin_sdk::*;
//!
//! #[derive(serde::Deserialize)]
//! struct Config { blocked: Vec<String> }
//!
//! struct Blocklist(Config);
//!
//! impl Plugin for Blocklist {
//!     type Config = Config;
//!     const HOOKS: &'static [Hook] = &[Hook::RcptTo];
//!     fn new(config: Config) -> Result<Self, String> { Ok(Blocklist(config)) }
//!     fn rcpt_to(&self, _: &Session, _: &Envelope, recipient: &str, _: &[Param]) -> AddressDecision {
//!         if self.0.blocked.iter().any(|b| b == recipient) {
//!             AddressDecision::reject(550, "5.7.1", "recipient blocked")
//!         } else {
//!             AddressDecision::next()
//!         }
//!     }
//! }
//!
//! export_plugin!(Blocklist);
//! ```
//!
//! Built natively, [`testing::Harness`] calls the hooks with sessions and messages made in the
//! test, and the [`host`] functions answer from a mock host: a plugin's tests are `cargo test`.

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "switchyard_plugin_sdk::bindings",
        // Verdicts and decisions compare in a plugin's tests (`assert_eq!`).
        additional_derives: [PartialEq],
    });
}

mod builders;
#[doc(hidden)]
pub mod export;
mod facts;
#[path = "host_api.rs"]
pub mod host;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use bindings::switchyard::plugin::types::{
    AddressDecision, AuthResults, BounceReport, BounceText, DataDecision, DataVerdict,
    DeliveryReport, DeliveryStatus, Edit, Envelope, FailedRecipient, Header, Level, MessageFacts,
    NextHop, Param, Reply, Smarthost, TlsPolicy, Verdict,
};
pub use facts::{Body, Session, SessionFacts};

/// The hooks a plugin can implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Connect,
    Helo,
    Auth,
    MailFrom,
    RcptTo,
    Data,
    Route,
    DeliveryResult,
    Bounce,
}

impl Hook {
    pub const ALL: &'static [Hook] = &[
        Hook::Connect,
        Hook::Helo,
        Hook::Auth,
        Hook::MailFrom,
        Hook::RcptTo,
        Hook::Data,
        Hook::Route,
        Hook::DeliveryResult,
        Hook::Bounce,
    ];

    /// The name used in the WIT `plugin-info.hooks` list.
    pub fn wit_name(self) -> &'static str {
        match self {
            Hook::Connect => "connect",
            Hook::Helo => "helo",
            Hook::Auth => "auth",
            Hook::MailFrom => "mail-from",
            Hook::RcptTo => "rcpt-to",
            Hook::Data => "data",
            Hook::Route => "route",
            Hook::DeliveryResult => "delivery-result",
            Hook::Bounce => "bounce",
        }
    }
}

/// A Switchyard plugin. Every hook has a default that answers "continue" (no opinion), so a
/// plugin implements only the hooks it needs and lists them in [`Plugin::HOOKS`] so the host does
/// not call the others.
pub trait Plugin: Sized + 'static {
    /// The plugin's `config` table from the host configuration, deserialised with serde.
    type Config: serde::de::DeserializeOwned;

    /// The hooks the host should call. Defaults to all of them.
    const HOOKS: &'static [Hook] = Hook::ALL;

    /// Builds the plugin from its configuration; an error stops it from loading. Runs in `init`:
    /// by default once when the plugin loads, every transaction then starting from a snapshot of
    /// the value built here (see the plugin guide), so expensive set-up belongs here.
    fn new(config: Self::Config) -> Result<Self, String>;

    /// A client connected. Every session hook gets the session lent for the call: read the facts
    /// you need with its methods (`session.client_ip()`, `session.helo()`, ...), which copy
    /// nothing into the plugin until called.
    fn connect(&self, _session: &Session<'_>) -> Verdict {
        Verdict::Continue
    }
    fn helo(&self, _session: &Session<'_>, _name: &str) -> Verdict {
        Verdict::Continue
    }
    fn auth(&self, _session: &Session<'_>, _mechanism: &str, _identity: &str) -> Verdict {
        Verdict::Continue
    }
    fn mail_from(
        &self,
        _session: &Session<'_>,
        _sender: &str,
        _params: &[Param],
    ) -> AddressDecision {
        AddressDecision::next()
    }
    fn rcpt_to(
        &self,
        _session: &Session<'_>,
        _envelope: &Envelope,
        _recipient: &str,
        _params: &[Param],
    ) -> AddressDecision {
        AddressDecision::next()
    }
    /// The end of DATA. The header fields are `body.headers()` (parsed by the host, copied into
    /// the plugin only when asked); the content is read in chunks with `body.read`.
    fn data(
        &self,
        _session: &Session<'_>,
        _envelope: &Envelope,
        _auth: &AuthResults,
        _body: &Body<'_>,
    ) -> DataDecision {
        DataDecision::next()
    }
    fn route(&self, _message: &MessageFacts, _recipient: &str) -> NextHop {
        NextHop::Continue
    }
    fn delivery_result(&self, _report: &DeliveryReport) {}
    fn bounce(&self, _report: &BounceReport) -> Option<BounceText> {
        None
    }
}
