//! The seam between the dispatcher and the wire: a [`Transport`] opens a [`Connection`] to a next
//! hop, and the dispatcher sends jobs over it. Two transports do the real work, SMTP (DNS, TLS with
//! the opportunistic fallback, the client in `client.rs`) and local Maildir delivery
//! (`mailbox.rs`); [`Transports`] picks one by the kind of hop. Tests put a scripted transport in
//! their place (chasquid's `Courier` and `TestCourier`), so outcomes, retries and DSNs are tested
//! without sockets.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::client::{Client, ClientError, ConnectOptions, Dane, Envelope};
use super::credentials::{Credentials, SharedCredentials};
use super::mailbox;
use super::route::NextHop;
use super::sts::{Mode as StsMode, MtaSts, Policy as StsPolicy};
use super::tls_report;
use crate::config::{Config, TlsPolicy};
use crate::mail::address::domain_key;
use crate::mail::reply::Reply;
use crate::mail::text::one_line;
use crate::net::dane::{DaneVerifier, TlsaAnswer};
use crate::net::dns::{Dns, Target};
use crate::net::verify::{ClientTls, TlsState};
use crate::queue::policies::{PolicyStore, TlsOutcome};
use crate::queue::{MessageMeta, RecipientDsn};
use mail_auth::report::tlsrpt::ResultType;

/// One message for some of its recipients, as a connection sends it.
pub struct Outgoing<'a> {
    pub meta: &'a MessageMeta,
    pub recipients: &'a [String],
    /// NOTIFY and ORCPT of each recipient, in order.
    pub recipient_dsn: &'a [RecipientDsn],
    pub content: &'a Bytes,
}

/// What became of a message on a connection.
pub struct Sent {
    /// One reply per recipient, in order.
    pub replies: Vec<Reply>,
    /// False when the connection broke: it carries no more messages.
    pub intact: bool,
    /// The next hop took the DSN parameters (it offers DSN): success and delay notices are its.
    pub dsn_passed: bool,
    /// The replies are the next hop's own (not this host's: a connection lost, a Maildir that
    /// could not be written); only those may slow a destination down (`backoff.rs`).
    pub from_peer: bool,
}

/// Why a connection to a next hop could not be opened.
#[derive(Debug, Clone)]
pub struct OpenFailure {
    /// The reply for every recipient that was to go there (a 4xx defers them, a 5xx fails
    /// them).
    pub reply: Reply,
    /// The next hop said it (its greeting, or its answer to EHLO, STARTTLS or AUTH), rather
    /// than this host concluding it (no address, no answer, a certificate that did not check).
    pub from_peer: bool,
}

impl From<Reply> for OpenFailure {
    fn from(reply: Reply) -> OpenFailure {
        OpenFailure {
            reply,
            from_peer: false,
        }
    }
}

impl From<&ClientError> for OpenFailure {
    fn from(error: &ClientError) -> OpenFailure {
        OpenFailure {
            reply: error.reply(),
            from_peer: matches!(error, ClientError::Refused { .. }),
        }
    }
}

/// An open way to a next hop, carrying one message after another.
#[async_trait]
pub trait Connection: Send {
    /// Who is at the other end, for the delivery log line (`relay=`) and DSNs.
    fn relay(&self) -> String;
    /// Messages sent over it so far.
    fn sent(&self) -> usize;
    /// What protects it, for the delivery log line (`tls=`).
    fn tls(&self) -> TlsState;
    async fn send(&mut self, message: &Outgoing<'_>) -> Sent;
    /// Whether a connection that sat idle can still carry a message (an SMTP server may have
    /// closed it meanwhile): checked before it is used again, so that a closed one costs a
    /// new connection, never a deferred message.
    async fn reusable(&mut self) -> bool {
        true
    }
    /// Ends it politely (SMTP QUIT).
    async fn close(self: Box<Self>);
}

#[async_trait]
pub trait Transport: Send + Sync {
    /// Opens a connection to `hop`.
    async fn open(&self, hop: &NextHop) -> Result<Box<dyn Connection>, OpenFailure>;

