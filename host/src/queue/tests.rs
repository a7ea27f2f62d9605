//! One suite, two engines: every test of the queue's contract runs against a real SQLite file
//! and against the real PostgreSQL server (`SWITCHYARD_TEST_DATABASE`, by default
//! `postgres://postgres@127.0.0.1:5432/test`), each test in a schema of its own so they run in
//! parallel. Engine-specific settings (durability, lease recovery) have tests of their own.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;

use super::postgres::PgQueue;
use super::sqlite::SqliteQueue;
use super::*;
use crate::config::{QueueConfig, QueueEngine};
use crate::queue::kv::Quota;

/// The test server; `scripts/test` starts it where it is down.
fn database_url() -> String {
    std::env::var("SWITCHYARD_TEST_DATABASE")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// Where a test's queue lives: a temporary directory, or a fresh schema.
struct Place {
    engine: QueueEngine,
    config: QueueConfig,
    dir: tempfile::TempDir,
}

impl Place {
    fn new(engine: QueueEngine) -> Place {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = QueueConfig {
            engine,
            ..QueueConfig::default()
        };
        if engine == QueueEngine::Postgres {
            config.url = Some(database_url());
            config.schema = Some(format!("unit_{}", ulid::Ulid::new()).to_lowercase());
            config.max_connections = 8;
        }
        Place {
            engine,
            config,
            dir,
        }
    }

    /// Opens the queue here (again: a second node, or a restart).
    async fn open(&self) -> Opened {
        open(&self.config, self.dir.path(), Schema::Migrate)
            .await
            .expect("open")
    }
}

/// Runs a test once per engine, each as its own test.
macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {
        $(mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(super::Place::new(crate::config::QueueEngine::Sqlite)).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(super::Place::new(crate::config::QueueEngine::Postgres)).await
            }
        })*
    };
}

both_engines!(
    enqueue_claim_record_cycle,
    kv_counters_expire_and_are_scoped,
    kv_compare_and_swap_is_atomic,
    kv_quotas_refuse_growth_and_purges_make_room,
    concurrent_enqueues_share_commits,
    concurrent_claims_never_overlap,
    expired_leases_pass_to_another_node,
    renewed_leases_hold,
    operator_lease_reports_busy_recipients,
    a_newer_schema_is_refused,
    unleased_work_wakes_the_scanner,
    listing_shows_lease_holders,
    stats_count_the_whole_queue,
    two_nodes_recording_one_message_at_once_finish_it,
    a_result_under_a_lease_that_passed_on_is_not_applied,
    held_recipients_wait_for_release_and_keep_their_message,
    traces_are_kept_by_message_and_refused_ones_found_by_client_sender_and_time,
);

async fn held_recipients_wait_for_release_and_keep_their_message(place: Place) {
    let queue = place.open().await.queue;
    queue
        .enqueue(message("h1", &["b@x.test", "c@y.test"]), None)
        .await
        .expect("enqueue");
    queue
        .enqueue(message("h2", &["d@x.test"]), None)
        .await
        .expect("enqueue");
    let now = now_millis();
    // One recipient of h1 is being delivered: holding leaves it to finish its attempt.
    let (leased, _) = queue
        .lease_message("h1", "node", now, now + 60_000)
        .await
        .expect("lease")
        .expect("message");
    assert_eq!(leased.recipients.len(), 2);
    queue
        .record(
            "node",
            vec![result("h1", 1, Outcome::Deferred { next_attempt: now })],
            vec![],
        )
        .await
        .expect("record");
    assert_eq!(queue.hold(Some("h1"), now).await.expect("hold"), (1, 1));
    // The busy recipient is delivered; the message stays for its held one.
    queue
        .record("node", vec![result("h1", 0, Outcome::Delivered)], vec![])
        .await
        .expect("record");
    let h1 = queue
        .get("h1")
        .await
        .expect("get")
        .expect("kept for the held recipient");
    assert_eq!(h1.recipients[1].state, RecipientState::Held);
    // Held recipients are never claimed, however due.
    let claimed = queue
        .claim_due("node", now + 10_000, now + 60_000, 10)
        .await
        .expect("claim");
    assert_eq!(
        claimed
            .iter()
            .map(|m| m.meta.id.as_str())
            .collect::<Vec<_>>(),
        ["h2"]
    );
    assert_eq!(queue.stats("node", now).await.expect("stats").held, 1);
    // A message of no held recipients is left alone; `None` releases every one.
    assert_eq!(queue.release(Some("h2")).await.expect("release"), 0);
    assert_eq!(queue.release(None).await.expect("release"), 1);
    let claimed = queue
        .claim_due("node", now_millis() + 1, now + 60_000, 10)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].meta.id, "h1");

    // An operator bounces a held message: every recipient fails and the DSN is queued.
    queue
        .enqueue(message("h3", &["e@x.test", "f@x.test"]), None)
        .await
        .expect("enqueue");
    assert_eq!(
        queue.hold(Some("h3"), now_millis()).await.expect("hold"),
        (2, 0)
    );
    // No plugins: their hooks are tested end to end (tests/e2e/admin.rs).
    let engine = crate::plugins::engine::new_engine_with(crate::plugins::engine::PoolTuning {
        instances: 8,
        pagemap_scan: false,
    })
    .expect("engine");
    let plugins = crate::plugins::PluginManager::start(
        engine,
        &[],
        &[],
        crate::plugins::PluginServices::default(),
    )
    .await
    .expect("no plugins");
    let bounced = crate::admin::actions::bounce(queue.as_ref(), "mx.test", "h3", &plugins)
        .await
        .expect("bounced");
    assert_eq!(bounced.notified, 2);
    let dsn = bounced.dsn.expect("a DSN to a@example.com");
    assert!(queue.get("h3").await.expect("get").is_none(), "all failed");
    assert!(queue.get(&dsn).await.expect("get").is_some(), "DSN queued");
}

