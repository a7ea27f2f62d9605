//! Rolling out a plugin: a canary decides for its share of the transactions, the same version
//! decides a message from its first hook to its delivery, `plugins promote` / `rollback` finish
//! or undo it under load without a failed transaction, and recorded traffic replayed against a
//! changed configuration shows exactly what it would decide differently.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::client::{message, TestClient};
use crate::harness::process::{OutputWithin, COMMAND_LIMIT};
use crate::harness::router::{plugin_path, stdout, Router};
use crate::plugins::{generation, plugin, router_with};

/// The live `gate` refuses `victim@` at RCPT (`misbehave`, mode `seed`); its canary (`noop`)
/// takes every recipient and, unlike the live one, implements the route and delivery hooks.
fn gate_with_canary(percent: u32) -> String {
    plugin(
        "gate",
        "misbehave",
        &format!(
            "grants = [\"kv\"]\ncanary = {{ path = \"{}\", percent = {percent} }}\n[plugin.config]\nmode = \"seed\"\n",
            plugin_path("noop").display()
        ),
    )
}

/// Transactions of `clients` connections at once, `each` per connection: MAIL, RCPT victim@,
/// RSET. Returns how many of them the victim was accepted in (the canary decided).
async fn victims_accepted(port: u16, clients: usize, each: usize) -> usize {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        tasks.push(tokio::spawn(async move {
            let mut client = TestClient::connect(port).await;
            let mut accepted = 0;
            for _ in 0..each {
                assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
                let reply = client.command("RCPT TO:<victim@switchyard.test>").await;
                match reply.code {
                    250 => accepted += 1,
                    550 => assert!(reply.text.contains("seed"), "{reply:?}"),
                    _ => panic!("neither version answered that: {reply:?}"),
                }
                assert_eq!(client.command("RSET").await.code, 250);
            }
            accepted
        }));
    }
    let mut accepted = 0;
    for task in tasks {
        accepted += task.await.expect("client");
    }
    accepted
}

/// Polls `queue trace ID` until the message's delivery is in it.
async fn delivered_trace(router: &Router, id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let output = router.queue(&["trace", id]);
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        if text.contains("  delivery  ") {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no delivery in the trace of {id}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_takes_its_share_and_keeps_each_message_through_delivery() {
    let (router, sink) = router_with(&gate_with_canary(50)).await;
    // 200 transactions: the canary's share is binomial(200, 0.5), 100 ± 7 (3 sd: 79..121).
    let accepted = victims_accepted(router.port, 4, 50).await;
    assert!(
        (79..=121).contains(&accepted),
        "the canary decided {accepted} of 200 transactions"
    );
    let listing = stdout(&router.plugins(&["list"]));
    assert!(
        listing.contains("-  gate~canary  canary of gate  percent=50  sha256="),
        "{listing}"
    );

    // Messages: the version that decided at RCPT also routes and delivers it.
    let mut client = TestClient::connect(router.port).await;
    let mut sent = Vec::new();
    for n in 0..24 {
        assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
        let victim = client.command("RCPT TO:<victim@switchyard.test>").await;
        assert_eq!(
            client
                .command("RCPT TO:<friend@switchyard.test>")
                .await
                .code,
            250
        );
        assert_eq!(client.command("DATA").await.code, 354);
        client
            .send(format!("{}.\r\n", message(&format!("m{n}"))).as_bytes())
            .await;
        let reply = client.reply().await;
        assert_eq!(reply.code, 250, "{reply:?}");
        let id = reply.text.rsplit(' ').next().expect("queue id").to_string();
        sent.push((id, victim.code == 250));
    }
    let received = sink.wait_for(sent.len(), Duration::from_secs(30)).await;
    let delivered: usize = received.iter().map(|message| message.rcpt_to.len()).sum();
    let accepted: usize = sent
        .iter()
        .map(|(_, canary)| 1 + usize::from(*canary))
        .sum();
    assert_eq!(
        delivered, accepted,
        "every recipient accepted was delivered"
    );
    let route = format!("{:<15} gate~canary", "route");
    let data_by = |who: &str| format!("{:<15} {who}  ", "data");
    let (mut canaries, mut lives) = (0, 0);
    for (id, canary) in &sent {
        let timeline = delivered_trace(&router, id).await;
        if *canary {
            canaries += 1;
            assert!(
                timeline.contains(&data_by("gate~canary")) && timeline.contains(&route),
                "{id} was the canary's at RCPT, so at DATA and routing too:\n{timeline}"
            );
        } else {
            lives += 1;
            assert!(
                timeline.contains(&data_by("gate")) && !timeline.contains("gate~canary"),
                "{id} was the live plugin's at RCPT, so to the end:\n{timeline}"
            );
        }
    }
    assert!(canaries > 0 && lives > 0, "both versions took messages");
}

/// Connections sending messages (to `friend@`, which both versions take) until `stop`;
/// returns each one's count and the replies that were not 250.
fn load(port: u16, stop: &Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<(usize, Vec<String>)>> {
    (0..3)
        .map(|index| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut client = TestClient::connect(port).await;
                let (mut sent, mut failures) = (0, Vec::new());
                while !stop.load(Ordering::SeqCst) {
                    let reply = client
                        .send_mail(
                            "s@sender.test",
                            &["friend@switchyard.test"],
                            &message(&format!("load {index}-{sent}")),
                        )
                        .await;
                    if reply.code != 250 {
                        failures.push(reply.text);
                    }
                    sent += 1;
                }
                (sent, failures)
            })
        })
        .collect()
}

