//! The glue behind [`crate::export_plugin!`]: the WIT `hooks` exports, forwarding to the
//! author's [`crate::Plugin`] held in a per-instance cell.

use std::cell::OnceCell;

use crate::bindings::switchyard::plugin::message::Body;
use crate::bindings::switchyard::plugin::types::{
    AddressDecision, AuthResults, BounceReport, BounceText, DataDecision, DeliveryReport, Envelope,
    MessageFacts, NextHop, Param, PluginInfo, Session, Verdict,
};
use crate::Plugin;

thread_local! {
    static INSTANCE: OnceCell<Box<dyn std::any::Any>> = const { OnceCell::new() };
}

/// Runs `f` with the plugin built by `init`. A hook called before `init` succeeded is a host bug;
/// it traps (the host turns that into the plugin's failure policy).
pub fn with<P: Plugin, R>(f: impl FnOnce(&P) -> R) -> R {
    INSTANCE.with(|cell| {
        let plugin = cell
            .get()
            .and_then(|boxed| boxed.downcast_ref::<P>())
            .expect("switchyard: hook called before init");
        f(plugin)
    })
}

pub fn init<P: Plugin>(config: String) -> Result<PluginInfo, String> {
    let config: P::Config =
        serde_json::from_str(&config).map_err(|error| format!("invalid plugin config: {error}"))?;
    let plugin = P::new(config)?;
    INSTANCE.with(|cell| {
        cell.set(Box::new(plugin))
            .map_err(|_| "init called twice".to_string())
    })?;
    Ok(PluginInfo {
        hooks: P::HOOKS
            .iter()
            .map(|hook| hook.wit_name().to_string())
            .collect(),
    })
}

/// The `Guest` implementation for plugin type `P`.
pub struct Exports<P>(std::marker::PhantomData<P>);

impl<P: Plugin> crate::bindings::exports::switchyard::plugin::hooks::Guest for Exports<P> {
    fn init(config: String) -> Result<PluginInfo, String> {
        init::<P>(config)
    }
    fn connect(session: &Session) -> Verdict {
        with::<P, _>(|p| p.connect(session))
    }
    fn helo(session: &Session, name: String) -> Verdict {
        with::<P, _>(|p| p.helo(session, &name))
    }
    fn auth(session: &Session, mechanism: String, identity: String) -> Verdict {
        with::<P, _>(|p| p.auth(session, &mechanism, &identity))
    }
    fn mail_from(session: &Session, sender: String, params: Vec<Param>) -> AddressDecision {
        with::<P, _>(|p| p.mail_from(session, &sender, &params))
    }
    fn rcpt_to(
        session: &Session,
        envelope: Envelope,
        recipient: String,
        params: Vec<Param>,
    ) -> AddressDecision {
        with::<P, _>(|p| p.rcpt_to(session, &envelope, &recipient, &params))
    }
    fn data(session: &Session, envelope: Envelope, auth: AuthResults, body: &Body) -> DataDecision {
        with::<P, _>(|p| p.data(session, &envelope, &auth, body))
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
        type __SwitchyardPluginExports = $crate::export::Exports<$plugin>;
        #[cfg(target_arch = "wasm32")]
        $crate::bindings::__export_world!(__SwitchyardPluginExports with_types_in $crate::bindings);
    };
}
