//! STARTTLS in (the listener) and out (opportunistic and mandatory delivery), with a certificate
//! generated for the test.

use std::time::Duration;

use switchyard::config::TlsPolicy;
use switchyard::delivery::client::{Client, ConnectOptions, Envelope};

use crate::harness::client::TestClient;
use crate::harness::router::{test_ca, tls_section, Router, RouterOptions};
use crate::harness::sink::Sink;

async fn tls_router(delivery: String) -> (Router, tempfile::TempDir) {
    let certs = tempfile::tempdir().expect("tempdir");
    let router = Router::start(RouterOptions {
        delivery,
        extra: tls_section(certs.path()),
        ..RouterOptions::default()
    })
    .await;
    (router, certs)
}

/// Options that verify the listener's certificate against the test's CA in `certs`.
fn options(tls: TlsPolicy, certs: &std::path::Path) -> ConnectOptions<'static> {
    let client_tls =
        switchyard::net::verify::ClientTls::new(Some(&test_ca(certs))).expect("client TLS");
    ConnectOptions {
        helo_name: "client.test",
        tls,
        client_tls: std::sync::Arc::new(client_tls),
        server_name: "mx.switchyard.test",
        connect_timeout: Duration::from_secs(5),
        command_timeout: Duration::from_secs(10),
        credentials: None,
        dane: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_inbound_then_a_transaction() {
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let (router, certs) = tls_router(format!("smarthost = \"{}\"\n", sink.address)).await;
    let address = format!("127.0.0.1:{}", router.port)
        .parse()
        .expect("address");
    let mut client = Client::connect(address, &options(TlsPolicy::Require, certs.path()))
        .await
        .expect("STARTTLS works");
    assert!(client.is_tls());
    assert_eq!(client.tls, switchyard::net::verify::TlsState::Verified);
    let recipients = vec!["b@switchyard.test".to_string()];
    let envelope = Envelope {
        sender: "a@sender.test",
        recipients: &recipients,
        smtputf8: false,
        eight_bit: false,
        size: 30,
        dsn: &Default::default(),
        recipient_dsn: &[],
    };
    let replies = client
        .send(&envelope, b"Subject: over TLS\r\n\r\nsecret\r\n")
        .await
        .expect("send");
    assert_eq!(replies[0].code, 250, "{replies:?}");
    client.quit().await;
    let received = sink.wait_for(1, Duration::from_secs(10)).await;
    assert!(
        received[0].data.contains("with ESMTPS id"),
        "{}",
        received[0].data
    );
    assert!(
        received[0].data.contains("(TLSv1_3 "),
        "{}",
        received[0].data
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_pipelined_after_starttls_are_refused() {
    let (router, _certs) = tls_router(String::new()).await;
    let mut client = TestClient::connect(router.port).await;
    client
        .send(b"STARTTLS\r\nMAIL FROM:<injected@sender.test>\r\n")
        .await;
    assert_eq!(
        client.reply().await.text,
        "554 5.5.1 Error: commands pipelined after STARTTLS"
    );
    assert!(client.is_closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_uses_starttls_when_offered_and_requires_it_when_told() {
    // Router B offers STARTTLS and relays to the sink; router A relays to B opportunistically.
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let (b, _certs) = tls_router(format!("smarthost = \"{}\"\n", sink.address)).await;
    let a = Router::start(RouterOptions::relaying_to(
        format!("127.0.0.1:{}", b.port),
        "tls = \"opportunistic\"\n",
    ))
    .await;
    let mut client = TestClient::connect(a.port).await;
    let content = crate::harness::client::message("hop");
    client
        .send_accepted("a@sender.test", &["b@switchyard.test"], &content)
        .await;
    let received = sink.wait_for(1, Duration::from_secs(15)).await;
    assert!(
        received[0]
            .data
            .contains("by mx.switchyard.test (Switchyard) (TLSv1_3"),
        "{}",
        received[0].data
    );

    // Mandatory TLS towards the plain sink defers instead of sending in clear text.
    let strict = Router::start(RouterOptions::relaying_to(
        sink.address,
        "tls = \"require\"\n",
    ))
    .await;
    let mut client = TestClient::connect(strict.port).await;
    client
        .send_accepted("a@sender.test", &["b@switchyard.test"], &content)
        .await;
    strict.log_with(&["status=deferred (451 4.7.4"]).await;
    assert_eq!(sink.received().len(), 1);
}
