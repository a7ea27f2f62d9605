//! Delivery: MX lookup through a real DNS server on loopback, fallback, retries, DSNs.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use mail_parser::{MessageParser, MimeHeaders};

use crate::harness::client::{message, TestClient};
use crate::harness::dns::DnsServer;
use crate::harness::router::{free_port, Router, RouterOptions};
use crate::harness::sink::{Rule, Sink};

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// A DNS server, a port shared by every sink (on different loopback addresses), and a router
/// that delivers to that port.
async fn setup() -> (DnsServer, u16) {
    (DnsServer::start().await, free_port())
}

async fn router(dns: &DnsServer, port: u16) -> Router {
    Router::start(RouterOptions {
        dns: Some(dns.address),
        delivery_port: port,
        ..RouterOptions::default()
    })
    .await
}

async fn sink(last: u8, port: u16, rule: Option<Rule>) -> Sink {
    Sink::start(IpAddr::V4(ip(last)), port, rule).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipients_split_across_domains_with_mx_fallback() {
    let (dns, port) = setup().await;
    // a.test: the preferred MX has nobody listening, the second one works.
    dns.mx("a.test", 10, "mx1.a.test");
    dns.a("mx1.a.test", ip(12));
    dns.mx("a.test", 20, "mx2.a.test");
    dns.a("mx2.a.test", ip(13));
    // b.test: no MX at all, only an address (implicit MX).
    dns.a("b.test", ip(14));
    let a = sink(13, port, None).await;
    let b = sink(14, port, None).await;
    let router = router(&dns, port).await;
    let mut client = TestClient::connect(router.port).await;
    let reply = client
        .send_mail(
            "s@sender.test",
            &["x@a.test", "y@b.test", "z@A.test"],
            &message("split"),
        )
        .await;
    assert_eq!(reply.code, 250, "{reply:?}");
    let at_a = a.wait_for(1, Duration::from_secs(15)).await;
    let at_b = b.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(
        at_a[0].rcpt_to,
        vec!["x@a.test", "z@A.test"],
        "one transaction per domain"
    );
    assert_eq!(at_b[0].rcpt_to, vec!["y@b.test"]);
    router
        .log_with(&[
            "to=<y@b.test>, relay=b.test[127.0.0.14]",
            "status=sent (250 2.0.0 accepted)",
        ])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mx_with_only_an_ipv6_address_gets_its_mail_over_ipv6() {
    let (dns, port) = setup().await;
    dns.mx("v6only.test", 10, "mx.v6only.test");
    dns.aaaa("mx.v6only.test", std::net::Ipv6Addr::LOCALHOST);
    let receiver = Sink::start(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), port, None).await;
    let router = router(&dns, port).await;
    let mut client = TestClient::connect(router.port).await;
    let reply = client
        .send_mail("s@sender.test", &["r@v6only.test"], &message("over ipv6"))
        .await;
    assert_eq!(reply.code, 250, "{reply:?}");
    let received = receiver.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(received[0].rcpt_to, ["r@v6only.test"]);
    router
        .log_with(&[
            &format!("to=<r@v6only.test>, relay=mx.v6only.test[::1]:{port}"),
            "status=sent (250 2.0.0 accepted)",
        ])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_mx_falls_back_to_the_other_family_when_the_first_refuses() {
    let (dns, port) = setup().await;
    // IPv4 first (the default): nothing listens at its A address, its AAAA address takes it.
    dns.mx("dual.test", 10, "mx.dual.test");
    dns.a("mx.dual.test", ip(31));
    dns.aaaa("mx.dual.test", std::net::Ipv6Addr::LOCALHOST);
    let receiver = Sink::start(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), port, None).await;
    let router = router(&dns, port).await;
    let mut client = TestClient::connect(router.port).await;
    let reply = client
        .send_mail("s@sender.test", &["r@dual.test"], &message("fallback"))
        .await;
    assert_eq!(reply.code, 250, "{reply:?}");
    receiver.wait_for(1, Duration::from_secs(15)).await;
    router
        .log_with(&[&format!("to=<r@dual.test>, relay=mx.dual.test[::1]:{port}")])
        .await;
    // Told to prefer IPv6, a router goes there first: nothing is tried at the A address.
    let router = Router::start(RouterOptions {
        dns: Some(dns.address),
        delivery_port: port,
        dns_settings: "address_preference = \"ipv6\"\n".to_string(),
        ..RouterOptions::default()
    })
    .await;
    let mut client = TestClient::connect(router.port).await;
    client
        .send_accepted("s@sender.test", &["r@dual.test"], &message("ipv6 first"))
        .await;
    receiver.wait_for(2, Duration::from_secs(15)).await;
    let log = router.log();
    assert!(!log.contains("127.0.0.31"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_failure_is_retried_until_delivered() {
    let (dns, port) = setup().await;
    dns.mx("retry.test", 10, "mx.retry.test");
    dns.a("mx.retry.test", ip(21));
    let rule: Rule =
        Arc::new(|_, attempt| (attempt == 1).then(|| "451 4.3.0 try again later".to_string()));
    let receiver = sink(21, port, Some(rule)).await;
    let router = router(&dns, port).await;
    let mut client = TestClient::connect(router.port).await;
    assert_eq!(
        client
            .send_mail("s@sender.test", &["r@retry.test"], &message("retry"))
            .await
            .code,
        250
    );
    let received = receiver.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(received[0].rcpt_to, vec!["r@retry.test"]);
    router
        .log_with(&[
            "attempt=1, status=deferred (451 4.3.0 try again later)",
            "attempt=2, status=sent",
        ])
        .await;
    // Delivered: the queue is empty again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let listing = String::from_utf8_lossy(&router.queue(&["list"]).stdout).to_string();
    assert!(listing.contains("-- 0 message(s) in queue"), "{listing}");
}

/// Parses a DSN and returns (Status, Final-Recipient, whole text).
fn parse_dsn(data: &str) -> (String, String, String) {
    let parsed = MessageParser::default()
        .parse(data.as_bytes())
        .expect("DSN parses");
    let content_type = parsed.content_type().expect("content type");
    assert_eq!(content_type.ctype(), "multipart");
    assert_eq!(content_type.subtype(), Some("report"));
    assert_eq!(
        content_type.attribute("report-type"),
        Some("delivery-status")
    );
    let report = parsed
        .parts
        .iter()
        .find(|part| {
            part.content_type()
                .map(|t| t.subtype() == Some("delivery-status"))
                .unwrap_or(false)
        })
        .expect("message/delivery-status part");
    let text = String::from_utf8_lossy(report.contents()).to_string();
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|value| value.trim().to_string())
            .unwrap_or_default()
    };
    (
        field("Status:"),
        field("Final-Recipient:"),
        data.to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_returns_one_dsn_to_the_sender() {
    let (dns, port) = setup().await;
    dns.mx("hard.test", 10, "mx.hard.test");
    dns.a("mx.hard.test", ip(31));
    dns.mx("sender.test", 10, "mx.sender.test");
    dns.a("mx.sender.test", ip(32));
    let rule: Rule = Arc::new(|address, _| {
        address
            .starts_with("nobody")
            .then(|| "550 5.1.1 no such user".to_string())
    });
    let hard = sink(31, port, Some(rule)).await;
    let sender = sink(32, port, None).await;
    let router = router(&dns, port).await;
    let mut client = TestClient::connect(router.port).await;
    let reply = client
        .send_mail(
            "s@sender.test",
            &["nobody@hard.test", "someone@hard.test"],
            &message("bounce me"),
        )
        .await;
    assert_eq!(reply.code, 250);
    let delivered = hard.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(
        delivered[0].rcpt_to,
        vec!["someone@hard.test"],
        "the good recipient is delivered"
    );
    let bounces = sender.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(bounces[0].mail_from, "", "DSNs come from the null sender");
    assert_eq!(bounces[0].rcpt_to, vec!["s@sender.test"]);
    let (status, recipient, text) = parse_dsn(&bounces[0].data);
    assert_eq!(status, "5.1.1");
    assert_eq!(recipient, "rfc822; nobody@hard.test");
    assert!(text.contains("Diagnostic-Code: smtp; 550 5.1.1 no such user"));
    assert!(
        text.contains("Subject: bounce me"),
        "original headers are returned"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sender.received().len(), 1, "exactly one DSN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_mx_and_missing_domains_bounce_but_bounces_never_bounce() {
    let (dns, port) = setup().await;
    dns.null_mx("nomail.test");
    dns.mx("sender.test", 10, "mx.sender.test");
    dns.a("mx.sender.test", ip(41));
    let sender = sink(41, port, None).await;
    let router = router(&dns, port).await;
    let mut client = TestClient::connect(router.port).await;
    assert_eq!(
        client
            .send_mail("s@sender.test", &["x@nomail.test"], &message("null mx"))
            .await
            .code,
        250
    );
    assert_eq!(
        client
            .send_mail("s@sender.test", &["x@nxdomain.test"], &message("no domain"))
            .await
            .code,
        250
    );
    // A bounce that cannot be delivered is dropped, not bounced.
    assert_eq!(
        client
            .send_mail("", &["x@nomail.test"], &message("a bounce"))
            .await
            .code,
        250
    );
    let dsns = sender.wait_for(2, Duration::from_secs(15)).await;
    let mut statuses: Vec<String> = dsns.iter().map(|dsn| parse_dsn(&dsn.data).0).collect();
    statuses.sort();
    assert_eq!(statuses, vec!["5.1.10", "5.1.2"]);
    router
        .log_with(&["undeliverable bounce discarded (null sender)"])
        .await;
    assert_eq!(sender.received().len(), 2, "no bounce of a bounce");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_commands_work_while_serving() {
    let (dns, port) = setup().await;
    dns.mx("slow.test", 10, "mx.slow.test");
    dns.a("mx.slow.test", ip(51));
    dns.mx("sender.test", 10, "mx.sender.test");
    dns.a("mx.sender.test", ip(52));
    let rule: Rule = Arc::new(|_, _| Some("452 4.2.2 mailbox full".to_string()));
    let _slow = sink(51, port, Some(rule)).await;
    let sender = sink(52, port, None).await;
    let router = router(&dns, port).await;
    let mut client = TestClient::connect(router.port).await;
    let reply = client
        .send_mail("s@sender.test", &["full@slow.test"], &message("stuck"))
        .await;
    let id = reply.text.rsplit(' ').next().expect("id").to_string();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let listing = String::from_utf8_lossy(&router.queue(&["list"]).stdout).to_string();
    assert!(
        listing.contains(&id) && listing.contains("452 4.2.2 mailbox full"),
        "{listing}"
    );
    let shown = String::from_utf8_lossy(&router.queue(&["show", &id]).stdout).to_string();
    assert!(
        shown.contains("recipient: <full@slow.test> state=queued")
            && shown.contains("Subject: stuck"),
        "{shown}"
    );
    // `retry` makes the running server try again now: the second attempt shows up at once,
    // not after the retry schedule's first step.
    let retry = router.queue(&["retry", &id]);
    assert!(retry.status.success());
    assert_eq!(
        String::from_utf8_lossy(&retry.stdout).trim(),
        "1 recipient(s) scheduled for immediate retry"
    );
    wait_for_queue_show(&router, &id, "attempts=2").await;
    let bounce = admin_command(&router, &["bounce", &id]).await;
    assert!(
        String::from_utf8_lossy(&bounce.stdout).contains(&format!("bounced {id}: 1 recipient(s)")),
        "{bounce:?}"
    );
    let dsn = sender.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(parse_dsn(&dsn[0].data).0, "5.0.0");
    let missing = router.queue(&["delete", &id]);
    assert!(!missing.status.success(), "already gone after the bounce");
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains(&format!("no message {id} in the queue"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_delete_and_retry_all_while_serving() {
    let (dns, port) = setup().await;
    dns.mx("slow.test", 10, "mx.slow.test");
    dns.a("mx.slow.test", ip(53));
    let rule: Rule = Arc::new(|_, _| Some("451 4.3.0 try later".to_string()));
    let _slow = sink(53, port, Some(rule)).await;
    let router = router(&dns, port).await;
    let mut client = TestClient::connect(router.port).await;
    let first = client
        .send_accepted("s@sender.test", &["a@slow.test"], &message("one"))
        .await;
    let second = client
        .send_accepted(
            "s@sender.test",
            &["b@slow.test", "c@slow.test"],
            &message("two"),
        )
        .await;
    wait_for_queue_show(&router, &first, "attempts=1").await;
    wait_for_queue_show(&router, &second, "attempts=1").await;
    let retry = router.queue(&["retry", "--all"]);
    assert_eq!(
        String::from_utf8_lossy(&retry.stdout).trim(),
        "3 recipient(s) scheduled for immediate retry"
    );
    wait_for_queue_show(&router, &first, "attempts=2").await;
    let deleted = admin_command(&router, &["delete", &first]).await;
    assert_eq!(
        String::from_utf8_lossy(&deleted.stdout).trim(),
        format!("deleted {first}")
    );
    let listing = String::from_utf8_lossy(&router.queue(&["list"]).stdout).to_string();
    assert!(
        !listing.contains(&first) && listing.contains(&second),
        "{listing}"
    );
    // Only the other message is left (no DSN for the deleted one either): its two recipients are
    // all that a retry finds now.
    assert!(listing.contains("-- 1 message(s) in queue"), "{listing}");
    let retry = router.queue(&["retry", "--all"]);
    assert_eq!(
        String::from_utf8_lossy(&retry.stdout).trim(),
        "2 recipient(s) scheduled for immediate retry"
    );
}

/// Polls `queue show ID` until it contains `expected`.
async fn wait_for_queue_show(router: &Router, id: &str, expected: &str) {
    let mut shown = String::new();
    for _ in 0..100 {
        shown = String::from_utf8_lossy(&router.queue(&["show", id]).stdout).to_string();
        if shown.contains(expected) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("`queue show {id}` never showed {expected:?}: {shown}");
}

/// Runs a queue command that acts on a message (bounce, delete), trying again while the running
/// server is delivering it, which the command refuses rather than race with.
async fn admin_command(router: &Router, args: &[&str]) -> std::process::Output {
    for _ in 0..50 {
        let output = router.queue(args);
        if output.status.success() {
            return output;
        }
        let error = String::from_utf8_lossy(&output.stderr).to_string();
        assert!(
            error.contains("being delivered right now"),
            "{args:?}: {error}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{args:?} kept finding the message in delivery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_reused_within_the_per_destination_limit() {
    let receiver = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let router = Router::start(RouterOptions::relaying_to(
        receiver.address,
        "max_connections_per_destination = 1\nmax_messages_per_connection = 100\n",
    ))
    .await;
    let port = router.port;
    let mut clients = Vec::new();
    for client_number in 0..5 {
        clients.push(tokio::spawn(async move {
            let mut client = TestClient::connect(port).await;
            for n in 0..10 {
                client
                    .send_accepted(
                        "s@sender.test",
                        &["r@dest.test"],
                        &message(&format!("reuse {client_number}-{n}")),
                    )
                    .await;
            }
        }));
    }
    for client in clients {
        client.await.expect("client");
    }
    receiver.wait_for(50, Duration::from_secs(20)).await;
    let connections = receiver.connections();
    assert_eq!(
        connections.most_open, 1,
        "never more than the per-destination limit: {connections:?}"
    );
    assert!(
        connections.total < 50,
        "several messages per connection: {connections:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_outlives_its_lifetime_is_returned() {
    let (dns, port) = setup().await;
    dns.mx("busy.test", 10, "mx.busy.test");
    dns.a("mx.busy.test", ip(61));
    dns.mx("sender.test", 10, "mx.sender.test");
    dns.a("mx.sender.test", ip(62));
    let rule: Rule = Arc::new(|_, _| Some("421 4.3.2 busy, come back later".to_string()));
    let _busy = sink(61, port, Some(rule)).await;
    let sender = sink(62, port, None).await;
    let router = Router::start(RouterOptions {
        dns: Some(dns.address),
        delivery_port: port,
        retry: "intervals = [\"300ms\"]\nmax_lifetime = \"2s\"\n".to_string(),
        ..RouterOptions::default()
    })
    .await;
    let mut client = TestClient::connect(router.port).await;
    client
        .send_accepted("s@sender.test", &["r@busy.test"], &message("expires"))
        .await;
    let dsn = sender.wait_for(1, Duration::from_secs(15)).await;
    let (status, recipient, text) = parse_dsn(&dsn[0].data);
    assert_eq!(
        (status.as_str(), recipient.as_str()),
        ("4.4.7", "rfc822; r@busy.test")
    );
    assert!(
        text.contains("last reply: 421 4.3.2 busy, come back later"),
        "{text}"
    );
    assert!(router.log().contains("status=expired"));
}