async fn traces_are_kept_by_message_and_refused_ones_found_by_client_sender_and_time(place: Place) {
    use super::traces::{
        PendingTrace, StoredCall, TraceQuery, TraceRecord, TracedCall, TracedPlugin, TracedScan,
    };
    use std::borrow::Cow;
    let traces = place.open().await.traces;
    let pending = |message_id: Option<&str>, at: Millis, client: &str, sender: &str| PendingTrace {
        message_id: message_id.map(str::to_string),
        at,
        phase: "smtp",
        client_ip: client.to_string(),
        sender: sender.to_string(),
        recipients: vec!["r@x.test".to_string()],
        outcome: "done".to_string(),
        plugins: vec![TracedPlugin {
            name: "p".to_string(),
            tenant: String::new(),
            generation: 2,
            sha256: "ab".repeat(32),
        }],
        calls: vec![StoredCall(
            -3,
            Cow::Borrowed("rcpt-to"),
            0,
            Cow::Borrowed("reject"),
            42,
            Some("r@x.test".into()),
            Some("550 5.7.1 no".to_string()),
            None,
            None,
            Vec::new(),
        )],
        scans: vec![TracedScan {
            scanner: "av".to_string(),
            result: "clean".to_string(),
            millis: 3,
        }],
    };
    let now = now_millis();
    let mut delivery = pending(Some("m1"), now + 5, "", "a@x.test");
    delivery.phase = "delivery";
    let written = vec![
        pending(Some("m1"), now, "192.0.2.1", "a@x.test"),
        delivery,
        pending(None, now - 60_000, "192.0.2.1", "old@x.test"),
        pending(None, now, "192.0.2.1", "b@x.test"),
        pending(None, now, "192.0.2.9", "c@x.test"),
    ];
    traces.append_traces(&written).await.expect("append");
    let m1 = traces.message_trace("m1").await.expect("trace");
    assert_eq!(m1.len(), 2, "oldest first, whole");
    assert_eq!(
        m1[0],
        TraceRecord {
            message_id: Some("m1".to_string()),
            at: now,
            phase: "smtp".to_string(),
            client_ip: "192.0.2.1".to_string(),
            sender: "a@x.test".to_string(),
            recipients: vec!["r@x.test".to_string()],
            outcome: "done".to_string(),
            plugins: written[0].plugins.clone(),
            calls: vec![TracedCall {
                at: now - 3,
                hook: "rcpt-to".to_string(),
                plugin: "p".to_string(),
                tenant: String::new(),
                subject: Some("r@x.test".to_string()),
                verdict: "reject".to_string(),
                detail: Some("550 5.7.1 no".to_string()),
                rewrite: None,
                edits: Vec::new(),
                micros: 42,
                failure: None,
            }],
            scans: written[0].scans.clone(),
        }
    );
    assert_eq!(m1[1], written[1].expand());
    let query = |client: Option<&str>, sender: Option<&str>, since: Option<Millis>| TraceQuery {
        client_ip: client.map(str::to_string),
        sender: sender.map(str::to_string),
        since,
        until: None,
        limit: 10,
    };
    let senders = |records: Vec<TraceRecord>| -> Vec<String> {
        records.into_iter().map(|record| record.sender).collect()
    };
    let found = traces
        .refused_traces(&query(Some("192.0.2.1"), None, None))
        .await
        .expect("search");
    assert_eq!(senders(found), ["b@x.test", "old@x.test"], "newest first");
    let found = traces
        .refused_traces(&query(Some("192.0.2.1"), None, Some(now - 1000)))
        .await
        .expect("search");
    assert_eq!(senders(found), ["b@x.test"]);
    let found = traces
        .refused_traces(&query(None, Some("c@x.test"), None))
        .await
        .expect("search");
    assert_eq!(senders(found), ["c@x.test"]);
    assert_eq!(traces.prune_traces(now - 1000).await.expect("prune"), 1);
    assert_eq!(
        traces
            .refused_traces(&query(None, None, None))
            .await
            .expect("search")
            .len(),
        2
    );
}

