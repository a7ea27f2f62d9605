//! Outbound trust: certificates checked on delivery, MTA-STS, smarthost AUTH. The receiving
//! servers are aiosmtpd (`tests/peers/smtp_sink.py`) and the policy server Python's http.server
//! (`tests/peers/https_policy.py`), with certificates from a CA made for the test.

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::harness::certs::TestCa;
use crate::harness::client::{message, TestClient};
use crate::harness::dns::DnsServer;
use crate::harness::peers::{PolicyServer, PySink};
use crate::harness::router::{Router, RouterOptions};

/// Waits until the log has a delivery line for each of `recipients`; returns the log and a way
/// to find a recipient's line.
async fn delivery_lines(router: &Router, recipients: &[&str]) -> (String, impl Fn(&str) -> String) {
    let wanted: Vec<String> = recipients.iter().map(|r| format!("to=<{r}>")).collect();
    let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
    let log = router.log_with(&wanted).await;
    let lines = log.clone();
    let line = move |recipient: &str| {
        lines
            .lines()
            .find(|line| line.contains(&format!("to=<{recipient}>")))
            .unwrap_or_default()
            .to_string()
    };
    (log, line)
}

fn route(domain: &str, host: &str, port: u16, tls: &str) -> String {
    format!("[[route]]\ndomain = \"{domain}\"\nsmarthost = \"{host}:{port}\"\ntls = \"{tls}\"\n\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_verifies_the_chain_and_the_name_and_opportunistic_only_encrypts() {
    let certs = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new(certs.path(), "trusted");
    let stranger_ca = TestCa::new(certs.path(), "stranger");
    let good = PySink::start(Some(&ca.issue(certs.path(), "good", &["mx.good.test"])));
    let misnamed = PySink::start(Some(&ca.issue(
        certs.path(),
        "misnamed",
        &["elsewhere.test"],
    )));
    let stranger = PySink::start(Some(&stranger_ca.issue(
        certs.path(),
        "stranger",
        &["mx.stranger.test"],
    )));
    let dns = DnsServer::start().await;
    for host in ["mx.good.test", "mx.misnamed.test", "mx.stranger.test"] {
        dns.a(host, Ipv4Addr::LOCALHOST);
    }
    let routes = [
        route("good.test", "mx.good.test", good.port, "require"),
        route(
            "misnamed.test",
            "mx.misnamed.test",
            misnamed.port,
            "require",
        ),
        route(
            "stranger.test",
            "mx.stranger.test",
            stranger.port,
            "require",
        ),
        route(
            "anyway.test",
            "mx.stranger.test",
            stranger.port,
            "opportunistic",
        ),
    ]
    .concat();
    let router = Router::start(RouterOptions {
        dns: Some(dns.address),
        delivery: format!("ca_file = \"{}\"\n", ca.certificate.display()),
        extra: routes,
        ..RouterOptions::default()
    })
    .await;
    let mut client = TestClient::connect(router.port).await;
    let mut ids = Vec::new();
    for recipient in [
        "a@good.test",
        "b@misnamed.test",
        "c@stranger.test",
        "d@anyway.test",
    ] {
        ids.push(
            client
                .send_accepted("sender@switchyard.test", &[recipient], &message(recipient))
                .await,
        );
    }
    let (log, line) = delivery_lines(
        &router,
        &[
            "a@good.test",
            "b@misnamed.test",
            "c@stranger.test",
            "d@anyway.test",
        ],
    )
    .await;
    assert!(
        line("a@good.test").contains("relay=mx.good.test[127.0.0.1]"),
        "{log}"
    );
    assert!(line("a@good.test").contains("tls=verified"), "{log}");
    assert!(line("a@good.test").contains("status=sent"), "{log}");
    let misnamed_line = line("b@misnamed.test");
    assert!(
        misnamed_line.contains("status=deferred (451 4.7.5 ")
            && misnamed_line.contains("certificate verification failed")
            && misnamed_line.contains("not valid for name"),
        "{misnamed_line}"
    );
    let stranger_line = line("c@stranger.test");
    assert!(
        stranger_line.contains("status=deferred (451 4.7.5 ")
            && stranger_line.contains("UnknownIssuer"),
        "{stranger_line}"
    );
    // The same unknown-CA server takes the mail under `opportunistic`: encrypted, not verified.
    let anyway = line("d@anyway.test");
    assert!(
        anyway.contains("tls=unverified") && anyway.contains("status=sent"),
        "{anyway}"
    );

    let delivered = good.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(delivered[0]["tls"], true);
    assert_eq!(delivered[0]["rcpt_tos"][0], "a@good.test");
    assert!(misnamed.received().is_empty());
    let received = stranger.received();
    assert_eq!(
        received.len(),
        1,
        "only the opportunistic message: {received:?}"
    );
    assert_eq!(received[0]["rcpt_tos"][0], "d@anyway.test");

    // The deferral's reason is the queue's last reply for the recipient.
    let listing = router.queue(&["show", &ids[1]]);
    let shown = String::from_utf8_lossy(&listing.stdout);
    assert!(shown.contains("certificate verification failed"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smarthost_gets_auth_plain_over_tls_only_with_credentials_from_a_file() {
    let certs = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new(certs.path(), "relay");
    let relay = PySink::start_with(
        Some(&ca.issue(certs.path(), "relay", &["relay.provider.test"])),
        Some("customer@provider.test:s3cret pass"),
    );
    let plain = PySink::start_with(None, Some("customer@provider.test:s3cret pass"));
    let dns = DnsServer::start().await;
    dns.a("relay.provider.test", Ipv4Addr::LOCALHOST);
    let credentials = certs.path().join("relay-passwords");
    std::fs::write(
        &credentials,
        format!(
            "# smarthost passwords\nrelay.provider.test:{} customer@provider.test:s3cret pass\n\
             127.0.0.1 customer@provider.test:s3cret pass\n",
            relay.port
        ),
    )
    .expect("write credentials");
    let router = Router::start(RouterOptions {
        dns: Some(dns.address),
        delivery: format!(
            "ca_file = \"{}\"\ncredentials_file = \"{}\"\n",
            ca.certificate.display(),
            credentials.display()
        ),
        extra: [
            route(
                "provider.test",
                "relay.provider.test",
                relay.port,
                "require",
            ),
            // The same password for a hop without TLS is never sent.
            route("cleartext.test", "127.0.0.1", plain.port, "opportunistic"),
        ]
        .concat(),
        ..RouterOptions::default()
    })
    .await;
    let mut client = TestClient::connect(router.port).await;
    client
        .send_accepted(
            "a@switchyard.test",
            &["x@provider.test"],
            &message("relayed"),
        )
        .await;
    client
        .send_accepted("a@switchyard.test", &["y@cleartext.test"], &message("kept"))
        .await;
    let received = relay.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(received[0]["auth"], "customer@provider.test");
    assert_eq!(received[0]["tls"], true);
    let log = router
        .log_with(&["to=<x@provider.test>", "to=<y@cleartext.test>"])
        .await;
    let cleartext = log
        .lines()
        .find(|line| line.contains("to=<y@cleartext.test>"))
        .unwrap_or_default();
    assert!(
        cleartext.contains("status=deferred (451 4.7.11 ")
            && cleartext.contains("credentials are sent only over verified TLS"),
        "{cleartext}"
    );
    assert!(!log.contains("s3cret"), "a password reached the log");
    assert!(plain.received().is_empty());

    // A password the relay refuses (the file is read again when it changes): deferred with
    // 4.7.8, never bounced, and the message is not sent without AUTH.
    std::fs::write(
        &credentials,
        format!(
            "relay.provider.test:{} customer@provider.test:not the password\n",
            relay.port
        ),
    )
    .expect("write credentials");
    router
        .log_with(&["relay credentials reloaded hosts=1"])
        .await;
    client
        .send_accepted(
            "a@switchyard.test",
            &["z@provider.test"],
            &message("refused"),
        )
        .await;
    let log = router.log_with(&["to=<z@provider.test>"]).await;
    let refused = log
        .lines()
        .find(|line| line.contains("to=<z@provider.test>"))
        .unwrap_or_default();
    assert!(refused.contains("status=deferred (451 4.7.8 "), "{refused}");
    assert!(
        !log.contains("not the password"),
        "a password reached the log"
    );
    assert_eq!(relay.received().len(), 1, "nothing more reached the relay");
}

fn policy(mode: &str, mx: &str) -> String {
    format!("version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n")
}

/// A policy fetch that fails keeps the unexpired cached policy in force (RFC 8461 3.3): the
/// domain publishes a new policy id, its policy server stops answering, and mail to an MX host
/// the cached policy does not list is still held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_policy_fetch_keeps_the_cached_mta_sts_policy() {
    let certs = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new(certs.path(), "web");
    let mx = PySink::start(Some(&ca.issue(certs.path(), "mx", &["mx.kept.test"])));
    let web = PolicyServer::start(&ca.issue(certs.path(), "web", &["mta-sts.kept.test"]));
    web.serve("mta-sts.kept.test", &policy("enforce", "mx.kept.test"));
    let dns = DnsServer::start().await;
    dns.mx("kept.test", 10, "mx.kept.test");
    dns.a("mx.kept.test", Ipv4Addr::LOCALHOST);
    dns.a("mta-sts.kept.test", Ipv4Addr::LOCALHOST);
    dns.txt("_mta-sts.kept.test", "v=STSv1; id=first;");
    let router = Router::start(RouterOptions {
        dns: Some(dns.address),
        delivery_port: mx.port,
        delivery: format!("ca_file = \"{}\"\n", ca.certificate.display()),
        extra: format!("[mta_sts]\nhttps_port = {}\nrecheck = \"1s\"\n", web.port),
        ..RouterOptions::default()
    })
    .await;
    let mut client = TestClient::connect(router.port).await;
    client
        .send_accepted("a@switchyard.test", &["one@kept.test"], &message("first"))
        .await;
    let (_, line) = delivery_lines(&router, &["one@kept.test"]).await;
    assert!(
        line("one@kept.test").contains("status=sent"),
        "{}",
        line("one@kept.test")
    );

    // A new id, a server that no longer has the policy, and an MX host the policy never listed.
    dns.forget("_mta-sts.kept.test");
    dns.txt("_mta-sts.kept.test", "v=STSv1; id=second;");
    web.unserve("mta-sts.kept.test");
    dns.forget("kept.test");
    dns.mx("kept.test", 10, "mx.elsewhere.test");
    dns.a("mx.elsewhere.test", Ipv4Addr::LOCALHOST);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    client
        .send_accepted("a@switchyard.test", &["two@kept.test"], &message("second"))
        .await;
    let (_, line) = delivery_lines(&router, &["two@kept.test"]).await;
    let held = line("two@kept.test");
    assert!(
        held.contains("status=deferred (451 4.7.5 MTA-STS policy of kept.test (enforce) allows none of its MX hosts (mx.elsewhere.test)"),
        "{held}"
    );
    assert!(
        web.requests()
            .iter()
            .filter(|request| request.starts_with("mta-sts.kept.test "))
            .count()
            >= 2,
        "the new id was fetched (and failed): {:?}",
        web.requests()
    );
    assert_eq!(mx.received().len(), 1, "nothing went to the unlisted host");
}

/// MTA-STS against policies served by Python's HTTPS server, records from the loopback DNS
/// server, and aiosmtpd as every MX host (one certificate naming some of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mta_sts_enforce_refuses_unlisted_mx_hosts_and_bad_certificates_and_testing_only_reports() {
    let certs = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new(certs.path(), "web");
    let mx = PySink::start(Some(&ca.issue(
        certs.path(),
        "mx",
        &["mx.enforce.test", "mx.other.test"],
    )));
    let domains = ["enforce", "stray", "badcert", "testing"];
    let policy_names: Vec<String> = domains
        .iter()
        .map(|domain| format!("mta-sts.{domain}.test"))
        .collect();
    let names: Vec<&str> = policy_names.iter().map(String::as_str).collect();
    let web = PolicyServer::start(&ca.issue(certs.path(), "web", &names));
    web.serve(
        "mta-sts.enforce.test",
        &policy("enforce", "mx.enforce.test"),
    );
    web.serve("mta-sts.stray.test", &policy("enforce", "mx.stray.test"));
    web.serve("mta-sts.badcert.test", &policy("enforce", "*.badcert.test"));
    web.serve(
        "mta-sts.testing.test",
        &policy("testing", "mx.testing.test"),
    );
    let dns = DnsServer::start().await;
    for (domain, exchange) in [
        ("enforce.test", "mx.enforce.test"),
        ("stray.test", "mx.other.test"),
        ("badcert.test", "mx.badcert.test"),
        ("testing.test", "mx.other.test"),
        ("nopolicy.test", "mx.badcert.test"),
    ] {
        dns.mx(domain, 10, exchange);
        dns.a(exchange, Ipv4Addr::LOCALHOST);
    }
    for domain in domains {
        dns.txt(
            &format!("_mta-sts.{domain}.test"),
            "v=STSv1; id=20261130T1;",
        );
        dns.a(&format!("mta-sts.{domain}.test"), Ipv4Addr::LOCALHOST);
    }
    let reports = PySink::start(None);
    let mut router = Router::start(RouterOptions {
        dns: Some(dns.address),
        delivery_port: mx.port,
        delivery: format!("ca_file = \"{}\"\n", ca.certificate.display()),
        extra: format!(
            "[mta_sts]\nhttps_port = {}\n\n{}",
            web.port,
            route("reports.test", "127.0.0.1", reports.port, "opportunistic")
        ),
        ..RouterOptions::default()
    })
    .await;
    let mut client = TestClient::connect(router.port).await;
    for domain in ["enforce", "stray", "badcert", "testing", "nopolicy"] {
        let recipient = format!("user@{domain}.test");
        client
            .send_accepted("a@switchyard.test", &[&recipient], &message(&recipient))
            .await;
    }
    let (log, line) = delivery_lines(
        &router,
        &[
            "user@enforce.test",
            "user@stray.test",
            "user@badcert.test",
            "user@testing.test",
            "user@nopolicy.test",
        ],
    )
    .await;
    let enforced = line("user@enforce.test");
    assert!(
        enforced.contains("tls=verified") && enforced.contains("status=sent"),
        "{enforced}"
    );
    let stray = line("user@stray.test");
    assert!(
        stray.contains("status=deferred (451 4.7.5 MTA-STS policy of stray.test (enforce) allows none of its MX hosts (mx.other.test)"),
        "{stray}"
    );
    let badcert = line("user@badcert.test");
    assert!(
        badcert.contains("status=deferred (451 4.7.5 ")
            && badcert.contains("certificate verification failed"),
        "{badcert}"
    );
    let testing = line("user@testing.test");
    assert!(testing.contains("status=sent"), "{testing}");
    assert!(
        log.contains("MTA-STS testing policy of testing.test would refuse this delivery: MX host mx.other.test is not in the policy"),
        "{log}"
    );
    // No policy: opportunistic TLS, the unmatched certificate taken as it is.
    let open = line("user@nopolicy.test");
    assert!(
        open.contains("tls=unverified") && open.contains("status=sent"),
        "{open}"
    );
    let delivered: Vec<String> = mx
        .wait_for(3, Duration::from_secs(10))
        .await
        .iter()
        .map(|message| {
            message["rcpt_tos"][0]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(
        delivered.len(),
        3,
        "only enforce, testing and nopolicy: {delivered:?}"
    );

    // TLS reports (RFC 8460): to the rua address of each policy domain that asks for them.
    for domain in ["enforce", "badcert"] {
        dns.txt(
            &format!("_smtp._tls.{domain}.test"),
            "v=TLSRPTv1; rua=mailto:tlsrpt@reports.test",
        );
    }
    // The counts are written beside the deliveries, not before their log lines.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let parsed = send_tls_reports(&router, &reports, 2).await;
    let of = |domain: &str| report_of(&parsed, domain);
    let good = of("enforce.test");
    assert_eq!(good["content_type"], "multipart/report");
    assert_eq!(good["report_type"], "tlsrpt");
    let policy = &good["report"]["policies"][0];
    assert_eq!(policy["policy"]["policy-type"], "sts", "{good}");
    assert_eq!(policy["policy"]["policy-domain"], "enforce.test");
    assert_eq!(policy["policy"]["mx-host"][0], "mx.enforce.test");
    assert_eq!(
        policy["summary"]["total-successful-session-count"], 1,
        "{good}"
    );
    assert_eq!(policy["summary"]["total-failure-session-count"], 0);
    assert!(good["report"]["date-range"]["start-datetime"].is_string());
    let bad = of("badcert.test");
    let policy = &bad["report"]["policies"][0];
    assert!(
        policy["summary"]["total-failure-session-count"].as_u64() >= Some(1),
        "{bad}"
    );
    let failure = &policy["failure-details"][0];
    assert_eq!(failure["result-type"], "certificate-host-mismatch", "{bad}");
    assert_eq!(failure["receiving-mx-hostname"], "mx.badcert.test");
    assert_eq!(failure["receiving-ip"], "127.0.0.1");

    // Cached in the queue's database: after a restart the same policy id is not fetched again.
    let fetches = web.requests().len();
    assert_eq!(fetches, 4, "{:?}", web.requests());
    router.terminate();
    router.wait_exit(Duration::from_secs(15)).await;
    router.spawn().await;
    let mut client = TestClient::connect(router.port).await;
    client
        .send_accepted(
            "a@switchyard.test",
            &["again@enforce.test"],
            &message("again"),
        )
        .await;
    mx.wait_for(4, Duration::from_secs(10)).await;
    assert_eq!(web.requests().len(), fetches, "{:?}", web.requests());
}

/// Runs `switchyard tls-reports send`, waits for `count` reports at the sink, and reads them.
async fn send_tls_reports(router: &Router, sink: &PySink, count: usize) -> Vec<serde_json::Value> {
    let sent = router.tls_reports(&["send"]);
    let printed = String::from_utf8_lossy(&sent.stdout);
    assert!(
        sent.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert!(
        printed.contains(&format!("-- {count} report(s)")),
        "{printed}"
    );
    sink.wait_for(count, Duration::from_secs(20))
        .await
        .iter()
        .map(|message| parse_tls_report(message["data"].as_str().unwrap_or_default()))
        .collect()
}

/// The report for `domain` among `parsed`.
fn report_of(parsed: &[serde_json::Value], domain: &str) -> serde_json::Value {
    parsed
        .iter()
        .find(|report| report["report_domain"] == domain)
        .unwrap_or_else(|| panic!("no report for {domain}: {parsed:?}"))
        .clone()
}

/// A TLS report message as Python's email and json packages read it
/// (`tests/peers/tlsrpt_parse.py`).
fn parse_tls_report(message: &str) -> serde_json::Value {
    use std::io::Write;
    let mut child = std::process::Command::new("python3")
        .arg(crate::harness::peers::peers_dir().join("tlsrpt_parse.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run tlsrpt_parse.py");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(message.as_bytes())
        .expect("write");
    let output = crate::harness::process::wait_within(
        child,
        crate::harness::process::COMMAND_LIMIT,
        "tlsrpt_parse.py",
    );
    serde_json::from_slice(&output.stdout).expect("JSON from tlsrpt_parse.py")
}

/// The SHA-256 of a certificate file's SubjectPublicKeyInfo: the data of a `3 1 1` TLSA record.
fn spki_sha256(certificate: &std::path::Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    use sha2::Digest;
    let der = rustls::pki_types::CertificateDer::from_pem_file(certificate).expect("certificate");
    let parsed = webpki::EndEntityCert::try_from(&der).expect("parse certificate");
    sha2::Sha256::digest(parsed.subject_public_key_info().as_ref()).to_vec()
}

/// DANE (RFC 7672) with the loopback DNS server playing a validating resolver (the AD bit) and
/// aiosmtpd as the MX hosts: a matching DANE-EE record authenticates a certificate no trusted CA
/// vouches for, and so does a DANE-TA record naming the CA the server sends; a mismatching
/// record defers without falling back to plain text, and unvalidated records are ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dane_ee_records_authenticate_or_defer_and_unvalidated_ones_are_ignored() {
    let certs = tempfile::tempdir().expect("tempdir");
    let own_ca = TestCa::new(certs.path(), "self-run");
    let unrelated_ca = TestCa::new(certs.path(), "public");
    let issued = own_ca.issue(
        certs.path(),
        "mx",
        &[
            "mx.dane.test",
            "mx.wrong.test",
            "mx.insecure.test",
            "mx.ta.test",
        ],
    );
    let digest = spki_sha256(&issued.certificate);
    let ca_digest = spki_sha256(&own_ca.certificate);
    // The server sends its CA's certificate after its own, as DANE-TA needs.
    let chain = format!(
        "{}{}",
        std::fs::read_to_string(&issued.certificate).expect("leaf"),
        std::fs::read_to_string(&own_ca.certificate).expect("ca")
    );
    std::fs::write(&issued.certificate, chain).expect("chain");
    let mx = PySink::start(Some(&issued));
    let dns = DnsServer::start().await;
    // dane.test also publishes an MTA-STS policy that does not list its MX host: DANE wins.
    let web = PolicyServer::start(&unrelated_ca.issue(certs.path(), "web", &["mta-sts.dane.test"]));
    web.serve("mta-sts.dane.test", &policy("enforce", "mx.elsewhere.test"));
    dns.txt("_mta-sts.dane.test", "v=STSv1; id=1;");
    dns.a("mta-sts.dane.test", Ipv4Addr::LOCALHOST);
    for domain in ["dane.test", "wrong.test"] {
        dns.txt(
            &format!("_smtp._tls.{domain}"),
            "v=TLSRPTv1; rua=mailto:tlsrpt@reports.test",
        );
    }
    let reports = PySink::start(None);
    for (domain, usage, data, secure) in [
        ("dane.test", 3, digest.clone(), true),
        ("ta.test", 2, ca_digest, true),
        ("wrong.test", 3, vec![0u8; 32], true),
        ("insecure.test", 3, vec![0u8; 32], false),
        // Validated, but PKIX-EE only: not for SMTP (RFC 7672 3.1.3), so TLS is required and
        // not authenticated.
        ("pkix.test", 1, vec![0u8; 32], true),
        // Validated MX, but its TLSA lookup fails (below): the host is not tried.
        ("broken.test", 3, vec![0u8; 32], true),
    ] {
        let host = format!("mx.{domain}");
        dns.mx(domain, 10, &host);
        dns.a(&host, Ipv4Addr::LOCALHOST);
        let tlsa = format!("_{}._tcp.{host}", mx.port);
        dns.tlsa(&tlsa, usage, 1, 1, data);
        if secure {
            dns.secure(domain);
            dns.secure(&tlsa);
        }
    }
    dns.fail(&format!("_{}._tcp.mx.broken.test", mx.port));
    let router = Router::start(RouterOptions {
        dns: Some(dns.address),
        delivery_port: mx.port,
        // The trust anchors do not include the MX hosts' CA: only DANE can vouch for them.
        delivery: format!(
            "dane = true\nca_file = \"{}\"\n",
            unrelated_ca.certificate.display()
        ),
        extra: format!(
            "[mta_sts]\nhttps_port = {}\n\n{}",
            web.port,
            route("reports.test", "127.0.0.1", reports.port, "opportunistic")
        ),
        ..RouterOptions::default()
    })
    .await;
    let mut client = TestClient::connect(router.port).await;
    for recipient in [
        "a@dane.test",
        "b@wrong.test",
        "c@insecure.test",
        "d@ta.test",
        "e@pkix.test",
        "f@broken.test",
    ] {
        client
            .send_accepted("s@switchyard.test", &[recipient], &message(recipient))
            .await;
    }
    let (log, line) = delivery_lines(
        &router,
        &[
            "a@dane.test",
            "b@wrong.test",
            "c@insecure.test",
            "d@ta.test",
            "e@pkix.test",
            "f@broken.test",
        ],
    )
    .await;
    let trust_anchor = line("d@ta.test");
    assert!(
        trust_anchor.contains("tls=verified") && trust_anchor.contains("status=sent"),
        "DANE-TA: {trust_anchor}"
    );
    let dane = line("a@dane.test");
    assert!(
        dane.contains("tls=verified") && dane.contains("status=sent"),
        "{log}"
    );
    let wrong = line("b@wrong.test");
    assert!(
        wrong.contains("status=deferred (451 4.7.5 ")
            && wrong.contains("DANE: no TLSA record matches"),
        "{wrong}"
    );
    let insecure = line("c@insecure.test");
    assert!(
        insecure.contains("tls=unverified") && insecure.contains("status=sent"),
        "{insecure}"
    );
    let pkix = line("e@pkix.test");
    assert!(
        pkix.contains("tls=unverified") && pkix.contains("status=sent"),
        "{pkix}"
    );
    let broken = line("f@broken.test");
    assert!(
        broken.contains("status=deferred (451 4.7.5 DANE: TLSA lookup for mx.broken.test failed"),
        "{broken}"
    );
    let delivered = mx.wait_for(4, Duration::from_secs(10)).await;
    assert!(delivered
        .iter()
        .all(|message| message["rcpt_tos"][0] != "b@wrong.test"));
    assert_eq!(
        web.requests().len(),
        1,
        "the MTA-STS policy was fetched, and lost to DANE"
    );

    // TLS reports of DANE hosts: policy type tlsa, one per MX host, the records as the string.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let parsed = send_tls_reports(&router, &reports, 2).await;
    let of = |domain: &str| report_of(&parsed, domain)["report"]["policies"][0].clone();
    let good = of("dane.test");
    assert_eq!(good["policy"]["policy-type"], "tlsa", "{good}");
    assert_eq!(good["policy"]["mx-host"][0], "mx.dane.test");
    assert!(good["policy"]["policy-string"][0]
        .as_str()
        .is_some_and(|record| record.starts_with("3 1 1 ")));
    assert_eq!(
        good["summary"]["total-successful-session-count"], 1,
        "{good}"
    );
    let bad = of("wrong.test");
    assert_eq!(bad["policy"]["policy-type"], "tlsa");
    assert!(
        bad["summary"]["total-failure-session-count"].as_u64() >= Some(1),
        "{bad}"
    );
}
