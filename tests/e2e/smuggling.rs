//! SMTP smuggling (CVE-2023-51764 and kin), the whole family, generated: every line ending
//! `{CR, LF, CRLF, NUL, nothing}` before a dot × `{CR, LF, CRLF, NUL}` after it, each followed by
//! a complete second transaction in the same write, in DATA and in BDAT, in plain text and after
//! STARTTLS, through the built-in default and through the example chain of five plugins, relayed
//! to a sink that (like many real servers) ends DATA at any line that is a dot. The second
//! transaction is a message of its own only when the first really ended with `<CRLF>.<CRLF>` in
//! DATA; in every other case it never reaches the sink as one.

use std::time::Duration;

use crate::harness::client::{Reply, TestClient};
use crate::harness::router::{plugin_path, tls_section, Router, RouterOptions};
use crate::harness::sink::Sink;

const BEFORE: [(&str, &str); 5] = [
    ("CR", "\r"),
    ("LF", "\n"),
    ("CRLF", "\r\n"),
    ("NUL", "\0"),
    ("nothing", ""),
];
const AFTER: [(&str, &str); 4] = [("CR", "\r"), ("LF", "\n"), ("CRLF", "\r\n"), ("NUL", "\0")];

/// How the router must answer the first message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expected {
    /// Accepted (its content may hold the second transaction's text).
    Accepted,
    /// Refused for a bare CR or LF, and the connection closed.
    RefusedAndClosed,
    /// Refused for a NUL; the session goes on.
    RefusedNul,
}

fn expected(before: &str, after: &str) -> Expected {
    let bare = |ending: &str| ending == "\r" || ending == "\n";
    if bare(before) || bare(after) {
        Expected::RefusedAndClosed
    } else if before == "\0" || after == "\0" {
        Expected::RefusedNul
    } else {
        Expected::Accepted
    }
}

/// Where the test's mail goes: the domain the router relays to the sink.
struct Target {
    router: Router,
    sink: Sink,
    domain: &'static str,
    /// The router's name, as its replies give it.
    hostname: &'static str,
    _certificates: tempfile::TempDir,
}

/// The built-in default (no plugins), relaying everything to the sink, with STARTTLS.
async fn builtin() -> Target {
    let certificates = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let router = Router::start(RouterOptions {
        extra: tls_section(certificates.path()),
        ..RouterOptions::relaying_to(sink.address, "")
    })
    .await;
    Target {
        router,
        sink,
        domain: "switchyard.test",
        hostname: "mx.switchyard.test",
        _certificates: certificates,
    }
}

/// The README's example configuration and its five plugins, with its route for example.test
/// pointed at the sink and STARTTLS added.
async fn example_chain() -> Target {
    let certificates = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/switchyard.toml"
    ))
    .expect("read the example configuration");
    let plugins = plugin_path("noop")
        .parent()
        .expect("plugin directory")
        .display()
        .to_string();
    let tls = tls_section(certificates.path());
    let sink_address = sink.address.to_string();
    let router = Router::start_with(|dir, port| {
        let config = example
            .replace("../target/wasm32-wasip2/plugin", &plugins)
            .replace(
                "data_dir = \"../switchyard-data\"",
                &format!("data_dir = \"{}\"", dir.display()),
            )
            .replace(
                "../switchyard-data/mailboxes",
                &dir.join("mailboxes").display().to_string(),
            )
            .replace("127.0.0.1:2525", &format!("127.0.0.1:{port}"))
            .replace("127.0.0.1:2526", &sink_address)
            .replace("listen = \"127.0.0.1:9425\"", "")
            // Its kv writes wait for a durable commit, which the rest of the suite can slow
            // past the default 100 ms; this test is about framing, not plugin time limits.
            .replace(
                "grants = [\"kv\", \"metrics\"]",
                "grants = [\"kv\", \"metrics\"]\ntime_limit = \"5s\"",
            );
        assert!(
            config.contains(&sink_address),
            "the example's route changed"
        );
        format!("{config}\n{tls}")
    })
    .await;
    Target {
        router,
        sink,
        domain: "example.test",
        hostname: "mx.example.test",
        _certificates: certificates,
    }
}

/// Every reply until the server closes the connection.
async fn replies_until_closed(client: &mut TestClient) -> Vec<Reply> {
    let mut replies = Vec::new();
    while let Some(reply) = tokio::time::timeout(Duration::from_secs(30), client.reply_checked())
        .await
        .expect("the server answers or closes within 30 s")
    {
        replies.push(reply);
    }
    replies
}