fn message(id: &str, recipients: &[&str]) -> NewMessage {
    NewMessage {
        meta: MessageMeta {
            id: id.to_string(),
            sender: "a@example.com".to_string(),
            received_at: now_millis(),
            size: 5,
            smtputf8: false,
            eight_bit: false,
            tenant: String::new(),
            dsn: Default::default(),
        },
        recipients: recipients.iter().map(|r| r.to_string()).collect(),
        recipient_dsn: Vec::new(),
        content: Bytes::from_static(b"x\r\n"),
        quarantine: None,
    }
}

fn result(id: &str, index: i64, outcome: Outcome) -> RecipientResult {
    RecipientResult {
        message_id: id.into(),
        index,
        attempts: 1,
        outcome,
        reply: "250 ok".into(),
        delay_warned: false,
    }
}

async fn enqueue_claim_record_cycle(place: Place) {
    let queue = place.open().await.queue;
    queue
        .enqueue(message("m1", &["b@x.test", "c@y.test"]), None)
        .await
        .expect("enqueue");
    assert_eq!(
        queue.content("m1").await.expect("content").as_deref(),
        Some(&b"x\r\n"[..])
    );
    let now = now_millis();
    let claimed = queue
        .claim_due("node", now + 1, now + 60_000, 10)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].recipients.len(), 2);
    assert_eq!(claimed[0].meta.sender, "a@example.com");
    // Leased: a second claim finds nothing.
    assert!(queue
        .claim_due("other", now + 1, now + 60_000, 10)
        .await
        .expect("claim")
        .is_empty());
    queue
        .record(
            "node",
            vec![
                result("m1", 0, Outcome::Delivered),
                result(
                    "m1",
                    1,
                    Outcome::Deferred {
                        next_attempt: now + 5000,
                    },
                ),
            ],
            vec![],
        )
        .await
        .expect("record");
    let listed = queue.get("m1").await.expect("get").expect("still queued");
    assert_eq!(listed.recipients[0].state, RecipientState::Delivered);
    assert_eq!(listed.recipients[1].state, RecipientState::Queued);
    assert_eq!(listed.recipients[1].lease, None, "recording ends the lease");
    assert!(queue
        .claim_due("node", now + 1, now + 60_000, 10)
        .await
        .expect("claim")
        .is_empty());
    assert_eq!(
        queue
            .claim_due("node", now + 6000, now + 60_000, 10)
            .await
            .expect("claim")
            .len(),
        1
    );
    queue
        .record(
            "node",
            vec![result("m1", 1, Outcome::Failed)],
            vec![message("bounce", &["a@example.com"])],
        )
        .await
        .expect("record");
    assert!(
        queue.get("m1").await.expect("get").is_none(),
        "finished message removed"
    );
    assert!(
        queue.get("bounce").await.expect("get").is_some(),
        "bounce queued atomically"
    );
    assert_eq!(queue.retry_now(Some("bounce")).await.expect("retry"), 1);
    assert!(queue.delete("bounce").await.expect("delete"));
    assert!(queue.list().await.expect("list").is_empty());
}

async fn kv_counters_expire_and_are_scoped(place: Place) {
    let kv = place.open().await.kv;
    assert_eq!(
        kv.increment("t", "p", "k", 1, 60, Quota::UNLIMITED)
            .await
            .expect("inc"),
        1
    );
    assert_eq!(
        kv.increment("t", "p", "k", 2, 60, Quota::UNLIMITED)
            .await
            .expect("inc"),
        3
    );
    assert_eq!(
        kv.increment("t", "other", "k", 1, 60, Quota::UNLIMITED)
            .await
            .expect("inc"),
        1,
        "per plugin"
    );
    assert_eq!(
        kv.get("t", "p", "k").await.expect("get"),
        Some(b"3".to_vec())
    );
    kv.set("t", "p", "gone", b"x", Some(0), Quota::UNLIMITED)
        .await
        .expect("set");
    assert_eq!(
        kv.get("t", "p", "gone").await.expect("get"),
        None,
        "expired"
    );
    assert_eq!(
        kv.increment("t", "p", "gone", 5, 60, Quota::UNLIMITED)
            .await
            .expect("inc"),
        5,
        "expired counter restarts"
    );
    kv.delete("t", "p", "k").await.expect("delete");
    assert_eq!(kv.get("t", "p", "k").await.expect("get"), None);
}