    /// The names of `hop`'s MX hosts, for shaping rules by MX host (none for other hops).
    async fn mx_hosts(&self, _hop: &NextHop) -> Vec<String> {
        Vec::new()
    }
}

/// The server's transports: SMTP for relays and MX hosts, Maildir for mailboxes, LMTP for
/// mailbox servers.
pub struct Transports {
    pub smtp: SmtpTransport,
    pub mailbox: MailboxTransport,
    pub lmtp: super::lmtp::LmtpTransport,
}

impl Transports {
    pub fn new(
        config: Arc<Config>,
        dns: Arc<Dns>,
        client_tls: Arc<ClientTls>,
        credentials: SharedCredentials,
        policies: Arc<dyn PolicyStore>,
    ) -> Transports {
        Transports {
            smtp: SmtpTransport {
                config: config.clone(),
                sts: MtaSts::new(
                    config.mta_sts.clone(),
                    dns.clone(),
                    client_tls.clone(),
                    policies.clone(),
                ),
                policies,
                dns,
                client_tls: client_tls.clone(),
                credentials,
            },
            mailbox: MailboxTransport {
                root: config.mailboxes.root.clone(),
                hostname: config.hostname.clone(),
            },
            lmtp: super::lmtp::LmtpTransport { config, client_tls },
        }
    }
}

#[async_trait]
impl Transport for Transports {
    async fn open(&self, hop: &NextHop) -> Result<Box<dyn Connection>, OpenFailure> {
        match hop {
            NextHop::Mailbox { .. } if self.lmtp.serves_mailboxes() => self.lmtp.open(hop).await,
            NextHop::Mailbox { .. } => self.mailbox.open(hop).await,
            NextHop::Lmtp { .. } => self.lmtp.open(hop).await,
            NextHop::Relay { .. } | NextHop::Mx { .. } => self.smtp.open(hop).await,
        }
    }

    async fn mx_hosts(&self, hop: &NextHop) -> Vec<String> {
        match hop {
            NextHop::Mx { domain } => self.smtp.dns.mx_names(domain).await,
            _ => Vec::new(),
        }
    }
}

/// Delivery over SMTP to the first reachable host of a next hop.
pub struct SmtpTransport {
    config: Arc<Config>,
    dns: Arc<Dns>,
    client_tls: Arc<ClientTls>,
    /// Passwords for relays, by host (`[delivery] credentials_file`), as last reloaded.
    credentials: SharedCredentials,
    /// Recipient domains' MTA-STS policies.
    sts: MtaSts,
    /// Where TLS outcomes are counted for TLS reports.
    policies: Arc<dyn PolicyStore>,
}

impl SmtpTransport {
    /// The hosts to try for a next hop, best first.
    async fn targets(&self, hop: &NextHop) -> Result<Vec<Target>, Reply> {
        match hop {
            NextHop::Relay { host, .. } => {
                let target = self.dns.host_target(&host.host, host.port_or(25)).await?;
                Ok(vec![target])
            }
            NextHop::Mx { domain } => self.dns.mx_targets(domain, self.config.delivery.port).await,
            NextHop::Mailbox { name } => Err(Reply::new(
                451,
                "4.3.5",
                format!("mailbox `{}` is local: no SMTP host", one_line(name)),
            )),
            NextHop::Lmtp { endpoint, .. } => Err(Reply::new(
                451,
                "4.3.5",
                format!("lmtp:{endpoint} is not an SMTP host"),
            )),
        }
    }

