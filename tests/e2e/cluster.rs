//! Several nodes on one PostgreSQL queue: they share the work, a node killed mid-run loses
//! nothing (another takes its leases over once they run out), and a node that loses the
//! database refuses mail with `451` until it is back, acknowledging nothing it did not commit.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::client::TestClient;
use crate::harness::router::{database_url, postgres_queue, Router, RouterOptions};
use crate::harness::sink::Sink;

/// A client that sends tagged messages to whichever node answers: on a dropped connection or a
/// temporary failure it moves to the next node and sends the same message again, as a real
/// client behind DNS or a load balancer would.
struct RoamingClient {
    ports: Vec<u16>,
    turn: usize,
    connection: Option<TestClient>,
}

/// What one attempt at a message got.
enum Sent {
    Accepted,
    /// A 4xx reply (the code).
    Deferred(u16),
    /// No reply: the node went away, or another code.
    Failed,
}

impl RoamingClient {
    fn new(ports: Vec<u16>, first: usize) -> RoamingClient {
        RoamingClient {
            ports,
            turn: first,
            connection: None,
        }
    }

    async fn connected(&mut self) -> Option<&mut TestClient> {
        if self.connection.is_none() {
            let port = self.ports[self.turn % self.ports.len()];
            let mut client = TestClient::try_connect_raw(port).await?;
            client.reply_checked().await.filter(|r| r.code == 220)?;
            client.send(b"EHLO roaming.test\r\n").await;
            client.reply_checked().await.filter(|r| r.code == 250)?;
            self.connection = Some(client);
        }
        self.connection.as_mut()
    }

    async fn attempt(&mut self, tag: &str) -> Sent {
        let content = format!("Subject: {tag}\r\n\r\nbody\r\n.\r\n");
        let outcome = tokio::time::timeout(Duration::from_secs(15), async {
            let client = self.connected().await?;
            client
                .send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@switchyard.test>\r\nDATA\r\n")
                .await;
            let mail = client.reply_checked().await?;
            let rcpt = client.reply_checked().await?;
            let data = client.reply_checked().await?;
            if data.code != 354 {
                // Refused before the content (the queue is down: 451 at MAIL).
                let refused = [mail.code, rcpt.code, data.code]
                    .into_iter()
                    .find(|code| *code != 250)
                    .unwrap_or(data.code);
                client.send(b"RSET\r\n").await;
                client.reply_checked().await?;
                return Some(refused);
            }
            client.send(content.as_bytes()).await;
            Some(client.reply_checked().await?.code)
        })
        .await;
        match outcome {
            Ok(Some(250)) => Sent::Accepted,
            Ok(Some(code)) if (400..500).contains(&code) => {
                self.turn += 1;
                Sent::Deferred(code)
            }
            _ => {
                self.connection = None;
                self.turn += 1;
                Sent::Failed
            }
        }
    }

