//! Delivery, the outbound wing: everything after the 250. The dispatcher (this file) keeps the
//! recipients in flight, groups them by next hop (`routing.rs`), and runs a bounded number of
//! connection workers per destination (its `shaping.rs` rule: connections, messages per
//! connection, rate, and the `backoff.rs` cut when the destination asks to slow down), each
//! sending one job after another over a connection that a [`connect::Transport`] opened (SMTP,
//! LMTP or Maildir), or one `idle.rs` kept open since the last. `status.rs` is what the admin
//! API shows of it. `outcome.rs` turns each attempt's replies
//! into delivered, deferred (with a retry time) or failed (with a DSN). `inbox.rs` is the door
//! in from the SMTP sessions; `scanner.rs` the door in from the queue.

pub mod backoff;
pub mod client;
pub mod connect;
pub mod credentials;
pub mod dsn;
mod idle;
pub mod inbox;
pub mod lmtp;
pub mod mailbox;
pub mod observe;
mod outcome;
pub mod retry;
pub mod route;
mod routing;
mod scanner;
pub mod shaping;
mod status;
pub mod sts;
#[cfg(test)]
mod tests;
pub mod tls_report;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Semaphore;

use crate::config::Config;
use crate::plugins::hooks::HookKind;
use crate::plugins::{PluginManager, PluginRun, PluginSet};
use crate::queue::{MessageMeta, Queue, QueuedMessage, RecipientRow};
use crate::shutdown::Shutdown;
use crate::tenants::Tenants;
use connect::{Connection, Outgoing, Transport};
use outcome::Attempt;
use route::NextHop;

pub use scanner::{run_lease_renewal, run_scanner};
pub use status::report_destinations;

/// The longest a connection is kept open waiting for its next message's send time: longer
/// waits are made without a connection (a server's idle timeout is often 30 s to 5 min).
const HOLD_FOR_SEND_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// What a worker does after a connection.
enum AfterConnection {
    /// The destination has no job left: the worker stops.
    NoJobs,
    /// Open (or take) another connection for the jobs left.
    Reopen,
    /// Wait for this job's send time without a connection, then open one for it.
    Wait(Box<(Lane, Job)>),
}

/// A destination as a worker sends to it: its key, next hop and rule, and the key of the pace
/// it goes by (its own, or its site's when an `mx` rule applies).
struct Lane {
    key: String,
    hop: NextHop,
    rule: Arc<shaping::Rule>,
    pace: String,
}

/// Recipients of one message that go to one destination.
struct Job {
    meta: Arc<MessageMeta>,
    content: Option<Bytes>,
    recipients: Vec<RecipientRow>,
    /// The message's plugin instances, held for its delivery-result and bounce hooks (one job of
    /// a message carries them; the others instantiate their own).
    plugins: Option<PluginRun>,
    /// While the job is being delivered: its place in its tenant's share of connections.
    share: Option<Share>,
}

/// A place in a tenant's share of outbound connections, held while one of its jobs is delivered.
/// Given back on drop, which wakes the destinations that had jobs of the tenant waiting for it.
struct Share {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    tenant: String,
    dispatcher: std::sync::Weak<Dispatcher>,
}

impl Drop for Share {
    fn drop(&mut self) {
        // The place is given back first: a worker woken below must be able to take it.
        drop(self.permit.take());
        if let Some(dispatcher) = self.dispatcher.upgrade() {
            dispatcher.unpark(&self.tenant);
        }
    }
}

struct Destination {
    hop: NextHop,
    /// Its shaping rule, chosen when it gets its first job and again after a reload.
    rule: Arc<shaping::Rule>,
    /// The shaper's generation `rule` is of.
    rule_generation: u64,
    /// The key of the pace it goes by, once its site is known (`find_site`): its own key, or
    /// its site's.
    pace: Option<String>,
    /// Jobs waiting, one queue per tenant (`""`: mail of no tenant), served in turn: a tenant
    /// with thousands of messages for a destination does not hold up another's few.
    queues: HashMap<String, VecDeque<Job>>,
    /// Tenants with waiting jobs, in the order they are served next.
    turn: VecDeque<String>,
    workers: usize,
}

