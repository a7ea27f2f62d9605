//! Traffic shaping: a destination's rule paces what goes to it, and a destination that answers
//! "slow down" in bulk is backed off, visibly, until it recovers or the operator says so.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::admin::{http, router_with_api, router_with_api_and, TOKEN};
use crate::harness::client::{message, TestClient};
use crate::harness::dns::DnsServer;
use crate::harness::router::{Router, RouterOptions};
use crate::harness::sink::{Rule, Sink};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_of_ten_a_second_holds_within_ten_percent_over_three_hundred_messages() {
    const MESSAGES: usize = 300;
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let router = Router::start(RouterOptions {
        extra: "[[shaping]]\ndomain = \"*\"\nrate = \"10/s\"\n".to_string(),
        ..RouterOptions::relaying_to(sink.address, "")
    })
    .await;
    // The backlog builds faster than it may drain, while the sink is watched.
    let port = router.port;
    let sending = tokio::spawn(async move {
        let mut client = TestClient::connect(port).await;
        for n in 0..MESSAGES {
            client
                .send_accepted(
                    "s@sender.test",
                    &["r@elsewhere.test"],
                    &message(&format!("paced {n}")),
                )
                .await;
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut first = None;
    let mut counts = Vec::new();
    let mut mark = Instant::now();
    while sink.received().len() < MESSAGES {
        let now = Instant::now();
        if now.duration_since(mark) >= Duration::from_secs(1) {
            counts.push(sink.received().len());
            mark = now;
        }
        if first.is_none() && !sink.received().is_empty() {
            first = Some(now);
        }
        assert!(
            now < deadline,
            "{} of {MESSAGES} delivered",
            sink.received().len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = first.expect("a first delivery").elapsed();
    sending.await.expect("every message sent");
    let subjects: std::collections::HashSet<String> = sink
        .received()
        .iter()
        .filter_map(|m| {
            m.data
                .lines()
                .find(|l| l.starts_with("Subject:"))
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        subjects.len(),
        MESSAGES,
        "each message once: {}",
        router.log().matches("status=sent").count()
    );
    // 299 intervals of 100 ms after the first.
    let expected = Duration::from_millis(100 * (MESSAGES as u64 - 1));
    assert!(
        took >= expected.mul_f64(0.9) && took <= expected.mul_f64(1.1),
        "{MESSAGES} messages at 10/s took {took:?}, expected {expected:?} within 10 %; delivered by each second: {counts:?}"
    );
}

/// The destination's entry in `GET /v1/destinations`, if it has one.
async fn destination(api: u16, key: &str) -> Option<serde_json::Value> {
    let (status, body) = http(api, "GET", "/v1/destinations", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let all: Vec<serde_json::Value> = serde_json::from_str(&body).expect("JSON");
    all.into_iter().find(|d| d["destination"] == key)
}

/// The back-off level in force for `key` (0: none).
async fn backoff_level(api: u16, key: &str) -> u64 {
    destination(api, key)
        .await
        .and_then(|d| d["backoff"]["level"].as_u64())
        .unwrap_or(0)
}

/// Polls until `check` holds for the back-off level of `key`, or fails after `limit`.
async fn wait_for_level(api: u16, key: &str, limit: Duration, check: impl Fn(u64) -> bool) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        let level = backoff_level(api, key).await;
        if check(level) {
            return level;
        }
        assert!(
            Instant::now() < deadline,
            "back-off level of {key} stayed {level}: {:?}",
            destination(api, key).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const BACKING_OFF: &str = "[[shaping]]\ndomain = \"*\"\nrate = \"40/s\"\n\
    backoff_after = 2\nbackoff_window = \"10s\"\nbackoff_factor = 0.25\n\
    backoff_floor = \"4/s\"\nbackoff_period = \"2s\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_answering_421_to_every_fifth_message_is_backed_off_then_restored_in_steps() {
    let sick = Arc::new(AtomicBool::new(true));
    let rule: Rule = {
        let sick = sick.clone();
        Arc::new(move |_, attempt| {
            (sick.load(Ordering::SeqCst) && attempt % 5 == 0)
                .then(|| "421 4.7.0 try again later".to_string())
        })
    };
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, Some(rule)).await;
    let (router, api, _secrets) = router_with_api(sink.address.port(), BACKING_OFF).await;
    let key = format!("[{}]", sink.address);
    let port = router.port;
    let send = |count: usize, tag: &'static str| {
        tokio::spawn(async move {
            let mut client = TestClient::connect(port).await;
            for n in 0..count {
                client
                    .send_accepted(
                        "s@sender.test",
                        &["r@elsewhere.test"],
                        &message(&format!("{tag} {n}")),
                    )
                    .await;
            }
        })
    };
    let first = send(60, "sick");
    // Two 421s within the window start it; two more (at the cut rate) take it to the floor.
    wait_for_level(api, &key, Duration::from_secs(15), |level| level >= 2).await;
    let entry = destination(api, &key)
        .await
        .expect("the destination is listed");
    let backoff = &entry["backoff"];
    assert_eq!(backoff["rate"].as_f64(), Some(4.0), "at the floor: {entry}");
    assert_eq!(entry["rate_allowed"].as_f64(), Some(4.0), "{entry}");
    assert_eq!(entry["rate_limit"], "40/s", "{entry}");
    let reasons = backoff["reasons"].to_string();
    assert!(reasons.contains("421 4.7.0 try again later"), "{entry}");
    // While it lasts, the backlog drains at the cut rate, not the rule's 40/s.
    let before = sink.received().len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let drained = sink.received().len() - before;
    assert!(
        drained <= 6,
        "{drained} messages in a second at a cut rate of 4/s"
    );
    let listed = router.queue(&["list", "--by-destination"]);
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(
        listed.contains(&key) && listed.contains("BACKING OFF: level 2 at 4.00/s"),
        "{listed}"
    );
    let explained = router.queue(&["backoff"]);
    let explained = String::from_utf8_lossy(&explained.stdout).into_owned();
    assert!(
        explained.contains("reply: 421 4.7.0 try again later"),
        "{explained}"
    );
    // Healthy again: one step back per period (2 s), then the rule's rate.
    sick.store(false, Ordering::SeqCst);
    let step = wait_for_level(api, &key, Duration::from_secs(5), |level| level == 1).await;
    assert_eq!(step, 1);
    wait_for_level(api, &key, Duration::from_secs(5), |level| level == 0).await;
    let entry = destination(api, &key).await.expect("listed");
    assert_eq!(entry["rate_allowed"].as_f64(), Some(40.0), "{entry}");
    first.await.expect("every message accepted");
    // The rest of the backlog goes at the full rate.
    let deadline = Instant::now() + Duration::from_secs(20);
    let deferred = || router.log().matches("status=deferred").count();
    while sink.received().len() + deferred() < 60 {
        assert!(Instant::now() < deadline, "{}", router.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(router
        .log()
        .contains("destination asks to slow down: rate cut"));

    // A back-off the operator ends: the rule's rate applies at once.
    sick.store(true, Ordering::SeqCst);
    let second = send(20, "again");
    wait_for_level(api, &key, Duration::from_secs(15), |level| level >= 1).await;
    let cancelled = router.queue(&["backoff", &key, "--cancel"]);
    assert!(
        cancelled.status.success(),
        "{}",
        String::from_utf8_lossy(&cancelled.stderr)
    );
    sick.store(false, Ordering::SeqCst);
    assert_eq!(backoff_level(api, &key).await, 0);
    let (status, _) = http(
        api,
        "DELETE",
        &format!("/v1/destinations/{}/backoff", key.replace(':', "%3A")),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 404, "no back-off left to cancel");
    second.await.expect("accepted");

    // A rule edited at a reload applies to the back-offs in force: here it turns them off.
    sick.store(true, Ordering::SeqCst);
    let third = send(20, "reloaded");
    wait_for_level(api, &key, Duration::from_secs(15), |level| level >= 1).await;
    let config = std::fs::read_to_string(&router.config_path).expect("config");
    let edited = config.replace("backoff_after = 2", "backoff_on = []");
    std::fs::write(&router.config_path, edited).expect("edit the config");
    let (status, body) = http(api, "POST", "/v1/plugins/reload", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(backoff_level(api, &key).await, 0);
    sick.store(false, Ordering::SeqCst);
    third.await.expect("accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn this_hosts_own_temporary_failures_never_back_a_destination_off() {
    // Nothing listens at the smarthost: every attempt fails here, with 4.4.1, which the rule
    // names, and a single such reply would be enough.
    let nowhere = crate::harness::router::free_port();
    let rule = "[[shaping]]\ndomain = \"*\"\nrate = \"40/s\"\n\
                backoff_on = [\"4.4.1\", \"421\", \"connection refused\"]\nbackoff_after = 1\n";
    let (router, api, _secrets) = router_with_api(nowhere, rule).await;
    let mut client = TestClient::connect(router.port).await;
    for n in 0..5 {
        client
            .send_accepted(
                "s@sender.test",
                &["r@elsewhere.test"],
                &message(&format!("n {n}")),
            )
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while router.log().matches("status=deferred").count() < 5 {
        assert!(Instant::now() < deadline, "{}", router.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let key = format!("[127.0.0.1:{nowhere}]");
    assert_eq!(backoff_level(api, &key).await, 0);
    assert!(!router.log().contains("slow down"), "{}", router.log());
}

/// Waits until the sink's connections satisfy `check`, or fails after `limit`.
async fn wait_for_connections(
    sink: &Sink,
    limit: Duration,
    check: impl Fn(crate::harness::sink::Connections) -> bool,
) {
    let deadline = Instant::now() + limit;
    while !check(sink.connections()) {
        assert!(Instant::now() < deadline, "{:?}", sink.connections());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends one message and waits until the sink has `delivered` in all.
async fn send_one(client: &mut TestClient, sink: &Sink, subject: &str, delivered: usize) {
    client
        .send_accepted("s@sender.test", &["r@elsewhere.test"], &message(subject))
        .await;
    wait_for_connections(sink, Duration::from_secs(10), |_| {
        sink.received().len() == delivered
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_reused_within_its_time_and_closed_after_it() {
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let rule = "[[shaping]]\ndomain = \"*\"\nidle_timeout = \"1500ms\"\n";
    let (router, api, _secrets) = router_with_api(sink.address.port(), rule).await;
    let key = format!("[{}]", sink.address);
    let mut client = TestClient::connect(router.port).await;
    send_one(&mut client, &sink, "first", 1).await;
    // Delivered, nothing more to send: the connection stays open, idle (parked once the
    // worker has recorded the delivery, just after the sink's 250).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let entry = destination(api, &key).await.expect("listed");
        if entry["connections_idle"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never idle: {entry}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sink.connections().open, 1);
    send_one(&mut client, &sink, "second", 2).await;
    assert_eq!(
        sink.connections().total,
        1,
        "the second message went over the idle connection"
    );
    // Past its idle time it is closed (with QUIT: the sink sees it end).
    wait_for_connections(&sink, Duration::from_secs(5), |c| c.open == 0).await;
    let entry = destination(api, &key).await.expect("listed");
    assert_eq!(entry["connections_idle"], 0, "{entry}");
    send_one(&mut client, &sink, "third", 3).await;
    assert_eq!(
        sink.connections().total,
        2,
        "a new connection after the idle time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_the_server_closed_costs_a_new_connection_not_a_deferral() {
    // The sink drops its connections while one is idle: it is dead when the next message
    // comes, and the router finds out with RSET before using it.
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let rule = "[[shaping]]\ndomain = \"*\"\nidle_timeout = \"5s\"\n";
    let (router, _api, _secrets) = router_with_api(sink.address.port(), rule).await;
    let mut client = TestClient::connect(router.port).await;
    send_one(&mut client, &sink, "first", 1).await;
    sink.drop_connections();
    wait_for_connections(&sink, Duration::from_secs(5), |c| c.open == 0).await;
    send_one(&mut client, &sink, "second", 2).await;
    assert_eq!(sink.connections().total, 2);
    assert!(
        !router.log().contains("status=deferred"),
        "{}",
        router.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_sending_to_one_destination_share_its_rate_by_their_parts() {
    let tenants = tempfile::tempdir().expect("tempdir");
    for (name, domain, percent) in [("acme", "acme.test", 75), ("bravo", "bravo.test", 25)] {
        std::fs::write(
            tenants.path().join(format!("{name}.toml")),
            format!("domains = [\"{domain}\"]\n[limits]\ndestination_rate_percent = {percent}\n"),
        )
        .expect("tenant file");
    }
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let router = Router::start(RouterOptions {
        extra: format!(
            "[[shaping]]\ndomain = \"*\"\nrate = \"20/s\"\nconnections = 4\n\n\
             [tenants]\ndirectory = \"{}\"\n",
            tenants.path().display()
        ),
        ..RouterOptions::relaying_to(sink.address, "")
    })
    .await;
    let port = router.port;
    let send = |to: &'static str, count: usize| {
        tokio::spawn(async move {
            let mut client = TestClient::connect(port).await;
            for n in 0..count {
                client
                    .send_accepted("s@sender.test", &[to], &message(&format!("{to} {n}")))
                    .await;
            }
        })
    };
    let acme = send("a@acme.test", 90);
    let bravo = send("b@bravo.test", 45);
    let counts = |sink: &Sink| {
        let received = sink.received();
        let of = |to: &str| received.iter().filter(|m| m.rcpt_to[0] == to).count();
        (of("a@acme.test"), of("b@bravo.test"))
    };
    // Once both backlogs are under way, three seconds of the destination's 20/s.
    let deadline = Instant::now() + Duration::from_secs(20);
    while sink.received().len() < 10 {
        assert!(Instant::now() < deadline, "{}", router.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (a0, b0) = counts(&sink);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (a1, b1) = counts(&sink);
    let (a, b) = (a1 - a0, b1 - b0);
    let bravo_part = b as f64 / (a + b) as f64;
    eprintln!("acme {a}, bravo {b} in 3 s");
    assert!(
        (0.15..=0.35).contains(&bravo_part),
        "acme sent {a} and bravo {b} in 3 s: bravo's part {bravo_part:.2}, expected 0.25"
    );
    assert!(
        (50..=70).contains(&(a + b)),
        "{} messages in 3 s at 20/s: the parts use the whole rate, and no more",
        a + b
    );
    acme.await.expect("acme's messages accepted");
    bravo.await.expect("bravo's messages accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domains_whose_mx_hosts_one_rule_names_share_its_rate() {
    let rule = "[[shaping]]\nmx = \"*.provider.test\"\nrate = \"10/s\"\n";
    let hosts = [
        &["one-test.mx.provider.test"][..],
        &["two-test.mx.provider.test"],
    ];
    two_domains_share_one_pace(rule, hosts, "mx:*.provider.test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domains_with_the_same_mx_hosts_share_a_rate_kept_by_mx_set() {
    // other.test has a rule of its own, without a rate.
    let rule = "[[shaping]]\ndomain = \"*\"\nrate = \"10/s\"\nby_mx_set = true\n\n\
                [[shaping]]\ndomain = \"other.test\"\n";
    let set = &["mx1.shared.test", "mx2.shared.test"][..];
    two_domains_share_one_pace(rule, [set, set], "site:mx1.shared.test,mx2.shared.test").await;
}

/// Mail for one.test and two.test (with MX hosts `hosts`), paced by `rule` at 10/s shared,
/// shown as destination `site`, and mail for other.test, which the shared pace must not hold.
async fn two_domains_share_one_pace(rule: &str, hosts: [&[&str]; 2], site: &str) {
    let dns = DnsServer::start().await;
    let port = crate::harness::router::free_port();
    let address = std::net::Ipv4Addr::new(127, 0, 0, 41);
    for (domain, hosts) in [
        ("one.test", hosts[0]),
        ("two.test", hosts[1]),
        ("other.test", &["mx.other.test"][..]),
    ] {
        for (n, host) in hosts.iter().enumerate() {
            dns.mx(domain, 10 * (n as u16 + 1), host);
            dns.a(host, address);
        }
    }
    let sink = Sink::start(std::net::IpAddr::V4(address), port, None).await;
    let (router, api, _secrets) = router_with_api_and(RouterOptions {
        dns: Some(dns.address),
        delivery_port: port,
        extra: rule.to_string(),
        ..RouterOptions::default()
    })
    .await;
    // The two domains' forty go in first, from four sessions at once, so that a backlog
    // builds however slowly this machine takes mail in; other.test's ten follow.
    let port = router.port;
    let senders: Vec<_> = (0..4)
        .map(|session| {
            tokio::spawn(async move {
                let mut client = TestClient::connect(port).await;
                for n in 0..10 {
                    let to = if n % 2 == 0 {
                        "r@one.test"
                    } else {
                        "r@two.test"
                    };
                    let text = message(&format!("{to} {session} {n}"));
                    client.send_accepted("s@sender.test", &[to], &text).await;
                }
            })
        })
        .collect();
    for sender in senders {
        sender.await.expect("the provider's messages accepted");
    }
    let mut client = TestClient::connect(router.port).await;
    for n in 0..10 {
        let text = message(&format!("other {n}"));
        client
            .send_accepted("s@sender.test", &["r@other.test"], &text)
            .await;
    }
    let received = sink.wait_for(50, Duration::from_secs(30)).await;
    // The two domains share the 10/s: their 40 messages take about 3.9 s, not
    // the 1.9 s they would each at 10/s.
    let arrivals: Vec<Instant> = received.iter().map(|m| m.arrived).collect();
    let provider: Vec<Instant> = received
        .iter()
        .filter(|m| m.rcpt_to[0] != "r@other.test")
        .map(|m| m.arrived)
        .collect();
    let took = provider[39] - provider[0];
    assert!(
        took >= Duration::from_millis(3500),
        "40 messages to two domains at a shared 10/s took {took:?}"
    );
    // other.test, queued behind the backlog, overtakes it: held to the shared pace, its
    // ten would have waited for every one of the forty.
    let other_last = received
        .iter()
        .filter(|m| m.rcpt_to[0] == "r@other.test")
        .map(|m| m.arrived)
        .max()
        .expect("other.test's messages");
    let overtaken = provider.iter().filter(|at| **at > other_last).count();
    assert!(
        overtaken >= 5,
        "other.test waited for the shared pace ({overtaken} overtaken): {arrivals:?}"
    );
    let (_, body) = http(api, "GET", "/v1/destinations", Some(TOKEN)).await;
    let all: Vec<serde_json::Value> = serde_json::from_str(&body).expect("JSON");
    let site = all
        .iter()
        .find(|d| d["destination"] == site)
        .unwrap_or_else(|| panic!("the site is listed: {body}"));
    assert_eq!(site["rate_limit"], "10/s", "{site}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_time_seconds_away_is_waited_for_without_a_connection() {
    // 20/m: a message every 3 s. The connection is not kept open for that long.
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let router = Router::start(RouterOptions {
        extra: "[[shaping]]\ndomain = \"*\"\nrate = \"20/m\"\n".to_string(),
        ..RouterOptions::relaying_to(sink.address, "")
    })
    .await;
    let mut client = TestClient::connect(router.port).await;
    for n in 0..3 {
        client
            .send_accepted(
                "s@sender.test",
                &["r@elsewhere.test"],
                &message(&format!("slow {n}")),
            )
            .await;
    }
    let first = sink.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(first.len(), 1);
    // Between the sends the sink has no connection from the router.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(sink.connections().open, 0, "{:?}", sink.connections());
    let all = sink.wait_for(3, Duration::from_secs(15)).await;
    let gap = all[2].arrived - all[1].arrived;
    assert!(gap >= Duration::from_millis(2700), "{gap:?}");
    assert_eq!(sink.connections().total, 3, "one connection per message");
}