/// Waits until the global chain is at `wanted` or later.
async fn generation_reaches(router: &Router, wanted: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while generation(router) < wanted {
        assert!(
            Instant::now() < deadline,
            "generation {wanted} never came:\n{}",
            router.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_and_rollback_switch_under_load_without_a_failed_transaction() {
    let noop_digest = sha256_hex(&plugin_path("noop"));
    let pinned = format!("sha256 = \"{}\"\n", sha256_hex(&plugin_path("misbehave")));
    // A pinned plugin's canary is pinned too.
    let (router, sink) = router_with(
        &gate_with_canary(50)
            .replacen("canary = ", &format!("{pinned}canary = "), 1)
            .replacen(
                "percent = 50 }",
                &format!("percent = 50, sha256 = \"{noop_digest}\" }}"),
                1,
            ),
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let senders = load(router.port, &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Rollback: the live version alone decides; the file keeps its pin and loses the canary.
    let output = router.plugins(&["rollback", "gate"]);
    let said = stdout(&output);
    assert!(said.contains("gate: canary"), "{said}");
    assert!(said.contains("rolled back"), "{said}");
    let config = std::fs::read_to_string(&router.config_path).expect("config");
    assert!(
        !config.contains("canary") && config.contains(&pinned),
        "{config}"
    );
    assert_eq!(
        victims_accepted(router.port, 2, 10).await,
        0,
        "only the live plugin decides"
    );

    // A canary again (the operator edits the file), then promote under the same load.
    std::fs::write(
        &router.config_path,
        config.replacen(
            &pinned,
            &format!(
                "{pinned}canary = {{ path = \"{}\", percent = 50, sha256 = \"{noop_digest}\" }}\n",
                plugin_path("noop").display()
            ),
            1,
        ),
    )
    .expect("write config");
    let before = generation(&router);
    generation_reaches(&router, before + 1).await;
    let listing = stdout(&router.plugins(&["list"]));
    assert!(
        listing.contains("gate~canary  canary of gate  percent=50"),
        "{listing}"
    );
    let output = router.plugins(&["promote", "gate"]);
    assert!(stdout(&output).contains("promoted"), "{output:?}");
    let config = std::fs::read_to_string(&router.config_path).expect("config");
    assert!(
        !config.contains("canary")
            && config.contains(&format!("path = \"{}\"", plugin_path("noop").display()))
            && config.contains(&format!("sha256 = \"{noop_digest}\"")),
        "the candidate is the plugin now, pinned to its digest:\n{config}"
    );
    assert_eq!(
        victims_accepted(router.port, 2, 10).await,
        20,
        "only the candidate decides"
    );
    let listing = stdout(&router.plugins(&["list"]));
    assert!(
        listing.contains("-  gate  generation=")
            && listing.contains(&noop_digest)
            && !listing.contains("~canary"),
        "{listing}"
    );

    // Nothing left to promote: a clear error, and the file untouched.
    let output = router.plugins(&["promote", "gate"]);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("plugin `gate` has neither a canary nor a shadow to promote"),
        "{output:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&router.config_path).expect("config"),
        config
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for sender in senders {
        let (sent, failures) = sender.await.expect("sender");
        assert!(failures.is_empty(), "failed transactions: {failures:?}");
        total += sent;
    }
    assert!(total > 20, "the load ran ({total} messages)");
    sink.wait_for(total, Duration::from_secs(30)).await;
}

fn sha256_hex(path: &std::path::Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(
        std::fs::read(path).expect("plugin file"),
    ))
}

/// Runs `switchyard plugins replay` against the configuration at `config`.
pub(crate) fn replay(
    recordings: &std::path::Path,
    config: &std::path::Path,
) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["plugins", "replay", "--recording"])
        .arg(recordings)
        .arg("--config")
        .arg(config)
        .output_within(COMMAND_LIMIT)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_replayed_against_a_changed_config_reports_exactly_the_changed_verdicts() {
    let chain = [
        plugin(
            "clients",
            "client-policy",
            "[plugin.config]\nblocked_helo = [\"bad.example\"]\nhelo_reply = \"550 5.7.1 Not that name\"\n",
        ),
        plugin(
            "aliases",
            "address-rewrite",
            "[plugin.config]\nrecipients = { \"info@switchyard.test\" = \"team@switchyard.test\" }\n",
        ),
        plugin(
            "filter",
            "content-filter",
            "[plugin.config]\nrules = [{ header = \"Subject\", contains = \"[spam]\", action = \"reject\", reply = \"550 5.7.1 Looks like spam\" }]\n",
        ),
    ]
    .concat();
    let (router, sink) = router_with(&format!(
        "[record]\ndirectory = \"recordings\"\npercent = 100\nbodies = true\n\n{chain}"
    ))
    .await;
    let recordings = router.dir.path().join("recordings");

    // One message rewritten and delivered, one refused at DATA, one client refused at EHLO.
    let mut client = TestClient::connect(router.port).await;
    client
        .send_accepted(
            "s@sender.test",
            &["info@switchyard.test"],
            &message("hello"),
        )
        .await;
    let refused = client
        .send_mail(
            "s@sender.test",
            &["friend@switchyard.test"],
            &message("[spam] buy now"),
        )
        .await;
    assert_eq!(refused.code, 550, "{refused:?}");
    assert_eq!(client.command("QUIT").await.code, 221);
    let mut stranger = TestClient::connect_raw(router.port).await;
    assert_eq!(stranger.reply().await.code, 220);
    assert_eq!(stranger.command("EHLO bad.example").await.code, 550);
    assert_eq!(stranger.command("QUIT").await.code, 221);
    sink.wait_for(1, Duration::from_secs(15)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let files = || {
        std::fs::read_dir(&recordings)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|entry| entry.path().extension().is_some_and(|e| e == "json"))
                    .count()
            })
            .unwrap_or(0)
    };
    while files() < 3 {
        assert!(
            Instant::now() < deadline,
            "recordings: {}\n{}",
            files(),
            router.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The same configuration decides the same.
    let same = replay(&recordings, &router.config_path);
    let said = String::from_utf8_lossy(&same.stdout).into_owned();
    assert!(
        same.status.success(),
        "{said}\n{}",
        String::from_utf8_lossy(&same.stderr)
    );
    assert!(
        said.contains(", 0 changed, 0 data steps not replayed"),
        "{said}"
    );

    // Another alias and another refusal text: exactly those two verdicts change.
    let original = std::fs::read_to_string(&router.config_path).expect("config");
    let changed_path = router.dir.path().join("candidate.toml");
    std::fs::write(
        &changed_path,
        original
            .replace("\"team@switchyard.test\"", "\"help@switchyard.test\"")
            .replace("Looks like spam", "No spam here"),
    )
    .expect("write candidate");
    let changed = replay(&recordings, &changed_path);
    let said = String::from_utf8_lossy(&changed.stdout).into_owned();
    assert!(!changed.status.success(), "a change fails the run:\n{said}");
    assert!(
        String::from_utf8_lossy(&changed.stderr).contains("2 verdicts changed"),
        "{}",
        String::from_utf8_lossy(&changed.stderr)
    );
    assert_eq!(said.matches("changed  message ").count(), 2, "{said}");
    assert!(
        said.contains("rcpt-to  <info@switchyard.test>\n  was: continue, rewrite <team@switchyard.test>\n  now: continue, rewrite <help@switchyard.test>\n"),
        "{said}"
    );
    assert!(
        said.contains("data  from <s@sender.test>\n  was: reject 550 5.7.1 Looks like spam\n  now: reject 550 5.7.1 No spam here\n"),
        "{said}"
    );
    // Nothing was sent by the replays: the sink has the one message it had.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.received().len(), 1);
}