impl Destination {
    fn new(hop: NextHop, rule: shaping::Rule, rule_generation: u64) -> Destination {
        Destination {
            hop,
            rule: Arc::new(rule),
            rule_generation,
            pace: None,
            queues: HashMap::new(),
            turn: VecDeque::new(),
            workers: 0,
        }
    }

    fn waiting(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum()
    }

    /// Puts a job taken too early back at the head of its tenant's queue.
    fn push_front(&mut self, job: Job) {
        let tenant = job.meta.tenant.clone();
        let queue = self.queues.entry(tenant.clone()).or_default();
        if queue.is_empty() {
            self.turn.push_front(tenant);
        }
        queue.push_front(job);
    }

    fn push(&mut self, job: Job) {
        let tenant = job.meta.tenant.clone();
        let queue = self.queues.entry(tenant.clone()).or_default();
        if queue.is_empty() {
            self.turn.push_back(tenant);
        }
        queue.push_back(job);
    }

    /// The next job of the first tenant in turn that `share` gives a place (`Err`: its share
    /// is in use); the tenants passed over for want of a place are added to `blocked`.
    fn pop(
        &mut self,
        mut share: impl FnMut(&str) -> Result<Option<Share>, ()>,
        blocked: &mut Vec<String>,
    ) -> Option<Job> {
        for _ in 0..self.turn.len() {
            let tenant = self.turn.pop_front()?;
            let place = match share(&tenant) {
                Ok(place) => place,
                Err(()) => {
                    blocked.push(tenant.clone());
                    self.turn.push_back(tenant);
                    continue;
                }
            };
            let queue = self.queues.get_mut(&tenant)?;
            let job = queue.pop_front();
            if queue.is_empty() {
                self.queues.remove(&tenant);
            } else {
                self.turn.push_back(tenant);
            }
            return job.map(|mut job| {
                job.share = place;
                job
            });
        }
        None
    }

    /// Puts the tenant whose next send time comes first (`next`: `None` for one that may send
    /// now) at the head of the turn, the first in turn among equals: a tenant waiting for its
    /// part of a rate does not make a worker wait while another tenant could send sooner.
    fn prefer_soonest(&mut self, next: impl Fn(&str) -> Option<tokio::time::Instant>) {
        let soonest = self
            .turn
            .iter()
            .enumerate()
            .min_by_key(|(_, tenant)| next(tenant))
            .map(|(position, _)| position);
        if let Some(position) = soonest.filter(|position| *position > 0) {
            if let Some(tenant) = self.turn.remove(position) {
                self.turn.push_front(tenant);
            }
        }
    }

    fn drain(&mut self) -> Vec<Job> {
        self.turn.clear();
        self.queues.drain().flat_map(|(_, jobs)| jobs).collect()
    }
}

#[derive(Default)]
struct State {
    destinations: HashMap<String, Destination>,
    /// Destinations with jobs of a tenant whose share of connections was all in use, by tenant:
    /// a place given back starts a worker for them.
    parked: HashMap<String, HashSet<String>>,
    /// (message id, recipient index) of every recipient held in memory, so a scan never hands out
    /// one that is already being worked on.
    in_flight: HashSet<(String, i64)>,
    /// Connections open now, by destination (those with none are left out).
    open: HashMap<String, usize>,
}

pub struct Dispatcher {
    config: Arc<Config>,
    queue: Arc<dyn Queue>,
    transport: Arc<dyn Transport>,
    plugins: Arc<PluginManager>,
    connections: Arc<Semaphore>,
    /// Each destination's rule and pace.
    shaper: shaping::Shaper,
    /// Connections with nothing to send, kept open for their destination's next message.
    idle: Arc<idle::IdlePool>,
    /// Each tenant's share of `connections` (`delivery_connections`), so one tenant's backlog
    /// cannot hold every outbound connection.
    tenant_connections: Mutex<HashMap<String, (usize, Arc<Semaphore>)>>,
    tenants: Arc<Tenants>,
    state: Mutex<State>,
    /// Once stopping, no delivery starts; those under way finish.
    shutdown: Shutdown,
}

