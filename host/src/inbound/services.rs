//! What every SMTP session shares.

use std::sync::Arc;

use crate::config::Config;
use crate::delivery::inbox::Inbox;
use crate::plugins::PluginManager;

pub struct Services {
    pub config: Arc<Config>,
    /// Where accepted messages go.
    pub inbox: Arc<Inbox>,
    /// The plugin chains; their generations change on reload.
    pub plugins: Arc<PluginManager>,
    /// Whose a domain or a user is, and each tenant's limits and usage.
    pub tenants: Arc<crate::tenants::Tenants>,
    /// Present when a certificate is configured: STARTTLS is offered.
    pub tls_acceptor: Option<tokio_rustls::TlsAcceptor>,
    /// The acceptor's certificates (chosen by SNI), loaded again on reload.
    pub certificates: Option<Arc<crate::net::tls::CertificateResolver>>,
    /// Present when `authentication.verify` is on: SPF, DKIM and DMARC of inbound mail.
    pub authenticator: Option<mail_auth::MessageAuthenticator>,
    /// Present when `[submission] users_file` is set: SMTP AUTH is offered on submission
    /// listeners.
    pub accounts: Option<crate::accounts::SharedAccounts>,
    /// Failed AUTH attempts per client address, across sessions.
    pub auth_budget: Arc<super::AuthBudget>,
    /// DKIM keys of the global configuration and of each tenant; signs mail of trusted clients.
    pub signer: Arc<crate::dkim::Signer>,
    /// The content scanners asked about each message before the data hooks.
    pub scanners: Arc<crate::scan::Scanners>,
    /// The soft limit on resident memory (`[smtp] memory_limit`): new sessions are refused
    /// above it. `None` when what the process may use is not known and the limit is a
    /// percentage of it.
    pub memory: Option<std::sync::Arc<super::memory::MemoryGuard>>,
    /// The graceful stop: sessions run under it and watch it.
    pub shutdown: crate::shutdown::Shutdown,
}
