//! Policy you can see: the decision trace of refused transactions and of delivered messages
//! (`queue trace`, `queue traces`), plugins' refusals in the log, pinned plugin digests, and
//! the circuit breaker.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::client::{message, TestClient};
use crate::harness::process::{OutputWithin, COMMAND_LIMIT};
use crate::harness::router::{free_port, plugin_path, scrape_metrics, stdout, Router};
use crate::harness::sink::Sink;
use crate::plugins::{generation, plugin, router_with};

/// The digest `sha256sum` (coreutils, not our code) prints for a plugin's component.
fn sha256sum(crate_name: &str) -> String {
    let output = Command::new("sha256sum")
        .arg(plugin_path(crate_name))
        .output_within(COMMAND_LIMIT);
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_string()
}

/// Polls `plugins list` (the server refreshes it every second) until it shows all of `wanted`.
async fn listing_with(router: &Router, wanted: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listing = stdout(&router.plugins(&["list"]));
        if wanted.iter().all(|part| listing.contains(part)) {
            return listing;
        }
        assert!(Instant::now() < deadline, "never {wanted:?}:\n{listing}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `queue trace ID` (records are written in batches) until `wanted` all show.
pub(crate) async fn trace_with(router: &Router, id: &str, wanted: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let output = router.queue(&["trace", id]);
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        if wanted.iter().all(|line| text.contains(line)) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "trace of {id} never showed {wanted:?}:\n{text}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_at_rcpt_and_a_routed_delivery_each_show_their_timeline() {
    let special = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let routes = format!(
        "[plugin.config]\nroutes = [{{ domain = \"routed.test\", smarthost = \"{}\", tls = \"none\" }}]\n",
        special.address
    );
    let chain = plugin(
        "gate",
        "misbehave",
        "grants = [\"kv\"]\n[plugin.config]\nmode = \"seed\"\n",
    ) + &plugin("routes", "static-routes", &routes);
    let (router, _sink) = router_with(&chain).await;

    // A transaction whose only recipient the gate refuses: nothing is queued.
    let mut client = TestClient::connect(router.port).await;
    assert_eq!(
        client.command("MAIL FROM:<spammer@sender.test>").await.code,
        250
    );
    let refused = client.command("RCPT TO:<victim@switchyard.test>").await;
    assert_eq!(refused.code, 550, "{refused:?}");
    assert_eq!(client.command("QUIT").await.code, 221);

    // A message the route hook sends to its smarthost.
    let mut client = TestClient::connect(router.port).await;
    let id = client
        .send_accepted("s@sender.test", &["a@routed.test"], &message("routed"))
        .await;
    special.wait_for(1, Duration::from_secs(15)).await;

    let gate = sha256sum("misbehave");
    let routes_digest = sha256sum("static-routes");
    let timeline = trace_with(
        &router,
        &id,
        &[
            &format!(
                "smtp  message {id}  client 127.0.0.1  from <s@sender.test>  to <a@routed.test>"
            ),
            "rcpt-to         gate  <a@routed.test>  continue",
            &format!("=> queued as {id}"),
            "route           routes  <a@routed.test>  hop smarthost 127.0.0.1:",
            "tls=none",
            &format!("a@routed.test -> [127.0.0.1:{}]", special.address.port()),
            "delivery",
            "a@routed.test: delivered (250",
            &format!("gate: generation 1, sha256 {gate}"),
            &format!("routes: generation 1, sha256 {routes_digest}"),
        ],
    )
    .await;
    // In time order: the transaction, its routing, then the attempt.
    let (smtp, route, delivery) = (
        timeline.find("  smtp  ").expect("smtp"),
        timeline.find("  route  ").expect("route"),
        timeline.find("  delivery  ").expect("delivery"),
    );
    assert!(smtp < route && route < delivery, "{timeline}");

    // The same as JSON, one record per line.
    let json = stdout(&router.queue(&["trace", &id, "--json"]));
    let records: Vec<serde_json::Value> = json
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON"))
        .collect();
    assert_eq!(records[0]["phase"], "smtp");
    assert_eq!(records[0]["message_id"], id.as_str());
    assert_eq!(records[0]["calls"][0]["hook"], "rcpt-to");
    assert_eq!(records[0]["calls"][0]["verdict"], "continue");
    assert!(records[0]["calls"][0]["micros"].as_u64().is_some());
    assert_eq!(records[0]["plugins"][0]["sha256"], gate.as_str());
    assert_eq!(records[1]["phase"], "route");
    assert_eq!(records[1]["calls"][0]["verdict"], "hop");

    // The refused transaction has no queue id: found by client, sender and time.
    let refused = stdout(&router.queue(&["traces", "--client", "127.0.0.1", "--since", "10m"]));
    assert!(
        refused.contains("smtp  client 127.0.0.1  from <spammer@sender.test>")
            && refused
                .contains("rcpt-to         gate  <victim@switchyard.test>  reject 550 5.7.1 seed")
            && refused.contains("=> reject at rcpt-to by plugin gate: 550 5.7.1 seed")
            && refused.contains("-- 1 refused transaction(s)"),
        "{refused}"
    );
    let by_sender = stdout(&router.queue(&["traces", "--sender", "spammer@sender.test"]));
    assert!(
        by_sender.contains("-- 1 refused transaction(s)"),
        "{by_sender}"
    );
    let nobody = stdout(&router.queue(&["traces", "--sender", "nobody@sender.test"]));
    assert!(nobody.contains("-- 0 refused transaction(s)"), "{nobody}");
    let unknown = router.queue(&["trace", "NOSUCHID"]);
    assert!(!unknown.status.success());

    // Every refusal by a plugin is logged with the plugin's name.
    router
        .log_with(&[
            "plugin refused plugin=gate",
            "hook=\"rcpt-to\"",
            "subject=\"victim@switchyard.test\"",
        ])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_plugin_with_another_digest_refuses_to_load_and_the_old_generation_keeps_serving()
{
    let digest = sha256sum("misbehave");
    let wrong = "0".repeat(64);
    // A wrong pin: the router does not start, and says why.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("wrong.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n{}",
            dir.path().join("data").display(),
            plugin(
                "gate",
                "misbehave",
                &format!(
                    "sha256 = \"{wrong}\"\ngrants = [\"kv\"]\n[plugin.config]\nmode = \"seed\"\n"
                )
            )
        ),
    )
    .expect("config");
    let check = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check-config"])
        .arg(&config)
        .output_within(COMMAND_LIMIT);
    let said = String::from_utf8_lossy(&check.stderr);
    assert!(!check.status.success(), "{said}");
    assert!(
        said.contains(&format!(
            "has sha256 {digest}, but the manifest pins {wrong}; refusing to load it"
        )),
        "{said}"
    );

    // The right pin (as sha256sum prints it, upper case too) loads.
    let pinned = |pin: &str, mode: &str| {
        plugin(
            "gate",
            "misbehave",
            &format!("sha256 = \"{pin}\"\ngrants = [\"kv\"]\n[plugin.config]\nmode = \"{mode}\"\n"),
        )
    };
    let (router, _sink) = router_with(&pinned(&digest.to_uppercase(), "seed")).await;
    let listing = stdout(&router.plugins(&["list"]));
    assert!(listing.contains(&format!("sha256={digest}")), "{listing}");

    // A reload whose pin no longer matches keeps generation 1 serving.
    let current = std::fs::read_to_string(&router.config_path).expect("config");
    std::fs::write(
        &router.config_path,
        current
            .replace(&digest.to_uppercase(), &wrong)
            .replace("mode = \"seed\"", "mode = \"session\""),
    )
    .expect("rewrite");
    let _ = router.plugins(&["reload"]);
    let listing = {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let listing = stdout(&router.plugins(&["list"]));
            if listing.contains("last reload failed") {
                break listing;
            }
            assert!(Instant::now() < deadline, "{listing}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    assert!(
        listing.contains("but the manifest pins 0000") && listing.contains("refusing to load it"),
        "{listing}"
    );
    assert_eq!(generation(&router), 1);
    let mut client = TestClient::connect(router.port).await;
    assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
    let reply = client.command("RCPT TO:<victim@switchyard.test>").await;
    assert!(
        reply.text.contains("seed"),
        "the pinned generation still decides: {reply:?}"
    );
}

/// `check-config` of these plugin tables: whether it passed, and what it said.
fn check_plugins(plugins: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("switchyard.toml");
    let text = format!(
        "data_dir = \"{}\"\n{plugins}",
        dir.path().join("data").display()
    );
    std::fs::write(&config, text).expect("config");
    let check = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("check-config")
        .arg(&config)
        .output_within(COMMAND_LIMIT);
    (
        check.status.success(),
        String::from_utf8_lossy(&check.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_plugin_runs_only_pinned_candidates_and_cache_entries_made_from_its_bytes() {
    let gate = sha256sum("misbehave");
    let noop = sha256sum("noop");
    let pinned = |candidate: &str| {
        plugin(
            "gate",
            "misbehave",
            &format!(
                "sha256 = \"{gate}\"\ngrants = [\"kv\"]\n{candidate}\n[plugin.config]\nmode = \"seed\"\n"
            ),
        )
    };
    let noop_path = plugin_path("noop").display().to_string();

    // Unpinned candidates of a pinned plugin are refused, with the reason.
    for candidate in [
        format!("shadow = \"{noop_path}\""),
        format!("canary = {{ path = \"{noop_path}\", percent = 50 }}"),
    ] {
        let (passed, said) = check_plugins(&pinned(&candidate));
        assert!(!passed, "{candidate}: {said}");
        let kind = if candidate.starts_with("shadow") {
            "shadow"
        } else {
            "canary"
        };
        assert!(
            said.contains(&format!(
                "plugin `gate` is pinned (sha256), so its {kind} must be pinned too"
            )),
            "{said}"
        );
    }
    // A pinned shadow whose file is another: refused like the plugin itself.
    let wrong = "0".repeat(64);
    let (passed, said) = check_plugins(&pinned(&format!(
        "shadow = {{ path = \"{noop_path}\", sha256 = \"{wrong}\" }}"
    )));
    assert!(!passed);
    assert!(
        said.contains(&format!(
            "plugin `gate~shadow`: {noop_path} has sha256 {noop}, but the manifest pins {wrong}"
        )),
        "{said}"
    );

    // Pinned both: it runs, and the shadow is asked.
    let (mut router, _sink) = router_with(&format!(
        "{}{}",
        pinned(&format!(
            "shadow = {{ path = \"{noop_path}\", sha256 = \"{noop}\" }}"
        )),
        plugin("other", "noop", "")
    ))
    .await;
    let (reply, _) = rcpt(&router, "victim@switchyard.test").await;
    assert!(reply.contains("seed"), "{reply}");
    listing_with(&router, &["gate~shadow  candidate of gate"]).await;

    // Someone who can write the cache swaps compilations: every entry of the gate's becomes a
    // copy of noop's. At the next start they are refused and compiled again, so the pinned code
    // still decides.
    router.terminate();
    router.wait_exit(Duration::from_secs(20)).await;
    let cache = router.dir.path().join("plugin-cache");
    let entries: Vec<_> = std::fs::read_dir(&cache)
        .expect("the plugin cache")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "cwasm"))
        .collect();
    let noop_entry = entries
        .iter()
        .find(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with(&noop))
        })
        .expect("noop's compilation is cached under its digest")
        .clone();
    let mut swapped = 0;
    for entry in &entries {
        if *entry != noop_entry {
            std::fs::copy(&noop_entry, entry).expect("swap");
            swapped += 1;
        }
    }
    assert!(swapped >= 1, "{entries:?}");
    router.spawn().await;
    let (reply, _) = rcpt(&router, "victim@switchyard.test").await;
    assert!(reply.contains("seed"), "the pinned plugin decides: {reply}");
    router
        .log_with(&[
            "compiled plugin cache entry ignored",
            "made from other bytes than the component being loaded",
        ])
        .await;
}

/// A new transaction's answer to `RCPT TO:<recipient>`, and how long it took.
async fn rcpt(router: &Router, recipient: &str) -> (String, Duration) {
    let mut client = TestClient::connect(router.port).await;
    assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
    let started = Instant::now();
    let reply = client.command(&format!("RCPT TO:<{recipient}>")).await;
    (reply.text, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_plugin_trips_its_breaker_and_is_called_again_after_the_cooldown() {
    let settings = "grants = [\"kv\"]\ntime_limit = \"300ms\"\nbreaker = { failures = 2, window = \"1m\", cooldown = \"3s\" }\n[plugin.config]\nmode = \"loop\"\n";
    let metrics = free_port();
    let (router, _sink) = router_with(&format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n",
        plugin("spinner", "misbehave", settings)
    ))
    .await;
    let failed = "451 4.3.0 plugin spinner failed, try again later";
    // Two transactions that each spend the plugin's whole time limit: the circuit opens.
    for _ in 0..2 {
        let (reply, took) = rcpt(&router, "victim@switchyard.test").await;
        assert_eq!(reply, failed);
        assert!(took >= Duration::from_millis(250), "{took:?}");
    }
    router
        .log_with(&["plugin circuit opened", "plugin=spinner"])
        .await;
    listing_with(&router, &["circuit=open(", "trips=1"]).await;
    // Open: the failure policy answers at once, without calling the plugin.
    let (reply, took) = rcpt(&router, "victim@switchyard.test").await;
    assert_eq!(reply, failed);
    assert!(
        took < Duration::from_millis(200),
        "skipped, not called: {took:?}"
    );
    listing_with(&router, &["skipped=1"]).await;
    let page = scrape_metrics(metrics).await;
    for series in [
        "switchyard_plugin_circuit_open{plugin=\"spinner\",tenant=\"\"} 1",
        "switchyard_plugin_circuit_trips_total{plugin=\"spinner\",tenant=\"\"} 1",
        "switchyard_plugin_skipped_total{plugin=\"spinner\",tenant=\"\"} 1",
        "switchyard_plugin_failures_total{plugin=\"spinner\",tenant=\"\",kind=\"Timeout\"} 2",
        "switchyard_plugin_call_seconds_bucket{plugin=\"spinner\",tenant=\"\",hook=\"rcpt-to\",le=\"0.5\"} 2",
    ] {
        assert!(page.contains(series), "{series} missing:\n{page}");
    }
    // After the cool-down the next call is the trial; it succeeds and closes the circuit.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let (reply, _) = rcpt(&router, "friend@switchyard.test").await;
    assert!(reply.starts_with("250 "), "{reply}");
    router
        .log_with(&["plugin circuit closed", "plugin=spinner"])
        .await;
    listing_with(&router, &["circuit=closed", "trips=1"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_candidate_is_asked_and_counted_but_the_live_verdict_rules() {
    // Live: refuses `victim@` at RCPT. Candidate: `noop`, which answers continue to everything.
    let settings = format!(
        "grants = [\"kv\"]\nshadow = \"{}\"\n[plugin.config]\nmode = \"seed\"\n",
        plugin_path("noop").display()
    );
    let metrics = free_port();
    let (router, sink) = router_with(&format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n",
        plugin("gate", "misbehave", &settings)
    ))
    .await;
    let mut client = TestClient::connect(router.port).await;
    assert_eq!(client.command("MAIL FROM:<s@sender.test>").await.code, 250);
    let refused = client.command("RCPT TO:<victim@switchyard.test>").await;
    assert_eq!(refused.code, 550, "the live plugin decides: {refused:?}");
    assert_eq!(client.command("RSET").await.code, 250);
    let id = client
        .send_accepted(
            "s@sender.test",
            &["friend@switchyard.test"],
            &message("both agree"),
        )
        .await;
    sink.wait_for(1, Duration::from_secs(15)).await;
    // rcpt-to twice (one disagreement, one agreement) and data once (agreement).
    let listing = listing_with(
        &router,
        &[
            "-  gate~shadow  candidate of gate",
            "agree=2  disagree=1  failures=0",
        ],
    )
    .await;
    assert!(
        listing.contains(&format!("sha256={}", sha256sum("noop"))),
        "{listing}"
    );
    let page = scrape_metrics(metrics).await;
    for series in [
        "switchyard_plugin_shadow_total{plugin=\"gate\",hook=\"rcpt-to\",result=\"disagree\"} 1",
        "switchyard_plugin_shadow_total{plugin=\"gate\",hook=\"rcpt-to\",result=\"agree\"} 1",
        "switchyard_plugin_shadow_total{plugin=\"gate\",hook=\"data\",result=\"agree\"} 1",
    ] {
        assert!(page.contains(series), "{series} missing:\n{page}");
    }
    // The trace shows both answers, the candidate's marked as agreeing or not.
    let timeline = trace_with(
        &router,
        &id,
        &[
            "rcpt-to         gate  <friend@switchyard.test>  continue",
            "rcpt-to         gate~shadow  <friend@switchyard.test>  continue [agrees]",
            "data            gate~shadow  continue [agrees]",
            &format!("gate~shadow: generation 1, sha256 {}", sha256sum("noop")),
        ],
    )
    .await;
    assert!(!timeline.contains("disagrees"), "{timeline}");
    let refused = stdout(&router.queue(&["traces", "--sender", "s@sender.test"]));
    assert!(
        refused.contains("rcpt-to         gate  <victim@switchyard.test>  reject 550 5.7.1 seed")
            && refused.contains(
                "rcpt-to         gate~shadow  <victim@switchyard.test>  continue [disagrees]"
            ),
        "{refused}"
    );
}
