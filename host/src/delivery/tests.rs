//! The dispatcher's outcomes, retries and DSNs through a scripted transport (chasquid's
//! `TestCourier`): no sockets, a real SQLite queue in a temporary directory, the real inbox.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::connect::{Connection, OpenFailure, Outgoing, Sent, Transport};
use super::inbox::{Accepted, Inbox};
use super::route::NextHop;
use super::Dispatcher;
use crate::config::Config;
use crate::mail::reply::Reply;
use crate::plugins::engine::{new_engine_with, PoolTuning};
use crate::plugins::{PluginManager, PluginServices};
use crate::queue::sqlite::SqliteQueue;
use crate::queue::{
    now_millis, MessageMeta, NewMessage, Queue, QueuedMessage, RecipientRow, RecipientState,
};
use crate::shutdown::Shutdown;

/// What the scripted transport does, and what it saw.
#[derive(Default)]
struct Script {
    /// Replies by recipient; a recipient not listed gets 250.
    replies: HashMap<String, Reply>,
    /// Set: every open fails with this reply.
    unreachable: Option<Reply>,
    /// How long an open takes.
    open_delay: Duration,
    /// How long a message takes to send.
    send_delay: Duration,
    /// Messages being sent now, by the first letter of their first recipient, and the most
    /// that ever were at once.
    sending: HashMap<char, usize>,
    most_sending: HashMap<char, usize>,
    /// A message to this recipient breaks the connection (no reply is known for it).
    breaks_on: Option<String>,
    /// Opens tried, connections opened, connections closed politely, and the recipients of
    /// every message sent, in order.
    tried: usize,
    opened: usize,
    closed: usize,
    sent: Vec<Vec<String>>,
}

#[derive(Clone, Default)]
struct ScriptedTransport(Arc<Mutex<Script>>);

impl ScriptedTransport {
    fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.0.lock().expect("script")
    }
}

struct ScriptedConnection {
    script: ScriptedTransport,
    sent: usize,
}

#[async_trait]
impl Transport for ScriptedTransport {
    async fn open(&self, _hop: &NextHop) -> Result<Box<dyn Connection>, OpenFailure> {
        let delay = self.script().open_delay;
        tokio::time::sleep(delay).await;
        let mut script = self.script();
        script.tried += 1;
        if let Some(reply) = &script.unreachable {
            return Err(OpenFailure {
                reply: reply.clone(),
                from_peer: true,
            });
        }
        script.opened += 1;
        Ok(Box::new(ScriptedConnection {
            script: self.clone(),
            sent: 0,
        }))
    }
}

#[async_trait]
impl Connection for ScriptedConnection {
    fn relay(&self) -> String {
        "scripted[192.0.2.25]:25".to_string()
    }

    fn sent(&self) -> usize {
        self.sent
    }

    fn tls(&self) -> crate::net::verify::TlsState {
        crate::net::verify::TlsState::None
    }

    async fn send(&mut self, message: &Outgoing<'_>) -> Sent {
        self.sent += 1;
        let group = message
            .recipients
            .first()
            .and_then(|recipient| recipient.chars().next())
            .unwrap_or('?');
        let delay = {
            let mut script = self.script.script();
            let now = script.sending.entry(group).or_default();
            *now += 1;
            let now = *now;
            let most = script.most_sending.entry(group).or_default();
            *most = (*most).max(now);
            script.send_delay
        };
        tokio::time::sleep(delay).await;
        let mut script = self.script.script();
        if let Some(now) = script.sending.get_mut(&group) {
            *now -= 1;
        }
        script.sent.push(message.recipients.to_vec());
        if script
            .breaks_on
            .as_ref()
            .is_some_and(|breaking| message.recipients.contains(breaking))
        {
            return Sent {
                replies: vec![
                    Reply::new(451, "4.4.2", "connection lost");
                    message.recipients.len()
                ],
                intact: false,
                dsn_passed: false,
                from_peer: false,
            };
        }
        let replies = message
            .recipients
            .iter()
            .map(|recipient| {
                script
                    .replies
                    .get(recipient)
                    .cloned()
                    .unwrap_or_else(|| Reply::new(250, "2.0.0", "ok"))
            })
            .collect();
        Sent {
            replies,
            intact: true,
            dsn_passed: false,
            from_peer: true,
        }
    }

    async fn close(self: Box<Self>) {
        self.script.script().closed += 1;
    }
}