    /// Sends until accepted, or gives up after `limit`.
    async fn deliver(&mut self, tag: &str, limit: Duration, deferred: &AtomicUsize) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            match self.attempt(tag).await {
                Sent::Accepted => return true,
                Sent::Deferred(_) => {
                    deferred.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Sent::Failed => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        false
    }
}

/// Sends the next numbered message once.
async fn send_next(client: &mut RoamingClient, n: &mut usize) -> (String, Sent) {
    *n += 1;
    let tag = format!("outage-{n}");
    let sent = client.attempt(&tag).await;
    (tag, sent)
}

/// The subjects the sink received, with how many times each.
fn received_tags(sink: &Sink) -> HashMap<String, usize> {
    let mut tags = HashMap::new();
    for message in sink.received() {
        if let Some(tag) = message
            .data
            .lines()
            .find_map(|line| line.strip_prefix("Subject: "))
        {
            *tags.entry(tag.to_string()).or_insert(0) += 1;
        }
    }
    tags
}

/// Waits until every accepted tag has arrived; returns the duplicates.
async fn all_arrive(sink: &Sink, accepted: &HashSet<String>, limit: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let tags = received_tags(sink);
        let missing: Vec<&String> = accepted
            .iter()
            .filter(|tag| !tags.contains_key(*tag))
            .collect();
        if missing.is_empty() {
            return tags.values().map(|count| count - 1).sum();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} accepted messages never delivered, e.g. {:?}",
            missing.len(),
            missing.first()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn rows(schema: &str, query: &str) -> i64 {
    let pool = sqlx::PgPool::connect(&database_url())
        .await
        .expect("connect to the test database");
    sqlx::query_scalar(&query.replace("{schema}", schema))
        .fetch_one(&pool)
        .await
        .expect("query")
}

const CLIENTS: usize = 6;
const PER_CLIENT: usize = 500;

/// Three nodes on one database, 3,000 messages spread over them; one node is killed with
/// SIGKILL a third of the way in and another restarted two thirds in. Every message that got a
/// 250 arrives; duplicates (deliveries the killed node made but could not record) are counted
/// and reported; nothing stays leased by the dead node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_the_queue_and_lose_nothing_when_one_is_killed() {
    // A next hop slower than the clients: every node has a backlog of leased messages, so the
    // killed one leaves work for the others to take over.
    let sink = Sink::start_slow(
        "127.0.0.1".parse().expect("ip"),
        0,
        None,
        Duration::from_millis(20),
    )
    .await;
    let (queue, schema) = postgres_queue("4s");
    let mut nodes = Vec::new();
    for n in 0..3 {
        nodes.push(
            Router::start(RouterOptions {
                queue: queue.clone(),
                node_id: Some(format!("node-{n}")),
                ..RouterOptions::relaying_to(sink.address, "")
            })
            .await,
        );
    }
    let ports: Vec<u16> = nodes.iter().map(|node| node.port).collect();
    let accepted_so_far = Arc::new(AtomicUsize::new(0));
    let deferred = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for number in 0..CLIENTS {
        let ports = ports.clone();
        let accepted_so_far = accepted_so_far.clone();
        let deferred = deferred.clone();
        clients.push(tokio::spawn(async move {
            let mut client = RoamingClient::new(ports, number);
            let mut accepted = Vec::new();
            for n in 0..PER_CLIENT {
                let tag = format!("cluster-{number}-{n}");
                if client
                    .deliver(&tag, Duration::from_secs(60), &deferred)
                    .await
                {
                    accepted.push(tag);
                    accepted_so_far.fetch_add(1, Ordering::SeqCst);
                }
            }
            accepted
        }));
    }
    let total = CLIENTS * PER_CLIENT;
    let wait_for = |count: usize| {
        let accepted_so_far = accepted_so_far.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
            while accepted_so_far.load(Ordering::SeqCst) < count {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "stalled before {count}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_for(total / 3).await;
    nodes[1].kill();
    let orphaned = rows(
        &schema,
        "SELECT COUNT(*) FROM {schema}.recipients WHERE lease_owner = 'node-1' AND state = 0",
    )
    .await;
    // The operator sees, from a surviving node, which node holds what.
    let listed = nodes[0].queue(&["list"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        orphaned == 0 || listed.contains("leased-by=node-1"),
        "queue list names the dead node's leases:\n{listed}"
    );
    wait_for(2 * total / 3).await;
    nodes[2].terminate();
    nodes[2].wait_exit(Duration::from_secs(60)).await;
    nodes[2].spawn().await;
    let mut accepted = HashSet::new();
    for client in clients {
        accepted.extend(client.await.expect("client task"));
    }
    assert_eq!(accepted.len(), total, "every message accepted by some node");
    let duplicates = all_arrive(&sink, &accepted, Duration::from_secs(120)).await;
    eprintln!(
        "cluster: {} accepted over 3 nodes (node-1 killed at {}, node-2 restarted at {}), \
         {} temporary refusals retried, {orphaned} recipients left leased by the killed node, \
         all delivered, {duplicates} duplicate deliveries",
        accepted.len(),
        total / 3,
        2 * total / 3,
        deferred.load(Ordering::SeqCst)
    );
    assert!(
        orphaned > 0,
        "the killed node held no work: nothing was taken over"
    );
    // Duplicates come only from deliveries node-1 finished but could not record: at most what
    // it had in flight, a small share of the run.
    assert!(
        duplicates <= total / 20,
        "{duplicates} duplicates of {total}"
    );
    // The survivors delivered everything: the queue is empty, nothing is leased to the dead
    // node, and the operator's view agrees.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while rows(&schema, "SELECT COUNT(*) FROM {schema}.recipients").await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "queue not emptied");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        rows(
            &schema,
            "SELECT COUNT(*) FROM {schema}.recipients WHERE lease_owner = 'node-1'"
        )
        .await,
        0
    );
    let listed = nodes[0].queue(&["list"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains("-- 0 message(s) in queue"), "{listed}");
    // Every surviving node delivered its share.
    for n in [0, 2] {
        let log = nodes[n].log();
        assert!(log.contains("status=sent"), "node-{n} delivered nothing");
    }
}

/// The database refuses the node (its role may no longer log in, its connections are cut):
/// the node answers `451 4.3.0`, never a `250` it did not commit, and takes mail again by
/// itself once the database is back. Everything it acknowledged is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_loses_the_database_refuses_mail_then_recovers() {
    let admin = sqlx::PgPool::connect(&database_url())
        .await
        .expect("connect to the test database");
    let role = format!("e2e_role_{}", ulid::Ulid::new()).to_lowercase();
    sqlx::query(&format!("CREATE ROLE {role} LOGIN"))
        .execute(&admin)
        .await
        .expect("create role");
    sqlx::query(&format!("GRANT CREATE ON DATABASE test TO {role}"))
        .execute(&admin)
        .await
        .expect("grant");
    let schema = format!("e2e_{}", ulid::Ulid::new()).to_lowercase();
    let url = database_url().replacen("postgres@", &format!("{role}@"), 1);
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let router = Router::start(RouterOptions {
        queue: format!(
            "engine = \"postgres\"\nurl = \"{url}\"\nschema = \"{schema}\"\nlease = \"5s\"\n"
        ),
        ..RouterOptions::relaying_to(sink.address, "")
    })
    .await;
    let mut client = RoamingClient::new(vec![router.port], 0);
    let mut accepted = HashSet::new();
    let mut n = 0;
    for _ in 0..50 {
        if let (tag, Sent::Accepted) = send_next(&mut client, &mut n).await {
            accepted.insert(tag);
        }
    }
    assert_eq!(accepted.len(), 50, "accepted before the outage");
    sqlx::query(&format!("ALTER ROLE {role} NOLOGIN"))
        .execute(&admin)
        .await
        .expect("nologin");
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(format!("switchyard/{schema}"))
    .execute(&admin)
    .await
    .expect("terminate");
    // During the outage: refusals, and no 250 (nothing can be committed).
    let mut refusals = HashMap::new();
    for _ in 0..4 {
        match send_next(&mut client, &mut n).await {
            (tag, Sent::Accepted) => panic!("{tag} acknowledged while the database is away"),
            (_, Sent::Deferred(code)) => *refusals.entry(code).or_insert(0) += 1,
            (_, Sent::Failed) => {}
        }
    }
    assert!(
        refusals.get(&451).copied().unwrap_or(0) >= 3,
        "451 during the outage: {refusals:?}"
    );
    sqlx::query(&format!("ALTER ROLE {role} LOGIN"))
        .execute(&admin)
        .await
        .expect("login");
    // Back by itself: the node probes once a second.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut after = 0;
    while after < 50 {
        assert!(tokio::time::Instant::now() < deadline, "never recovered");
        match send_next(&mut client, &mut n).await {
            (tag, Sent::Accepted) => {
                accepted.insert(tag);
                after += 1;
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let duplicates = all_arrive(&sink, &accepted, Duration::from_secs(60)).await;
    eprintln!(
        "outage: {} acknowledged, all delivered; refusals {refusals:?}; {duplicates} duplicates",
        accepted.len()
    );
    let log = router.log();
    assert!(log.contains("queue database answers again"), "{log}");
    drop(router);
    let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&admin)
        .await;
    let _ = sqlx::query(&format!("REVOKE CREATE ON DATABASE test FROM {role}"))
        .execute(&admin)
        .await;
    let _ = sqlx::query(&format!("DROP ROLE {role}"))
        .execute(&admin)
        .await;
}

/// The plugins' kv store is the cluster's: a greylisted triplet retried on another node passes
/// there (one first-seen record, written by compare-and-swap), and a rate limit counts a
/// sender's messages on every node together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greylisting_and_rate_limits_hold_across_nodes() {
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let (queue, _schema) = postgres_queue("10s");
    let plugins = format!(
        "[[plugin]]\nname = \"greylist\"\npath = \"{}\"\ngrants = [\"kv\", \"clock\"]\ntime_limit = \"5s\"\n\
         [plugin.config]\ndelay_seconds = 1\nretry_window_seconds = 600\n\n\
         [[plugin]]\nname = \"rate\"\npath = \"{}\"\ngrants = [\"kv\", \"metrics\"]\ntime_limit = \"5s\"\n\
         [plugin.config]\nper_sender = {{ limit = 3, window_seconds = 600 }}\n",
        crate::harness::router::plugin_path("greylist").display(),
        crate::harness::router::plugin_path("rate-limit").display(),
    );
    let mut nodes = Vec::new();
    for n in 0..2 {
        nodes.push(
            Router::start(RouterOptions {
                queue: queue.clone(),
                node_id: Some(format!("node-{n}")),
                extra: plugins.clone(),
                ..RouterOptions::relaying_to(sink.address, "")
            })
            .await,
        );
    }
    let mut a = TestClient::connect(nodes[0].port).await;
    let mut b = TestClient::connect(nodes[1].port).await;
    assert_eq!(a.command("MAIL FROM:<grey@sender.test>").await.code, 250);
    let first = a.command("RCPT TO:<x@switchyard.test>").await;
    assert_eq!(first.code, 451, "greylisted on node-0: {first:?}");
    // Too early on the other node: the same record says wait.
    assert_eq!(b.command("MAIL FROM:<grey@sender.test>").await.code, 250);
    assert_eq!(b.command("RCPT TO:<x@switchyard.test>").await.code, 451);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let retried = b.command("RCPT TO:<x@switchyard.test>").await;
    assert_eq!(
        retried.code, 250,
        "passes on node-1 after the delay: {retried:?}"
    );
    assert_eq!(b.command("RSET").await.code, 250);
    // Back on node-0, the triplet is remembered as passed.
    let again = a.command("RCPT TO:<x@switchyard.test>").await;
    assert_eq!(again.code, 250, "{again:?}");
    assert_eq!(a.command("RSET").await.code, 250);
    // Three MAILs of one sender spread over both nodes; the fourth is over the limit anywhere.
    for turn in 0..3 {
        let client = if turn == 1 { &mut b } else { &mut a };
        let reply = client.command("MAIL FROM:<busy@sender.test>").await;
        assert_eq!(reply.code, 250, "{reply:?}");
        assert_eq!(client.command("RSET").await.code, 250);
    }
    let limited = b.command("MAIL FROM:<busy@sender.test>").await;
    assert_eq!(limited.code, 450, "counted across nodes: {limited:?}");
}

/// The operator's view of a shared queue, from any node: `queue list` on node-1 shows what
/// node-0 accepted, with its attempts; node-1's metrics count the whole queue; and `queue
/// retry --all` run against node-1's configuration makes a node try again at once: the nodes
/// scan only hourly, so only the NOTIFY of the retry order can wake them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_commands_and_metrics_see_the_shared_queue() {
    let rule: crate::harness::sink::Rule = Arc::new(|_: &str, _| Some("451 4.2.0 hold".into()));
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, Some(rule)).await;
    let (queue, _schema) = postgres_queue("10s");
    let metrics_port = crate::harness::router::free_port();
    let mut nodes = Vec::new();
    for n in 0..2 {
        let metrics = if n == 1 {
            format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n")
        } else {
            String::new()
        };
        nodes.push(
            Router::start(RouterOptions {
                queue: format!("{queue}scan_interval = \"1h\"\n"),
                node_id: Some(format!("node-{n}")),
                // Far apart: only a retry order brings the second attempt soon.
                retry: "intervals = [\"1h\"]\n".into(),
                extra: metrics,
                ..RouterOptions::relaying_to(sink.address, "")
            })
            .await,
        );
    }
    let mut client = TestClient::connect(nodes[0].port).await;
    for n in 0..3 {
        client
            .send_accepted(
                "a@sender.test",
                &["b@switchyard.test"],
                &crate::harness::client::message(&format!("held-{n}")),
            )
            .await;
    }
    let listed = |node: &Router| String::from_utf8_lossy(&node.queue(&["list"]).stdout).to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = listed(&nodes[1]);
        if text.matches("attempts=1").count() == 3 {
            assert!(text.contains("-- 3 message(s) in queue"), "{text}");
            assert!(text.contains("451 4.2.0 hold"), "{text}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let scraped = crate::harness::router::scrape_metrics(metrics_port).await;
        if scraped.contains("switchyard_queue_messages 3")
            && scraped.contains("switchyard_queue_recipients{state=\"queued\"} 3")
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{scraped}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let retried = nodes[1].queue(&["retry", "--all"]);
    assert!(retried.status.success(), "{retried:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = listed(&nodes[0]);
        if text.matches("attempts=2").count() == 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no retry after the order: {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
