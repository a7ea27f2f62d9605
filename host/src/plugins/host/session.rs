//! The `types` interface: the `session` resource lent to every session hook.
use std::sync::Arc;

use wasmtime::component::{HasSelf, Linker, Resource};

use super::HostState;
use crate::plugins::bindings::switchyard::plugin::types;

/// What a hook can learn about the SMTP session through the `session` resource.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionFacts {
    pub client_ip: String,
    pub listener: String,
    pub submission: bool,
    pub helo: Option<String>,
    pub tls: bool,
    pub auth_identity: Option<String>,
    pub tenant: String,
}

/// The `session` lent to one hook call (the host pushes it before the call and takes it back
/// after: a plugin only ever sees it borrowed).
pub struct SessionHandle(pub Arc<SessionFacts>);

impl types::Host for HostState {}

impl HostState {
    /// The facts behind a lent session; a stale handle (which the component model's borrow
    /// rules should make impossible) reads as an empty session rather than trapping the host.
    fn session(&self, session: &Resource<SessionHandle>) -> Arc<SessionFacts> {
        self.table
            .get(session)
            .map(|handle| handle.0.clone())
            .unwrap_or_default()
    }
}

impl types::HostSession for HostState {
    async fn client_ip(&mut self, session: Resource<SessionHandle>) -> String {
        self.session(&session).client_ip.clone()
    }

    async fn listener(&mut self, session: Resource<SessionHandle>) -> String {
        self.session(&session).listener.clone()
    }

    async fn submission(&mut self, session: Resource<SessionHandle>) -> bool {
        self.session(&session).submission
    }

    async fn helo(&mut self, session: Resource<SessionHandle>) -> Option<String> {
        self.session(&session).helo.clone()
    }

    async fn tls(&mut self, session: Resource<SessionHandle>) -> bool {
        self.session(&session).tls
    }

    async fn auth_identity(&mut self, session: Resource<SessionHandle>) -> Option<String> {
        self.session(&session).auth_identity.clone()
    }

    async fn tenant(&mut self, session: Resource<SessionHandle>) -> String {
        self.session(&session).tenant.clone()
    }

    async fn drop(&mut self, session: Resource<SessionHandle>) -> wasmtime::Result<()> {
        self.table.delete(session)?;
        Ok(())
    }
}

/// Adds the `types` interface to `linker`.
pub(super) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    types::add_to_linker::<_, HasSelf<HostState>>(linker, |state| state)
}