impl Dispatcher {
    pub fn new(
        config: Arc<Config>,
        queue: Arc<dyn Queue>,
        transport: Arc<dyn Transport>,
        plugins: Arc<PluginManager>,
        tenants: Arc<Tenants>,
        shutdown: Shutdown,
    ) -> Arc<Dispatcher> {
        Arc::new(Dispatcher {
            shutdown,
            tenant_connections: Mutex::new(HashMap::new()),
            tenants,
            connections: Arc::new(Semaphore::new(config.delivery.max_connections)),
            shaper: shaping::Shaper::new(config.clone()),
            idle: Arc::default(),
            config,
            queue,
            transport,
            plugins,
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
        let set = self.plugins.set_for_message(&meta.tenant, &meta.id);
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
            let plugins = plugins
                .filter(|run| run.generation() == set.generation && run.tenant() == &*set.tenant);
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
        observe::delivery_run(set, meta, held)
    }

    /// Marks recipients as in flight, dropping those that already are.
    fn take_in_flight(&self, id: &str, recipients: Vec<RecipientRow>) -> Vec<RecipientRow> {
        let mut state = self.state();
        recipients
            .into_iter()
            .filter(|recipient| state.in_flight.insert((id.to_string(), recipient.index)))
            .collect()
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
        let mut spawn = Vec::new();
        let mut state = self.state();
        for (key, (hop, recipients)) in by_hop {
            let destination = state.destinations.entry(key.clone()).or_insert_with(|| {
                let generation = self.shaper.generation();
                let rule = self.shaper.rule_for(&hop);
                Destination::new(hop, rule, generation)
            });
            let limit = destination.rule.connections;
            destination.push(Job {
                meta: meta.clone(),
                content: content.clone(),
                recipients,
                plugins: plugins.take(),
                share: None,
            });
            if destination.workers < limit && destination.workers < destination.waiting() {
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
    ///
    /// Tenants take turns, each within its share of connections (`delivery_connections`): a
    /// tenant whose share is in use is passed over, and when only such tenants have jobs left the
    /// worker stops and the destination is parked until one of them gives a place back.
    fn next_job(self: &Arc<Self>, key: &str) -> Option<(Lane, Job)> {
        let mut state = self.state();
        let stopping = self.shutdown.is_stopping();
        let mut blocked = Vec::new();
        let destination = state.destinations.get_mut(key)?;
        let generation = self.shaper.generation();
        if destination.rule_generation != generation {
            // The rules were reloaded: the destination's next message goes by its new one.
            destination.rule = Arc::new(self.shaper.rule_for(&destination.hop));
            destination.rule_generation = generation;
            destination.pace = None;
        }
        let job = if stopping {
            None
        } else {
            let pace = destination.pace.clone();
            let pace = pace.as_deref().unwrap_or(key);
            destination.prefer_soonest(|tenant| {
                self.rate_share(tenant)
                    .and_then(|_| self.shaper.tenant_next(pace, tenant))
            });
            destination.pop(|tenant| self.take_share(tenant), &mut blocked)
        };
        match job {
            Some(job) => Some((
                Lane {
                    key: key.to_string(),
                    hop: destination.hop.clone(),
                    rule: destination.rule.clone(),
                    pace: destination.pace.clone().unwrap_or_else(|| key.to_string()),
                },
                job,
            )),
            None => {
                destination.workers -= 1;
                if destination.workers == 0 && destination.waiting() == 0 {
                    state.destinations.remove(key);
                }
                for tenant in blocked {
                    state
                        .parked
                        .entry(tenant)
                        .or_default()
                        .insert(key.to_string());
                }
                None
            }
        }
    }

    /// A place in `tenant`'s share of connections: `Ok(None)` for mail of no tenant (or of a
    /// tenant removed since), `Err` when the share is in use.
    fn take_share(self: &Arc<Self>, tenant: &str) -> Result<Option<Share>, ()> {
        let Some(share) = self.tenant_share(tenant) else {
            return Ok(None);
        };
        let permit = share.try_acquire_owned().map_err(|_| ())?;
        Ok(Some(Share {
            permit: Some(permit),
            tenant: tenant.to_string(),
            dispatcher: Arc::downgrade(self),
        }))
    }

    /// The part of destinations' rates `tenant` is held to (`destination_rate_percent`), when
    /// it is held to less than the whole.
    fn rate_share<'a>(&self, tenant: &'a str) -> Option<shaping::TenantShare<'a>> {
        if tenant.is_empty() {
            return None;
        }
        let percent = self.tenants.get(tenant)?.limits.destination_rate_percent;
        (percent < 100).then(|| shaping::TenantShare {
            tenant,
            part: f64::from(percent) / 100.0,
        })
    }

    /// `tenant` gave a place back: the destinations parked for want of one get a worker again.
    fn unpark(self: &Arc<Self>, tenant: &str) {
        let keys = {
            let mut state = self.state();
            match state.parked.remove(tenant) {
                Some(keys) => keys,
                None => return,
            }
        };
        for key in keys {
            let start = {
                let mut state = self.state();
                match state.destinations.get_mut(&key) {
                    Some(destination)
                        if destination.workers < destination.rule.connections
                            && destination.waiting() > 0 =>
                    {
                        destination.workers += 1;
                        true
                    }
                    _ => false,
                }
            };
            if start {
                let dispatcher = self.clone();
                self.shutdown
                    .spawn_delivery(async move { dispatcher.work(key).await });
            }
        }
    }

    /// Every job still waiting for a destination (used when the destination is unreachable).
    fn take_waiting(&self, key: &str) -> Vec<Job> {
        let mut state = self.state();
        state
            .destinations
            .get_mut(key)
            .map(Destination::drain)
            .unwrap_or_default()
    }

    /// One connection worker: opens a connection to the destination and sends jobs over it until
    /// none is left.
    async fn work(self: Arc<Self>, key: String) {
        // A job whose send time was too far off to keep its connection open for (`send_over`).
        let mut carried: Option<(Lane, Job)> = None;
        loop {
            // The job comes with its place in its tenant's share (see `next_job`); a tenant
            // without one never makes a worker wait, so another tenant's jobs go first.
            let (lane, job) = match carried.take() {
                Some(carried) => carried,
                None => {
                    let Some((mut lane, job)) = self.next_job(&key) else {
                        return;
                    };
                    self.find_site(&mut lane).await;
                    match self.over_site_limit(&lane, job) {
                        Ok(job) => (lane, job),
                        // More workers than an `mx` rule allows: this one stops.
                        Err(()) => return,
                    }
                }
            };
            // The send time is waited for before a connection is taken or opened: a worker
            // waiting for a cut rate holds neither a socket nor one of `max_connections`.
            let share = self.rate_share(&job.meta.tenant);
            self.shaper
                .pace(&lane.pace, &lane.hop, &lane.rule, share)
                .await;
            let Ok(permit) = self.connections.clone().acquire_owned().await else {
                return;
            };
            if self.shutdown.is_stopping() {
                // Stopping began meanwhile: the job stays leased in the queue for the next start,
                // and the next `next_job` ends this worker.
                self.forget(&job);
                continue;
            }
            let opened = match self.reuse_idle(&key).await {
                Some(connection) => Ok(connection),
                None => self.transport.open(&lane.hop).await,
            };
            match opened {
                Err(failure) => {
                    if failure.from_peer {
                        let replies = std::slice::from_ref(&failure.reply);
                        self.shaper
                            .observe(&lane.pace, &lane.hop, &lane.rule, replies);
                    }
                    self.unreachable(&key, job, failure.reply).await
                }
                Ok(connection) => {
                    self.count_open(&key, 1);
                    let after = self.send_over(lane, connection, job).await;
                    self.count_open(&key, -1);
                    match after {
                        // No job was left: this worker is no longer counted.
                        AfterConnection::NoJobs => return,
                        AfterConnection::Reopen => {}
                        AfterConnection::Wait(waiting) => carried = Some(*waiting),
                    }
                }
            }
            drop(permit);
        }
    }

    /// The semaphore of `tenant`'s outbound connections at once, made (or remade, when its
    /// limit changed) from its limits; `None` for mail of no tenant or of a removed tenant.
    fn tenant_share(&self, tenant: &str) -> Option<Arc<Semaphore>> {
        if tenant.is_empty() {
            return None;
        }
        let limit = self.tenants.get(tenant)?.limits.delivery_connections;
        let mut shares = self
            .tenant_connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let entry = shares
            .entry(tenant.to_string())
            .or_insert_with(|| (limit, Arc::new(Semaphore::new(limit))));
        if entry.0 != limit {
            *entry = (limit, Arc::new(Semaphore::new(limit)));
        }
        Some(entry.1.clone())
    }

    /// The destination is unreachable now: the job and every job waiting for it share the fate.
    async fn unreachable(&self, key: &str, job: Job, reply: crate::mail::reply::Reply) {
        let mut jobs = vec![job];
        jobs.extend(self.take_waiting(key));
        for job in jobs {
            let attempts = job
                .recipients
                .iter()
                .map(|recipient| Attempt {
                    recipient: recipient.clone(),
                    reply: reply.clone(),
                    relay: "none".to_string(),
                    tls: crate::net::verify::TlsState::None,
                    dsn_passed: false,
                })
                .collect();
            self.finish(job, attempts).await;
        }
    }

    /// Sends `job`, then further jobs of the destination, over one connection, up to the
    /// rule's messages per connection and at its rate. Returns false when the destination had
    /// no job left (the worker then stops), true when the worker should open a new connection
    /// for the rest.
    async fn send_over(
        self: &Arc<Self>,
        mut lane: Lane,
        mut connection: Box<dyn Connection>,
        job: Job,
    ) -> AfterConnection {
        // The first job's send time has come already (see `work`).
        let mut job = Some(job);
        let mut paced = true;
        while let Some(current) = job.take() {
            if !paced {
                if self.shaper.wait_ahead(&lane.pace) > HOLD_FOR_SEND_TIME {
                    // Too long to keep the connection (and its permit) waiting: the worker
                    // waits without them, and opens or takes one again when the time comes.
                    self.park_or_close(&lane, connection).await;
                    return AfterConnection::Wait(Box::new((lane, current)));
                }
                let share = self.rate_share(&current.meta.tenant);
                self.shaper
                    .pace(&lane.pace, &lane.hop, &lane.rule, share)
                    .await;
            }
            paced = false;
            if !self.deliver(&lane, connection.as_mut(), current).await {
                // The connection broke: nothing more goes over it, and no QUIT either.
                return AfterConnection::Reopen;
            }
            if connection.sent() >= lane.rule.messages_per_connection {
                break;
            }
            match self.next_job(&lane.key) {
                Some((mut next_lane, next)) => {
                    self.find_site(&mut next_lane).await;
                    lane = next_lane;
                    job = Some(next);
                }
                None => {
                    self.park_or_close(&lane, connection).await;
                    return AfterConnection::NoJobs;
                }
            }
        }
        connection.close().await;
        AfterConnection::Reopen
    }

    /// `job` back when the worker is within its destination's `connections` under the rule
    /// its site gave it; else the job goes back to the head of its tenant's queue, the worker
    /// is no longer counted, and `Err`. (A destination's first workers are started under its
    /// domain rule, before its MX hosts are known.)
    fn over_site_limit(&self, lane: &Lane, mut job: Job) -> Result<Job, ()> {
        let share = {
            let mut state = self.state();
            let Some(destination) = state.destinations.get_mut(&lane.key) else {
                return Ok(job);
            };
            if destination.workers <= lane.rule.connections {
                return Ok(job);
            }
            let share = job.share.take();
            destination.workers -= 1;
            destination.push_front(job);
            share
        };
        // Given back outside the lock: dropping a place wakes parked destinations.
        drop(share);
        Err(())
    }

    /// An idle connection to `key` that still answers, if one is parked (those that do not
    /// are dropped).
    async fn reuse_idle(&self, key: &str) -> Option<Box<dyn Connection>> {
        loop {
            let mut connection = self.idle.take(key)?;
            if connection.reusable().await {
                return Some(connection);
            }
            tracing::debug!(destination = %key, "an idle connection no longer answers; dropped");
        }
    }

    /// Parks a connection with nothing more to send for the destination's next message, when
    /// the rule keeps idle connections and there is room (idle and busy ones together within
    /// `connections`); otherwise closes it.
    async fn park_or_close(&self, lane: &Lane, connection: Box<dyn Connection>) {
        let rule = &lane.rule;
        let busy = self
            .state()
            .destinations
            .get(&lane.key)
            .map(|destination| destination.workers)
            .unwrap_or_default();
        let room = rule
            .idle_connections
            .min(rule.connections.saturating_sub(busy));
        let spent = connection.sent() >= rule.messages_per_connection;
        let refused = if spent {
            Some(connection)
        } else {
            self.idle.park(
                &lane.key,
                connection,
                rule.idle_timeout,
                room,
                &self.shutdown,
            )
        };
        if let Some(connection) = refused {
            connection.close().await;
        }
    }

    /// Applies an `mx` rule to an MX destination whose MX hosts it names (the lookup is the
    /// resolver's, cached): the destination then goes by the rule and shares its site's pace;
    /// under a `by_mx_set` rule, it shares the pace of the destinations with the same MX hosts.
    async fn find_site(&self, lane: &mut Lane) {
        if !matches!(lane.hop, NextHop::Mx { .. }) || !self.shaper.goes_by_mx() {
            return;
        }
        let mut hosts = self.transport.mx_hosts(&lane.hop).await;
        if hosts.is_empty() {
            // The lookup failed: the destination keeps what it went by.
            return;
        }
        // From the domain's own rule each time: MX records change, and a site's rule must not
        // outlive the match.
        let mut rule = self.shaper.rule_for(&lane.hop);
        lane.pace = lane.key.clone();
        if rule.by_mx_set {
            hosts.sort();
            hosts.dedup();
            lane.pace = format!("site:{}", hosts.join(","));
        }
        if let Some(site) = self.shaper.rule_for_site(&lane.hop, &hosts) {
            lane.pace = site.source.clone().unwrap_or_else(|| lane.key.clone());
            rule = site;
        }
        lane.rule = Arc::new(rule);
        let mut state = self.state();
        if let Some(destination) = state.destinations.get_mut(&lane.key) {
            destination.rule = lane.rule.clone();
            destination.pace = Some(lane.pace.clone());
        }
    }

    /// Counts a connection to `key` opened (1) or closed (-1).
    fn count_open(&self, key: &str, change: isize) {
        let mut state = self.state();
        let open = state.open.entry(key.to_string()).or_default();
        *open = open.saturating_add_signed(change);
        if *open == 0 {
            state.open.remove(key);
        }
    }

    /// Sends one job over an open connection and records the results. Returns false when the
    /// connection broke.
    async fn deliver(&self, lane: &Lane, connection: &mut dyn Connection, mut job: Job) -> bool {
        let Some(content) = self.content_of(&mut job).await else {
            return true;
        };
        let addresses: Vec<String> = job.recipients.iter().map(|r| r.address.clone()).collect();
        let recipient_dsn: Vec<_> = job.recipients.iter().map(|r| r.dsn.clone()).collect();
        let relay = connection.relay();
        let tls = connection.tls();
        let sent = connection
            .send(&Outgoing {
                meta: &job.meta,
                recipients: &addresses,
                recipient_dsn: &recipient_dsn,
                content: &content,
            })
            .await;
        let dsn_passed = sent.dsn_passed;
        if sent.from_peer {
            self.shaper
                .observe(&lane.pace, &lane.hop, &lane.rule, &sent.replies);
        }
        let attempts = job
            .recipients
            .iter()
            .zip(sent.replies)
            .map(|(recipient, reply)| Attempt {
                recipient: recipient.clone(),
                reply,
                relay: relay.clone(),
                tls,
                dsn_passed,
            })
            .collect();
        job.content = Some(content);
        self.finish(job, attempts).await;
        sent.intact
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

    /// The messages with recipients held in memory: the leases this node renews.
    pub fn in_flight_messages(&self) -> Vec<String> {
        let state = self.state();
        let ids: HashSet<&String> = state.in_flight.iter().map(|(id, _)| id).collect();
        ids.into_iter().cloned().collect()
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
}
