//! What every SMTP session and delivery worker shares.

use std::sync::Arc;

use crate::config::Config;
use crate::delivery::Dispatcher;
use crate::plugins::PluginManager;
use crate::queue::Queue;

pub struct Services {
    pub config: Arc<Config>,
    pub queue: Arc<dyn Queue>,
    pub dispatcher: Arc<Dispatcher>,
    /// The plugin chain; its generation changes on reload.
    pub plugins: Arc<PluginManager>,
    /// This process's name for queue leases.
    pub node_id: String,
    /// Present when a certificate is configured: STARTTLS is offered.
    pub tls_acceptor: Option<tokio_rustls::TlsAcceptor>,
    /// Present when `authentication.verify` is on: SPF, DKIM and DMARC of inbound mail.
    pub authenticator: Option<mail_auth::MessageAuthenticator>,
    /// Present when `[submission] users_file` is set: SMTP AUTH is offered on submission
    /// listeners.
    pub accounts: Option<Arc<crate::accounts::Accounts>>,
    /// Failed AUTH attempts per client address, across sessions.
    pub auth_budget: Arc<crate::smtp::server::AuthBudget>,
    /// The graceful stop: sessions run under it and watch it.
    pub shutdown: crate::shutdown::Shutdown,
}
