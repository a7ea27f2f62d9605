//! Delivery: the dispatcher groups queued recipients by next hop, runs a bounded number of
//! connections per destination, sends several messages per connection, and records each
//! recipient's outcome (delivered, deferred with a retry time, or failed with a DSN).

pub mod dns;
pub mod dsn;
pub mod mailbox;
mod observe;
pub mod retry;
pub mod route;
mod scanner;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Semaphore;

use crate::config::{Config, HostPort, TlsPolicy};
use crate::plugins::bindings::types as wit;
use crate::plugins::chain::RouteDecision;
use crate::plugins::hooks::HookKind;
use crate::plugins::{PluginManager, PluginRun, PluginSet, RunContext};
use crate::queue::{
    now_millis, MessageMeta, Outcome, Queue, QueuedMessage, RecipientResult, RecipientRow,
};
use crate::shutdown::Shutdown;
use crate::smtp::address::{domain_key, Mailbox};
use crate::smtp::client::{Client, ConnectOptions, Envelope};
use crate::smtp::reply::Reply;
use dns::Dns;
use dsn::FailedRecipient;
use route::NextHop;

pub use scanner::run_scanner;

/// Recipients of one message that go to one destination.
struct Job {
    meta: Arc<MessageMeta>,
    content: Option<Bytes>,
    recipients: Vec<RecipientRow>,
    /// The message's plugin instances, held for its delivery-result and bounce hooks (one job of
    /// a message carries them; the others instantiate their own).
    plugins: Option<PluginRun>,
}

struct Destination {
    hop: NextHop,
    jobs: VecDeque<Job>,
    workers: usize,
}

#[derive(Default)]
struct State {
    destinations: HashMap<String, Destination>,
    /// (message id, recipient index) of every recipient held in memory, so a scan never hands out
    /// one that is already being worked on.
    in_flight: HashSet<(String, i64)>,
}

pub struct Dispatcher {
    config: Arc<Config>,
    queue: Arc<dyn Queue>,
    dns: Arc<Dns>,
    plugins: Arc<PluginManager>,
    tls_config: Arc<rustls::ClientConfig>,
    connections: Arc<Semaphore>,
    state: Mutex<State>,
    /// Once stopping, no delivery starts; those under way finish.
    shutdown: Shutdown,
}

/// The message facts plugins see.
fn plugin_facts(meta: &MessageMeta) -> wit::MessageFacts {
    wit::MessageFacts {
        id: meta.id.clone(),
        sender: meta.sender.clone(),
        size: meta.size,
        tenant: String::new(),
    }
}

/// The fate of one recipient in one attempt.
struct Attempt {
    recipient: RecipientRow,
    reply: Reply,
    relay: String,
}

