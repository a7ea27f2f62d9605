//! Filtering on the way in: the `dnsbl` plugin asks DNS blocklists and allow-lists through the
//! host's resolver (the `dns` grant), here the test harness's DNS server on loopback; the host
//! asks the real rspamd and clamd about each message (`[[scanner]]`), and `content-filter`
//! decides on what they said (the `scanners` grant).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::harness::client::{message, TestClient};
use crate::harness::dns::DnsServer;
use crate::harness::router::{free_port, scrape_metrics, Router, RouterOptions};
use crate::harness::scanners::{
    message_with_attachment, Clamd, Rspamd, GTUBE, TEST_VIRUS, TEST_VIRUS_NAME,
};
use crate::harness::sink::Sink;
use crate::plugins::plugin;
use crate::rollout::replay;
use crate::trace::trace_with;

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

/// `content-filter`'s common policy on the scanners' results (as in `examples/switchyard.toml`).
const SCANNER_POLICY: &str = "grants = [\"scanners\"]\n[plugin.config]\nrules = [\n\
  { virus = true, action = \"reject\", reply = \"554 5.7.1 Virus found: {virus}\" },\n\
  { scanner_error = true, action = \"tempfail\", reply = \"451 4.7.1 Cannot scan the message now ({scanner_error})\" },\n\
  { rspamd_action = \"reject\", action = \"reject\", reply = \"550 5.7.1 Refused as spam: {rspamd_message}\" },\n\
  { rspamd_action = \"add header\", action = \"add-header\", name = \"X-Spam\", value = \"Yes\" },\n\
  { rspamd_score = -1000.0, action = \"add-header\", name = \"X-Spam-Score\", value = \"{rspamd_score}\" },\n\
  { rspamd_score = -1000.0, action = \"add-rspamd-headers\" },\n]\n";

/// A `[[scanner]]` table.
fn scanner(name: &str, kind: &str, address: &str, more: &str) -> String {
    format!("[[scanner]]\nname = \"{name}\"\nkind = \"{kind}\"\naddress = \"{address}\"\n{more}\n")
}