async fn kv_quotas_refuse_growth_and_purges_make_room(place: Place) {
    use super::kv::{Swap, Usage};
    let kv = place.open().await.kv;
    let quota = Quota { keys: 3, bytes: 40 };
    kv.set("t", "p", "a", b"1234567890", None, quota)
        .await
        .expect("10 bytes of value, 11 in all");
    kv.increment("t", "p", "b", 1, 1, quota)
        .await
        .expect("a counter");
    // Growing an existing value within the quota; then a value past the bytes.
    kv.set("t", "p", "a", b"12345678901234567890", None, quota)
        .await
        .expect("21 + 2 bytes in all");
    let error = kv
        .set("t", "p", "c", &[b'x'; 20], None, quota)
        .await
        .expect_err("past the bytes");
    assert_eq!(error.to_string(), "kv quota of 40 bytes reached");
    // A third key fits; a fourth does not, however small.
    kv.set("t", "p", "c", b"x", Some(1), quota)
        .await
        .expect("third key");
    let error = kv
        .increment("t", "p", "d", 1, 60, quota)
        .await
        .expect_err("past the keys");
    assert_eq!(error.to_string(), "kv quota of 3 keys reached");
    let swap = Swap {
        key: "d",
        expected: None,
        value: b"1",
        ttl_seconds: None,
        quota,
    };
    assert!(kv.compare_and_swap("t", "p", swap).await.is_err());
    assert_eq!(
        kv.get("t", "p", "d").await.expect("get"),
        None,
        "nothing written"
    );
    // Rewriting what exists, shrinking and deleting stay allowed at the quota.
    assert_eq!(
        kv.increment("t", "p", "b", 1, 1, quota).await.expect("inc"),
        2
    );
    kv.set("t", "p", "a", b"1", None, quota)
        .await
        .expect("shrink");
    // Other owners are counted apart.
    kv.set("t", "q", "d", b"1", None, quota)
        .await
        .expect("another plugin");
    let usage = kv.usage().await.expect("usage");
    assert_eq!(
        usage,
        [
            Usage {
                tenant: "t".into(),
                plugin: "p".into(),
                keys: 3,
                bytes: 2 + 2 + 2
            },
            Usage {
                tenant: "t".into(),
                plugin: "q".into(),
                keys: 1,
                bytes: 2
            },
        ]
    );
    // Once `b` and `c` expire and are purged (in batches), their room is free again.
    let later = now_millis() + 5_000;
    assert_eq!(kv.purge_expired(later, 1).await.expect("purge"), 1);
    assert_eq!(kv.purge_expired(later, 10).await.expect("purge"), 1);
    assert_eq!(kv.purge_expired(later, 10).await.expect("purge"), 0);
    kv.increment("t", "p", "d", 1, 60, quota)
        .await
        .expect("room again");
    let usage = kv.usage().await.expect("usage");
    assert_eq!((usage[0].keys, usage[0].bytes), (2, 2 + 2));
    // Unlimited (the host's own keys): no check at all.
    for n in 0..10 {
        kv.set("", "", &format!("k{n}"), b"v", None, Quota::UNLIMITED)
            .await
            .expect("unlimited");
    }
}

async fn concurrent_enqueues_share_commits(place: Place) {
    let queue = place.open().await.queue;
    let mut tasks = Vec::new();
    for n in 0..200 {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            queue
                .enqueue(message(&format!("m{n}"), &["b@x.test"]), None)
                .await
        }));
    }
    let before = queue.commits();
    for task in tasks {
        task.await.expect("join").expect("enqueue");
    }
    assert_eq!(queue.list().await.expect("list").len(), 200);
    // 200 writes at once: far fewer commits than writes, or group commit is not grouping.
    let commits = queue.commits() - before;
    assert!(
        (1..=100).contains(&commits),
        "{commits} commits for 200 enqueues"
    );
    // A duplicate id fails alone, without failing the rest of its group.
    let (dup, fresh) = tokio::join!(
        queue.enqueue(message("m1", &["b@x.test"]), None),
        queue.enqueue(message("fresh", &["b@x.test"]), None)
    );
    assert!(dup.is_err());
    assert!(fresh.is_ok());
}

/// Two nodes (two opened queues) claiming the same due work at once take disjoint parts of it,
/// and together all of it.
async fn concurrent_claims_never_overlap(place: Place) {
    let first = place.open().await.queue;
    let second = place.open().await.queue;
    for n in 0..300 {
        first
            .enqueue(message(&format!("m{n:03}"), &["b@x.test"]), None)
            .await
            .expect("enqueue");
    }
    let claim = |queue: std::sync::Arc<dyn Queue>, node: &'static str| async move {
        let mut ids = Vec::new();
        loop {
            let now = now_millis();
            let claimed = queue
                .claim_due(node, now, now + 60_000, 25)
                .await
                .expect("claim");
            if claimed.is_empty() {
                return ids;
            }
            ids.extend(claimed.into_iter().map(|message| message.meta.id));
        }
    };
    let (a, b) = tokio::join!(claim(first, "a"), claim(second, "b"));
    let a: HashSet<String> = a.into_iter().collect();
    let b: HashSet<String> = b.into_iter().collect();
    assert!(a.is_disjoint(&b), "a recipient claimed by two nodes");
    assert_eq!(a.len() + b.len(), 300, "every message claimed");
}