impl Dispatcher {
    pub fn new(
        config: Arc<Config>,
        queue: Arc<dyn Queue>,
        dns: Arc<Dns>,
        plugins: Arc<PluginManager>,
        shutdown: Shutdown,
    ) -> Arc<Dispatcher> {
        Arc::new(Dispatcher {
            shutdown,
            connections: Arc::new(Semaphore::new(config.delivery.max_connections)),
            config,
            queue,
            dns,
            plugins,
            tls_config: crate::net::tls::unverified_client_config(),
            state: Mutex::new(State::default()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Hands a claimed message to delivery. `content` saves a read when the caller has it;
    /// `plugins` is the run of the SMTP transaction that accepted it, if it was held for reuse.
    pub fn submit(
        self: &Arc<Self>,
        message: QueuedMessage,
        content: Option<Bytes>,
        plugins: Option<PluginRun>,
    ) {
        if self.shutdown.is_stopping() {
            // The message is in the queue, leased to this process: the next start takes it up.
            return;
        }
        let meta = Arc::new(message.meta);
        let recipients = self.take_in_flight(&meta.id, message.recipients);
        if recipients.is_empty() {
            return;
        }
        let set = self.plugins.current();
        if set.implements(HookKind::Route) {
            let dispatcher = self.clone();
            self.shutdown.spawn_delivery(async move {
                dispatcher
                    .route_with_plugins(set, meta, recipients, content, plugins)
                    .await
            });
        } else {
            let routed = recipients
                .into_iter()
                .map(|recipient| (self.static_hop(&recipient.address), recipient))
                .collect();
            let plugins = plugins.filter(|run| run.generation() == set.generation);
            self.queue_jobs(meta, content, routed, plugins);
        }
    }

    /// The run for a message's delivery-side hooks: `held` if it is of the current generation,
    /// else a fresh one.
    fn plugin_run(
        &self,
        set: &Arc<PluginSet>,
        meta: &MessageMeta,
        held: Option<PluginRun>,
    ) -> PluginRun {
        PluginRun::resume(
            set,
            held,
            RunContext {
                tenant: String::new(),
                queue_id: Some(meta.id.clone()),
            },
        )
    }

    /// Marks recipients as in flight, dropping those that already are.
    fn take_in_flight(&self, id: &str, recipients: Vec<RecipientRow>) -> Vec<RecipientRow> {
        let mut state = self.state();
        recipients
            .into_iter()
            .filter(|recipient| state.in_flight.insert((id.to_string(), recipient.index)))
            .collect()
    }

    /// The next hop from the configuration alone: routes, smarthost, MX.
    fn static_hop(&self, address: &str) -> NextHop {
        let domain = Mailbox::from_stored(address)
            .map(|mailbox| mailbox.domain)
            .unwrap_or_default();
        route::next_hop(&self.config, &domain)
    }

    /// Asks the route hooks for each recipient; settles at once the recipients they discard or
    /// fail, and queues the rest.
    async fn route_with_plugins(
        self: Arc<Self>,
        set: Arc<PluginSet>,
        meta: Arc<MessageMeta>,
        recipients: Vec<RecipientRow>,
        content: Option<Bytes>,
        held: Option<PluginRun>,
    ) {
        let mut run = self.plugin_run(&set, &meta, held);
        let facts = plugin_facts(&meta);
        let mut routed = Vec::new();
        let mut settled = Vec::new();
        for recipient in recipients {
            let settle = |reply: Reply| Attempt {
                recipient: recipient.clone(),
                reply,
                relay: "plugin".to_string(),
            };
            match run.route(&facts, &recipient.address).await {
                RouteDecision::Continue | RouteDecision::Hop(wit::NextHop::Continue) => {
                    routed.push((self.static_hop(&recipient.address), recipient));
                }
                RouteDecision::Hop(wit::NextHop::Mx(domain)) => {
                    if !crate::smtp::address::is_domain(&domain) {
                        settled.push(settle(Reply::new(
                            451,
                            "4.3.5",
                            "a routing plugin named an invalid domain",
                        )));
                        continue;
                    }
                    routed.push((
                        NextHop::Mx {
                            domain: domain_key(&domain),
                        },
                        recipient,
                    ));
                }
                RouteDecision::Hop(wit::NextHop::Smarthost(smarthost)) => {
                    // A host name as strict as one in the configuration; a plugin's bad one
                    // defers the recipient (the operator can fix the plugin) instead of
                    // reaching DNS, logs and DSNs.
                    let Ok(parsed) = smarthost.host.parse::<HostPort>() else {
                        settled.push(settle(Reply::new(
                            451,
                            "4.3.5",
                            "a routing plugin named an invalid smarthost",
                        )));
                        continue;
                    };
                    let host = HostPort {
                        host: parsed.host,
                        port: Some(smarthost.port),
                    };
                    let tls = match smarthost.tls {
                        wit::TlsPolicy::None => TlsPolicy::None,
                        wit::TlsPolicy::Opportunistic => TlsPolicy::Opportunistic,
                        wit::TlsPolicy::Require => TlsPolicy::Require,
                    };
                    routed.push((NextHop::Relay { host, tls }, recipient));
                }
                RouteDecision::Hop(wit::NextHop::Mailbox(name)) => {
                    if self.config.mailboxes.root.is_some() {
                        routed.push((NextHop::Mailbox { name }, recipient));
                    } else {
                        // Keep the mail rather than lose it: the operator can add the setting.
                        settled.push(settle(Reply::new(
                            451,
                            "4.3.5",
                            format!("mailbox `{name}`: no [mailboxes] root is configured"),
                        )));
                    }
                }
                RouteDecision::Hop(wit::NextHop::Discard) => {
                    settled.push(settle(Reply::new(
                        250,
                        "2.0.0",
                        "discarded by a routing plugin",
                    )));
                }
                RouteDecision::Hop(wit::NextHop::Fail(reply)) => {
                    // A 4xx defers the recipient, anything else fails it.
                    let permanent = !(400..500).contains(&reply.code);
                    settled.push(settle(crate::plugins::chain::reply_of(reply, permanent)));
                }
                RouteDecision::Failed(reply) => settled.push(settle(reply)),
            }
        }
        let mut run = Some(run);
        if !settled.is_empty() {
            let job = Job {
                meta: meta.clone(),
                content: content.clone(),
                recipients: settled
                    .iter()
                    .map(|attempt| attempt.recipient.clone())
                    .collect(),
                plugins: if routed.is_empty() { run.take() } else { None },
            };
            self.finish(job, settled).await;
        }
        let run = run.and_then(|run| {
            self.plugins
                .hold(run, &[HookKind::DeliveryResult, HookKind::Bounce])
        });
        self.queue_jobs(meta, content, routed, run);
    }

    /// Queues one job per next hop and starts connection workers within the limits.
    fn queue_jobs(
        self: &Arc<Self>,
        meta: Arc<MessageMeta>,
        content: Option<Bytes>,
        routed: Vec<(NextHop, RecipientRow)>,
        mut plugins: Option<PluginRun>,
    ) {
        let mut by_hop: HashMap<String, (NextHop, Vec<RecipientRow>)> = HashMap::new();
        for (hop, recipient) in routed {
            by_hop
                .entry(hop.key())
                .or_insert_with(|| (hop, Vec::new()))
                .1
                .push(recipient);
        }
        let limit = self.config.delivery.max_connections_per_destination;
        let mut spawn = Vec::new();
        let mut state = self.state();
        for (key, (hop, recipients)) in by_hop {
            let destination =
                state
                    .destinations
                    .entry(key.clone())
                    .or_insert_with(|| Destination {
                        hop,
                        jobs: VecDeque::new(),
                        workers: 0,
                    });
            destination.jobs.push_back(Job {
                meta: meta.clone(),
                content: content.clone(),
                recipients,
                plugins: plugins.take(),
            });
            if destination.workers < limit && destination.workers < destination.jobs.len() {
                destination.workers += 1;
                spawn.push(key);
            }
        }
        drop(state);
        for key in spawn {
            let dispatcher = self.clone();
            self.shutdown
                .spawn_delivery(async move { dispatcher.work(key).await });
        }
    }

    /// The next job for a destination; when there is none (or the process is stopping) the
    /// calling worker is no longer counted. Jobs left behind at a stop stay leased in the queue,
    /// and the next start delivers them.
    fn next_job(&self, key: &str) -> Option<(NextHop, Job)> {
        let mut state = self.state();
        let stopping = self.shutdown.is_stopping();
        let destination = state.destinations.get_mut(key)?;
        let job = if stopping {
            None
        } else {
            destination.jobs.pop_front()
        };
        match job {
            Some(job) => Some((destination.hop.clone(), job)),
            None => {
                destination.workers -= 1;
                if destination.workers == 0 {
                    state.destinations.remove(key);
                }
                None
            }
        }
    }

    /// Every job still waiting for a destination (used when the destination is unreachable).
    fn take_waiting(&self, key: &str) -> Vec<Job> {
        let mut state = self.state();
        state
            .destinations
            .get_mut(key)
            .map(|destination| destination.jobs.drain(..).collect())
            .unwrap_or_default()
    }

    /// One connection worker: opens a connection to the destination and sends jobs over it until
    /// none is left.
    async fn work(self: Arc<Self>, key: String) {
        loop {
            let Ok(permit) = self.connections.clone().acquire_owned().await else {
                return;
            };
            let Some((hop, job)) = self.next_job(&key) else {
                return;
            };
            if let NextHop::Mailbox { name } = &hop {
                self.deliver_locally(name, job).await;
                continue;
            }
            let mut job = Some(job);
            match self.open(&hop).await {
                Err(reply) => {
                    // The destination is unreachable now: every job waiting for it shares the fate.
                    let relay = "none".to_string();
                    let mut jobs: Vec<Job> = job.take().into_iter().collect();
                    jobs.extend(self.take_waiting(&key));
                    for job in jobs {
                        let attempts = job
                            .recipients
                            .iter()
                            .map(|recipient| Attempt {
                                recipient: recipient.clone(),
                                reply: reply.clone(),
                                relay: relay.clone(),
                            })
                            .collect();
                        self.finish(job, attempts).await;
                    }
                }
                Ok(mut client) => {
                    let max_messages = self.config.delivery.max_messages_per_connection;
                    let mut broken = false;
                    while let Some(current) = job.take() {
                        broken = !self.deliver(&mut client, current).await;
                        if broken || client.transactions >= max_messages {
                            break;
                        }
                        job = self.next_job(&key).map(|(_, job)| job);
                        if job.is_none() {
                            // This worker is no longer counted: close and stop.
                            client.quit().await;
                            return;
                        }
                    }
                    if !broken {
                        client.quit().await;
                    }
                }
            }
            drop(permit);
        }
    }

    /// Connects to the first reachable host of a next hop. An `Err` is the reply for every
    /// recipient that was to go there.
    async fn open(&self, hop: &NextHop) -> Result<Client, Reply> {
        let delivery = &self.config.delivery;
        let targets = self.dns.targets(hop, delivery.port).await?;
        let tls = match hop {
            NextHop::Relay { tls, .. } => *tls,
            NextHop::Mx { .. } => delivery.tls,
            NextHop::Mailbox { .. } => TlsPolicy::None,
        };
        let mut last_error = Reply::new(451, "4.4.1", "no host to connect to");
        for target in &targets {
            for address in &target.addresses {
                let mut options = ConnectOptions {
                    helo_name: self.config.helo_name(),
                    tls,
                    tls_config: self.tls_config.clone(),
                    server_name: &target.name,
                    connect_timeout: delivery.connect_timeout,
                    command_timeout: delivery.command_timeout,
                };
                let mut result = Client::connect(*address, &options).await;
                if let Err(crate::smtp::client::ClientError::Tls { .. }) = &result {
                    if tls == TlsPolicy::Opportunistic {
                        // Opportunistic TLS that fails is retried in plain text, as Postfix does.
                        tracing::info!(host = %target.name, %address, "TLS handshake failed; retrying without TLS");
                        options.tls = TlsPolicy::None;
                        result = Client::connect(*address, &options).await;
                    }
                }
                match result {
                    Ok(client) => return Ok(client),
                    Err(error) => {
                        tracing::info!(%error, "connection attempt failed; trying the next host");
                        last_error = error.reply();
                    }
                }
            }
        }
        Err(last_error)
    }

    /// Sends one job over an open connection and records the results. Returns false when the
    /// connection broke.
    async fn deliver(&self, client: &mut Client, mut job: Job) -> bool {
        let Some(content) = self.content_of(&mut job).await else {
            return true;
        };
        let addresses: Vec<String> = job.recipients.iter().map(|r| r.address.clone()).collect();
        let envelope = Envelope {
            sender: &job.meta.sender,
            recipients: &addresses,
            smtputf8: job.meta.smtputf8,
            eight_bit: job.meta.eight_bit,
            size: job.meta.size,
        };
        let relay = client.peer.clone();
        let (replies, intact) = match client.send(&envelope, &content).await {
            Ok(replies) => (replies, true),
            Err(error) => (vec![error.reply(); addresses.len()], false),
        };
        let attempts = job
            .recipients
            .iter()
            .zip(replies)
            .map(|(recipient, reply)| Attempt {
                recipient: recipient.clone(),
                reply,
                relay: relay.clone(),
            })
            .collect();
        job.content = Some(content);
        self.finish(job, attempts).await;
        intact
    }

    /// The job's content, read from the queue if the job does not carry it. `None` (and the job
    /// forgotten) when the message is gone or cannot be read: a later scan finds it again.
    async fn content_of(&self, job: &mut Job) -> Option<Bytes> {
        if let Some(content) = job.content.take() {
            return Some(content);
        }
        match self.queue.content(&job.meta.id).await {
            Ok(Some(content)) => Some(content),
            Ok(None) => {
                tracing::info!(queue_id = %job.meta.id, "message left the queue before delivery");
                self.forget(job);
                None
            }
            Err(error) => {
                tracing::error!(queue_id = %job.meta.id, %error, "cannot read message content");
                self.forget(job);
                None
            }
        }
    }

    /// Writes one copy per recipient into a local Maildir and records the results.
    async fn deliver_locally(&self, name: &str, mut job: Job) {
        let Some(content) = self.content_of(&mut job).await else {
            return;
        };
        let Some(root) = self.config.mailboxes.root.clone() else {
            return;
        };
        let mut attempts = Vec::with_capacity(job.recipients.len());
        for recipient in &job.recipients {
            let (root, mailbox, content) = (root.clone(), name.to_string(), content.clone());
            let hostname = self.config.hostname.clone();
            let sender = job.meta.sender.clone();
            let address = recipient.address.clone();
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
            attempts.push(Attempt {
                recipient: recipient.clone(),
                reply,
                // The name came from a plugin: it goes into a log line and a DSN field.
                relay: format!("mailbox:{}", crate::smtp::text::one_line(name)),
            });
        }
        job.content = Some(content);
        self.finish(job, attempts).await;
    }

    /// Drops a job's recipients from the in-flight set without recording anything.
    fn forget(&self, job: &Job) {
        let mut state = self.state();
        for recipient in &job.recipients {
            state
                .in_flight
                .remove(&(job.meta.id.clone(), recipient.index));
        }
    }

    /// Turns replies into outcomes, logs one line per recipient, queues a DSN for failures and
    /// records it all in one transaction.
    async fn finish(&self, mut job: Job, attempts: Vec<Attempt>) {
        let now = now_millis();
        let meta = job.meta.clone();
        let delay = (now - meta.received_at).max(0) as f64 / 1000.0;
        let mut results = Vec::with_capacity(attempts.len());
        let mut failed = Vec::new();
        let mut reports = Vec::new();
        for attempt in attempts {
            let count = attempt.recipient.attempts + 1;
            let reply_text = attempt.reply.one_line();
            let (outcome, status, diagnostic) = if attempt.reply.is_positive() {
                (Outcome::Delivered, "sent", reply_text.clone())
            } else if attempt.reply.is_permanent() {
                (Outcome::Failed, "bounced", reply_text.clone())
            } else {
                match retry::next_attempt(&self.config.retry, count, meta.received_at, now) {
                    Some(next_attempt) => (Outcome::Deferred { next_attempt }, "deferred", reply_text.clone()),
                    None => (
                        Outcome::Failed,
                        "expired",
                        format!("message expired after {delay:.0}s in the queue; last reply: {reply_text}"),
                    ),
                }
            };
            metrics::counter!("switchyard_deliveries_total", "status" => status).increment(1);
            tracing::info!(
                queue_id = %meta.id,
                "to=<{}>, relay={}, delay={:.2}s, attempt={}, status={} ({})",
                attempt.recipient.address,
                attempt.relay,
                delay,
                count,
                status,
                diagnostic
            );
            if matches!(outcome, Outcome::Failed) {
                let dsn_status = if status == "expired" {
                    "4.4.7".to_string()
                } else {
                    dsn::status_of(attempt.reply.code, &attempt.reply.enhanced)
                };
                failed.push(FailedRecipient {
                    address: attempt.recipient.address.clone(),
                    status: dsn_status,
                    diagnostic: diagnostic.clone(),
                    remote_mta: (attempt.relay != "none").then(|| attempt.relay.clone()),
                });
            }
            reports.push(observe::report(
                &meta,
                &attempt.recipient.address,
                &outcome,
                &attempt.relay,
                &diagnostic,
                count,
            ));
            results.push(RecipientResult {
                message_id: meta.id.clone(),
                index: attempt.recipient.index,
                attempts: count,
                outcome,
                reply: diagnostic,
            });
        }
        let set = self.plugins.current();
        let mut run = self.plugin_run(&set, &meta, job.plugins.take());
        let mut bounces = Vec::new();
        if !failed.is_empty() {
            let content = match job.content.take() {
                Some(content) => Some(content),
                None => self.queue.content(&meta.id).await.ok().flatten(),
            };
            let content = content.unwrap_or_default();
            let text = observe::bounce_text(&mut run, &meta, &failed, &content).await;
            match dsn::build(
                &self.config.hostname,
                &meta,
                &content,
                &failed,
                text.as_ref(),
            ) {
                Some(bounce) => {
                    tracing::info!(queue_id = %meta.id, dsn = %bounce.meta.id, "sender non-delivery notification");
                    bounces.push(bounce);
                }
                None if meta.sender.is_empty() => {
                    tracing::info!(queue_id = %meta.id, "undeliverable bounce discarded (null sender)");
                }
                None => {}
            }
        }
        let recorded = self.queue.record(results, bounces).await;
        self.forget(&job);
        match recorded {
            // Observers hear of an outcome once it is recorded, never of one that a crash could
            // undo.
            Ok(()) => observe::delivery_results(&mut run, &reports).await,
            // The recipients stay leased and are tried again once the lease expires.
            Err(error) => {
                tracing::error!(queue_id = %meta.id, %error, "cannot record delivery results")
            }
        }
    }
}