/// A dispatcher over a scripted transport and a real queue, with no plugins.
struct Bench {
    queue: Arc<SqliteQueue>,
    dispatcher: Arc<Dispatcher>,
    inbox: Inbox,
    transport: ScriptedTransport,
    shutdown: Shutdown,
    _dir: tempfile::TempDir,
}

async fn bench(config: Config) -> Bench {
    bench_with(config, crate::tenants::Tenants::none()).await
}

async fn bench_with(mut config: Config, tenants: crate::tenants::Tenants) -> Bench {
    config.node_id = Some("test-node".to_string());
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = Arc::new(
        SqliteQueue::open(&dir.path().join("queue.db"), Duration::ZERO)
            .await
            .expect("queue"),
    );
    let engine = new_engine_with(PoolTuning {
        instances: 8,
        pagemap_scan: false,
    })
    .expect("engine");
    let plugins = PluginManager::start(engine, &[], &[], PluginServices::default())
        .await
        .expect("no plugins");
    let transport = ScriptedTransport::default();
    let shutdown = Shutdown::new();
    let dispatcher = Dispatcher::new(
        Arc::new(config),
        queue.clone(),
        Arc::new(transport.clone()),
        plugins.clone(),
        Arc::new(tenants),
        shutdown.clone(),
    );
    let inbox = Inbox::new(queue.clone(), dispatcher.clone(), plugins);
    Bench {
        queue,
        dispatcher,
        inbox,
        transport,
        shutdown,
        _dir: dir,
    }
}

impl Bench {
    async fn accept(&self, sender: &str, recipients: &[&str]) -> String {
        self.accept_for("", sender, recipients).await
    }

    async fn accept_for(&self, tenant: &str, sender: &str, recipients: &[&str]) -> String {
        let accepted = Accepted {
            tenant: tenant.to_string(),
            id: self.inbox.new_id(),
            listener: "test".to_string(),
            sender: sender.to_string(),
            recipients: recipients.iter().map(|r| r.to_string()).collect(),
            recipient_dsn: Vec::new(),
            dsn: Default::default(),
            content: Bytes::from_static(b"Subject: test\r\n\r\nbody\r\n"),
            smtputf8: false,
            eight_bit_mime: false,
            quarantine: None,
        };
        self.inbox.accept(accepted, None).await.expect("queued")
    }

