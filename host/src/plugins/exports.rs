//! Calling the hooks an instance exports. Their types are checked once per plugin, when it loads
//! (`PluginPre::new` checks the component against the WIT package); the generated bindings would
//! check them again for every new instance, which was about a tenth of the cost of a
//! transaction's instance. Here an instance only looks a hook up by its export index, resolved at
//! load, when it is called.

use std::sync::Arc;

use wasmtime::component::{Component, ComponentExportIndex, Instance, Resource, TypedFunc};
use wasmtime::Store;

use super::bindings::types::{
    AddressDecision, AuthResults, BounceReport, BounceText, DataDecision, DeliveryReport, Envelope,
    MessageFacts, NextHop, Param, PluginInfo, Verdict,
};
use super::host::{BodyHandle, HostState, SessionHandle};

/// The interface a plugin exports, as the component names it (the package version in `wit/`; a
/// component built for another version fails to load here, naming this export).
const HOOKS: &str = "switchyard:plugin/hooks@0.2.0";

/// Where each hook is among a component's exports.
pub struct HookIndices {
    init: ComponentExportIndex,
    connect: ComponentExportIndex,
    helo: ComponentExportIndex,
    auth: ComponentExportIndex,
    mail_from: ComponentExportIndex,
    rcpt_to: ComponentExportIndex,
    data: ComponentExportIndex,
    route: ComponentExportIndex,
    delivery_result: ComponentExportIndex,
    bounce: ComponentExportIndex,
}

impl HookIndices {
    /// Resolves every hook of `component`; the error names the first one missing.
    pub fn new(component: &Component) -> Result<HookIndices, String> {
        let interface = component
            .get_export_index(None, HOOKS)
            .ok_or_else(|| format!("does not export {HOOKS}"))?;
        let hook = |name: &str| {
            component
                .get_export_index(Some(&interface), name)
                .ok_or_else(|| format!("does not export {HOOKS}#{name}"))
        };
        Ok(HookIndices {
            init: hook("init")?,
            connect: hook("connect")?,
            helo: hook("helo")?,
            auth: hook("auth")?,
            mail_from: hook("mail-from")?,
            rcpt_to: hook("rcpt-to")?,
            data: hook("data")?,
            route: hook("route")?,
            delivery_result: hook("delivery-result")?,
            bounce: hook("bounce")?,
        })
    }
}

/// The hooks of one instance.
#[derive(Clone)]
pub struct Hooks {
    instance: Instance,
    indices: Arc<HookIndices>,
}

/// `call_NAME(store, args) -> wasmtime::Result<RESULT>` for one hook, like the generated bindings.
/// A hook without a result (`delivery-result`) has the results `()`, not `((),)`.
macro_rules! hook {
    ($method:ident, $index:ident, ($($arg:ident: $type:ty),*)) => {
        pub async fn $method(
            &self,
            store: &mut Store<HostState>,
            $($arg: $type),*
        ) -> wasmtime::Result<()> {
            let func = self.func(store, &self.indices.$index)?;
            // SAFETY: see `func`.
            let typed = unsafe { TypedFunc::<($($type,)*), ()>::new_unchecked(func) };
            typed.call_async(store, ($($arg,)*)).await
        }
    };
    ($method:ident, $index:ident, ($($arg:ident: $type:ty),*) -> $result:ty) => {
        pub async fn $method(
            &self,
            store: &mut Store<HostState>,
            $($arg: $type),*
        ) -> wasmtime::Result<$result> {
            let func = self.func(store, &self.indices.$index)?;
            // SAFETY: see `func`.
            let typed = unsafe { TypedFunc::<($($type,)*), ($result,)>::new_unchecked(func) };
            Ok(typed.call_async(store, ($($arg,)*)).await?.0)
        }
    };
}

impl Hooks {
    pub fn new(instance: Instance, indices: Arc<HookIndices>) -> Hooks {
        Hooks { instance, indices }
    }

    /// The hook at `index`. Callers use it as a `TypedFunc` of the WIT's types without checking
    /// them again: this component's exports were checked against exactly those types when the
    /// plugin loaded (`PluginPre::new` in the loader), and an index only ever refers to the
    /// component it was resolved on. A wrong type would make wasmtime panic, not misbehave.
    fn func(
        &self,
        store: &mut Store<HostState>,
        index: &ComponentExportIndex,
    ) -> wasmtime::Result<wasmtime::component::Func> {
        self.instance
            .get_func(&mut *store, index)
            .ok_or_else(|| wasmtime::format_err!("a hook is not exported"))
    }

    hook!(call_init, init, (config: &str) -> Result<PluginInfo, String>);
    hook!(call_connect, connect, (session: Resource<SessionHandle>) -> Verdict);
    hook!(call_helo, helo, (session: Resource<SessionHandle>, name: &str) -> Verdict);
    hook!(call_auth, auth, (session: Resource<SessionHandle>, mechanism: &str, identity: &str) -> Verdict);
    hook!(call_mail_from, mail_from, (session: Resource<SessionHandle>, sender: &str, params: &[Param]) -> AddressDecision);
    hook!(call_rcpt_to, rcpt_to, (session: Resource<SessionHandle>, envelope: &Envelope, recipient: &str, params: &[Param]) -> AddressDecision);
    hook!(call_data, data, (session: Resource<SessionHandle>, envelope: &Envelope, auth: &AuthResults, body: Resource<BodyHandle>) -> DataDecision);
    hook!(call_route, route, (message: &MessageFacts, recipient: &str) -> NextHop);
    hook!(call_delivery_result, delivery_result, (report: &DeliveryReport));
    hook!(call_bounce, bounce, (report: &BounceReport) -> Option<BounceText>);
}
