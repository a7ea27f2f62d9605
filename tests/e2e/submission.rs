//! SMTP AUTH on a submission listener: offered only over TLS, PLAIN and LOGIN checked against
//! the users file (hashes made by `switchyard auth hash`), relaying for authenticated clients
//! only, and the `auth` hook refusing an identity whose password was right.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use crate::harness::client::{message, TestClient};
use crate::harness::peers::python;
use crate::harness::process::{OutputWithin, COMMAND_LIMIT};
use crate::harness::router::{plugin_path, tls_section, Router, RouterOptions};
use crate::harness::sink::Sink;

pub const ALICE: &str = "alice@example.test";
pub const ALICE_PASSWORD: &str = "correct horse battery";
const MALLORY: &str = "mallory@example.test";
const MALLORY_PASSWORD: &str = "s3cret";

/// `switchyard auth hash` for `password`.
fn hash(password: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["auth", "hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run auth hash");
    writeln!(child.stdin.take().expect("stdin"), "{password}").expect("write password");
    let output = crate::harness::process::wait_within(
        child,
        crate::harness::process::COMMAND_LIMIT,
        "auth hash",
    );
    assert!(output.status.success());
    let hash = String::from_utf8(output.stdout).expect("utf-8");
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    hash.trim().to_string()
}

pub struct Submission {
    pub router: Router,
    pub sink: Sink,
    /// The TLS files ([`tls_section`]), and the users file.
    pub files: tempfile::TempDir,
}

/// A router with one submission listener, TLS, two accounts, no trusted networks, relaying to
/// a sink; `plugins` is appended to its configuration.
async fn submission(plugins: &str) -> Submission {
    submission_as("submission", plugins).await
}

/// [`submission`] with the listener's role (`submission` or `submissions`).
pub async fn submission_as(role: &'static str, plugins: &str) -> Submission {
    let files = tempfile::tempdir().expect("tempdir");
    let users = files.path().join("users");
    std::fs::write(
        &users,
        format!(
            "# SMTP AUTH accounts\n{ALICE}:{}\n{MALLORY}:{}\n",
            hash(ALICE_PASSWORD),
            hash(MALLORY_PASSWORD)
        ),
    )
    .expect("write users");
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let router = Router::start(RouterOptions {
        role,
        relay: "domains = [\"switchyard.test\"]\nnetworks = []\n".to_string(),
        delivery: format!("smarthost = \"{}\"\n", sink.address),
        extra: format!(
            "{}\n[submission]\nusers_file = \"{}\"\n\n{plugins}",
            tls_section(files.path()),
            users.display()
        ),
        ..RouterOptions::default()
    })
    .await;
    Submission {
        router,
        sink,
        files,
    }
}

fn plain(identity: &str, password: &str) -> String {
    STANDARD.encode(format!("\0{identity}\0{password}"))
}