    /// Connects to one address; opportunistic TLS that fails is retried in plain text, as
    /// Postfix does.
    async fn connect(
        &self,
        target: &Target,
        address: std::net::SocketAddr,
        tls: TlsPolicy,
        credentials: Option<&Credentials>,
        dane: Option<Dane>,
    ) -> Result<Client, ClientError> {
        let delivery = &self.config.delivery;
        // A host with validated TLSA records never falls back to plain text.
        let may_fall_back = tls == TlsPolicy::Opportunistic && dane.is_none();
        let mut options = ConnectOptions {
            helo_name: self.config.helo_name(),
            tls,
            client_tls: self.client_tls.clone(),
            server_name: &target.name,
            connect_timeout: delivery.connect_timeout,
            command_timeout: delivery.command_timeout,
            credentials: credentials.cloned(),
            dane,
        };
        let result = Client::connect(address, &options).await;
        if matches!(result, Err(ClientError::Tls { .. })) && may_fall_back {
            tracing::info!(host = %target.name, %address, "TLS handshake failed; retrying without TLS");
            options.tls = TlsPolicy::None;
            return Client::connect(address, &options).await;
        }
        result
    }
}

#[async_trait]
impl Transport for SmtpTransport {
    async fn open(&self, hop: &NextHop) -> Result<Box<dyn Connection>, OpenFailure> {
        let mut targets = self.targets(hop).await?;
        let mut tls = match hop {
            NextHop::Relay { tls, .. } => *tls,
            NextHop::Mx { .. } => self.config.delivery.tls,
            NextHop::Mailbox { .. } | NextHop::Lmtp { .. } => TlsPolicy::None,
        };
        let policy = match hop {
            NextHop::Mx { domain } => self.sts.policy_for(&domain_key(domain)).await,
            _ => None,
        };
        let domain = match hop {
            NextHop::Mx { domain } => domain.as_str(),
            _ => "",
        };
        let dane = self.dane_of(hop, &targets).await;
        let dane_for = |name: &str| dane.iter().find(|(host, _)| host == name).map(|(_, d)| d);
        if let Some(policy) = policy.as_deref().filter(|p| p.mode == StsMode::Enforce) {
            // RFC 8461 4: only the policy's MX hosts, over TLS verified for the MX name; a host
            // with DANE is held to its TLSA records instead (DANE beats MTA-STS, RFC 8461 2).
            let listed: Vec<String> = targets.iter().map(|t| t.name.clone()).collect();
            targets
                .retain(|target| policy.allows(&target.name) || dane_for(&target.name).is_some());
            if targets.is_empty() {
                let mx_host = listed.first().map(String::as_str).unwrap_or_default();
                self.count_outcome(
                    Counted::sts(domain, policy, mx_host, None),
                    Err((
                        ResultType::ValidationFailure,
                        "mx-not-in-policy".to_string(),
                    )),
                );
                return Err(Reply::new(
                    451,
                    "4.7.5",
                    format!(
                        "MTA-STS policy of {domain} (enforce) allows none of its MX hosts ({})",
                        listed.join(", ")
                    ),
                )
                .into());
            }
            tls = TlsPolicy::Require;
        }
        let credentials = match hop {
            NextHop::Relay { host, .. } => self
                .credentials
                .load()
                .get(&host.host, host.port_or(25))
                .cloned(),
            _ => None,
        };
        let mut last_error = OpenFailure::from(Reply::new(451, "4.4.1", "no host to connect to"));
        for target in &targets {
            let host_dane = match dane_for(&target.name) {
                Some(Ok(host_dane)) => Some(host_dane.clone()),
                Some(Err(reply)) => {
                    last_error = reply.clone().into();
                    continue;
                }
                None => None,
            };
            // Policy checks are MTA-STS's; a DANE host answers to DANE alone.
            let policy = if host_dane.is_some() {
                None
            } else {
                policy.clone()
            };
            let dane_records = host_dane.as_ref().map(|(_, text)| text.clone());
            for address in &target.addresses {
                let dane = host_dane.as_ref().map(|(dane, _)| dane.clone());
                match self
                    .connect(target, *address, tls, credentials.as_ref(), dane)
                    .await
                {
                    Ok(mut client) => {
                        if let Some(records) = &dane_records {
                            client.authenticated_host = true;
                            let counted = Counted::dane(domain, records, &target.name, address);
                            self.count_outcome(counted, Ok(()));
                            return Ok(Box::new(client));
                        }
                        client.authenticated_host = match hop {
                            NextHop::Mx { .. } => policy
                                .as_deref()
                                .is_some_and(|p| p.mode == StsMode::Enforce),
                            _ => true,
                        };
                        if let Some(policy) = policy.as_deref() {
                            let problems = policy_problems(policy, target, &client);
                            let outcome = match problems.is_empty() {
                                true => Ok(()),
                                false => Err((ResultType::ValidationFailure, problems.join("; "))),
                            };
                            let counted = Counted::sts(domain, policy, &target.name, Some(address));
                            self.count_outcome(counted, outcome);
                            if policy.mode == StsMode::Testing && !problems.is_empty() {
                                tracing::warn!(%domain, host = %target.name, "MTA-STS testing policy of {domain} would refuse this delivery: {}", problems.join("; "));
                            }
                        }
                        return Ok(Box::new(client));
                    }
                    Err(error) => {
                        let counted = match (&dane_records, policy.as_deref()) {
                            (Some(records), _) => {
                                Some(Counted::dane(domain, records, &target.name, address))
                            }
                            (None, Some(policy)) => {
                                Some(Counted::sts(domain, policy, &target.name, Some(address)))
                            }
                            (None, None) => None,
                        };
                        if let (Some(counted), Some(result)) =
                            (counted, tls_report::result_type(&error))
                        {
                            self.count_outcome(counted, Err((result, error.to_string())));
                        }
                        tracing::info!(%error, "connection attempt failed; trying the next host");
                        last_error = OpenFailure::from(&error);
                    }
                }
            }
        }
        Err(last_error)
    }
}

impl SmtpTransport {
    /// The DANE requirement of each MX host whose TLSA records a validating resolver vouches
    /// for (with `[delivery] dane` on and the MX records themselves validated): `Ok` the way to
    /// check its certificate, `Err` the reply when its TLSA lookup failed (the host is not tried:
    /// RFC 7672 2.2 forbids falling back). Hosts without validated records are not listed.
    async fn dane_of(
        &self,
        hop: &NextHop,
        targets: &[Target],
    ) -> Vec<(String, Result<(Dane, String), Reply>)> {
        let NextHop::Mx { domain } = hop else {
            return Vec::new();
        };
        if !self.config.delivery.dane || !self.dns.mx_is_authentic(domain).await {
            return Vec::new();
        }
        let mut found = Vec::new();
        for target in targets {
            let requirement = match self.dns.tlsa(&target.name, self.config.delivery.port).await {
                Ok(TlsaAnswer::Insecure) => continue,
                Ok(TlsaAnswer::Unusable) => Ok((Dane::EncryptOnly, String::new())),
                Ok(TlsaAnswer::Usable(records)) => {
                    let text = records
                        .iter()
                        .map(|r| r.to_string())
                        .collect::<Vec<_>>()
                        .join("\n");
                    DaneVerifier::client_config(records)
                        .map(|config| (Dane::Authenticate(config), text))
                        .map_err(|error| Reply::new(451, "4.7.5", format!("DANE: {error}")))
                }
                Err(error) => Err(Reply::new(
                    451,
                    "4.7.5",
                    format!("DANE: TLSA lookup for {} failed: {error}", target.name),
                )),
            };
            found.push((target.name.clone(), requirement));
        }
        found
    }
}

/// What a policy would find wrong with a connection: an MX host it does not list, TLS that is
/// not verified. Under `testing` the delivery goes ahead and this is logged and reported
/// (RFC 8461 5); under `enforce` neither can happen.
fn policy_problems(policy: &StsPolicy, target: &Target, client: &Client) -> Vec<String> {
    let mut problems = Vec::new();
    if !policy.allows(&target.name) {
        problems.push(format!("MX host {} is not in the policy", target.name));
    }
    if client.tls != TlsState::Verified {
        problems.push(format!("TLS is {}", client.tls));
    }
    problems
}

impl SmtpTransport {
    /// Counts a connection's TLS outcome for the policy domain's TLS report.
    fn count_outcome(&self, counted: Counted<'_>, outcome: Result<(), (ResultType, String)>) {
        if !self.config.tls_reports.enabled {
            return;
        }
        let (result, reason) = match outcome {
            Ok(()) => ("success".to_string(), String::new()),
            Err((result, reason)) => (tls_report::result_name(result), reason),
        };
        tls_report::count(
            &self.policies,
            TlsOutcome {
                domain: domain_key(counted.domain),
                policy_type: counted.policy_type.to_string(),
                policy_text: counted.policy_text.to_string(),
                mx_host: counted.mx_host.to_string(),
                result,
                receiving_ip: counted
                    .address
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default(),
                reason,
            },
        );
    }
}

/// Which policy a connection's TLS outcome is counted under, for TLS reports (RFC 8460).
struct Counted<'a> {
    domain: &'a str,
    /// `sts` or `tlsa`.
    policy_type: &'static str,
    /// The MTA-STS policy file, or the TLSA records one per line.
    policy_text: &'a str,
    mx_host: &'a str,
    address: Option<&'a std::net::SocketAddr>,
}

