//! Filtering on the way in: the `dnsbl` plugin asks DNS blocklists and allow-lists through the
//! host's resolver (the `dns` grant), here the test harness's DNS server on loopback.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::harness::client::TestClient;
use crate::harness::dns::DnsServer;
use crate::harness::router::{free_port, scrape_metrics, Router, RouterOptions};
use crate::plugins::plugin;

/// The greeting a client from `source` gets.
async fn greeting_from(source: Ipv4Addr, port: u16) -> (String, Duration) {
    let started = Instant::now();
    let mut client = TestClient::connect_raw_from(source, port).await;
    (client.reply().await.text, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_blocklists_refuse_listed_clients_and_never_a_lookup_that_fails() {
    let dns = DnsServer::start().await;
    let listed = Ipv4Addr::new(127, 0, 0, 7);
    let allowed = Ipv4Addr::new(127, 0, 0, 8);
    let silent = Ipv4Addr::new(127, 0, 0, 9);
    dns.a("7.0.0.127.bl.test", Ipv4Addr::new(127, 0, 0, 2));
    dns.a("8.0.0.127.bl.test", Ipv4Addr::new(127, 0, 0, 2));
    dns.a("8.0.0.127.wl.test", Ipv4Addr::new(127, 0, 10, 0));
    dns.silence("9.0.0.127.bl.test");
    // ::1 in nibble form.
    let nibbles = format!("1.{}bl.test", "0.".repeat(31));
    dns.a(&nibbles, Ipv4Addr::new(127, 0, 0, 2));
    let metrics_port = free_port();
    let v6_port = free_port();
    // A list that never answers holds the lookup until the resolver gives up, past the time
    // limit: the plugin is stopped then, and its failure policy, `continue`, lets the client in.
    let settings = "grants = [\"dns\", \"metrics\"]\ntime_limit = \"3s\"\nfailure_policy = \"continue\"\n[plugin.config]\nthreshold = 2\n\
        zones = [\n  { zone = \"bl.test\", weight = 2 },\n  { zone = \"wl.test\", weight = 3, allow = true },\n]\n";
    let router = Router::start(RouterOptions {
        dns: Some(dns.address),
        extra: format!(
            "[[listener]]\nname = \"v6\"\naddress = \"[::1]:{v6_port}\"\ngreeting_delay = \"0s\"\n\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n{}",
            plugin("dnsbl", "dnsbl", settings)
        ),
        ..RouterOptions::default()
    })
    .await;

    let (reply, _) = greeting_from(listed, router.port).await;
    assert_eq!(
        reply,
        "554 5.7.1 Service unavailable; listed by bl.test (client [127.0.0.7])"
    );
    let (reply, _) = greeting_from(allowed, router.port).await;
    assert!(reply.starts_with("220 "), "allow-listed: {reply}");
    // The list never answers: once the resolver gives up (2 s, twice) the client is served.
    let (reply, waited) = greeting_from(silent, router.port).await;
    assert!(
        reply.starts_with("220 "),
        "a lookup that times out: {reply}"
    );
    assert!(waited >= Duration::from_millis(1500), "{waited:?}");
    // IPv6: looked up in nibble form.
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(("::1", v6_port)),
    )
    .await
    .expect("connect in time")
    .expect("connect over IPv6");
    let mut reader = tokio::io::BufReader::new(stream);
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncBufReadExt::read_line(&mut reader, &mut line),
    )
    .await
    .expect("a reply in time")
    .expect("read");
    assert_eq!(
        line.trim_end(),
        "554 5.7.1 Service unavailable; listed by bl.test (client [::1])"
    );
    let page = scrape_metrics(metrics_port).await;
    assert!(
        page.contains("switchyard_plugin_counter_total{plugin=\"dnsbl\",tenant=\"\",name=\"listed_bl_test\"} 3"),
        "{page}"
    );
}