/// Connects and reads the greeting; returns the client and its EHLO reply text.
async fn connect(port: u16) -> (TestClient, String) {
    let mut client = TestClient::connect_raw(port).await;
    assert_eq!(client.reply().await.code, 220);
    let ehlo = client.command("EHLO client.test").await;
    assert_eq!(ehlo.code, 250, "{ehlo:?}");
    (client, ehlo.text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_only_over_tls_and_only_authenticated_clients_relay() {
    let server = submission("").await;
    let (mut client, ehlo) = connect(server.router.port).await;
    assert!(!ehlo.contains("AUTH"), "AUTH offered before TLS: {ehlo}");
    let reply = client
        .command(&format!("AUTH PLAIN {}", plain(ALICE, ALICE_PASSWORD)))
        .await;
    assert_eq!(
        (reply.code, &reply.text[4..10]),
        (538, "5.7.11"),
        "{reply:?}"
    );
    let reply = client.command(&format!("MAIL FROM:<{ALICE}>")).await;
    assert_eq!(reply.code, 530, "{reply:?}");
    assert!(reply.text.contains("5.7.0 Authentication required"));

    let mut client = client.starttls().await;
    let ehlo = client.command("EHLO client.test").await;
    assert!(ehlo.text.contains("AUTH PLAIN LOGIN"), "{ehlo:?}");
    let reply = client.command(&format!("MAIL FROM:<{ALICE}>")).await;
    assert_eq!(
        reply.code, 530,
        "TLS alone is not authentication: {reply:?}"
    );
    let reply = client
        .command(&format!("AUTH PLAIN {}", plain(ALICE, "wrong password")))
        .await;
    assert_eq!(reply.code, 535, "{reply:?}");
    assert!(reply.text.contains("5.7.8"), "{reply:?}");
    let reply = client
        .command(&format!("AUTH PLAIN {}", plain(ALICE, ALICE_PASSWORD)))
        .await;
    assert_eq!(reply.code, 235, "{reply:?}");
    assert!(reply.text.contains("2.7.0"), "{reply:?}");
    let reply = client.command("AUTH PLAIN AGFAYg==").await;
    assert_eq!(reply.code, 503, "a second AUTH: {reply:?}");

    // Relaying to a domain that is not ours is what authentication buys.
    let reply = client
        .send_mail(ALICE, &["bob@elsewhere.example"], &message("submitted"))
        .await;
    assert_eq!(reply.code, 250, "{reply:?}");
    let reply = client
        .command(&format!("MAIL FROM:<{ALICE}> AUTH=<>"))
        .await;
    assert_eq!(
        reply.code, 250,
        "the AUTH= parameter (RFC 4954 5): {reply:?}"
    );
    client.command("QUIT").await;
    let received = server.sink.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(received[0].rcpt_to, vec!["bob@elsewhere.example"]);
    assert!(
        received[0].data.contains("with ESMTPSA id"),
        "RFC 3848 protocol name: {}",
        received[0].data
    );
    let log = server
        .router
        .log_with(&["authenticated", "authentication failed"])
        .await;
    assert!(log.contains("identity=alice@example.test"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_mechanism_and_broken_exchanges() {
    let server = submission("").await;
    let (client, _) = connect(server.router.port).await;
    let mut client = client.starttls().await;
    let reply = client.command("AUTH LOGIN").await;
    assert_eq!(reply.text, "334 VXNlcm5hbWU6", "Username: challenge");
    let reply = client.command(&STANDARD.encode(ALICE)).await;
    assert_eq!(reply.text, "334 UGFzc3dvcmQ6", "Password: challenge");
    let reply = client.command(&STANDARD.encode(ALICE_PASSWORD)).await;
    assert_eq!(reply.code, 235, "{reply:?}");

    let (client, _) = connect(server.router.port).await;
    let mut client = client.starttls().await;
    let reply = client.command("AUTH PLAIN").await;
    assert_eq!(reply.text, "334", "an empty challenge");
    let reply = client.command("*").await;
    assert_eq!(reply.code, 501, "cancelled: {reply:?}");
    assert!(reply.text.contains("5.7.0"));
    let reply = client.command("AUTH PLAIN not-base64!").await;
    assert_eq!(reply.code, 501, "{reply:?}");
    let reply = client.command("AUTH CRAM-MD5").await;
    assert_eq!(reply.code, 504, "{reply:?}");
    let reply = client.command("AUTH").await;
    assert_eq!(reply.code, 501, "{reply:?}");
    let reply = client
        .command(&format!(
            "AUTH PLAIN {}",
            plain("nobody@example.test", ALICE_PASSWORD)
        ))
        .await;
    assert_eq!(reply.code, 535, "unknown user: {reply:?}");
    let reply = client
        .command(&format!(
            "AUTH PLAIN {}",
            STANDARD.encode(format!("{MALLORY}\0{ALICE}\0{ALICE_PASSWORD}"))
        ))
        .await;
    assert_eq!(reply.code, 535, "acting as another user: {reply:?}");
    let reply = client.command("MAIL FROM:<x@example.test>").await;
    assert_eq!(reply.code, 530, "still not authenticated: {reply:?}");
    let reply = client
        .command(&format!("AUTH LOGIN {}", STANDARD.encode(MALLORY)))
        .await;
    assert_eq!(
        reply.text, "334 UGFzc3dvcmQ6",
        "LOGIN with an initial response"
    );
    let reply = client.command(&STANDARD.encode(MALLORY_PASSWORD)).await;
    assert_eq!(reply.code, 235, "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auth_hook_refuses_a_suspended_identity() {
    let plugin = format!(
        "[[plugin]]\nname = \"client-policy\"\npath = \"{}\"\n[plugin.config]\n\
         suspended_identities = [\"{MALLORY}\"]\nauth_reply = \"535 5.7.8 Account suspended\"\n",
        plugin_path("client-policy").display()
    );
    let server = submission(&plugin).await;
    let (client, _) = connect(server.router.port).await;
    let mut client = client.starttls().await;
    let reply = client
        .command(&format!("AUTH PLAIN {}", plain(MALLORY, MALLORY_PASSWORD)))
        .await;
    assert_eq!(reply.code, 535, "{reply:?}");
    assert!(reply.text.contains("Account suspended"), "{reply:?}");
    let reply = client
        .command(&format!("AUTH PLAIN {}", plain(ALICE, ALICE_PASSWORD)))
        .await;
    assert_eq!(reply.code, 235, "another identity is fine: {reply:?}");
    let log = server
        .router
        .log_with(&["authentication refused by plugin"])
        .await;
    assert!(log.contains("identity=mallory@example.test"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_listeners_do_not_offer_auth() {
    let router = Router::start(RouterOptions::default()).await;
    let (mut client, ehlo) = connect(router.port).await;
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    let reply = client.command("AUTH PLAIN AGFAYg==").await;
    assert_eq!(reply.code, 503, "{reply:?}");
    assert!(
        reply.text.contains("authentication not enabled"),
        "{reply:?}"
    );
}

/// The resident memory of process `pid`, in KiB (`VmRSS` in /proc).
fn resident_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("the router's /proc status")
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// 200 failed logins at once from 200 loopback addresses (so the per-address budget holds none
/// of them back): each check needs argon2's 19 MiB, and the server's resident memory must stay
/// within a bound while they run and fall back after them, because only a fixed number of
/// checks run at once, on workers that reuse their memory and give it back when idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_failed_logins_at_once_keep_memory_bounded_and_it_falls_back() {
    const LOGINS: usize = 200;
    /// What the logins may add to the resident memory at their peak: the checkers' block
    /// memory (19 MiB for each of at most 8 workers) and 200 TLS sessions.
    const PEAK_BOUND_KIB: u64 = 200 * 1024;
    /// What may be left some seconds after the burst.
    const AFTER_BOUND_KIB: u64 = 60 * 1024;
    let server = submission("[submission.auth_failures]\nlimit = 5\ndelay = \"10ms\"\n").await;
    let port = server.router.port;
    let pid = server.router.pid();
    let before = resident_kib(pid);
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while sampling.load(std::sync::atomic::Ordering::SeqCst) {
                peak = peak.max(resident_kib(pid));
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            peak
        })
    };
    let mut logins = Vec::new();
    for n in 0..LOGINS {
        let source = std::net::Ipv4Addr::new(127, 0, 2, u8::try_from(n + 1).expect("an octet"));
        logins.push(tokio::spawn(async move {
            let mut client = TestClient::connect_raw_from(source, port).await;
            assert_eq!(client.reply().await.code, 220);
            assert_eq!(client.command("EHLO client.test").await.code, 250);
            let mut client = client.starttls().await;
            client
                .command(&format!("AUTH PLAIN {}", plain(ALICE, "wrong")))
                .await
                .text
        }));
    }
    for login in logins {
        assert_eq!(
            login.await.expect("login"),
            "535 5.7.8 Authentication credentials invalid"
        );
    }
    sampling.store(false, std::sync::atomic::Ordering::SeqCst);
    let peak = sampler.await.expect("sampler");
    // The workers give their memory back after 5 s idle.
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    let after = resident_kib(pid);
    eprintln!("resident memory: {before} KiB before, {peak} KiB at the peak, {after} KiB after");
    assert!(
        peak.saturating_sub(before) < PEAK_BOUND_KIB,
        "{before} KiB before, {peak} KiB at the peak"
    );
    assert!(
        after.saturating_sub(before) < AFTER_BOUND_KIB,
        "{before} KiB before, {after} KiB after"
    );
}

/// Password guessing across sessions: 20 sessions of one wrong password each, as an attacker
/// would open them. Each failure is answered later than the last; the fifth bans the address,
/// and from then on it gets 421 4.7.0 at connect, right password or not, until the ban ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_guessing_across_sessions_is_slowed_then_banned() {
    let metrics_port = crate::harness::router::free_port();
    let server = submission(&format!(
        "[submission.auth_failures]\nlimit = 5\nwindow = \"10m\"\nban = \"4s\"\ndelay = \"100ms\"\n\n\
         [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"
    ))
    .await;
    let mut answers = Vec::new();
    let mut delays = Vec::new();
    for attempt in 0..20 {
        let mut client = TestClient::connect_raw(server.router.port).await;
        let greeting = client.reply().await;
        if greeting.code != 220 {
            answers.push(greeting.text);
            assert!(client.is_closed().await, "attempt {attempt}");
            continue;
        }
        assert_eq!(client.command("EHLO client.test").await.code, 250);
        let mut client = client.starttls().await;
        let started = std::time::Instant::now();
        let reply = client
            .command(&format!(
                "AUTH PLAIN {}",
                plain(ALICE, &format!("guess {attempt}"))
            ))
            .await;
        delays.push(started.elapsed());
        answers.push(reply.text);
        // The QUIT is answered 221, unless the session was closed after this failure.
        let _ = client.try_send(b"QUIT\r\n").await;
        match client.reply_checked().await {
            Some(reply) if reply.code == 221 => {}
            Some(reply) => answers.push(reply.text),
            None => answers.push("closed".to_string()),
        }
    }
    let failed = "535 5.7.8 Authentication credentials invalid";
    assert_eq!(&answers[..5], [failed; 5], "{answers:#?}");
    assert!(
        answers[5].starts_with(
            "421 4.7.0 Too many failed authentication attempts from 127.0.0.1; try again in"
        ),
        "the fifth failure ends its session with 421: {answers:#?}"
    );
    assert_eq!(answers.len(), 21, "{answers:#?}");
    for refused in &answers[6..] {
        assert!(
            refused.starts_with("421 4.7.0 Too many failed authentication attempts"),
            "{refused}"
        );
    }
    // 100, 200, 400, 800 and 1600 ms: each failure waits longer than the one before.
    for (n, delay) in delays.iter().enumerate() {
        let least = Duration::from_millis(100 << n);
        assert!(
            *delay >= least,
            "failure {n} answered after {delay:?}, before {least:?}"
        );
    }
    // Banned means banned: the right password does not get in either.
    let mut client = TestClient::connect_raw(server.router.port).await;
    assert_eq!(client.reply().await.code, 421);
    let metrics = crate::harness::router::scrape_metrics(metrics_port).await;
    assert!(
        metrics.contains("switchyard_auth_bans_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "switchyard_smtp_refused_total{listener=\"submission\",reason=\"auth_ban\"} 16"
        ),
        "{metrics}"
    );
    // The ban ends.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (client, _) = connect(server.router.port).await;
    let mut client = client.starttls().await;
    let reply = client
        .command(&format!("AUTH PLAIN {}", plain(ALICE, ALICE_PASSWORD)))
        .await;
    assert_eq!(reply.code, 235, "{reply:?}");
    server
        .router
        .log_with(&["client banned after failed authentication attempts"])
        .await;
}

/// The same budget as Python's smtplib sees it: `login` fails with 535 until the budget is
/// spent, and then the connection is refused with 421 before any command (smtplib raises
/// `SMTPConnectError`), right password or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtplib_sees_the_ban_at_connect() {
    let server = submission(
        "[submission.auth_failures]\nlimit = 3\nwindow = \"10m\"\nban = \"1m\"\ndelay = \"10ms\"\n",
    )
    .await;
    let script = r#"
import smtplib, ssl, sys
port, user, good = int(sys.argv[1]), sys.argv[2], sys.argv[3]
context = ssl.create_default_context()
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
for attempt in range(5):
    password = good if attempt == 4 else "guess %d" % attempt
    try:
        client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    except smtplib.SMTPConnectError as error:
        print("connect", error.smtp_code, error.smtp_error.decode().split(";")[0])
        continue
    client.starttls(context=context)
    client.ehlo()
    # One mechanism, so one attempt per session (login() would try LOGIN after PLAIN).
    client.user, client.password = user, password
    try:
        client.auth("PLAIN", client.auth_plain)
        print("logged in", end="")
    except smtplib.SMTPAuthenticationError as error:
        print("auth", error.smtp_code, end="")
    try:
        print(" quit", client.docmd("QUIT")[0])
    except smtplib.SMTPServerDisconnected:
        print(" quit: disconnected")
    client.close()
"#;
    let port = server.router.port.to_string();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["-c", script, &port, ALICE, ALICE_PASSWORD])
            .output_within(COMMAND_LIMIT)
    })
    .await
    .expect("python");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = printed.lines().collect();
    // The third failure spends the budget: smtplib gets its 535, then 421 where it expects the
    // QUIT's reply, and the next connections are refused at the greeting.
    assert_eq!(
        lines,
        [
            "auth 535 quit 221",
            "auth 535 quit 221",
            "auth 535 quit 421",
            "connect 421 4.7.0 Too many failed authentication attempts from 127.0.0.1",
            "connect 421 4.7.0 Too many failed authentication attempts from 127.0.0.1",
        ],
        "{printed}"
    );
}

/// A submission server with two tenants: `acme` (domain example.test, user alice) and `other`
/// (domain `other`.test). Returns the tenants' directory with it.
async fn alice_of_acme_beside(other: &str) -> (tempfile::TempDir, Submission) {
    let tenants = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        tenants.path().join("acme.toml"),
        format!("domains = [\"example.test\"]\nusers = [\"{ALICE}\"]\n"),
    )
    .expect("write acme");
    std::fs::write(
        tenants.path().join(format!("{other}.toml")),
        format!("domains = [\"{other}.test\"]\n"),
    )
    .expect("write the other tenant");
    let server = submission(&format!(
        "[tenants]\ndirectory = \"{}\"\n",
        tenants.path().display()
    ))
    .await;
    (tenants, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_user_cannot_send_as_another_tenants_domain() {
    // alice is acme's user; acme owns example.test, bravo owns bravo.test.
    let (_tenants, server) = alice_of_acme_beside("bravo").await;
    let (client, _) = connect(server.router.port).await;
    let mut client = client.starttls().await;
    client.command("EHLO client.test").await;
    let reply = client
        .command(&format!("AUTH PLAIN {}", plain(ALICE, ALICE_PASSWORD)))
        .await;
    assert_eq!(reply.code, 235, "{reply:?}");
    let reply = client.command("MAIL FROM:<ceo@bravo.test>").await;
    assert_eq!(
        reply.text, "553 5.7.1 <ceo@bravo.test>: Sender address is not one of your domains",
        "{reply:?}"
    );
    let reply = client.command("MAIL FROM:<alice@elsewhere.example>").await;
    assert_eq!(
        reply.code, 553,
        "a domain of no tenant is not acme's either: {reply:?}"
    );
    // Her own tenant's domain goes through, to anywhere, and the message is acme's.
    let letter = message("from acme").replace("From: a@sender.test", &format!("From: {ALICE}"));
    client
        .send_accepted(ALICE, &["bob@bravo.test"], &letter)
        .await;
    server.sink.wait_for(1, Duration::from_secs(10)).await;
    let log = server.router.log();
    assert!(log.contains("tenant=acme"), "{log}");
    // mallory is no tenant's user: the global rules apply, as without tenants.
    let (client, _) = connect(server.router.port).await;
    let mut client = client.starttls().await;
    client.command("EHLO client.test").await;
    let reply = client
        .command(&format!("AUTH PLAIN {}", plain(MALLORY, MALLORY_PASSWORD)))
        .await;
    assert_eq!(reply.code, 235, "{reply:?}");
    assert_eq!(
        client
            .command("MAIL FROM:<mallory@example.test>")
            .await
            .code,
        250
    );
}

/// Python's smtplib as a tenant's user: the envelope sender is her own, but a `From:` of another
/// tenant's domain (or of no tenant's) is refused after the data with 550 5.7.1 naming the rule;
/// her own `From:` goes through and is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_user_cannot_put_another_domain_in_the_header_from() {
    let (_tenants, server) = alice_of_acme_beside("globex").await;
    let script = r#"
import smtplib, ssl, sys
from email.message import EmailMessage
port, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3]
context = ssl.create_default_context()
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
for author in ["CEO <ceo@globex.test>", "someone@elsewhere.example", "Alice <%s>, ceo@globex.test" % user, "undisclosed:;", "Alice <%s>" % user]:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = author, "bob@bravo.example", "hello"
    message.set_content("From a tenant's user.")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.starttls(context=context)
        client.login(user, password)
        try:
            client.send_message(message, from_addr=user)
            print("accepted")
        except smtplib.SMTPDataError as error:
            print(error.smtp_code, error.smtp_error.decode())
"#;
    let lines = python(vec![
        "-c".to_string(),
        script.to_string(),
        server.router.port.to_string(),
        ALICE.to_string(),
        ALICE_PASSWORD.to_string(),
    ])
    .await;
    assert_eq!(
        lines,
        [
            "550 5.7.1 From: domain globex.test is not one of your domains (header_from = \"own-domains\")",
            "550 5.7.1 From: domain elsewhere.example is not one of your domains (header_from = \"own-domains\")",
            "550 5.7.1 From: domain globex.test is not one of your domains (header_from = \"own-domains\")",
            "550 5.7.1 From: has no address of your domains (header_from = \"own-domains\")",
            "accepted",
        ]
    );
    let received = server.sink.wait_for(1, Duration::from_secs(10)).await;
    assert!(received[0].data.contains(&format!("From: Alice <{ALICE}>")));
    server
        .router
        .log_with(&["From: outside the tenant's domains refused"])
        .await;
}

/// AUTH PLAIN as `identity` in a new session over STARTTLS: the reply's code.
async fn login_code(port: u16, identity: &str, password: &str) -> u16 {
    let (client, _) = connect(port).await;
    let mut client = client.starttls().await;
    client
        .command(&format!("AUTH PLAIN {}", plain(identity, password)))
        .await
        .code
}

/// An account added to the users file logs in without a restart, while alice keeps sending:
/// the file is read again when it changes. A broken file keeps the accounts loaded before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_added_to_the_users_file_log_in_without_a_restart() {
    const CAROL: &str = "carol@example.test";
    let server = submission("[submission.auth_failures]\nlimit = 0\n").await;
    let port = server.router.port;
    let users = server.files.path().join("users");
    assert_eq!(login_code(port, CAROL, "carol's secret").await, 535);

    // Live traffic: alice sends a message per session until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut sent = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let (client, _) = connect(port).await;
                let mut client = client.starttls().await;
                let reply = client
                    .command(&format!("AUTH PLAIN {}", plain(ALICE, ALICE_PASSWORD)))
                    .await;
                assert_eq!(reply.code, 235, "alice during the reload: {reply:?}");
                client
                    .send_accepted(ALICE, &["bob@elsewhere.example"], &message("live"))
                    .await;
                sent += 1;
            }
            sent
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&users)
        .expect("users file");
    writeln!(file, "{CAROL}:{}", hash("carol's secret")).expect("add carol");
    drop(file);
    server
        .router
        .log_with(&["SMTP AUTH accounts reloaded users=3"])
        .await;
    assert_eq!(login_code(port, CAROL, "carol's secret").await, 235);

    // A broken file: logged with its line, and the accounts stay as they were.
    let before = std::fs::read_to_string(&users).expect("users");
    std::fs::write(&users, format!("{before}dave-without-a-hash\n")).expect("break");
    server
        .router
        .log_with(&[
            "configuration does not load; what runs stays as it was",
            "users:5: expected `name:hash`",
        ])
        .await;
    assert_eq!(login_code(port, CAROL, "carol's secret").await, 235);

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let sent = traffic.await.expect("alice's traffic");
    assert!(sent >= 2, "alice sent {sent} messages during the reloads");
    server.sink.wait_for(sent, Duration::from_secs(20)).await;
}