impl<'a> Counted<'a> {
    fn sts(
        domain: &'a str,
        policy: &'a StsPolicy,
        mx_host: &'a str,
        address: Option<&'a std::net::SocketAddr>,
    ) -> Counted<'a> {
        Counted {
            domain,
            policy_type: "sts",
            policy_text: &policy.text,
            mx_host,
            address,
        }
    }

    fn dane(
        domain: &'a str,
        records: &'a str,
        mx_host: &'a str,
        address: &'a std::net::SocketAddr,
    ) -> Counted<'a> {
        Counted {
            domain,
            policy_type: "tlsa",
            policy_text: records,
            mx_host,
            address: Some(address),
        }
    }
}

#[async_trait]
impl Connection for Client {
    fn relay(&self) -> String {
        self.peer.clone()
    }

    fn sent(&self) -> usize {
        self.transactions
    }

    fn tls(&self) -> TlsState {
        self.tls
    }

    async fn send(&mut self, message: &Outgoing<'_>) -> Sent {
        let envelope = Envelope {
            sender: &message.meta.sender,
            recipients: message.recipients,
            smtputf8: message.meta.smtputf8,
            eight_bit: message.meta.eight_bit,
            size: message.meta.size,
            dsn: &message.meta.dsn,
            recipient_dsn: message.recipient_dsn,
        };
        let dsn_passed = self.offers_dsn();
        match Client::send(self, &envelope, message.content).await {
            Ok(replies) => Sent {
                replies,
                intact: true,
                dsn_passed,
                from_peer: true,
            },
            Err(error) => Sent {
                replies: vec![error.reply(); message.recipients.len()],
                intact: false,
                dsn_passed,
                from_peer: matches!(error, ClientError::Refused { .. }),
            },
        }
    }