async fn expired_leases_pass_to_another_node(place: Place) {
    let queue = place.open().await.queue;
    let now = now_millis();
    queue
        .enqueue(
            message("m1", &["b@x.test"]),
            Some(("dead".into(), now + 1000)),
        )
        .await
        .expect("enqueue");
    assert!(
        queue
            .claim_due("alive", now + 10, now + 60_000, 10)
            .await
            .expect("claim")
            .is_empty(),
        "leased by the accepting node"
    );
    let taken = queue
        .claim_due("alive", now + 1001, now + 60_000, 10)
        .await
        .expect("claim");
    assert_eq!(taken.len(), 1, "taken over once the lease ran out");
    let listed = queue.get("m1").await.expect("get").expect("queued");
    assert_eq!(
        listed.recipients[0]
            .lease
            .as_ref()
            .map(|l| l.owner.as_str()),
        Some("alive")
    );
}

async fn renewed_leases_hold(place: Place) {
    let queue = place.open().await.queue;
    let now = now_millis();
    queue
        .enqueue(
            message("m1", &["b@x.test"]),
            Some(("node".into(), now + 1000)),
        )
        .await
        .expect("enqueue");
    assert_eq!(
        queue
            .renew_leases("node", &["other".into()], now + 60_000)
            .await
            .expect("renew"),
        0,
        "only the messages named"
    );
    assert_eq!(
        queue
            .renew_leases("node", &["m1".into()], now + 60_000)
            .await
            .expect("renew"),
        1
    );
    assert!(queue
        .claim_due("other", now + 5000, now + 60_000, 10)
        .await
        .expect("claim")
        .is_empty());
    // A restart of the same node takes its own leases back; the engines differ on the others'.
    queue
        .enqueue(
            message("m2", &["c@x.test"]),
            Some(("neighbour".into(), now + 60_000)),
        )
        .await
        .expect("enqueue");
    let recovered = queue.recover_leases("node").await.expect("recover");
    match place.engine {
        QueueEngine::Sqlite => assert_eq!(recovered, 2, "one process owns the file"),
        QueueEngine::Postgres => assert_eq!(recovered, 1, "only this node's leases"),
    }
}

async fn operator_lease_reports_busy_recipients(place: Place) {
    let queue = place.open().await.queue;
    let now = now_millis();
    queue
        .enqueue(
            message("m1", &["b@x.test"]),
            Some(("node".into(), now + 60_000)),
        )
        .await
        .expect("enqueue");
    let (message, busy) = queue
        .lease_message("m1", "admin", now, now + 60_000)
        .await
        .expect("lease")
        .expect("exists");
    assert_eq!((message.recipients.len(), busy), (0, 1));
    assert!(queue
        .lease_message("none", "admin", now, now + 60_000)
        .await
        .expect("lease")
        .is_none());
    assert_eq!(queue.release_leases("node").await.expect("release"), 1);
    let (message, busy) = queue
        .lease_message("m1", "admin", now, now + 60_000)
        .await
        .expect("lease")
        .expect("exists");
    assert_eq!((message.recipients.len(), busy), (1, 0));
}

/// A database migrated by a newer Switchyard (a migration this binary does not have) is
/// refused, by name.
async fn a_newer_schema_is_refused(place: Place) {
    let opened = place.open().await;
    let known = match place.engine {
        QueueEngine::Sqlite => migrations::newest(migrations::SQLITE),
        QueueEngine::Postgres => migrations::newest(migrations::POSTGRES),
    };
    assert_eq!(opened.queue.schema_version().await.expect("version"), known);
    drop(opened);
    let insert =
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
                  VALUES (9999, 'from the future', TRUE, x'00', 0)";
    match place.engine {
        QueueEngine::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&format!(
                "sqlite://{}",
                place.dir.path().join(&place.config.path).display()
            ))
            .await
            .expect("connect");
            sqlx::query(insert).execute(&pool).await.expect("insert");
        }
        QueueEngine::Postgres => {
            let schema = place.config.schema.clone().expect("schema");
            let pool = sqlx::PgPool::connect(&database_url())
                .await
                .expect("connect");
            sqlx::query(&format!(
                "{} ",
                insert
                    .replace("_sqlx_migrations", &format!("{schema}._sqlx_migrations"))
                    .replace("x'00'", "'\\x00'::bytea")
            ))
            .execute(&pool)
            .await
            .expect("insert");
            let refused = postgres::check(&place.config).await;
            assert!(
                matches!(refused, Err(QueueError::SchemaTooNew { found: 9999, .. })),
                "check-config refuses it too"
            );
        }
    }
    let error = open(&place.config, place.dir.path(), Schema::Migrate)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(
            error,
            QueueError::SchemaTooNew { found: 9999, known: k } if k == known
        ),
        "{error}"
    );
    assert!(error
        .to_string()
        .contains("newer than this Switchyard knows"));
}

