//! SIGKILL under load: every message that got a 250 is delivered after a restart, on either
//! queue engine.

use std::collections::HashSet;
use std::time::Duration;

use crate::harness::client::TestClient;
use crate::harness::router::{postgres_queue, Router, RouterOptions};
use crate::harness::sink::Sink;

const CLIENTS: usize = 8;
const PER_CLIENT: usize = 400;
/// The server is killed once this many messages (of the 3,200 the clients send) got their 250.
const KILL_AFTER: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_accepted_message_is_lost_when_killed_sqlite() {
    no_accepted_message_is_lost_when_killed(String::new()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_accepted_message_is_lost_when_killed_postgres() {
    no_accepted_message_is_lost_when_killed(postgres_queue("10s").0).await
}

async fn no_accepted_message_is_lost_when_killed(queue: String) {
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let mut router = Router::start(RouterOptions {
        queue,
        ..RouterOptions::relaying_to(sink.address, "")
    })
    .await;
    let port = router.port;
    let accepted_so_far = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut senders = Vec::new();
    for client_number in 0..CLIENTS {
        let accepted_so_far = accepted_so_far.clone();
        senders.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            let Ok(Ok(stream)) = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::TcpStream::connect(("127.0.0.1", port)),
            )
            .await
            else {
                return accepted;
            };
            drop(stream);
            let mut client = TestClient::connect(port).await;
            for n in 0..PER_CLIENT {
                let tag = format!("crash-{client_number}-{n}");
                let content = format!("Subject: {tag}\r\n\r\nbody\r\n");
                // Any failure (the server died mid-transaction) ends this client.
                let sent = tokio::time::timeout(Duration::from_secs(5), async {
                    client
                        .send(
                            b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@switchyard.test>\r\nDATA\r\n",
                        )
                        .await;
                    for _ in 0..3 {
                        client.reply_checked().await?;
                    }
                    client.send(content.as_bytes()).await;
                    client.send(b".\r\n").await;
                    client.reply_checked().await
                })
                .await;
                match sent {
                    Ok(Some(reply)) if reply.code == 250 => {
                        accepted.push(tag);
                        accepted_so_far.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    _ => break,
                }
            }
            accepted
        }));
    }
    // Kill in the middle of the run, with clients mid-transaction.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while accepted_so_far.load(std::sync::atomic::Ordering::SeqCst) < KILL_AFTER {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} messages accepted in 120 s",
            accepted_so_far.load(std::sync::atomic::Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    router.kill();
    let mut accepted = HashSet::new();
    for sender in senders {
        accepted.extend(sender.await.expect("client task"));
    }
    assert!(
        accepted.len() >= KILL_AFTER && accepted.len() < CLIENTS * PER_CLIENT,
        "killed mid-run ({} accepted)",
        accepted.len()
    );
    router.spawn().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let delivered: HashSet<String> = sink
            .received()
            .iter()
            .filter_map(|m| {
                m.data
                    .lines()
                    .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
            })
            .collect();
        let missing: Vec<_> = accepted.difference(&delivered).collect();
        if missing.is_empty() {
            let duplicates = sink.received().len() - delivered.len();
            eprintln!("accepted {} before SIGKILL, all delivered; {duplicates} redelivered after the crash", accepted.len());
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} accepted messages never delivered, e.g. {:?}",
            missing.len(),
            missing.first()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
