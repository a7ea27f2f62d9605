//! The hooks of the WIT `hooks` interface, written once: the table below makes the hook kinds
//! (and their names), where each hook is among a component's exports, and the typed call of each.
//! Adding a hook is one line here, its WIT, its chain semantics in `chain.rs` and its SDK method.
//!
//! Hooks are called without the generated bindings' per-instance type check: each component's
//! exports were checked against the WIT package once, when the plugin loaded (`PluginPre::new` in
//! the loader), instead of again for every transaction's instance. An instance only
//! looks a hook up by its export index, resolved at load, when it is called.

use std::sync::Arc;

use wasmtime::component::{Component, ComponentExportIndex, Instance, Resource, TypedFunc};
use wasmtime::Store;

use super::bindings::types::{
    AddressDecision, AuthResults, BounceReport, BounceText, DataDecision, DeliveryReport, Envelope,
    MessageFacts, NextHop, Param, PluginInfo, Verdict,
};
use super::host::{BodyHandle, HostState, SessionHandle};

/// The interface a plugin exports, as the component names it (the package version in `wit/`).
/// A component built against an earlier 0.2.x exports it under its own version, which the
/// component model's semver rule matches to this one; one of another line fails to load here,
/// naming this export.
const HOOKS: &str = "switchyard:plugin/hooks@0.2.3";

/// `call_NAME(store, args) -> wasmtime::Result<RESULT>` for one export, like the generated
/// bindings. A hook without a result (`delivery-result`) has the results `()`, not `((),)`.
macro_rules! call {
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

/// The table: each hook's kind (a bit of [`HookSet`]), its WIT name, its field in
/// [`HookIndices`], and its call with the WIT's argument and result types.
macro_rules! hooks {
    ($($kind:ident = $bit:literal, $name:literal, $field:ident,
       $method:ident ($($arg:ident: $type:ty),*) $(-> $result:ty)?;)*) => {
        /// The hooks of the WIT `hooks` interface.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u16)]
        pub enum HookKind {
            $($kind = $bit,)*
        }

        impl HookKind {
            pub const ALL: [HookKind; [$($name),*].len()] = [$(HookKind::$kind),*];

            /// The hook's name in the WIT (and in `plugin-info.hooks`).
            pub fn name(self) -> &'static str {
                match self {
                    $(HookKind::$kind => $name,)*
                }
            }
        }

        /// Where `init` and each hook are among a component's exports.
        pub struct HookIndices {
            init: ComponentExportIndex,
            $($field: ComponentExportIndex,)*
        }

        impl HookIndices {
            /// Resolves every hook of `component`; the error names the first one missing.
            pub fn new(component: &Component) -> Result<HookIndices, String> {
                let interface = component
                    .get_export_index(None, HOOKS)
                    .ok_or_else(|| format!("does not export {HOOKS}"))?;
                let export = |name: &str| {
                    component
                        .get_export_index(Some(&interface), name)
                        .ok_or_else(|| format!("does not export {HOOKS}#{name}"))
                };
                Ok(HookIndices {
                    init: export("init")?,
                    $($field: export($name)?,)*
                })
            }
        }

        impl Hooks {
            call!(call_init, init, (config: &str) -> Result<PluginInfo, String>);
            $(call!($method, $field, ($($arg: $type),*) $(-> $result)?);)*
        }
    };
}

hooks! {
    Connect = 1, "connect", connect,
        call_connect(session: Resource<SessionHandle>) -> Verdict;
    Helo = 2, "helo", helo,
        call_helo(session: Resource<SessionHandle>, name: &str) -> Verdict;
    Auth = 4, "auth", auth,
        call_auth(session: Resource<SessionHandle>, mechanism: &str, identity: &str) -> Verdict;
    MailFrom = 8, "mail-from", mail_from,
        call_mail_from(session: Resource<SessionHandle>, sender: &str, params: &[Param]) -> AddressDecision;
    RcptTo = 16, "rcpt-to", rcpt_to,
        call_rcpt_to(session: Resource<SessionHandle>, envelope: &Envelope, recipient: &str, params: &[Param]) -> AddressDecision;
    Data = 32, "data", data,
        call_data(session: Resource<SessionHandle>, envelope: &Envelope, auth: &AuthResults, body: Resource<BodyHandle>) -> DataDecision;
    Route = 64, "route", route,
        call_route(message: &MessageFacts, recipient: &str) -> NextHop;
    DeliveryResult = 128, "delivery-result", delivery_result,
        call_delivery_result(report: &DeliveryReport);
    Bounce = 256, "bounce", bounce,
        call_bounce(report: &BounceReport) -> Option<BounceText>;
}

impl HookKind {
    /// The hook's position in [`HookKind::ALL`].
    pub fn index(self) -> usize {
        (self as u16).trailing_zeros() as usize
    }

    pub fn from_name(name: &str) -> Option<HookKind> {
        HookKind::ALL.into_iter().find(|hook| hook.name() == name)
    }
}

/// The hooks of one instance.
#[derive(Clone)]
pub struct Hooks {
    instance: Instance,
    indices: Arc<HookIndices>,
}

impl Hooks {
    pub fn new(instance: Instance, indices: Arc<HookIndices>) -> Hooks {
        Hooks { instance, indices }
    }

    /// The export at `index`. Callers use it as a `TypedFunc` of the WIT's types without
    /// checking them again: this component's exports were checked against exactly those types
    /// when the plugin loaded, and an index only ever refers to the component it was resolved
    /// on. A wrong type would make wasmtime panic, not misbehave.
    fn func(
        &self,
        store: &mut Store<HostState>,
        index: &ComponentExportIndex,
    ) -> wasmtime::Result<wasmtime::component::Func> {
        self.instance
            .get_func(&mut *store, index)
            .ok_or_else(|| wasmtime::format_err!("a hook is not exported"))
    }
}

/// The hooks one plugin implements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HookSet(u16);

impl HookSet {
    /// The hooks `init` named in its `plugin-info`; an unknown name is an error.
    pub fn from_names(names: &[String]) -> Result<HookSet, String> {
        let mut hooks = HookSet::default();
        for name in names {
            match HookKind::from_name(name) {
                Some(hook) => hooks.insert(hook),
                None => return Err(format!("init lists unknown hook `{name}`")),
            }
        }
        Ok(hooks)
    }

    pub fn insert(&mut self, hook: HookKind) {
        self.0 |= hook as u16;
    }

    pub fn contains(self, hook: HookKind) -> bool {
        self.0 & hook as u16 != 0
    }

    pub fn names(self) -> Vec<&'static str> {
        HookKind::ALL
            .into_iter()
            .filter(|hook| self.contains(*hook))
            .map(HookKind::name)
            .collect()
    }
}