    async fn reusable(&mut self) -> bool {
        self.still_open().await
    }

    async fn close(self: Box<Self>) {
        self.quit().await;
    }
}

/// Local delivery into the Maildir folders under `[mailboxes] root`.
pub struct MailboxTransport {
    root: Option<PathBuf>,
    hostname: String,
}

#[async_trait]
impl Transport for MailboxTransport {
    async fn open(&self, hop: &NextHop) -> Result<Box<dyn Connection>, OpenFailure> {
        let NextHop::Mailbox { name } = hop else {
            return Err(Reply::new(451, "4.3.5", "not a mailbox").into());
        };
        let Some(root) = self.root.clone() else {
            // Keep the mail rather than lose it: the operator can add the setting.
            return Err(Reply::new(
                451,
                "4.3.5",
                format!(
                    "mailbox `{}`: no [mailboxes] root is configured",
                    one_line(name)
                ),
            )
            .into());
        };
        Ok(Box::new(MailboxConnection {
            root,
            name: name.clone(),
            hostname: self.hostname.clone(),
            sent: 0,
        }))
    }
}

struct MailboxConnection {
    root: PathBuf,
    name: String,
    hostname: String,
    sent: usize,
}

#[async_trait]
impl Connection for MailboxConnection {
    fn relay(&self) -> String {
        // The name came from a plugin: it goes into a log line and a DSN field.
        format!("mailbox:{}", one_line(&self.name))
    }

    fn sent(&self) -> usize {
        self.sent
    }

    fn tls(&self) -> TlsState {
        TlsState::None
    }

    /// Writes one copy per recipient.
    async fn send(&mut self, message: &Outgoing<'_>) -> Sent {
        let mut replies = Vec::with_capacity(message.recipients.len());
        for recipient in message.recipients {
            let (root, mailbox, content) = (
                self.root.clone(),
                self.name.clone(),
                message.content.clone(),
            );
            let hostname = self.hostname.clone();
            let sender = message.meta.sender.clone();
            let address = recipient.clone();
            // File writes and fsyncs block: off the async workers.
            let reply = tokio::task::spawn_blocking(move || {
                mailbox::deliver(&mailbox::Letter {
                    root: &root,
                    mailbox: &mailbox,
                    hostname: &hostname,
                    sender: &sender,
                    recipient: &address,
                    content: &content,
                })
            })
            .await
            .unwrap_or_else(|_| Reply::new(451, "4.3.0", "local delivery failed"));
            replies.push(reply);
        }
        self.sent += 1;
        Sent {
            replies,
            intact: true,
            dsn_passed: false,
            from_peer: false,
        }
    }

    async fn close(self: Box<Self>) {}
}