/// One attempt: the first message with `before` `.` `after` in its body and the whole second
/// transaction in one write, then QUIT. Returns every reply after the first message's `354` (or
/// after its RCPT for BDAT).
async fn attempt(
    target: &Target,
    tls: bool,
    bdat: bool,
    before: &str,
    after: &str,
    tag: &str,
) -> Vec<Reply> {
    let domain = target.domain;
    let mut client = TestClient::connect(target.router.port).await;
    if tls {
        client = client.starttls().await;
    }
    // A sender per attempt: the example chain limits messages per sender.
    let reply = client
        .command(&format!("MAIL FROM:<alice.{tag}@acc.test>"))
        .await;
    assert_eq!(reply.code, 250, "{tag}: {reply:?}");
    let reply = client.command(&format!("RCPT TO:<bob@{domain}>")).await;
    assert_eq!(reply.code, 250, "{tag}: {reply:?}");
    let first = format!(
        "From: alice@acc.test\r\nTo: bob@{domain}\r\nSubject: outer {tag}\r\n\r\nbody1{before}.{after}"
    );
    let second = format!(
        "MAIL FROM:<admin@acc.test>\r\nRCPT TO:<victim@{domain}>\r\nDATA\r\n\
         From: admin@acc.test\r\nTo: victim@{domain}\r\nSubject: SMUGGLED {tag}\r\n\r\n\
         smuggled body\r\n.\r\n"
    );
    let content = format!("{first}{second}");
    if bdat {
        let mut bytes = format!("BDAT {} LAST\r\n", content.len()).into_bytes();
        bytes.extend_from_slice(content.as_bytes());
        bytes.extend_from_slice(b"QUIT\r\n");
        client.send(&bytes).await;
    } else {
        let reply = client.command("DATA").await;
        assert_eq!(reply.code, 354, "{tag}: {reply:?}");
        client.send(format!("{content}QUIT\r\n").as_bytes()).await;
    }
    replies_until_closed(&mut client).await
}

fn codes(replies: &[Reply]) -> Vec<u16> {
    replies.iter().map(|reply| reply.code).collect()
}

/// The header section of a message as the sink got it.
fn headers(data: &str) -> &str {
    data.split("\r\n\r\n").next().unwrap_or(data)
}

async fn whole_family(target: Target) {
    // (tag, whether the second transaction is rightly a message of its own)
    let mut accepted = Vec::new();
    for tls in [false, true] {
        for bdat in [false, true] {
            for (before_name, before) in BEFORE {
                for (after_name, after) in AFTER {
                    let tag = format!(
                        "{}-{}-{before_name}-{after_name}",
                        if tls { "tls" } else { "plain" },
                        if bdat { "bdat" } else { "data" }
                    );
                    let replies = attempt(&target, tls, bdat, before, after, &tag).await;
                    let control = !bdat && before == "\r\n" && after == "\r\n";
                    let shown: Vec<&str> = replies.iter().map(|r| r.text.as_str()).collect();
                    if control {
                        // A real end of data: two transactions, both legitimate.
                        assert_eq!(
                            codes(&replies),
                            [250, 250, 250, 354, 250, 221],
                            "{tag}: {shown:?}"
                        );
                        accepted.push((tag, true));
                        continue;
                    }
                    match expected(before, after) {
                        Expected::Accepted => {
                            assert_eq!(codes(&replies), [250, 221], "{tag}: {shown:?}");
                            accepted.push((tag, false));
                        }
                        Expected::RefusedAndClosed => {
                            let closing = format!(
                                "421 4.5.2 {} closing connection after malformed message content",
                                target.hostname
                            );
                            assert_eq!(
                                shown,
                                [
                                    "550 5.5.2 Bare LF or CR in message content is not allowed; lines must end with CRLF",
                                    closing.as_str(),
                                ],
                                "{tag}: refused, then closed before QUIT was read"
                            );
                        }
                        Expected::RefusedNul => {
                            assert_eq!(
                                shown,
                                [
                                    "550 5.6.0 NUL characters in message content are not allowed",
                                    "221 2.0.0 Bye"
                                ],
                                "{tag}"
                            );
                        }
                    }
                }
            }
        }
    }
    let expected_messages: usize = accepted
        .iter()
        .map(|(_, second_too)| if *second_too { 2 } else { 1 })
        .sum();
    target
        .sink
        .wait_for(expected_messages, Duration::from_secs(30))
        .await;
    // Anything smuggled would arrive with the rest; give it time to.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = target.sink.received();
    assert_eq!(
        received.len(),
        expected_messages,
        "no message beyond those accepted"
    );
    for message in &received {
        let own_headers = headers(&message.data);
        let Some(tag) = own_headers
            .lines()
            .find_map(|line| line.strip_prefix("Subject: SMUGGLED "))
        else {
            continue;
        };
        assert!(
            accepted
                .iter()
                .any(|(accepted_tag, second_too)| *second_too && accepted_tag == tag),
            "smuggled message {tag} arrived as a message of its own: {message:?}"
        );
        assert_eq!(message.mail_from, "admin@acc.test");
    }
    // Each accepted first message arrived whole, with the second transaction's text inside it
    // when that was not a real one.
    for (tag, second_too) in &accepted {
        let outer = received
            .iter()
            .find(|message| {
                let subject = format!("Subject: outer {tag}");
                headers(&message.data).lines().any(|line| line == subject)
            })
            .unwrap_or_else(|| panic!("outer {tag} not delivered"));
        if !second_too {
            assert!(
                outer
                    .data
                    .contains(&format!("Subject: SMUGGLED {tag}\r\n\r\nsmuggled body\r\n")),
                "{tag}: the second transaction stays content: {:?}",
                outer.data
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_smuggling_through_the_builtin_default() {
    whole_family(builtin().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_smuggling_through_the_example_chain() {
    whole_family(example_chain().await).await;
}
