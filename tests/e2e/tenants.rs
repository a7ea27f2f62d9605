//! Tenants: one router, many customers, each with its own domains, chain and limits. Each test
//! runs the real binary with a directory of tenant files, and real plugins built from `plugins/`.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::client::{message, TestClient};
use crate::harness::router::{free_port, plugin_path, scrape_metrics, Router, RouterOptions};
use crate::harness::sink::Sink;

/// A `[[plugin]]` table of a tenant file.
fn plugin(name: &str, crate_name: &str, settings: &str) -> String {
    format!(
        "[[plugin]]\nname = \"{name}\"\npath = \"{}\"\n{settings}\n",
        plugin_path(crate_name).display()
    )
}

fn write(dir: &Path, name: &str, text: &str) {
    // Written beside, then renamed: the router never reads half a file.
    let temporary = dir.join(format!(".{name}.tmp"));
    std::fs::write(&temporary, text).expect("write tenant file");
    std::fs::rename(&temporary, dir.join(name)).expect("rename tenant file");
}

struct Tenanted {
    router: Router,
    sink: Sink,
    tenants: tempfile::TempDir,
    metrics_port: u16,
}

/// A router relaying to a sink, with the tenant files `files` (name, text) and these lines for
/// `[tenants.limits]`.
async fn router_with_tenants(files: &[(&str, String)], limits: &str) -> Tenanted {
    let tenants = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        write(tenants.path(), name, text);
    }
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let metrics_port = free_port();
    let router = Router::start(RouterOptions {
        extra: format!(
            "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n[tenants]\ndirectory = \"{}\"\n[tenants.limits]\n{limits}\n",
            tenants.path().display()
        ),
        ..RouterOptions::relaying_to(sink.address, "")
    })
    .await;
    Tenanted {
        router,
        sink,
        tenants,
        metrics_port,
    }
}

