//! The SQLite engine against a real file: the queue's cycle, durability settings, group commit,
//! the kv store.

use super::*;
use crate::queue::{now_millis, Outcome};

#[tokio::test]
async fn kv_counters_expire_and_are_scoped() {
    use crate::queue::kv::KvStore;
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = SqliteQueue::open(&dir.path().join("q.db"), Duration::ZERO)
        .await
        .expect("open");
    let queue: &dyn KvStore = &queue;
    assert_eq!(queue.increment("t", "p", "k", 1, 60).await.expect("inc"), 1);
    assert_eq!(queue.increment("t", "p", "k", 2, 60).await.expect("inc"), 3);
    assert_eq!(
        queue
            .increment("t", "other", "k", 1, 60)
            .await
            .expect("inc"),
        1,
        "per plugin"
    );
    assert_eq!(
        queue.get("t", "p", "k").await.expect("get"),
        Some(b"3".to_vec())
    );
    queue
        .set("t", "p", "gone", b"x", Some(0))
        .await
        .expect("set");
    assert_eq!(
        queue.get("t", "p", "gone").await.expect("get"),
        None,
        "expired"
    );
    assert_eq!(
        queue.increment("t", "p", "gone", 5, 60).await.expect("inc"),
        5,
        "expired counter restarts"
    );
    queue.delete("t", "p", "k").await.expect("delete");
    assert_eq!(queue.get("t", "p", "k").await.expect("get"), None);
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

#[tokio::test]
async fn enqueue_claim_record_cycle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = SqliteQueue::open(&dir.path().join("q.db"), Duration::ZERO)
        .await
        .expect("open");
    queue
        .enqueue(message("m1", &["b@x.test", "c@y.test"]), None)
        .await
        .expect("enqueue");
    let now = now_millis();
    let claimed = queue
        .claim_due("node", now + 1, now + 60_000, 10)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].recipients.len(), 2);
    // Leased: a second claim finds nothing.
    assert!(queue
        .claim_due("other", now + 1, now + 60_000, 10)
        .await
        .expect("claim")
        .is_empty());
    let result = |index, outcome| RecipientResult {
        message_id: "m1".into(),
        index,
        attempts: 1,
        outcome,
        reply: "250 ok".into(),
        delay_warned: false,
    };
    queue
        .record(
            vec![
                result(0, Outcome::Delivered),
                result(
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
            vec![result(1, Outcome::Failed)],
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
}

#[tokio::test]
async fn commits_are_durable_wal_with_full_sync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = SqliteQueue::open(&dir.path().join("q.db"), Duration::ZERO)
        .await
        .expect("open");
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&queue.pool)
        .await
        .expect("pragma");
    let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(&queue.pool)
        .await
        .expect("pragma");
    assert_eq!(
        (mode.as_str(), sync),
        ("wal", 2),
        "WAL with synchronous=FULL (2)"
    );
}

#[tokio::test]
async fn concurrent_enqueues_share_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = SqliteQueue::open(&dir.path().join("q.db"), Duration::ZERO)
        .await
        .expect("open");
    let mut tasks = Vec::new();
    for n in 0..200 {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            queue
                .enqueue(message(&format!("m{n}"), &["b@x.test"]), None)
                .await
        }));
    }
    for task in tasks {
        task.await.expect("join").expect("enqueue");
    }
    assert_eq!(queue.list().await.expect("list").len(), 200);
    // A duplicate id fails alone, without failing the rest of its group.
    let (dup, fresh) = tokio::join!(
        queue.enqueue(message("m1", &["b@x.test"]), None),
        queue.enqueue(message("fresh", &["b@x.test"]), None)
    );
    assert!(dup.is_err());
    assert!(fresh.is_ok());
}