/// Unleased work (a bounce queued, a retry ordered) wakes a waiting scanner, on this node and,
/// for the shared engine, on another.
async fn unleased_work_wakes_the_scanner(place: Place) {
    let writer = place.open().await.queue;
    let waiter = match place.engine {
        QueueEngine::Sqlite => writer.clone(),
        QueueEngine::Postgres => place.open().await.queue,
    };
    // The first wait starts the listener; give it time to LISTEN before the work arrives.
    let waiting = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.work_arrived().await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    writer
        .enqueue(message("bounce", &["a@example.com"]), None)
        .await
        .expect("enqueue");
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("woken")
        .expect("join");
}

async fn listing_shows_lease_holders(place: Place) {
    let queue = place.open().await.queue;
    let now = now_millis();
    queue
        .enqueue(
            message("m1", &["b@x.test", "c@x.test"]),
            Some(("node-7".into(), now + 60_000)),
        )
        .await
        .expect("enqueue");
    queue
        .enqueue(message("m2", &["d@x.test"]), None)
        .await
        .expect("enqueue");
    let listed = queue.list().await.expect("list");
    assert_eq!(listed.len(), 2);
    let m1 = listed.iter().find(|m| m.meta.id == "m1").expect("m1");
    assert_eq!(m1.recipients.len(), 2);
    assert!(m1.recipients.iter().all(|r| r.lease
        == Some(Lease {
            owner: "node-7".into(),
            until: now + 60_000
        })));
    let m2 = listed.iter().find(|m| m.meta.id == "m2").expect("m2");
    assert_eq!(m2.recipients[0].lease, None);
}

#[tokio::test]
async fn sqlite_commits_are_durable_wal_with_full_sync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.db");
    SqliteQueue::open(&path, Duration::ZERO)
        .await
        .expect("open");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("connect");
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&pool)
        .await
        .expect("pragma");
    assert_eq!(mode, "wal");
    // `synchronous` is a setting of each connection, so it is asked of the queue's own: FULL
    // (2), so a commit is on disk before the 250.
    let queue = SqliteQueue::open(&path, Duration::ZERO)
        .await
        .expect("open again");
    assert_eq!(queue.synchronous().await.expect("synchronous"), 2);
}

/// A queue file written before the schema had migrations (no DSN columns, no migration table)
/// opens, gains the columns, and keeps its messages.
#[tokio::test]
async fn sqlite_file_from_before_migrations_is_upgraded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.db");
    {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=rwc", path.display()))
            .await
            .expect("connect");
        for statement in [
            "CREATE TABLE messages (id TEXT PRIMARY KEY, sender TEXT NOT NULL, received_at INTEGER NOT NULL,
               size INTEGER NOT NULL, smtputf8 INTEGER NOT NULL, eight_bit INTEGER NOT NULL, content BLOB NOT NULL)",
            "CREATE TABLE recipients (message_id TEXT NOT NULL, idx INTEGER NOT NULL, address TEXT NOT NULL,
               state INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt INTEGER NOT NULL,
               last_reply TEXT, lease_owner TEXT, lease_until INTEGER, PRIMARY KEY (message_id, idx))",
            "INSERT INTO messages VALUES ('old', 'a@x.test', 1, 3, 0, 0, x'782e0d0a')",
            "INSERT INTO recipients (message_id, idx, address, state, next_attempt) VALUES ('old', 0, 'b@y.test', 0, 1)",
        ] {
            sqlx::query(statement).execute(&pool).await.expect("old schema");
        }
    }
    let queue = SqliteQueue::open(&path, Duration::ZERO)
        .await
        .expect("open");
    let old = Queue::get(&queue, "old").await.expect("get").expect("kept");
    assert_eq!(old.recipients[0].address, "b@y.test");
    assert_eq!(
        queue.schema_version().await.expect("version"),
        migrations::newest(migrations::SQLITE),
        "upgraded, then migrated to this version"
    );
}

/// Bodies are compressed with lz4 where the server has it (migration 2).
#[tokio::test]
async fn postgres_bodies_use_lz4() {
    let place = Place::new(QueueEngine::Postgres);
    let queue = PgQueue::open(&place.config, Schema::Migrate)
        .await
        .expect("open");
    let compression: Option<String> = sqlx::query_scalar(
        "SELECT NULLIF(attcompression, '')::text FROM pg_attribute
         WHERE attrelid = 'messages'::regclass AND attname = 'content'",
    )
    .fetch_one(&queue.pool)
    .await
    .expect("attribute");
    assert_eq!(compression.as_deref(), Some("l"), "l: lz4");
}

#[tokio::test]
async fn postgres_commits_wait_for_the_disk() {
    let place = Place::new(QueueEngine::Postgres);
    let queue = PgQueue::open(&place.config, Schema::Migrate)
        .await
        .expect("open");
    for (name, expected) in [
        ("synchronous_commit", "on"),
        ("lock_timeout", "5s"),
        ("idle_in_transaction_session_timeout", "15s"),
    ] {
        let setting: String = sqlx::query_scalar(&format!("SHOW {name}"))
            .fetch_one(&queue.pool)
            .await
            .expect("show");
        assert_eq!(setting, expected, "{name}");
    }
}

