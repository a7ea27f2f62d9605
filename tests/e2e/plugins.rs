//! The plugin system through the real binary: hooks changing outcomes, and the sandbox holding
//! against plugins that loop, hoard memory, trap or import what they were not granted.

use std::time::{Duration, Instant};

use crate::harness::client::{message, TestClient};
use crate::harness::dns::DnsServer;
use crate::harness::router::{free_port, plugin_path, scrape_metrics, Router, RouterOptions};
use crate::harness::sink::Sink;

pub(crate) fn plugin(name: &str, crate_name: &str, settings: &str) -> String {
    format!(
        "[[plugin]]\nname = \"{name}\"\npath = \"{}\"\n{settings}\n",
        plugin_path(crate_name).display()
    )
}

/// A router relaying to a sink, with these [[plugin]] tables.
pub(crate) async fn router_with(plugins: &str) -> (Router, Sink) {
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let router = Router::start(RouterOptions {
        extra: plugins.to_string(),
        ..RouterOptions::relaying_to(sink.address, "")
    })
    .await;
    (router, sink)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_hook_sends_a_domain_to_its_smarthost() {
    let special = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let routes = format!(
        "[plugin.config]\nroutes = [\n  {{ domain = \"routed.test\", smarthost = \"{}\", tls = \"none\" }},\n  {{ domain = \"gone.test\", reject = \"550 5.1.2 this domain is gone\" }},\n  {{ domain = \"void.test\", discard = true }},\n]\n",
        special.address
    );
    let (router, default_sink) = router_with(&plugin("routes", "static-routes", &routes)).await;
    let mut client = TestClient::connect(router.port).await;
    client
        .send_accepted(
            "s@sender.test",
            &["a@routed.test", "b@other.test"],
            &message("routes"),
        )
        .await;
    client
        .send_accepted(
            "s@sender.test",
            &["c@void.test", "d@gone.test"],
            &message("void"),
        )
        .await;
    let routed = special.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(routed[0].rcpt_to, vec!["a@routed.test"]);
    let others = default_sink.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(
        others[0].rcpt_to,
        vec!["b@other.test"],
        "unrouted recipients take the configured path"
    );
    router
        .log_with(&[
            "to=<c@void.test>, relay=plugin",
            "status=sent (250 2.0.0 discarded by a routing plugin)",
            "to=<d@gone.test>, relay=plugin",
            "status=bounced (550 5.1.2 this domain is gone)",
            "plugin loaded generation=1 plugin=routes hooks=route",
        ])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_hook_delivers_into_a_local_maildir() {
    let mail = tempfile::tempdir().expect("tempdir");
    let routes =
        "[plugin.config]\nroutes = [\n  { domain = \"archive.test\", mailbox = \"archive\" },\n  \
        { domain = \"escape.test\", mailbox = \"../outside\" },\n]\n";
    let (router, sink) = router_with(&format!(
        "[mailboxes]\nroot = \"{}\"\n\n{}",
        mail.path().join("maildirs").display(),
        plugin("routes", "static-routes", routes)
    ))
    .await;
    let mut client = TestClient::connect(router.port).await;
    client
        .send_accepted(
            "s@sender.test",
            &["a@archive.test", "b@archive.test"],
            &message("kept"),
        )
        .await;
    client
        .send_accepted("s@sender.test", &["c@escape.test"], &message("escape"))
        .await;
    router
        .log_with(&[
            "to=<a@archive.test>, relay=mailbox:archive",
            "to=<b@archive.test>, relay=mailbox:archive",
            "to=<c@escape.test>, relay=mailbox:../outside",
        ])
        .await;
    let new = mail.path().join("maildirs/archive/new");
    let mut letters: Vec<String> = std::fs::read_dir(&new)
        .expect("archive/new exists")
        .map(|entry| std::fs::read_to_string(entry.expect("entry").path()).expect("read"))
        .collect();
    letters.sort();
    assert_eq!(letters.len(), 2, "one copy per recipient");
    assert!(
        letters[0].starts_with("Return-Path: <s@sender.test>\r\nDelivered-To: a@archive.test\r\n"),
        "{}",
        letters[0]
    );
    assert!(letters[1].contains("Delivered-To: b@archive.test"));
    assert!(letters[0].contains("Subject: kept"));
    assert!(
        !mail.path().join("outside").exists(),
        "a mailbox name never leaves the root"
    );
    let log = router.log();
    assert!(
        log.contains("status=sent (250 2.0.0 delivered to mailbox archive as"),
        "{log}"
    );
    assert!(
        log.contains("status=bounced (550 5.1.1 mailbox `../outside`: not a valid mailbox name)"),
        "{log}"
    );
    // The bounce goes back to the sender through the smarthost.
    let bounce = sink.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(bounce[0].rcpt_to, vec!["s@sender.test"]);
}

/// The time limit of tests whose plugin writes to the kv store. A write waits for its durable
/// commit, and with the rest of the suite running beside it an `fsync` can take longer than the
/// default 100 ms; these tests are about what the plugin decides, not about its time limit.
const KV_TIME_LIMIT: &str = "time_limit = \"5s\"";

/// A router with the misbehaving plugin in `mode`, and the time it took to refuse a victim.
async fn misbehave(mode: &str, limits: &str) -> (Router, String, Duration) {
    let settings = format!("grants = [\"kv\"]\n{limits}\n[plugin.config]\nmode = \"{mode}\"\n");
    let (router, _sink) = router_with(&plugin("misbehave", "misbehave", &settings)).await;
    let mut client = TestClient::connect(router.port).await;
    assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
    let started = Instant::now();
    let reply = client.command("RCPT TO:<victim@switchyard.test>").await;
    let elapsed = started.elapsed();
    let failed = reply.text.contains("plugin misbehave failed");
    if failed {
        // A plugin that failed is not asked again in the same transaction: its failure policy
        // answers for it, at once (no second spin, no second allocation).
        let again = Instant::now();
        let second = client.command("RCPT TO:<friend@switchyard.test>").await;
        assert_eq!(second.text, reply.text);
        assert!(
            again.elapsed() < Duration::from_millis(500),
            "{:?}",
            again.elapsed()
        );
        // The next transaction gets a fresh instance.
        assert_eq!(client.command("RSET").await.code, 250);
        assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
    }
    // The session goes on: a harmless recipient is accepted.
    assert_eq!(
        client
            .command("RCPT TO:<friend@switchyard.test>")
            .await
            .code,
        250
    );
    if failed {
        let failures = router.log().matches("plugin failed").count();
        assert_eq!(
            failures,
            1,
            "one failure logged, not one per call: {}",
            router.log()
        );
    }
    (router, reply.text, elapsed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_loops_forever_gets_451_within_its_deadline_and_others_go_on() {
    // A deadline long enough to tell "served while the loops spin" from "served after them".
    let settings = "grants = [\"kv\"]\ntime_limit = \"3s\"\n[plugin.config]\nmode = \"loop\"\n";
    let (router, _sink) = router_with(&plugin("misbehave", "misbehave", settings)).await;
    let port = router.port;
    // Two spinning calls: as many as the server has worker threads on these two-core machines
    // (tokio starts one per core), so a plugin call that held its thread would leave none.
    let mut looping = Vec::new();
    for _ in 0..2 {
        let mut client = TestClient::connect(port).await;
        assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
        client.send(b"RCPT TO:<victim@switchyard.test>\r\n").await;
        looping.push(client);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let mut other = TestClient::connect(port).await;
    other
        .send_accepted(
            "s@sender.test",
            &["someone@switchyard.test"],
            &message("meanwhile"),
        )
        .await;
    let other_elapsed = started.elapsed();
    // Well before the spinning calls reach their 3 s deadline.
    assert!(
        other_elapsed < Duration::from_millis(2500),
        "another session is served while the plugin spins, took {other_elapsed:?}"
    );
    for client in &mut looping {
        let reply = client.reply().await;
        assert_eq!(
            reply.text,
            "451 4.3.0 plugin misbehave failed, try again later"
        );
    }
    let loop_elapsed = started.elapsed();
    assert!(
        loop_elapsed < Duration::from_secs(6),
        "refused soon after the 3 s deadline, took {loop_elapsed:?}"
    );
    let log = router.log();
    assert!(
        log.contains("plugin failed")
            && log.contains("plugin=misbehave")
            && log.contains("kind=Timeout"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_allocates_without_bound_is_stopped_at_its_memory_cap() {
    let (router, reply, _) = misbehave("alloc", "memory_limit = 8388608").await;
    assert_eq!(reply, "451 4.3.0 plugin misbehave failed, try again later");
    assert!(
        router.log().contains("kind=OutOfMemory"),
        "{}",
        router.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_traps_fails_with_its_policy() {
    let (router, reply, _) = misbehave("trap", "").await;
    assert_eq!(reply, "451 4.3.0 plugin misbehave failed, try again later");
    assert!(router.log().contains("kind=Trap"), "{}", router.log());
    // With failure_policy = "reject" the same trap refuses permanently.
    let (_, reply, _) = misbehave("trap", "failure_policy = \"reject\"").await;
    assert_eq!(reply, "550 5.3.0 plugin misbehave failed");
}

/// A transaction's plugins share one store: one that runs out of memory or traps must leave the
/// others whole, and the chain goes on past it when its policy says `continue`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_plugin_leaves_the_rest_of_the_chain_whole() {
    let member = |name: &str, mode: &str, limits: &str| {
        plugin(
            name,
            "misbehave",
            &format!("grants = [\"kv\"]\n{limits}\n[plugin.config]\nmode = \"{mode}\"\n"),
        )
    };
    let chain = [
        member(
            "hog",
            "alloc",
            "memory_limit = 8388608\nfailure_policy = \"continue\"",
        ),
        member("crash", "trap", "failure_policy = \"continue\""),
        member("answer", "session", ""),
    ]
    .concat();
    let (router, _sink) = router_with(&chain).await;
    for round in 0..2 {
        let mut client = TestClient::connect(router.port).await;
        assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
        let reply = client.command("RCPT TO:<victim@switchyard.test>").await;
        assert!(
            reply.text.starts_with("550 5.7.1 ip=127.0.0.1 "),
            "round {round}: the last plugin answers: {}\n{}",
            reply.text,
            router.log()
        );
        // Within the transaction the failed two are skipped, the third still answers.
        let again = client.command("RCPT TO:<victim@switchyard.test>").await;
        assert!(again.text.starts_with("550 5.7.1 ip="), "{}", again.text);
    }
    let log = router.log();
    assert_eq!(log.matches("kind=OutOfMemory").count(), 2, "{log}");
    assert_eq!(log.matches("kind=Trap").count(), 2, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_reads_the_session_it_is_lent() {
    let settings = "grants = [\"kv\"]\n[plugin.config]\nmode = \"session\"\n";
    let (router, _sink) = router_with(&plugin("misbehave", "misbehave", settings)).await;
    let mut client = TestClient::connect(router.port).await;
    assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
    let reply = client.command("RCPT TO:<victim@switchyard.test>").await;
    assert!(
        reply.text.starts_with("550 5.7.1 ip=127.0.0.1 listener=")
            && reply.text.contains(" submission=false helo=")
            && reply.text.ends_with(" tls=false auth= tenant="),
        "{}",
        reply.text
    );
    assert!(reply.text.contains(" helo=client.test "), "{}", reply.text);
}

/// What two transactions' instances of the misbehaving plugin say their `init` drew at random.
async fn init_seeds(settings: &str) -> (Router, String, String) {
    let settings = format!("grants = [\"kv\"]\n{settings}\n[plugin.config]\nmode = \"seed\"\n");
    let (router, _sink) = router_with(&plugin("misbehave", "misbehave", &settings)).await;
    let mut seeds = Vec::new();
    for _ in 0..2 {
        let mut client = TestClient::connect(router.port).await;
        assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
        let reply = client.command("RCPT TO:<victim@switchyard.test>").await;
        assert!(reply.text.starts_with("550 5.7.1 seed "), "{}", reply.text);
        seeds.push(reply.text);
    }
    let second = seeds.pop().unwrap_or_default();
    let first = seeds.pop().unwrap_or_default();
    (router, first, second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_start_from_the_state_init_left_unless_preinitialize_is_off() {
    // By default `init` runs once, at load, and every transaction starts from its snapshot.
    let (router, first, second) = init_seeds("").await;
    assert_eq!(first, second, "both transactions start from one snapshot");
    let listed = String::from_utf8_lossy(&router.plugins(&["list"]).stdout).to_string();
    assert!(listed.contains("init=snapshot"), "{listed}");
    // With preinitialize = false each transaction's instance runs `init` itself.
    let (router, first, second) = init_seeds("preinitialize = false").await;
    assert_ne!(first, second, "each instance drew its own seed");
    let listed = String::from_utf8_lossy(&router.plugins(&["list"]).stdout).to_string();
    assert!(listed.contains("init=per-instance"), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_runs_once_per_load() {
    // Pre-initialised: the one `init` is the one the snapshot keeps; the loader learns the
    // plugin's hooks from it instead of running `init` again to validate the configuration.
    let (_router, reply, _) = misbehave("inits", KV_TIME_LIMIT).await;
    assert_eq!(reply, "550 5.7.1 inits 1");
    // Not pre-initialised: once at load (validation), then once in the transaction's instance.
    let limits = format!("preinitialize = false\n{KV_TIME_LIMIT}");
    let (_router, reply, _) = misbehave("inits", &limits).await;
    assert_eq!(reply, "550 5.7.1 inits 2");
}

/// The time is a grant: WASI's wall clock, which every toolchain links, tells a plugin the real
/// time only when its manifest grants `clock`; otherwise it reads the Unix epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_plugin_granted_clock_reads_the_time_from_wasi() {
    for (grants, granted) in [
        ("grants = [\"kv\"]", false),
        ("grants = [\"kv\", \"clock\"]", true),
    ] {
        let settings = format!("{grants}\n[plugin.config]\nmode = \"wasi-clock\"\n");
        let (router, _sink) = router_with(&plugin("timer", "misbehave", &settings)).await;
        let mut client = TestClient::connect(router.port).await;
        assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
        let reply = client
            .command("RCPT TO:<victim@switchyard.test>")
            .await
            .text;
        let seconds: u64 = reply
            .strip_prefix("550 5.7.1 wasi clock ")
            .and_then(|seconds| seconds.parse().ok())
            .unwrap_or_else(|| panic!("{reply}"));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        if granted {
            assert!(
                now.abs_diff(seconds) < 60,
                "granted: {seconds} against {now}"
            );
        } else {
            assert_eq!(seconds, 0, "not granted: the epoch");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn granted_imports_work_and_ungranted_ones_refuse_to_load() {
    let (_router, reply, _) = misbehave("kv", KV_TIME_LIMIT).await;
    assert_eq!(reply, "550 5.7.1 victim number 1");
    let refused = Router::try_start(RouterOptions {
        extra: plugin("misbehave", "misbehave", "[plugin.config]\nmode = \"kv\"\n"),
        ..RouterOptions::default()
    })
    .await;
    let log = refused
        .err()
        .expect("a plugin importing an ungranted interface must not load");
    assert!(
        log.contains("plugin `misbehave` imports `switchyard:plugin/kv@0.2.3`, which its manifest does not grant; add \"kv\" to its grants"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_hook_rejects_quarantines_and_edits_headers_and_recipients() {
    let rules = "[plugin.config]\nrules = [\n\
        { header = \"Subject\", contains = \"[spam]\", action = \"reject\", reply = \"550 5.7.1 Looks like spam\" },\n\
        { attachment = [\"exe\"], action = \"reject\", reply = \"552 5.7.0 Executables are not accepted\" },\n\
        { header = \"Subject\", contains = \"[review]\", action = \"quarantine\", reason = \"held for review\" },\n\
        { always = true, action = \"add-header\", name = \"X-Filtered\", value = \"switchyard\" },\n\
        { always = true, action = \"remove-header\", name = \"X-Internal\" },\n\
        { header = \"Subject\", contains = \"hello\", action = \"add-recipient\", address = \"archive@switchyard.test\" },\n\
        { always = true, action = \"remove-recipient\", address = \"dropped@switchyard.test\" },\n\
    ]\n";
    let (router, sink) = router_with(&plugin("filter", "content-filter", rules)).await;
    let mut client = TestClient::connect(router.port).await;
    let spam = client
        .send_mail(
            "s@sender.test",
            &["b@switchyard.test"],
            &message("[spam] buy now"),
        )
        .await;
    assert_eq!(spam.text, "550 5.7.1 Looks like spam");
    let executable = "From: a@sender.test\r\nSubject: tool\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"setup.exe\"\r\n\r\nTVqQ\r\n--b--\r\n";
    assert_eq!(
        client
            .send_mail("s@sender.test", &["b@switchyard.test"], executable)
            .await
            .text,
        "552 5.7.0 Executables are not accepted"
    );
    let held = client
        .send_accepted(
            "s@sender.test",
            &["b@switchyard.test"],
            &message("[review] contract"),
        )
        .await;
    let clean = "From: a@sender.test\r\nX-Internal: secret\r\nSubject: hello\r\n\r\nHi.\r\n";
    client
        .send_accepted(
            "s@sender.test",
            &["b@switchyard.test", "dropped@switchyard.test"],
            clean,
        )
        .await;

    let received = sink.wait_for(1, Duration::from_secs(15)).await;
    assert!(
        received[0].data.contains("X-Filtered: switchyard\r\n"),
        "{}",
        received[0].data
    );
    assert!(
        !received[0].data.contains("X-Internal"),
        "{}",
        received[0].data
    );
    assert_eq!(
        received[0].rcpt_to,
        vec!["b@switchyard.test", "archive@switchyard.test"],
        "the data hook added one recipient and removed another"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(sink.received().len(), 1, "the quarantined message is held");
    let listing = String::from_utf8_lossy(&router.queue(&["list"]).stdout).to_string();
    assert!(
        listing.contains(&held) && listing.contains("QUARANTINED  (held for review)"),
        "{listing}"
    );
    assert!(router.queue(&["retry", &held]).status.success());
    let released = sink.wait_for(2, Duration::from_secs(15)).await;
    assert!(
        released[1].data.contains("Subject: [review] contract"),
        "released after review"
    );
}

/// The (client, number) of every message a sink received, from subjects "c{client}n{number}".
fn subjects(sink: &Sink) -> Vec<(usize, usize)> {
    sink.received()
        .iter()
        .filter_map(|m| {
            let subject = m
                .data
                .lines()
                .find_map(|line| line.strip_prefix("Subject: c"))?;
            let (client, number) = subject.trim().split_once('n')?;
            Some((client.parse().ok()?, number.parse().ok()?))
        })
        .collect()
}

/// The generation `switchyard plugins list` reports.
pub(crate) fn generation(router: &Router) -> u64 {
    let output = router.plugins(&["list"]);
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("generation "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_plugin_is_replaced_twice_under_load_without_losing_mail() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    const CLIENTS: usize = 4;
    let sinks = [
        Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await,
        Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await,
        Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await,
    ];
    let route = |sink: &Sink| {
        format!("[plugin.config]\nroutes = [{{ domain = \"moving.test\", smarthost = \"{}\", tls = \"none\" }}]\n", sink.address)
    };
    let router = Router::start(RouterOptions {
        extra: plugin("routes", "static-routes", &route(&sinks[0])),
        ..RouterOptions::default()
    })
    .await;
    let port = router.port;
    let stop = Arc::new(AtomicBool::new(false));
    // Messages each client has had answered so far.
    let sent: Arc<Vec<AtomicUsize>> = Arc::new((0..CLIENTS).map(|_| AtomicUsize::new(0)).collect());
    let mut senders = Vec::new();
    for client_index in 0..CLIENTS {
        let (stop, sent) = (stop.clone(), sent.clone());
        senders.push(tokio::spawn(async move {
            let mut client = TestClient::connect(port).await;
            let mut failures = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let content =
                    format!("From: s@sender.test\r\nSubject: c{client_index}n{n}\r\n\r\nbody\r\n");
                let reply = client
                    .send_mail("s@sender.test", &["x@moving.test"], &content)
                    .await;
                if reply.code != 250 {
                    failures.push(reply.text);
                }
                n += 1;
                sent[client_index].store(n, Ordering::SeqCst);
            }
            (n, failures)
        }));
    }
    let answered = |sent: &[AtomicUsize]| -> Vec<usize> {
        sent.iter()
            .map(|count| count.load(Ordering::SeqCst))
            .collect()
    };
    // Per swap, per client: how many messages had been answered once the new generation ran.
    let mut swaps: Vec<Vec<usize>> = Vec::new();
    for (step, next) in [(1, &sinks[1]), (2, &sinks[2])] {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let current = std::fs::read_to_string(&router.config_path).expect("config");
        let previous = if step == 1 { &sinks[0] } else { &sinks[1] };
        std::fs::write(
            &router.config_path,
            current.replace(&previous.address.to_string(), &next.address.to_string()),
        )
        .expect("rewrite");
        if step == 2 {
            // The second swap also goes through the admin command (it waits for the outcome).
            let output = router.plugins(&["reload"]);
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while generation(&router) < step + 1 {
            assert!(
                Instant::now() < deadline,
                "generation {} never came; log:\n{}",
                step + 1,
                router.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        swaps.push(answered(&sent));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;

    // A reload that cannot load keeps generation 3 running, under the same load.
    let current = std::fs::read_to_string(&router.config_path).expect("config");
    std::fs::write(
        &router.config_path,
        current.replace("static_routes.wasm", "missing_plugin.wasm"),
    )
    .expect("rewrite");
    let failed = router.plugins(&["reload"]);
    assert!(!failed.status.success(), "a failed reload is reported");
    assert!(
        String::from_utf8_lossy(&failed.stderr).contains("the previous generation keeps running"),
        "{}",
        String::from_utf8_lossy(&failed.stderr)
    );
    let listing = String::from_utf8_lossy(&router.plugins(&["list"]).stdout).to_string();
    assert!(
        listing.contains("generation 3")
            && listing.contains("-  routes  generation=3  sha256=")
            && listing.contains("hooks=[route]")
            && listing.contains("last reload failed")
            && listing.contains("missing_plugin.wasm"),
        "{listing}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for sender in senders {
        let (count, failures) = sender.await.expect("sender");
        assert!(
            failures.is_empty(),
            "failed transactions during reloads: {failures:?}"
        );
        total += count;
    }
    assert!(total > 40, "load ran ({total} messages)");
    let deadline = Instant::now() + Duration::from_secs(30);
    while sinks.iter().map(|s| s.received().len()).sum::<usize>() < total {
        assert!(
            Instant::now() < deadline,
            "lost messages: {} of {total} delivered",
            sinks.iter().map(|s| s.received().len()).sum::<usize>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (a, b, c) = (
        subjects(&sinks[0]),
        subjects(&sinks[1]),
        subjects(&sinks[2]),
    );
    assert_eq!(
        a.len() + b.len() + c.len(),
        total,
        "every message delivered exactly once"
    );
    // A message answered after a swap completed was routed by the new generation. The one in
    // flight at the swap (number == answered count) may have gone either way.
    assert!(
        a.iter().all(|&(client, n)| n <= swaps[0][client]),
        "after the first swap nothing goes to A: {a:?}, swap at {:?}",
        swaps[0]
    );
    assert!(
        b.iter().all(|&(client, n)| n <= swaps[1][client]),
        "after the second swap nothing goes to B: {b:?}, swap at {:?}",
        swaps[1]
    );
    assert!(
        !b.is_empty() && !c.is_empty(),
        "each generation routed mail: A={} B={} C={}",
        a.len(),
        b.len(),
        c.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_rewrite_maps_senders_and_recipients() {
    let maps = "[plugin.config]\nsenders = { \"root@host.test\" = \"ops@example.test\" }\nrecipients = { \"@alias.test\" = \"@example.test\", \"info@switchyard.test\" = \"team@example.test\" }\n";
    let (router, sink) = router_with(&plugin("rewrite", "address-rewrite", maps)).await;
    let mut client = TestClient::connect(router.port).await;
    client
        .send_accepted(
            "root@host.test",
            &["bob@alias.test", "info@switchyard.test", "carol@other.test"],
            &message("maps"),
        )
        .await;
    let received = sink.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(received[0].mail_from, "ops@example.test");
    assert_eq!(
        received[0].rcpt_to,
        vec!["bob@example.test", "team@example.test", "carol@other.test"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_counts_senders_in_the_kv_store_and_exports_metrics() {
    let limits = format!("grants = [\"kv\", \"metrics\"]\n{KV_TIME_LIMIT}\n[plugin.config]\nper_sender = {{ limit = 2, window_seconds = 60 }}\nreply = \"450 4.7.1 Slow down\"\n");
    let metrics_port = free_port();
    let (router, _sink) = router_with(&format!(
        "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n{}",
        plugin("rate", "rate-limit", &limits)
    ))
    .await;
    let mut client = TestClient::connect(router.port).await;
    for _ in 0..2 {
        client
            .send_accepted(
                "busy@sender.test",
                &["b@switchyard.test"],
                &message("counted"),
            )
            .await;
    }
    assert_eq!(
        client.command("MAIL FROM:<busy@sender.test>").await.text,
        "450 4.7.1 Slow down"
    );
    assert_eq!(
        client.command("MAIL FROM:<calm@sender.test>").await.code,
        250,
        "other senders have their own count"
    );
    // The plugin's counter and the host's own series on the Prometheus endpoint.
    let scraped = scrape_metrics(metrics_port).await;
    for series in [
        "switchyard_plugin_counter_total{plugin=\"rate\",tenant=\"\",name=\"limited_total\"} 1",
        "switchyard_messages_accepted_total{tenant=\"\"} 2",
        "switchyard_plugin_calls_total{plugin=\"rate\",tenant=\"\"} 4",
        "switchyard_smtp_sessions_total{listener=\"inbound\"} ",
    ] {
        assert!(
            scraped.contains(series),
            "{series} missing from:\n{scraped}"
        );
    }
}

/// A sink that refuses recipients whose local part starts with "nobody" (550 5.1.1).
async fn sink_refusing_nobody() -> Sink {
    Sink::start(
        "127.0.0.1".parse().expect("ip"),
        0,
        Some(std::sync::Arc::new(|address: &str, _| {
            address
                .starts_with("nobody")
                .then(|| "550 5.1.1 no such user".to_string())
        })),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounce_branding_writes_the_dsn_text() {
    let sink = sink_refusing_nobody().await;
    let branding = "[plugin.config]\nsubject = \"Undeliverable: {subject}\"\ntext = \"ACME could not deliver:\\n{failures}\"\n";
    let router = Router::start(RouterOptions {
        extra: plugin("branding", "bounce-branding", branding),
        ..RouterOptions::relaying_to(sink.address, "")
    })
    .await;
    let mut client = TestClient::connect(router.port).await;
    client
        .send_accepted(
            "s@sender.test",
            &["nobody@switchyard.test"],
            &message("quarterly report"),
        )
        .await;
    let dsn = sink.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(dsn[0].mail_from, "");
    assert!(
        dsn[0]
            .data
            .contains("Subject: Undeliverable: quarterly report\r\n"),
        "{}",
        dsn[0].data
    );
    assert!(
        dsn[0].data.contains(
            "ACME could not deliver:\r\n  nobody@switchyard.test: 550 5.1.1 no such user\r\n"
        ),
        "{}",
        dsn[0].data
    );
    assert!(
        dsn[0]
            .data
            .contains("Content-Type: message/delivery-status")
            && dsn[0].data.contains("Status: 5.1.1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_plugin_decides_like_a_rust_one() {
    // plugins/python-policy/app.py, built by componentize-py: CPython inside the component.
    let settings = "time_limit = \"1s\"\n[plugin.config]\nblocked_senders = [\"evil@sender.test\"]\ntag = \"checked\"\n";
    let (router, sink) = router_with(&plugin("python-policy", "python-policy", settings)).await;
    let mut client = TestClient::connect(router.port).await;
    assert_eq!(
        client.command("MAIL FROM:<evil@sender.test>").await.text,
        "550 5.7.1 sender evil@sender.test is blocked (python-policy)"
    );
    client
        .send_accepted(
            "good@sender.test",
            &["b@switchyard.test"],
            &message("from python"),
        )
        .await;
    let received = sink.wait_for(1, Duration::from_secs(15)).await;
    assert!(
        received[0]
            .data
            .contains("X-Policy: checked; 1 recipient(s)\r\n"),
        "{}",
        received[0].data
    );
    // Too large to snapshot at every load (18 MB): each instance runs init, and still decides.
    let listed = String::from_utf8_lossy(&router.plugins(&["list"]).stdout).to_string();
    assert!(listed.contains("init=per-instance"), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_javascript_plugin_decides_like_a_rust_one() {
    // plugins/js-policy/plugin.js, built by componentize-js: StarlingMonkey inside the component.
    let settings = "time_limit = \"1s\"\n[plugin.config]\nblocked_recipients = [\"Gone@switchyard.test\"]\ntag = \"checked\"\n";
    let (router, sink) = router_with(&plugin("js-policy", "js-policy", settings)).await;
    let mut client = TestClient::connect(router.port).await;
    assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
    assert_eq!(
        client.command("RCPT TO:<gone@switchyard.test>").await.text,
        "550 5.1.1 recipient gone@switchyard.test is refused (js-policy)"
    );
    assert_eq!(client.command("RSET").await.code, 250);
    client
        .send_accepted(
            "s@sender.test",
            &["b@switchyard.test"],
            &message("from javascript"),
        )
        .await;
    let received = sink.wait_for(1, Duration::from_secs(15)).await;
    assert!(
        received[0]
            .data
            .contains("X-JS-Policy: checked; subject \"from javascript\"\r\n"),
        "{}",
        received[0].data
    );
    let listed = String::from_utf8_lossy(&router.plugins(&["list"]).stdout).to_string();
    assert!(
        listed.contains("-  js-policy  generation=1") && listed.contains("hooks=[rcpt-to,data]"),
        "{listed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_helo_hooks_refuse_clients_and_delivery_results_are_observed() {
    let sink = sink_refusing_nobody().await;
    let policy = "[plugin.config]\nblocked_networks = [\"127.0.0.66/32\"]\n\
        connect_reply = \"554 5.7.1 Your network is not welcome here\"\n\
        require_fqdn_helo = true\nblocked_helo = [\"spammer.example\"]\n";
    let stats = "grants = [\"metrics\"]\n[plugin.config]\ndomains = [\"switchyard.test\"]\n";
    let metrics_port = free_port();
    let router = Router::start(RouterOptions {
        extra: format!(
            "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n{}{}",
            plugin("policy", "client-policy", policy),
            plugin("stats", "delivery-stats", stats)
        ),
        ..RouterOptions::relaying_to(sink.address, "")
    })
    .await;

    // connect: a client from the blocked address gets the plugin's reply instead of a greeting.
    let mut blocked =
        TestClient::connect_raw_from("127.0.0.66".parse().expect("ip"), router.port).await;
    assert_eq!(
        blocked.reply().await.text,
        "554 5.7.1 Your network is not welcome here"
    );
    assert!(blocked.is_closed().await);

    // helo: a bare name and a listed one are refused; the client may try again.
    let mut client =
        TestClient::connect_raw_from("127.0.0.67".parse().expect("ip"), router.port).await;
    assert_eq!(client.reply().await.code, 220);
    let refusal = "550 5.7.1 Helo command rejected: need fully-qualified hostname";
    assert_eq!(client.command("EHLO localhost").await.text, refusal);
    assert_eq!(client.command("HELO spammer.example").await.text, refusal);
    assert_eq!(
        client.command("MAIL FROM:<s@sender.test>").await.text,
        "503 5.5.1 Error: send HELO/EHLO first",
        "a refused HELO does not count as one"
    );
    assert_eq!(client.command("EHLO client.example").await.code, 250);

    // delivery-result: one recipient delivered, one refused by the next hop; the plugin counts both.
    // From the null sender, so that no DSN adds a delivery of its own to the counts.
    client
        .send_accepted(
            "",
            &["b@switchyard.test", "nobody@switchyard.test"],
            &message("observed"),
        )
        .await;
    sink.wait_for(1, Duration::from_secs(15)).await;
    let mut scraped = String::new();
    for _ in 0..50 {
        scraped = scrape_metrics(metrics_port).await;
        if scraped.contains("name=\"failed_total\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for series in [
        "switchyard_plugin_counter_total{plugin=\"stats\",tenant=\"\",name=\"delivered_total\"} 1",
        "switchyard_plugin_counter_total{plugin=\"stats\",tenant=\"\",name=\"failed_total\"} 1",
        "switchyard_plugin_counter_total{plugin=\"stats\",tenant=\"\",name=\"delivered_total_switchyard_test\"} 1",
        "switchyard_deliveries_total{status=\"sent\",tenant=\"\"} 1",
        "switchyard_deliveries_total{status=\"bounced\",tenant=\"\"} 1",
    ] {
        assert!(scraped.contains(series), "{series} missing from:\n{scraped}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spf_and_dmarc_results_reach_the_data_hook_and_the_message() {
    let dns = DnsServer::start().await;
    dns.txt("pass.test", "v=spf1 ip4:127.0.0.1 -all");
    dns.txt("_dmarc.pass.test", "v=DMARC1; p=reject");
    dns.txt("fail.test", "v=spf1 -all");
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let rules = "[plugin.config]\nrules = [\n\
        { spf = \"fail\", action = \"reject\", reply = \"550 5.7.23 SPF check failed\" },\n\
        { dmarc = \"pass\", action = \"add-header\", name = \"X-Dmarc\", value = \"pass\" },\n\
    ]\n";
    let router = Router::start(RouterOptions {
        dns: Some(dns.address),
        // 127.0.0.1 is not a trusted network here: its mail is checked like the internet's.
        relay: "domains = [\"switchyard.test\"]\nnetworks = []\n".to_string(),
        extra: plugin("filter", "content-filter", rules),
        ..RouterOptions::relaying_to(sink.address, "")
    })
    .await;
    let mut client = TestClient::connect(router.port).await;
    let aligned = "From: s@pass.test\r\nTo: b@switchyard.test\r\nSubject: aligned\r\n\r\nHi.\r\n";
    client
        .send_accepted("s@pass.test", &["b@switchyard.test"], aligned)
        .await;
    let forged = "From: s@fail.test\r\nSubject: forged\r\n\r\nHi.\r\n";
    assert_eq!(
        client
            .send_mail("s@fail.test", &["b@switchyard.test"], forged)
            .await
            .text,
        "550 5.7.23 SPF check failed"
    );
    // A result the sender wrote itself, claiming to be this server's, is removed.
    let unknown = "Authentication-Results: mx.switchyard.test; dmarc=pass header.from=unknown.test\r\nFrom: s@unknown.test\r\nSubject: unknown\r\n\r\nHi.\r\n";
    client
        .send_accepted("s@unknown.test", &["b@switchyard.test"], unknown)
        .await;

    let received = sink.wait_for(2, Duration::from_secs(15)).await;
    let data = |subject: &str| -> String {
        received
            .iter()
            .find(|m| m.data.contains(&format!("Subject: {subject}")))
            .map(|m| m.data.clone())
            .unwrap_or_else(|| panic!("no message {subject}"))
    };
    let aligned = data("aligned");
    // The host's header comes before the Received header it added; the plugin's edit is above.
    let results_at = aligned
        .find("Authentication-Results: mx.switchyard.test;")
        .unwrap_or_else(|| panic!("no Authentication-Results in:\n{aligned}"));
    assert!(
        results_at < aligned.find("Received: ").unwrap_or(0),
        "{aligned}"
    );
    for expected in [
        "spf=pass",
        "smtp.mailfrom=s@pass.test",
        "dmarc=pass",
        "header.from=pass.test",
        "X-Dmarc: pass",
    ] {
        assert!(
            aligned.contains(expected),
            "{expected} missing from:\n{aligned}"
        );
    }
    let unknown = data("unknown");
    assert!(unknown.contains("spf=none"), "{unknown}");
    assert!(
        !unknown.contains("dmarc=pass"),
        "a forged result survived:\n{unknown}"
    );
    assert!(!unknown.contains("X-Dmarc"), "{unknown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_from_one_file_keep_their_own_config_and_state() {
    // Two policies from the same component, each with its own config.
    let first = "[plugin.config]\nblocked_helo = [\"first.example\"]\n\
        helo_reply = \"550 5.7.1 refused by the first\"\n";
    let second = "[plugin.config]\nblocked_helo = [\"second.example\"]\n\
        helo_reply = \"550 5.7.1 refused by the second\"\n";
    let (router, _sink) = router_with(&format!(
        "{}{}",
        plugin("first", "client-policy", first),
        plugin("second", "client-policy", second)
    ))
    .await;
    let mut client = TestClient::connect_raw(router.port).await;
    assert_eq!(client.reply().await.code, 220);
    assert_eq!(
        client.command("EHLO first.example").await.text,
        "550 5.7.1 refused by the first"
    );
    assert_eq!(
        client.command("EHLO second.example").await.text,
        "550 5.7.1 refused by the second"
    );
    assert_eq!(client.command("EHLO third.example").await.code, 250);
    let listed = router.plugins(&["list"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains("first") && listed.contains("second"),
        "{listed}"
    );

    // State: two rate limits from one file, two messages a sender each. Were their kv counts
    // one, each MAIL would count twice and the second would be refused.
    let limit =
        "grants = [\"kv\", \"metrics\"]\n[plugin.config]\nper_sender = { limit = 2, window_seconds = 3600 }\n";
    let (router, _sink) = router_with(&format!(
        "{}{}",
        plugin("limit-a", "rate-limit", limit),
        plugin("limit-b", "rate-limit", limit)
    ))
    .await;
    let mut client = TestClient::connect(router.port).await;
    for _ in 0..2 {
        assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
        assert_eq!(client.command("RSET").await.code, 250);
    }
    assert_eq!(
        client.command("MAIL FROM:<s@sender.test>").await.code,
        450,
        "the third message is past each plugin's own limit"
    );
}

/// No plugin can get CR, LF or NUL past the host: not into a reply (a forged second reply), an
/// address (a smuggled command), a header field or an added recipient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_cannot_inject_line_breaks_or_nul() {
    let settings = "grants = [\"kv\"]\n[plugin.config]\nmode = \"inject\"\n";
    let (router, sink) = router_with(&plugin("misbehave", "misbehave", settings)).await;
    let mut client = TestClient::connect(router.port).await;
    assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
    client
        .send(b"RCPT TO:<victim@switchyard.test>\r\nRCPT TO:<rewrite@switchyard.test>\r\nRCPT TO:<b@switchyard.test>\r\nNOOP\r\n")
        .await;
    assert_eq!(
        client.reply().await.text,
        "550 5.7.1 refused  250 2.1.5 Ok  (a forged second reply)",
        "one reply line, whatever the plugin's text holds"
    );
    assert_eq!(
        client.reply().await.text,
        "451 4.3.0 Temporary policy failure, try again later",
        "a rewrite into an invalid address is refused"
    );
    assert_eq!(client.reply().await.text, "250 2.1.5 Ok");
    assert_eq!(
        client.reply().await.text,
        "250 2.0.0 Ok",
        "the NOOP, in step"
    );
    let reply = client.command("DATA").await;
    assert_eq!(reply.code, 354);
    client
        .send(b"From: s@sender.test\r\nSubject: original\r\n\r\nbody\r\n.\r\n")
        .await;
    assert_eq!(client.reply().await.code, 250);
    let received = sink.wait_for(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.received().len(), 1);
    let message = &received[0];
    assert_eq!(
        message.rcpt_to,
        vec!["b@switchyard.test"],
        "no recipient was added"
    );
    assert!(
        message.data.contains("X-Clean: yes\r\n"),
        "{}",
        message.data
    );
    assert!(
        message.data.contains("Subject: original\r\n"),
        "{}",
        message.data
    );
    for injected in ["Bcc:", "Injected", "X-Nul", "X-Injected", "\0"] {
        assert!(
            !message.data.contains(injected),
            "{injected:?} in {}",
            message.data
        );
    }
    let log = router.log();
    assert!(log.contains("plugin header edit ignored"), "{log}");
    assert!(log.contains("plugin added an invalid recipient"), "{log}");
    assert!(
        log.contains("a plugin rewrote an address into an invalid one"),
        "{log}"
    );
}

/// An instance that takes over a pool slot never sees what the slot's previous instance wrote:
/// not in its static data (restored from the snapshot) nor in fresh heap pages (given back to
/// the kernel). The plugin looks before it writes, in every transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_slots_never_show_what_the_last_instance_wrote() {
    let settings =
        "grants = [\"kv\"]\nmemory_limit = 16777216\n[plugin.config]\nmode = \"remember\"\n";
    let (router, _sink) = router_with(&plugin("misbehave", "misbehave", settings)).await;
    let mut client = TestClient::connect(router.port).await;
    for round in 0..20 {
        assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
        let reply = client.command("RCPT TO:<victim@switchyard.test>").await;
        assert_eq!(reply.text, "550 5.7.1 wiped", "transaction {round}");
        // The check can fail: the same instance, asked again, finds its own mark.
        let reply = client.command("RCPT TO:<victim@switchyard.test>").await;
        assert_eq!(
            reply.text, "550 5.7.1 leaked: the static",
            "transaction {round}"
        );
        assert_eq!(client.command("RSET").await.code, 250);
    }
    // Sessions side by side draw on several slots; each starts clean too.
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut client = TestClient::connect(router.port).await;
        assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
        clients.push(client);
    }
    for client in &mut clients {
        let reply = client.command("RCPT TO:<victim@switchyard.test>").await;
        assert_eq!(reply.text, "550 5.7.1 wiped");
    }
    let log = router.log();
    assert!(!log.contains("plugin failed"), "{log}");
}

/// A plugin built against WIT 0.2.0 as released (its frozen copy, not the SDK) loads in this
/// 0.2.1 host: its `kv@0.2.0` import is linked to the host's kv and its `hooks@0.2.0` export is
/// found; it counts recipients and refuses the third.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_built_for_wit_0_2_0_still_loads_and_runs() {
    let settings = format!("grants = [\"kv\"]\n{KV_TIME_LIMIT}\n[plugin.config]\nlimit = 2\n");
    let (router, _sink) = router_with(&plugin("old", "kv-counter-0-2-0", &settings)).await;
    let mut client = TestClient::connect(router.port).await;
    assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
    for n in 1..=2 {
        let reply = client
            .command(&format!("RCPT TO:<r{n}@switchyard.test>"))
            .await;
        assert_eq!(reply.code, 250, "{reply:?}");
    }
    let reply = client.command("RCPT TO:<r3@switchyard.test>").await;
    assert_eq!(reply.code, 550, "{reply:?}");
    assert!(
        reply.text.contains("refused by a 0.2.0 plugin"),
        "{reply:?}"
    );
}
