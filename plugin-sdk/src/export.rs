//! The glue behind [`crate::export_plugin!`]: the WIT `hooks` exports, forwarding to the
//! author's [`crate::Plugin`], which `init` builds into a static slot of the plugin's own type.

use std::cell::OnceCell;

use crate::bindings::switchyard::plugin::message::Body;
use crate::bindings::switchyard::plugin::types::{
    AddressDecision, AuthResults, BounceReport, BounceText, DataDecision, DeliveryReport, Envelope,
    MessageFacts, NextHop, Param, PluginInfo, Session, Verdict,
};
use crate::facts;
use crate::Plugin;

/// Where an instance keeps the plugin `init` built: a static of the plugin's concrete type, so a
/// hook reaches it with one load (no thread-local lookup, no `dyn Any` downcast). Every hook call
/// lands in an instance whose memory the host last touched many messages ago, and each extra
/// pointer chased on the way to the plugin is a cache miss per call.
pub struct Slot<P>(OnceCell<P>);

// SAFETY: a plugin instance has one thread (wasm32 without the atomics feature has no threads),
// so the slot is never reached from two threads. Elsewhere (native unit tests) no slot is
// `Sync`, and `export_plugin!` declares none.
#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
unsafe impl<P> Sync for Slot<P> {}

impl<P> Slot<P> {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Slot<P> {
        Slot(OnceCell::new())
    }
}

/// Implemented by [`crate::export_plugin!`] for the exported plugin type: its slot.
pub trait Exported: Plugin {
    fn slot() -> &'static Slot<Self>;
}

/// Runs `f` with the plugin built by `init`. A hook called before `init` succeeded is a host bug;
/// it traps (the host turns that into the plugin's failure policy).
pub fn with<P: Exported, R>(f: impl FnOnce(&P) -> R) -> R {
    let plugin = P::slot()
        .0
        .get()
        .expect("switchyard: hook called before init");
    f(plugin)
}

pub fn init<P: Exported>(config: String) -> Result<PluginInfo, String> {
    let config: P::Config =
        serde_json::from_str(&config).map_err(|error| format!("invalid plugin config: {error}"))?;
    let plugin = P::new(config)?;
    P::slot()
        .0
        .set(plugin)
        .map_err(|_| "init called twice".to_string())?;
    Ok(PluginInfo {
        hooks: P::HOOKS
            .iter()
            .map(|hook| hook.wit_name().to_string())
            .collect(),
    })
}

/// The `Guest` implementation for plugin type `P`.
pub struct Exports<P>(std::marker::PhantomData<P>);

impl<P: Exported> crate::bindings::exports::switchyard::plugin::hooks::Guest for Exports<P> {
    fn init(config: String) -> Result<PluginInfo, String> {
        init::<P>(config)
    }
    fn connect(session: &Session) -> Verdict {
        with::<P, _>(|p| p.connect(&facts::Session::host(session)))
    }
    fn helo(session: &Session, name: String) -> Verdict {
        with::<P, _>(|p| p.helo(&facts::Session::host(session), &name))
    }
    fn auth(session: &Session, mechanism: String, identity: String) -> Verdict {
        with::<P, _>(|p| p.auth(&facts::Session::host(session), &mechanism, &identity))
    }
    fn mail_from(session: &Session, sender: String, params: Vec<Param>) -> AddressDecision {
        with::<P, _>(|p| p.mail_from(&facts::Session::host(session), &sender, &params))
    }
    fn rcpt_to(
        session: &Session,
        envelope: Envelope,
        recipient: String,
        params: Vec<Param>,
    ) -> AddressDecision {
        with::<P, _>(|p| {
            p.rcpt_to(
                &facts::Session::host(session),
                &envelope,
                &recipient,
                &params,
            )
        })
    }
    fn data(session: &Session, envelope: Envelope, auth: AuthResults, body: &Body) -> DataDecision {
        with::<P, _>(|p| {
            p.data(
                &facts::Session::host(session),
                &envelope,
                &auth,
                &facts::Body::host(body),
            )
        })
    }
    fn route(message: MessageFacts, recipient: String) -> NextHop {
        with::<P, _>(|p| p.route(&message, &recipient))
    }
    fn delivery_result(report: DeliveryReport) {
        with::<P, _>(|p| p.delivery_result(&report))
    }
    fn bounce(report: BounceReport) -> Option<BounceText> {
        with::<P, _>(|p| p.bounce(&report))
    }
}

/// Exports a [`Plugin`] implementation as the component's `hooks`. The export exists only when
/// building for WebAssembly, so the same crate also builds natively for unit tests.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            static SLOT: $crate::export::Slot<$plugin> = $crate::export::Slot::new();
            impl $crate::export::Exported for $plugin {
                fn slot() -> &'static $crate::export::Slot<Self> {
                    &SLOT
                }
            }
        };
        #[cfg(target_arch = "wasm32")]
        type __SwitchyardPluginExports = $crate::export::Exports<$plugin>;
        #[cfg(target_arch = "wasm32")]
        $crate::bindings::__export_world!(__SwitchyardPluginExports with_types_in $crate::bindings);
    };
}
