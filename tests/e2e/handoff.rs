//! Hand-off to a mailbox server by LMTP, against the real Dovecot (`dovecot-lmtpd`): one reply
//! per recipient after the data, each recipient's outcome its own.

use std::time::{Duration, Instant};

use crate::harness::client::TestClient;
use crate::harness::dovecot::Dovecot;
use crate::harness::router::{stdout, Router, RouterOptions};
use crate::harness::sink::Sink;
use crate::plugins::plugin;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lmtp_hands_each_recipient_its_own_reply_from_dovecot() {
    let dovecot = tokio::task::spawn_blocking(Dovecot::start)
        .await
        .expect("dovecot");
    // Bounces go to the sink (the sender's domain is routed nowhere else).
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    // example.test by a [[route]] over TCP; local.test by the route hook's mailbox(), handed to
    // [mailboxes] lmtp over Dovecot's Unix socket.
    let router = Router::start(RouterOptions {
        relay: "domains = [\"switchyard.test\", \"example.test\", \"local.test\"]\nnetworks = [\"127.0.0.0/8\"]\n".to_string(),
        extra: format!(
            "[[route]]\ndomain = \"example.test\"\nlmtp = \"{}\"\n\n[mailboxes]\nlmtp = \"{}\"\n\n{}",
            dovecot.address,
            dovecot.socket.display(),
            plugin(
                "routes",
                "static-routes",
                "[plugin.config]\nroutes = [{ domain = \"local.test\", mailbox = \"inbox\" }]\n"
            )
        ),
        ..RouterOptions::relaying_to(sink.address, "")
    })
    .await;
    let mut client = TestClient::connect(router.port).await;
    let content = "From: s@sender.test\r\nTo: team@example.test\r\nSubject: hand-off\r\n\
        Message-ID: <handoff@sender.test>\r\n\r\nFor the mailboxes.\r\n";
    client
        .send_accepted(
            "s@sender.test",
            &[
                "alice@example.test",
                "nosuchuser@example.test",
                "carol@example.test",
                "bob@example.test",
            ],
            content,
        )
        .await;
    client
        .send_accepted("s@sender.test", &["bob@local.test"], content)
        .await;

    let deadline = Instant::now() + Duration::from_secs(20);
    while dovecot.inbox("alice").len() + dovecot.inbox("bob").len() < 3 {
        assert!(
            Instant::now() < deadline,
            "not delivered:\n{}\n{}",
            router.log(),
            dovecot.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dovecot.inbox("alice").len(), 1);
    // Once over TCP (example.test), once over the socket (local.test).
    assert_eq!(dovecot.inbox("bob").len(), 2);
    assert!(dovecot.inbox("alice")[0].contains("Subject: hand-off"));
    // Over quota: a temporary failure for carol alone, who stays queued.
    assert!(dovecot.inbox("carol").is_empty());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let listing = stdout(&router.queue(&["list"]));
        if listing.contains("carol@example.test  attempts=1") {
            assert!(
                !listing.contains("alice@") && !listing.contains("bob@"),
                "{listing}"
            );
            assert!(!listing.contains("nosuchuser@"), "{listing}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "carol never deferred:\n{listing}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = router.log();
    assert!(
        log.contains("452 4.2.2 <carol@example.test> Quota exceeded"),
        "{log}"
    );
    // The unknown user failed alone: its sender gets a DSN for it and for nobody else.
    let bounces = sink.wait_for(1, Duration::from_secs(20)).await;
    let dsn = &bounces[0].data;
    assert_eq!(bounces[0].rcpt_to, ["s@sender.test"]);
    assert!(
        dsn.contains("Final-Recipient: rfc822; nosuchuser@example.test"),
        "{dsn}"
    );
    assert!(dsn.contains("Status: 5.1.1"), "{dsn}");
    assert!(!dsn.contains("Final-Recipient: rfc822; carol@"), "{dsn}");
    assert!(dsn.contains("lmtp:"), "the relay is named: {dsn}");
}