/// A router relaying to a sink, with these scanners and the policy above.
async fn scanning_router(scanners: &str, metrics_port: u16) -> (Router, Sink) {
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let router = Router::start(RouterOptions {
        extra: format!(
            "{scanners}\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n{}",
            plugin("content-filter", "content-filter", SCANNER_POLICY)
        ),
        ..RouterOptions::relaying_to(sink.address, "")
    })
    .await;
    (router, sink)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rspamd_refuses_gtube_with_its_reason_and_scores_clean_mail_in_a_header() {
    let rspamd = tokio::task::spawn_blocking(Rspamd::start)
        .await
        .expect("rspamd");
    let metrics_port = free_port();
    let (router, sink) = scanning_router(
        &scanner("rspamd", "rspamd", &rspamd.address, "timeout = \"20s\""),
        metrics_port,
    )
    .await;
    let mut client = TestClient::connect(router.port).await;
    let spam = format!(
        "From: a@example.com\r\nTo: b@switchyard.test\r\nSubject: spam\r\nMessage-ID: <spam@example.com>\r\n\r\n{GTUBE}\r\n"
    );
    let reply = client
        .send_mail("a@example.com", &["b@switchyard.test"], &spam)
        .await;
    assert_eq!(
        (reply.code, reply.text.as_str()),
        (550, "550 5.7.1 Refused as spam: Gtube pattern")
    );
    let clean = "From: Alice <a@example.com>\r\nTo: Bob <b@switchyard.test>\r\nSubject: lunch\r\n\
        Message-ID: <clean@example.com>\r\nDate: Mon, 7 Dec 2026 12:00:00 +0000\r\n\r\nSee you at noon.\r\n";
    let id = client
        .send_accepted("a@example.com", &["b@switchyard.test"], clean)
        .await;
    let received = sink.wait_for(1, Duration::from_secs(20)).await;
    let data = &received[0].data;
    let score = data
        .lines()
        .find_map(|line| line.strip_prefix("X-Spam-Score: "))
        .unwrap_or_else(|| panic!("no score header:\n{data}"));
    let score: f64 = score.trim().parse().expect("a number");
    assert!(score < 6.0, "clean mail scored {score}");
    assert!(!data.contains("X-Spam: Yes"), "{data}");
    // rspamd's own fields, asked for by `add-rspamd-headers`.
    assert!(data.contains("X-Spamd-Result: default: False"), "{data}");
    // The trace shows what rspamd said, before the data hook's call.
    trace_with(&router, &id, &["scanner rspamd: no action, score"]).await;
    let page = scrape_metrics(metrics_port).await;
    for series in [
        "switchyard_scanner_calls_total{scanner=\"rspamd\",verdict=\"reject\"} 1",
        "switchyard_scanner_calls_total{scanner=\"rspamd\",verdict=\"no action\"} 1",
        "switchyard_scanner_seconds_count{scanner=\"rspamd\"} 2",
    ] {
        assert!(page.contains(series), "{series} in\n{page}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clamav_refuses_an_infected_attachment_by_name_and_defers_what_it_cannot_scan() {
    let clamd = tokio::task::spawn_blocking(|| Clamd::start("1M"))
        .await
        .expect("clamd");
    let metrics_port = free_port();
    // Over TCP and over the Unix socket: both see every message.
    let scanners = format!(
        "{}{}",
        scanner("clamav", "clamav", &clamd.address, "max_size = 4000000"),
        scanner(
            "clamav-local",
            "clamav",
            &clamd.socket.display().to_string(),
            ""
        )
    );
    let (router, sink) = scanning_router(&scanners, metrics_port).await;
    let mut client = TestClient::connect(router.port).await;
    let infected = message_with_attachment("infected", "tool.bin", TEST_VIRUS);
    let reply = client
        .send_mail("a@example.com", &["b@switchyard.test"], &infected)
        .await;
    assert_eq!(
        (reply.code, reply.text.as_str()),
        (
            554,
            format!("554 5.7.1 Virus found: {TEST_VIRUS_NAME}").as_str()
        )
    );
    // BDAT's last chunk is scanned as DATA's end is.
    assert_eq!(client.command("MAIL FROM:<a@example.com>").await.code, 250);
    assert_eq!(
        client.command("RCPT TO:<b@switchyard.test>").await.code,
        250
    );
    let infected = message_with_attachment("chunked", "tool.bin", TEST_VIRUS);
    let (first, last) = infected.split_at(infected.len() / 2);
    client
        .send(format!("BDAT {}\r\n{first}", first.len()).as_bytes())
        .await;
    assert_eq!(client.reply().await.code, 250);
    client
        .send(format!("BDAT {} LAST\r\n{last}", last.len()).as_bytes())
        .await;
    let reply = client.reply().await;
    assert_eq!(
        reply.text,
        format!("554 5.7.1 Virus found: {TEST_VIRUS_NAME}"),
        "{reply:?}"
    );
    // clamd closes the sessions left idle past its IdleTimeout (2 s here): the next scan
    // opens a new one instead of failing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let clean = message_with_attachment("clean", "notes.txt", b"nothing to see here\n");
    client
        .send_accepted("a@example.com", &["b@switchyard.test"], &clean)
        .await;
    sink.wait_for(1, Duration::from_secs(20)).await;
    // Past clamd's own StreamMaxLength (1 MiB) but within the scanner's max_size: clamd
    // refuses the stream part-way, and says so; the message is deferred, never passed.
    let filler = "0123456789abcdef".repeat(4).repeat(24 * 1024);
    let large = format!(
        "From: a@example.com\r\nTo: b@switchyard.test\r\nSubject: large\r\n\r\n{}",
        filler
            .as_bytes()
            .chunks(64)
            .map(|line| format!("{}\r\n", String::from_utf8_lossy(line)))
            .collect::<String>()
    );
    let reply = client
        .send_mail("a@example.com", &["b@switchyard.test"], &large)
        .await;
    assert_eq!(reply.code, 451, "{reply:?}");
    assert!(
        reply
            .text
            .contains("clamav: clamd answered: INSTREAM size limit exceeded. ERROR"),
        "{reply:?}"
    );
    assert_eq!(sink.received().len(), 1, "only the clean message went on");
    let page = scrape_metrics(metrics_port).await;
    for series in [
        "switchyard_scanner_calls_total{scanner=\"clamav\",verdict=\"infected\"} 2",
        "switchyard_scanner_calls_total{scanner=\"clamav-local\",verdict=\"infected\"} 2",
        "switchyard_scanner_calls_total{scanner=\"clamav\",verdict=\"clean\"} 1",
        "switchyard_scanner_errors_total{scanner=\"clamav\",error=\"protocol\"} 1",
    ] {
        assert!(page.contains(series), "{series} in\n{page}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scanner_that_is_down_or_too_slow_defers_the_message_within_its_timeout() {
    // One that accepts connections and never answers, and one where nothing listens.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_address = silent.local_addr().expect("address");
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            open.push(stream);
        }
    });
    let down = format!("127.0.0.1:{}", free_port());
    let metrics_port = free_port();
    let (slow_router, slow_sink) = scanning_router(
        &scanner(
            "slow",
            "rspamd",
            &silent_address.to_string(),
            "timeout = \"1s\"",
        ),
        metrics_port,
    )
    .await;
    let mut client = TestClient::connect(slow_router.port).await;
    let started = Instant::now();
    let reply = client
        .send_mail("a@example.com", &["b@switchyard.test"], &message("slow"))
        .await;
    let waited = started.elapsed();
    assert_eq!(
        (reply.code, reply.text.as_str()),
        (
            451,
            "451 4.7.1 Cannot scan the message now (slow: no answer within 1000 ms)"
        )
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    let page = scrape_metrics(metrics_port).await;
    assert!(
        page.contains("switchyard_scanner_errors_total{scanner=\"slow\",error=\"timeout\"} 1"),
        "{page}"
    );
    drop(slow_router);
    held.abort();

    let (router, sink) = scanning_router(&scanner("down", "clamav", &down, ""), free_port()).await;
    let mut client = TestClient::connect(router.port).await;
    let reply = client
        .send_mail("a@example.com", &["b@switchyard.test"], &message("down"))
        .await;
    assert_eq!(reply.code, 451, "{reply:?}");
    assert!(
        reply
            .text
            .starts_with("451 4.7.1 Cannot scan the message now (down: cannot connect: 127.0.0.1:"),
        "{reply:?}"
    );
    assert!(slow_sink.received().is_empty() && sink.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_not_granted_scanners_fails_closed_when_it_reads_them() {
    // The same policy without the grant: the plugin loads (with a warning), and its first read
    // of the results fails it, so its failure policy (tempfail) answers: nothing passes unread.
    let ungranted = SCANNER_POLICY.replace("grants = [\"scanners\"]\n", "");
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let router = Router::start(RouterOptions {
        extra: format!(
            "{}\n{}",
            scanner("down", "clamav", &format!("127.0.0.1:{}", free_port()), ""),
            plugin("content-filter", "content-filter", &ungranted)
        ),
        ..RouterOptions::relaying_to(sink.address, "")
    })
    .await;
    let mut client = TestClient::connect(router.port).await;
    let reply = client
        .send_mail(
            "a@example.com",
            &["b@switchyard.test"],
            &message("ungranted"),
        )
        .await;
    assert_eq!(reply.code, 451, "{reply:?}");
    assert!(reply.text.starts_with("451 4.3.0"), "{reply:?}");
    let log = router.log();
    assert!(
        log.contains("the plugin can read `scanners` but is not granted it"),
        "{log}"
    );
    assert!(
        log.contains("read scanners.results without the `scanners` grant"),
        "{log}"
    );
    assert!(sink.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_decides_on_the_recorded_verdicts_without_asking_the_scanner_again() {
    let clamd = tokio::task::spawn_blocking(|| Clamd::start("1M"))
        .await
        .expect("clamd");
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let router = Router::start(RouterOptions {
        extra: format!(
            "[record]\ndirectory = \"recordings\"\npercent = 100\nbodies = true\n\n{}\n{}",
            scanner("clamav", "clamav", &clamd.address, ""),
            plugin("content-filter", "content-filter", SCANNER_POLICY)
        ),
        ..RouterOptions::relaying_to(sink.address, "")
    })
    .await;
    let mut client = TestClient::connect(router.port).await;
    let infected = message_with_attachment("infected", "tool.bin", TEST_VIRUS);
    let reply = client
        .send_mail("a@example.com", &["b@switchyard.test"], &infected)
        .await;
    assert_eq!(reply.code, 554, "{reply:?}");
    assert_eq!(client.command("QUIT").await.code, 221);
    let recordings = router.dir.path().join("recordings");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(&recordings)
        .map(|entries| entries.count())
        .unwrap_or(0)
        == 0
    {
        assert!(Instant::now() < deadline, "no recording:\n{}", router.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The scanner is gone: asked again, it would be an error and the verdict a tempfail. The
    // replay gives the plugin what clamd said then, and only the reply's words change.
    drop(clamd);
    let original = std::fs::read_to_string(&router.config_path).expect("config");
    let changed_path = router.dir.path().join("candidate.toml");
    std::fs::write(
        &changed_path,
        original.replace("Virus found: {virus}", "Infected by {virus}"),
    )
    .expect("write candidate");
    let changed = replay(&recordings, &changed_path);
    let said = String::from_utf8_lossy(&changed.stdout).into_owned();
    assert!(
        said.contains(&format!(
            "  was: reject 554 5.7.1 Virus found: {TEST_VIRUS_NAME}\n  now: reject 554 5.7.1 Infected by {TEST_VIRUS_NAME}\n"
        )),
        "{said}\n{}",
        String::from_utf8_lossy(&changed.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scanner_entry_edited_at_a_reload_applies_to_the_next_message() {
    // At first the entry names a port where nothing listens: mail is deferred.
    let down = format!("127.0.0.1:{}", free_port());
    let (router, sink) =
        scanning_router(&scanner("clamav", "clamav", &down, ""), free_port()).await;
    let mut client = TestClient::connect(router.port).await;
    let reply = client
        .send_mail("a@example.com", &["b@switchyard.test"], &message("before"))
        .await;
    assert_eq!(reply.code, 451, "{reply:?}");
    // The operator points it at the running clamd and reloads: no restart.
    let clamd = tokio::task::spawn_blocking(|| Clamd::start("1M"))
        .await
        .expect("clamd");
    let config = std::fs::read_to_string(&router.config_path).expect("config");
    std::fs::write(&router.config_path, config.replace(&down, &clamd.address)).expect("edit");
    let reloaded = router.plugins(&["reload"]);
    assert!(
        reloaded.status.success(),
        "{}",
        String::from_utf8_lossy(&reloaded.stderr)
    );
    router.log_with(&["scanners reloaded scanners=1"]).await;
    let infected = message_with_attachment("infected", "tool.bin", TEST_VIRUS);
    let reply = client
        .send_mail("a@example.com", &["b@switchyard.test"], &infected)
        .await;
    assert_eq!(
        reply.text,
        format!("554 5.7.1 Virus found: {TEST_VIRUS_NAME}"),
        "{reply:?}"
    );
    client
        .send_accepted("a@example.com", &["b@switchyard.test"], &message("after"))
        .await;
    let received = sink.wait_for(1, Duration::from_secs(10)).await;
    assert!(
        received[0].data.contains("Subject: after"),
        "{}",
        received[0].data
    );
}
