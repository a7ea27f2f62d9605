//! Hand-off to a mailbox server by LMTP (RFC 2033): a `[[route]]`'s `lmtp`, or the route hooks'
//! `mailbox(name)` recipients when `[mailboxes] lmtp` is set. The connection is the SMTP
//! client's, greeted with LHLO, and gives one reply per recipient after the data, so each
//! recipient's outcome (delivered, deferred, failed, its DSN) is its own.

use std::sync::Arc;

use async_trait::async_trait;

use super::client::{Client, ConnectOptions};
use super::connect::{Connection, OpenFailure, Transport};
use super::route::NextHop;
use crate::config::{Config, Endpoint, TlsPolicy};
use crate::mail::reply::Reply;
use crate::net::verify::ClientTls;

pub struct LmtpTransport {
    pub(super) config: Arc<Config>,
    pub(super) client_tls: Arc<ClientTls>,
}

impl LmtpTransport {
    /// Whether the route hooks' mailboxes go to an LMTP server instead of Maildirs.
    pub fn serves_mailboxes(&self) -> bool {
        self.config.mailboxes.lmtp.is_some()
    }

    async fn connect(&self, endpoint: &Endpoint, tls: TlsPolicy) -> Result<Client, OpenFailure> {
        let delivery = &self.config.delivery;
        let server_name = match endpoint {
            Endpoint::Tcp(address) => address
                .rsplit_once(':')
                .map_or(address.as_str(), |(host, _)| host)
                .trim_matches(['[', ']'])
                .to_string(),
            Endpoint::Unix(_) => "localhost".to_string(),
        };
        let options = ConnectOptions {
            helo_name: self.config.helo_name(),
            // A Unix socket never carries TLS: the policy applies over TCP only.
            tls: match endpoint {
                Endpoint::Unix(_) => TlsPolicy::None,
                Endpoint::Tcp(_) => tls,
            },
            client_tls: self.client_tls.clone(),
            server_name: &server_name,
            connect_timeout: delivery.connect_timeout,
            command_timeout: delivery.command_timeout,
            credentials: None,
            dane: None,
        };
        Client::connect_lmtp(endpoint, &options)
            .await
            .map_err(|error| OpenFailure::from(&error))
    }
}

#[async_trait]
impl Transport for LmtpTransport {
    async fn open(&self, hop: &NextHop) -> Result<Box<dyn Connection>, OpenFailure> {
        let (endpoint, tls) = match hop {
            NextHop::Lmtp { endpoint, tls } => (endpoint, *tls),
            NextHop::Mailbox { .. } => match &self.config.mailboxes.lmtp {
                Some(endpoint) => (endpoint, self.config.delivery.tls),
                None => return Err(Reply::new(451, "4.3.5", "no [mailboxes] lmtp is set").into()),
            },
            NextHop::Mx { .. } | NextHop::Relay { .. } => {
                return Err(Reply::new(451, "4.3.5", "not an LMTP next hop").into())
            }
        };
        let client = self.connect(endpoint, tls).await?;
        Ok(Box::new(client))
    }
}