    /// Waits until no delivery work is running.
    async fn settled(&self) {
        for _ in 0..500 {
            if self.shutdown.running().1 == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("deliveries still running after 5 s");
    }

    async fn recipients(&self, id: &str) -> HashMap<String, RecipientRow> {
        self.queue
            .get(id)
            .await
            .expect("read")
            .map(|message| {
                message
                    .recipients
                    .into_iter()
                    .map(|row| (row.address.clone(), row))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The DSNs in the queue: messages from the null sender.
    async fn bounces(&self) -> Vec<(QueuedMessage, String)> {
        let mut bounces = Vec::new();
        for message in self.queue.list().await.expect("list") {
            if message.meta.sender.is_empty() {
                let content = self
                    .queue
                    .content(&message.meta.id)
                    .await
                    .expect("read")
                    .expect("content");
                bounces.push((message, String::from_utf8_lossy(&content).to_string()));
            }
        }
        bounces
    }
}

#[tokio::test]
async fn delivered_deferred_and_failed_recipients_are_recorded_and_the_failed_bounced() {
    let bench = bench(Config::default()).await;
    {
        let mut script = bench.transport.script();
        script
            .replies
            .insert("soft@b.test".into(), Reply::new(451, "4.2.0", "try later"));
        script.replies.insert(
            "hard@b.test".into(),
            Reply::new(550, "5.1.1", "no such user"),
        );
    }
    let before = now_millis();
    let id = bench
        .accept("alice@a.test", &["ok@b.test", "soft@b.test", "hard@b.test"])
        .await;
    bench.settled().await;
    let rows = bench.recipients(&id).await;
    // Delivered and failed recipients are done; the message stays for the deferred one.
    assert_eq!(rows["ok@b.test"].state, RecipientState::Delivered);
    assert_eq!(rows["hard@b.test"].state, RecipientState::Failed);
    let soft = &rows["soft@b.test"];
    assert_eq!(soft.state, RecipientState::Queued);
    assert_eq!(soft.attempts, 1);
    assert_eq!(soft.last_reply.as_deref(), Some("451 4.2.0 try later"));
    // The first of Postfix-like intervals: 300 s.
    let wait = soft.next_attempt - before;
    assert!((299_000..=301_000 + 5_000).contains(&wait), "{wait}");
    assert_eq!(
        bench.transport.script().sent,
        [vec!["ok@b.test", "soft@b.test", "hard@b.test"]]
    );
    let bounces = bench.bounces().await;
    assert_eq!(bounces.len(), 1, "one DSN for the one failure");
    let (dsn, text) = &bounces[0];
    assert_eq!(dsn.recipients[0].address, "alice@a.test");
    assert!(
        text.contains(
            "Final-Recipient: rfc822; hard@b.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("Remote-MTA: dns; scripted[192.0.2.25]:25"),
        "{text}"
    );
    assert!(
        !text.contains("soft@b.test"),
        "a deferred recipient is not in the DSN"
    );
}

#[tokio::test]
async fn a_message_past_its_lifetime_expires_with_4_4_7() {
    let bench = bench(Config::default()).await;
    bench
        .transport
        .script()
        .replies
        .insert("late@b.test".into(), Reply::new(451, "4.4.1", "still down"));
    // Queued six days ago (the default lifetime is five), with three attempts behind it.
    let received_at = now_millis() - 6 * 24 * 3600 * 1000;
    let meta = MessageMeta {
        id: "OLD1".into(),
        sender: "alice@a.test".into(),
        received_at,
        size: 24,
        smtputf8: false,
        eight_bit: false,
        tenant: String::new(),
        dsn: Default::default(),
    };
    let new = NewMessage {
        meta: meta.clone(),
        recipients: vec!["late@b.test".into()],
        recipient_dsn: Vec::new(),
        content: Bytes::from_static(b"Subject: old\r\n\r\nbody\r\n"),
        quarantine: None,
    };
    bench
        .queue
        .enqueue(new, Some(("test-node".into(), now_millis() + 60_000)))
        .await
        .expect("queued");
    let mut row = bench
        .recipients("OLD1")
        .await
        .remove("late@b.test")
        .expect("row");
    row.attempts = 3;
    bench.dispatcher.submit(
        QueuedMessage {
            meta,
            recipients: vec![row],
        },
        None,
        None,
    );
    bench.settled().await;
    let rows = bench.recipients("OLD1").await;
    assert!(
        rows.is_empty(),
        "a message with nothing left to deliver is removed: {rows:?}"
    );
    let bounces = bench.bounces().await;
    assert_eq!(bounces.len(), 1);
    let text = &bounces[0].1;
    assert!(text.contains("Status: 4.4.7"), "{text}");
    assert!(
        text.contains(
            "message expired after 518400s in the queue; last reply: 451 4.4.1 still down"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn an_unreachable_destination_settles_every_job_waiting_for_it() {
    let mut config = Config::default();
    config.delivery.max_connections_per_destination = 1;
    let bench = bench(config).await;
    {
        let mut script = bench.transport.script();
        script.unreachable = Some(Reply::new(451, "4.4.1", "connection refused"));
        // The second message queues behind the first while the one worker tries to connect.
        script.open_delay = Duration::from_millis(500);
    }
    let first = bench.accept("alice@a.test", &["x@b.test"]).await;
    let second = bench.accept("bob@a.test", &["y@b.test", "z@b.test"]).await;
    bench.settled().await;
    for (id, address) in [
        (&first, "x@b.test"),
        (&second, "y@b.test"),
        (&second, "z@b.test"),
    ] {
        let row = &bench.recipients(id).await[address];
        assert_eq!(row.state, RecipientState::Queued, "{address}");
        assert_eq!(row.attempts, 1, "{address}");
        assert_eq!(
            row.last_reply.as_deref(),
            Some("451 4.4.1 connection refused")
        );
    }
    assert!(bench.bounces().await.is_empty());
    assert_eq!(
        bench.transport.script().tried,
        1,
        "the waiting job shared the fate of the failed attempt"
    );
    // A permanent refusal of the whole destination (a null MX, say) fails and bounces.
    bench.transport.script().unreachable = Some(Reply::new(
        556,
        "5.1.10",
        "Domain b.test does not accept mail (null MX)",
    ));
    let third = bench.accept("carol@a.test", &["w@b.test"]).await;
    bench.settled().await;
    assert!(bench.recipients(&third).await.is_empty());
    let bounces = bench.bounces().await;
    assert_eq!(bounces.len(), 1);
    assert!(bounces[0].1.contains("Status: 5.1.10"));
    assert!(!bounces[0].1.contains("Remote-MTA"), "nothing was reached");
}

#[tokio::test]
async fn a_bounce_that_fails_is_dropped_not_bounced() {
    let bench = bench(Config::default()).await;
    bench.transport.script().replies.insert(
        "gone@b.test".into(),
        Reply::new(550, "5.1.1", "no such user"),
    );
    let id = bench.accept("", &["gone@b.test"]).await;
    bench.settled().await;
    assert!(bench.recipients(&id).await.is_empty());
    assert!(
        bench.bounces().await.is_empty(),
        "RFC 5321 4.5.5: no bounce of a bounce"
    );
}

#[tokio::test]
async fn a_connection_carries_at_most_max_messages_per_connection() {
    let mut config = Config::default();
    config.delivery.max_messages_per_connection = 2;
    config.delivery.max_connections_per_destination = 1;
    let bench = bench(config).await;
    // Opening takes a while, so the other messages queue up behind the first.
    bench.transport.script().open_delay = Duration::from_millis(500);
    for n in 0..5 {
        bench
            .accept("alice@a.test", &[&format!("r{n}@b.test")])
            .await;
    }
    bench.settled().await;
    let script = bench.transport.script();
    assert_eq!(script.sent.len(), 5, "every message sent once");
    assert_eq!(script.opened, 3, "2 + 2 + 1 messages");
    assert_eq!(script.closed, 3, "each connection closed once, politely");
}

#[tokio::test]
async fn a_broken_connection_is_not_reused_nor_closed_politely() {
    let mut config = Config::default();
    config.delivery.max_connections_per_destination = 1;
    let bench = bench(config).await;
    {
        let mut script = bench.transport.script();
        script.breaks_on = Some("break@b.test".into());
        script.open_delay = Duration::from_millis(500);
    }
    let broken = bench.accept("alice@a.test", &["break@b.test"]).await;
    let after = bench.accept("alice@a.test", &["next@b.test"]).await;
    bench.settled().await;
    let row = &bench.recipients(&broken).await["break@b.test"];
    assert_eq!(row.state, RecipientState::Queued);
    assert_eq!(row.last_reply.as_deref(), Some("451 4.4.2 connection lost"));
    assert!(
        bench.recipients(&after).await.is_empty(),
        "delivered on a new connection"
    );
    let script = bench.transport.script();
    assert_eq!(
        script.opened, 2,
        "the broken connection carried nothing more"
    );
    assert_eq!(script.closed, 1, "no QUIT on the broken one");
}

/// Tenants take turns at a destination, each within its share of connections: tenant A's
/// backlog, capped at one connection, does not hold up tenant B's mail to the same destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_backlog_waits_for_its_share_while_another_tenant_goes_first() {
    let parse = |id: &str, text: &str| {
        crate::config::TenantConfig::parse(
            text,
            std::path::Path::new(&format!("/t/{id}.toml")),
            &crate::config::TenantLimits::default(),
        )
        .expect("tenant")
    };
    let tenants = crate::tenants::Tenants::new(
        true,
        vec![
            parse(
                "acme",
                "domains = [\"acme.test\"]\n[limits]\ndelivery_connections = 1\n",
            ),
            parse("bravo", "domains = [\"bravo.test\"]\n"),
        ],
        Vec::new(),
    );
    let mut config = Config::default();
    config.delivery.smarthost = Some("relay.test".parse().expect("host"));
    config.delivery.max_connections_per_destination = 3;
    let bench = bench_with(config, tenants).await;
    bench.transport.script().send_delay = Duration::from_millis(100);
    for n in 0..6 {
        bench
            .accept_for("acme", "s@acme.test", &[&format!("a{n}@far.test")])
            .await;
    }
    for n in 0..2 {
        bench
            .accept_for("bravo", "s@bravo.test", &[&format!("b{n}@far.test")])
            .await;
    }
    bench.settled().await;
    let script = bench.transport.script();
    assert_eq!(script.sent.len(), 8, "{:?}", script.sent);
    assert_eq!(
        script.most_sending.get(&'a'),
        Some(&1),
        "acme's share is one connection"
    );
    // bravo's two went while acme's backlog waited for its share: among the first four sent.
    let order: Vec<&str> = script.sent.iter().map(|r| r[0].as_str()).collect();
    let last_bravo = order
        .iter()
        .rposition(|r| r.starts_with('b'))
        .expect("bravo sent");
    assert!(last_bravo < 4, "{order:?}");
}