fn with_subject(subject: &str, to: &str) -> String {
    format!("From: a@sender.test\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nHello.\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_chains_decide_differently_on_the_same_message() {
    let acme = format!(
        "domains = [\"acme.test\"]\n{}{}",
        plugin(
            "filter",
            "content-filter",
            "[plugin.config]\nrules = [\n  { header = \"Subject\", contains = \"offer\", action = \"reject\", reply = \"550 5.7.1 acme takes no offers\" },\n  { header = \"Subject\", contains = \"hold\", action = \"quarantine\", reason = \"held\" },\n]\n"
        ),
        plugin("facts", "misbehave", "grants = [\"kv\"]\n[plugin.config]\nmode = \"session\"\n"),
    ) + &plugin(
        "rewrite",
        "address-rewrite",
        "[plugin.config]\nrecipients = { \"alias@acme.test\" = \"x@bravo.test\" }\n",
    );
    let bravo = format!(
        "domains = [\"bravo.test\"]\n{}",
        plugin(
            "filter",
            "content-filter",
            "[plugin.config]\nrules = [{ header = \"Subject\", contains = \"offer\", action = \"add-header\", name = \"X-Bravo\", value = \"an offer\" }]\n"
        ),
    );
    let setup = router_with_tenants(&[("acme.toml", acme), ("bravo.toml", bravo)], "").await;
    let mut client = TestClient::connect(setup.router.port).await;
    let reply = client
        .send_mail(
            "s@sender.test",
            &["a@acme.test"],
            &with_subject("an offer", "a@acme.test"),
        )
        .await;
    assert_eq!(reply.text, "550 5.7.1 acme takes no offers");
    client
        .send_accepted(
            "s@sender.test",
            &["b@bravo.test"],
            &with_subject("an offer", "b@bravo.test"),
        )
        .await;
    let received = setup.sink.wait_for(1, Duration::from_secs(10)).await;
    assert!(
        received[0].data.contains("X-Bravo: an offer\r\n"),
        "{}",
        received[0].data
    );
    // Mail of no tenant follows the global configuration: neither chain touches it.
    client
        .send_accepted(
            "s@sender.test",
            &["c@switchyard.test"],
            &with_subject("an offer", "c@switchyard.test"),
        )
        .await;
    let received = setup.sink.wait_for(2, Duration::from_secs(10)).await;
    assert!(
        !received[1].data.contains("X-Bravo"),
        "{}",
        received[1].data
    );

    // The tenant's hooks see their tenant in the session.
    assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
    let reply = client.command("RCPT TO:<victim@acme.test>").await;
    assert!(reply.text.ends_with(" tenant=acme"), "{}", reply.text);
    assert_eq!(client.command("RSET").await.code, 250);

    // One transaction, one tenant: the others' recipients are sent again on their own.
    assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
    assert_eq!(client.command("RCPT TO:<b1@bravo.test>").await.code, 250);
    let reply = client.command("RCPT TO:<a@acme.test>").await;
    assert_eq!(
        reply.text,
        "452 4.5.3 <a@acme.test>: Recipient of another tenant; send it in a transaction of its own"
    );
    assert_eq!(
        client.command("RCPT TO:<x@switchyard.test>").await.code,
        452
    );
    assert_eq!(client.command("RCPT TO:<b2@bravo.test>").await.code, 250);
    assert_eq!(client.command("RSET").await.code, 250);
    // acme's plugin may not move acme's mail into bravo's domain, past bravo's chain.
    assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
    assert_eq!(
        client.command("RCPT TO:<alias@acme.test>").await.text,
        "550 5.7.1 <x@bravo.test>: Rewritten into another tenant's domain"
    );
    assert_eq!(client.command("RSET").await.code, 250);
    // A refused first recipient does not choose the tenant.
    assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
    assert_eq!(client.command("RCPT TO:<victim@acme.test>").await.code, 550);
    assert_eq!(client.command("RCPT TO:<b3@bravo.test>").await.code, 250);
    assert_eq!(client.command("QUIT").await.code, 221);

    let log = setup
        .router
        .log_with(&["tenant=bravo", "status=sent"])
        .await;
    assert!(log.contains("tenant=bravo"), "{log}");
    let metrics = scrape_metrics(setup.metrics_port).await;
    assert!(
        metrics.contains("switchyard_messages_accepted_total{tenant=\"bravo\"} 1"),
        "{metrics}"
    );
    let listed =
        String::from_utf8_lossy(&setup.router.plugins(&["list", "--tenant", "acme"]).stdout)
            .to_string();
    assert!(listed.contains("acme  facts  generation=1"), "{listed}");
    assert!(!listed.contains("bravo"), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_running_one_plugin_under_one_name_never_share_kv_keys() {
    // The same plugin, the same name, the same key (the sender): one message per sender each.
    let limit = plugin(
        "rate-limit",
        "rate-limit",
        "grants = [\"kv\", \"metrics\"]\n[plugin.config]\nper_sender = { limit = 1, window_seconds = 3600 }\n",
    );
    let setup = router_with_tenants(
        &[
            ("acme.toml", format!("domains = [\"acme.test\"]\n{limit}")),
            ("bravo.toml", format!("domains = [\"bravo.test\"]\n{limit}")),
        ],
        "",
    )
    .await;
    let mut client = TestClient::connect(setup.router.port).await;
    client
        .send_accepted(
            "s@sender.test",
            &["a@acme.test"],
            &message("first for acme"),
        )
        .await;
    // bravo's counter is its own: acme's count does not reach it.
    client
        .send_accepted(
            "s@sender.test",
            &["b@bravo.test"],
            &message("first for bravo"),
        )
        .await;
    // acme's second message is over acme's limit: the tenant's mail-from hook, asked at the
    // first recipient, refuses that recipient.
    assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
    let reply = client.command("RCPT TO:<a@acme.test>").await;
    assert_eq!(reply.code, 450, "{reply:?}");
    assert_eq!(client.command("RSET").await.code, 250);
    assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
    assert_eq!(client.command("RCPT TO:<b@bravo.test>").await.code, 450);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_limits_is_refused_with_the_limit_named() {
    let setup = router_with_tenants(
        &[
            (
                "acme.toml",
                "domains = [\"acme.test\"]\n[limits]\nmessages_per_hour = 2\nsessions = 1\n"
                    .to_string(),
            ),
            ("bravo.toml", "domains = [\"bravo.test\"]\n".to_string()),
        ],
        "",
    )
    .await;
    let mut client = TestClient::connect(setup.router.port).await;
    for n in 0..2 {
        client
            .send_accepted(
                "s@sender.test",
                &["a@acme.test"],
                &message(&format!("acme {n}")),
            )
            .await;
    }
    // acme's one session is this client's: a second client gets no acme session.
    let mut other = TestClient::connect(setup.router.port).await;
    assert_eq!(other.command("MAIL FROM:<s@sender.test>").await.code, 250);
    let reply = other.command("RCPT TO:<a@acme.test>").await;
    assert_eq!(
        reply.text,
        "451 4.7.1 Tenant limit reached: 1 sessions at once, try again later"
    );
    // The first client is over acme's hourly messages.
    assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
    let reply = client.command("RCPT TO:<a@acme.test>").await;
    assert_eq!(
        reply.text,
        "451 4.7.1 Tenant limit reached: 2 messages per hour, try again later"
    );
    // Another tenant is not slowed by it.
    assert_eq!(client.command("RCPT TO:<b@bravo.test>").await.code, 250);
    assert_eq!(other.command("RCPT TO:<b@bravo.test>").await.code, 250);
    let metrics = scrape_metrics(setup.metrics_port).await;
    for limit in ["messages_per_hour", "sessions"] {
        assert!(
            metrics.contains(&format!(
                "switchyard_tenant_limited_total{{tenant=\"acme\",limit=\"{limit}\"}}"
            )),
            "{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_files_added_changed_and_broken_under_live_traffic_touch_no_other_tenant() {
    let refuse_all = |reply: &str| {
        plugin(
            "gate",
            "content-filter",
            &format!("[plugin.config]\nrules = [{{ always = true, action = \"reject\", reply = \"{reply}\" }}]\n"),
        )
    };
    let bravo = format!(
        "domains = [\"bravo.test\"]\n{}",
        plugin("filter", "content-filter", "[plugin.config]\nrules = []\n")
    );
    let setup = router_with_tenants(&[("bravo.toml", bravo)], "").await;
    let port = setup.router.port;

    // bravo's traffic runs throughout; every message must be accepted.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let traffic = {
        let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
        tokio::spawn(async move {
            let mut client = TestClient::connect(port).await;
            while !stop.load(Ordering::Relaxed) {
                let reply = client
                    .send_mail("s@sender.test", &["b@bravo.test"], &message("live"))
                    .await;
                if reply.code == 250 {
                    sent.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let dir = setup.tenants.path().to_path_buf();
    // Before charlie exists its domain is nobody's: the global rules accept it (loopback relays).
    assert!(charlie_reply(port).await.starts_with("250 "));
    // Added: charlie's chain refuses everything.
    write(
        &dir,
        "charlie.toml",
        &format!(
            "domains = [\"charlie.test\"]\n{}",
            refuse_all("550 5.7.1 charlie v1")
        ),
    );
    wait_until(|| async { charlie_reply(port).await == "550 5.7.1 charlie v1" }).await;
    // Changed.
    write(
        &dir,
        "charlie.toml",
        &format!(
            "domains = [\"charlie.test\"]\n{}",
            refuse_all("550 5.7.1 charlie v2")
        ),
    );
    wait_until(|| async { charlie_reply(port).await == "550 5.7.1 charlie v2" }).await;
    // Broken: generation 2 keeps running, and `plugins list` says why.
    write(&dir, "charlie.toml", "domains = [\"charlie.test\"\n");
    wait_until(|| async {
        String::from_utf8_lossy(&setup.router.plugins(&["list"]).stdout)
            .contains("charlie  last reload failed:")
    })
    .await;
    assert_eq!(charlie_reply(port).await, "550 5.7.1 charlie v2");
    // A file claiming bravo's domain is refused the same way.
    write(
        &dir,
        "delta.toml",
        "domains = [\"bravo.test\", \"delta.test\"]\n",
    );
    wait_until(|| async {
        String::from_utf8_lossy(&setup.router.plugins(&["list"]).stdout)
            .contains("already claimed by tenant `bravo`")
    })
    .await;
    // Removed: charlie's domain is nobody's again.
    std::fs::remove_file(dir.join("charlie.toml")).expect("remove charlie");
    wait_until(|| async { charlie_reply(port).await.starts_with("250 ") }).await;

    stop.store(true, Ordering::Relaxed);
    traffic.await.expect("traffic task");
    let listed =
        String::from_utf8_lossy(&setup.router.plugins(&["list", "--tenant", "bravo"]).stdout)
            .to_string();
    assert!(
        listed.contains("bravo  filter  generation=1"),
        "bravo was never reloaded: {listed}"
    );
    assert_eq!(failed.load(Ordering::Relaxed), 0, "bravo lost transactions");
    assert!(sent.load(Ordering::Relaxed) > 5, "bravo's traffic ran");
}

/// What a message to charlie.test gets, from a new session.
async fn charlie_reply(port: u16) -> String {
    let mut client = TestClient::connect(port).await;
    client
        .send_mail("s@sender.test", &["c@charlie.test"], &message("to charlie"))
        .await
        .text
}

/// Polls `check` until it holds (within 20 s).
async fn wait_until<F, Fut>(check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "condition never held");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_whose_plugin_loops_slows_no_other_tenant() {
    // acme's plugin loops on every recipient it is asked about (until its time limit); bravo's
    // mail must all be accepted and delivered meanwhile. The breaker is off: an open circuit
    // would skip the looping plugin and hide what its calls cost.
    let acme = format!(
        "domains = [\"acme.test\"]\n{}",
        plugin(
            "looping",
            "misbehave",
            "grants = [\"kv\"]\ntime_limit = \"200ms\"\nbreaker = { failures = 0 }\n[plugin.config]\nmode = \"loop\"\n"
        ),
    );
    let setup = router_with_tenants(
        &[
            ("acme.toml", acme),
            ("bravo.toml", "domains = [\"bravo.test\"]\n".to_string()),
        ],
        "plugin_time_limit = \"200ms\"\n",
    )
    .await;
    let port = setup.router.port;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut noisy = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        noisy.push(tokio::spawn(async move {
            let mut tempfailed = 0;
            while !stop.load(Ordering::Relaxed) {
                let mut client = TestClient::connect(port).await;
                assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
                let reply = client.command("RCPT TO:<victim@acme.test>").await;
                assert_eq!(
                    reply.text, "451 4.3.0 plugin looping failed, try again later",
                    "acme gets its failure policy"
                );
                tempfailed += 1;
            }
            tempfailed
        }));
    }
    let started = Instant::now();
    let mut client = TestClient::connect(port).await;
    for n in 0..30 {
        client
            .send_accepted(
                "s@sender.test",
                &["b@bravo.test"],
                &message(&format!("bravo {n}")),
            )
            .await;
    }
    setup.sink.wait_for(30, Duration::from_secs(30)).await;
    let bravo_time = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut tempfailed = 0;
    for task in noisy {
        tempfailed += task.await.expect("noisy client");
    }
    assert!(tempfailed >= 4, "acme's clients ran: {tempfailed}");
    assert!(
        bravo_time < Duration::from_secs(30),
        "bravo took {bravo_time:?}"
    );
    let log = setup.router.log();
    assert!(log.contains("kind=Timeout"), "{log}");
    assert!(
        !log.contains("plugin circuit opened"),
        "every call of the looping plugin ran to its limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_limits_cap_its_plugins_memory_and_instances() {
    // The plugin asks for 64 MiB; acme's limits give each instance 8 MiB and the tenant two
    // instances at once.
    let acme = format!(
        "domains = [\"acme.test\"]\n{}",
        plugin(
            "hoarder",
            "misbehave",
            "grants = [\"kv\"]\nmemory_limit = 67108864\n[plugin.config]\nmode = \"alloc\"\n"
        ),
    );
    let setup = router_with_tenants(
        &[("acme.toml", acme)],
        "plugin_memory_limit = 8388608\nplugin_instances = 2\n",
    )
    .await;
    let port = setup.router.port;

    // Memory: the instance is stopped at the tenant's cap, not the plugin's own limit.
    let mut client = TestClient::connect(port).await;
    assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
    assert_eq!(
        client.command("RCPT TO:<victim@acme.test>").await.text,
        "451 4.3.0 plugin hoarder failed, try again later"
    );
    setup
        .router
        .log_with(&["kind=OutOfMemory", "over its memory_limit of 8388608 bytes"])
        .await;
    assert_eq!(client.command("QUIT").await.code, 221);

    // Instances: two open transactions of acme hold its two; a third waits for one to end.
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut client = TestClient::connect(port).await;
        assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
        assert_eq!(client.command("RCPT TO:<friend@acme.test>").await.code, 250);
        open.push(client);
    }
    let mut third = TestClient::connect(port).await;
    assert_eq!(third.command("MAIL FROM:<s@sender.test>").await.code, 250);
    assert_eq!(
        third.command("RCPT TO:<friend@acme.test>").await.text,
        "451 4.7.1 Tenant limit reached: 2 plugin instances at once, try again later"
    );
    let mut first = open.remove(0);
    assert_eq!(first.command("QUIT").await.code, 221);
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(third.command("RSET").await.code, 250);
        assert_eq!(third.command("MAIL FROM:<s@sender.test>").await.code, 250);
        let reply = third.command("RCPT TO:<friend@acme.test>").await;
        if reply.code == 250 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the freed instance never came: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A tenant's plugins hold at most their tenant's kv quota. acme's rate limit counts each new
/// sender under a key of its own: past three keys the host refuses the count, which the plugin
/// learns (try-increment) and lets the mail through uncounted rather than stop everyone's mail;
/// once the keys expire and the host purges them, there is room again. bravo runs a plugin built for WIT 0.2.0, whose `increment` cannot
/// say why: past its one key it traps, and its failure policy answers. The gauges show what
/// each holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_plugins_keep_to_its_kv_quota_and_expired_keys_are_purged() {
    let acme = format!(
        "domains = [\"acme.test\"]\n{}[limits]\nkv_keys = 3\n",
        plugin(
            "limit",
            "rate-limit",
            "grants = [\"kv\", \"metrics\"]\ntime_limit = \"5s\"\n[plugin.config]\nper_sender = { limit = 100, window_seconds = 3 }\n"
        ),
    );
    let bravo = format!(
        "domains = [\"bravo.test\"]\n{}[limits]\nkv_keys = 1\n",
        plugin(
            "old",
            "kv-counter-0-2-0",
            "grants = [\"kv\"]\ntime_limit = \"5s\"\n[plugin.config]\nlimit = 100\n"
        ),
    );
    let setup = router_with_tenants(
        &[("acme.toml", acme), ("bravo.toml", bravo)],
        // The purge runs every second here.
        "plugin_time_limit = \"5s\"\n\n[kv]\npurge_interval = \"1s\"\n",
    )
    .await;
    let port = setup.router.port;
    let rcpt = |sender: String, recipient: &'static str| async move {
        let mut client = TestClient::connect(port).await;
        assert_eq!(
            client.command(&format!("MAIL FROM:<{sender}>")).await.code,
            250
        );
        client.command(&format!("RCPT TO:<{recipient}>")).await.text
    };
    for n in 1..=3 {
        let reply = rcpt(format!("s{n}@sender.test"), "x@acme.test").await;
        assert!(reply.starts_with("250 "), "sender {n}: {reply}");
    }
    let reply = rcpt("s4@sender.test".to_string(), "x@acme.test").await;
    assert!(reply.starts_with("250 "), "uncounted, not refused: {reply}");
    setup
        .router
        .log_with(&[
            "kv write refused: quota of 3 keys reached",
            "plugin=limit",
            "tenant=acme",
        ])
        .await;

    // bravo's 0.2.0 plugin: its first sender's key fits, the second's traps the plugin.
    assert!(rcpt("a@sender.test".to_string(), "x@bravo.test")
        .await
        .starts_with("250 "));
    assert_eq!(
        rcpt("b@sender.test".to_string(), "x@bravo.test").await,
        "451 4.3.0 plugin old failed, try again later"
    );

    // The gauges, then the purge: acme's keys expire after a second, and room comes back.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let page = scrape_metrics(setup.metrics_port).await;
        if page.contains("switchyard_kv_keys{tenant=\"acme\",plugin=\"limit\"} 0")
            && page.contains("switchyard_kv_keys{tenant=\"bravo\",plugin=\"old\"} 1")
        {
            assert!(
                page.contains("switchyard_kv_bytes{tenant=\"bravo\",plugin=\"old\"} "),
                "{page}"
            );
            assert!(
                page.contains("switchyard_plugin_counter_total{plugin=\"limit\",tenant=\"acme\",name=\"uncounted_total\"} 1"),
                "{page}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "never purged:\n{page}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reply = rcpt("s5@sender.test".to_string(), "x@acme.test").await;
    assert!(reply.starts_with("250 "), "after the purge: {reply}");
}