/// A wrong password or database is refused when the queue opens, with the server's reason.
#[tokio::test]
async fn postgres_bad_address_is_refused_clearly() {
    let mut config = Place::new(QueueEngine::Postgres).config;
    config.url = Some("postgres://postgres@127.0.0.1:5432/no_such_database_here".into());
    let error = PgQueue::open(&config, Schema::Migrate)
        .await
        .err()
        .expect("refused");
    assert!(
        error.to_string().contains("no_such_database_here"),
        "{error}"
    );
    assert!(!describe_hides_password().contains("secret"));
}

fn describe_hides_password() -> String {
    let config = QueueConfig {
        engine: QueueEngine::Postgres,
        url: Some("postgres://mail:secret@db.internal:5433/queue".into()),
        ..QueueConfig::default()
    };
    let described = postgres::describe(&config);
    assert_eq!(described, "postgres://mail@db.internal:5433/queue");
    described
}

/// The database drops the writer's connections while sessions are queueing: every enqueue that
/// was answered Ok is in the queue (no `250` without a commit), and the queue works again once
/// connections can be made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connection_loss_never_acknowledges_an_uncommitted_message() {
    let place = Place::new(QueueEngine::Postgres);
    let queue = place.open().await.queue;
    let schema = place.config.schema.clone().expect("schema");
    let admin = sqlx::PgPool::connect(&database_url())
        .await
        .expect("connect");
    let mut tasks = Vec::new();
    for n in 0..400 {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("m{n}");
            let result = queue.enqueue(message(&id, &["b@x.test"]), None).await;
            (id, result.is_ok())
        }));
        if n % 100 == 50 {
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            )
            .bind(format!("switchyard/{schema}"))
            .execute(&admin)
            .await
            .expect("terminate");
        }
    }
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for task in tasks {
        let (id, ok) = task.await.expect("join");
        if ok {
            acknowledged.push(id);
        } else {
            refused += 1;
        }
    }
    let stored: HashSet<String> = queue
        .list()
        .await
        .expect("list after the loss")
        .into_iter()
        .map(|message| message.meta.id)
        .collect();
    for id in &acknowledged {
        assert!(stored.contains(id), "{id} acknowledged but not stored");
    }
    eprintln!(
        "acknowledged {}, refused {refused}, stored {}",
        acknowledged.len(),
        stored.len()
    );
    queue
        .enqueue(message("after", &["b@x.test"]), None)
        .await
        .expect("works again");
}

async fn kv_compare_and_swap_is_atomic(place: Place) {
    use super::kv::Swap;
    let kv = place.open().await.kv;
    let swap = |expected: Option<&'static [u8]>, value: &'static [u8]| Swap {
        key: "k",
        expected,
        value,
        ttl_seconds: None,
        quota: Quota::UNLIMITED,
    };
    assert!(kv
        .compare_and_swap("t", "p", swap(None, b"1"))
        .await
        .expect("cas"));
    assert!(
        !kv.compare_and_swap("t", "p", swap(None, b"2"))
            .await
            .expect("cas"),
        "present: not swapped as missing"
    );
    assert!(
        !kv.compare_and_swap("t", "p", swap(Some(b"9"), b"2"))
            .await
            .expect("cas"),
        "another value expected"
    );
    assert!(kv
        .compare_and_swap("t", "p", swap(Some(b"1"), b"2"))
        .await
        .expect("cas"));
    assert_eq!(
        kv.get("t", "p", "k").await.expect("get"),
        Some(b"2".to_vec())
    );
    // A counter's text compares as its bytes.
    kv.increment("t", "p", "n", 7, 60, Quota::UNLIMITED)
        .await
        .expect("inc");
    let counter = Swap {
        key: "n",
        expected: Some(b"7"),
        value: b"0",
        ttl_seconds: Some(60),
        quota: Quota::UNLIMITED,
    };
    assert!(kv.compare_and_swap("t", "p", counter).await.expect("cas"));
    // An expired key counts as missing.
    kv.set("t", "p", "old", b"x", Some(0), Quota::UNLIMITED)
        .await
        .expect("set");
    let revive = Swap {
        key: "old",
        expected: None,
        value: b"y",
        ttl_seconds: None,
        quota: Quota::UNLIMITED,
    };
    assert!(kv.compare_and_swap("t", "p", revive).await.expect("cas"));
    // Racing from the same value, exactly one wins (two nodes: two opened stores).
    let other = place.open().await.kv;
    let mut racers = Vec::new();
    for n in 0..20u8 {
        let kv = if n % 2 == 0 {
            kv.clone()
        } else {
            other.clone()
        };
        racers.push(tokio::spawn(async move {
            let value = [n];
            kv.compare_and_swap(
                "t",
                "p",
                Swap {
                    key: "race",
                    expected: None,
                    value: &value,
                    ttl_seconds: None,
                    quota: Quota::UNLIMITED,
                },
            )
            .await
            .expect("cas")
        }));
    }
    let mut winners = 0;
    for racer in racers {
        winners += racer.await.expect("join") as usize;
    }
    assert_eq!(winners, 1);
}

async fn stats_count_the_whole_queue(place: Place) {
    let queue = place.open().await.queue;
    let now = now_millis();
    queue
        .enqueue(
            message("m1", &["a@x.test", "b@x.test"]),
            Some(("here".into(), now + 60_000)),
        )
        .await
        .expect("enqueue");
    queue
        .enqueue(
            message("m2", &["c@x.test"]),
            Some(("there".into(), now + 60_000)),
        )
        .await
        .expect("enqueue");
    let mut held = message("m3", &["d@x.test"]);
    held.quarantine = Some("suspicious".into());
    queue.enqueue(held, None).await.expect("enqueue");
    let stats = queue.stats("here", now).await.expect("stats");
    assert_eq!(
        stats,
        QueueStats {
            messages: 3,
            queued: 3,
            quarantined: 1,
            held: 0,
            leased: 3,
            leased_here: 2,
        }
    );
}

/// `sslmode=require` in the URL: the queue's connections are encrypted (the test server has
/// Debian's default certificate; `require` does not verify it, `verify-full` would).
#[tokio::test]
async fn postgres_connections_can_be_encrypted() {
    let mut place = Place::new(QueueEngine::Postgres);
    place.config.url = Some(format!("{}?sslmode=require", database_url()));
    let queue = PgQueue::open(&place.config, Schema::Migrate)
        .await
        .expect("open over TLS");
    let encrypted: bool =
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&queue.pool)
            .await
            .expect("pg_stat_ssl");
    assert!(encrypted);
}

/// Two nodes record the last recipients of the same messages at the same moment: whichever
/// commits second sees the first's results and removes the finished message (none is left
/// behind with every recipient done).
async fn two_nodes_recording_one_message_at_once_finish_it(place: Place) {
    let first = place.open().await.queue;
    let second = place.open().await.queue;
    for n in 0..40 {
        // Leased to one owner for brevity: what matters is two transactions at once.
        let lease = Some(("node".to_string(), now_millis() + 60_000));
        first
            .enqueue(message(&format!("m{n}"), &["a@x.test", "b@y.test"]), lease)
            .await
            .expect("enqueue");
    }
    let mut recorders = Vec::new();
    for n in 0..40 {
        for (queue, index) in [(first.clone(), 0), (second.clone(), 1)] {
            recorders.push(tokio::spawn(async move {
                let id = format!("m{n}");
                queue
                    .record("node", vec![result(&id, index, Outcome::Delivered)], vec![])
                    .await
            }));
        }
    }
    for recorder in recorders {
        recorder.await.expect("join").expect("record");
    }
    assert!(first.list().await.expect("list").is_empty());
}

/// A node whose lease ran out (it froze) and was taken over records late: its result is stale,
/// not applied, and its DSN is not queued; the new holder's lease stands.
async fn a_result_under_a_lease_that_passed_on_is_not_applied(place: Place) {
    let queue = place.open().await.queue;
    let now = now_millis();
    queue
        .enqueue(
            message("m1", &["b@x.test"]),
            Some(("frozen".into(), now + 1000)),
        )
        .await
        .expect("enqueue");
    let taken = queue
        .claim_due("alive", now + 1001, now + 60_000, 10)
        .await
        .expect("claim");
    assert_eq!(taken.len(), 1);
    let stale = queue
        .record(
            "frozen",
            vec![result("m1", 0, Outcome::Failed)],
            vec![message("late-bounce", &["a@example.com"])],
        )
        .await
        .expect("record");
    assert_eq!(stale, 1);
    let kept = queue.get("m1").await.expect("get").expect("still queued");
    assert_eq!(kept.recipients[0].state, RecipientState::Queued);
    assert_eq!(
        kept.recipients[0].lease.as_ref().map(|l| l.owner.as_str()),
        Some("alive")
    );
    assert!(queue.get("late-bounce").await.expect("get").is_none());
    // The holder's own result is applied.
    let stale = queue
        .record("alive", vec![result("m1", 0, Outcome::Delivered)], vec![])
        .await
        .expect("record");
    assert_eq!(stale, 0);
    assert!(queue.get("m1").await.expect("get").is_none());
}

/// The operator's commands use a shared schema as it is: on one not yet migrated to this
/// version they refuse, naming `queue migrate`, and change nothing.
#[tokio::test]
async fn postgres_operator_commands_never_migrate() {
    let place = Place::new(QueueEngine::Postgres);
    let error = open(&place.config, place.dir.path(), Schema::AsIs)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(error, QueueError::SchemaTooOld { found: 0, .. }),
        "{error}"
    );
    assert!(error.to_string().contains("switchyard queue migrate"));
    assert_eq!(postgres::check(&place.config).await.expect("check"), 0);
    place.open().await;
    open(&place.config, place.dir.path(), Schema::AsIs)
        .await
        .expect("at this version");
}
