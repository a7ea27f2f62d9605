//! The DSN extension (RFC 3461) and REQUIRETLS (RFC 8689): parameters sent by Python's smtplib,
//! kept per message and recipient, honoured in the reports, passed on to a next hop that offers
//! DSN; the reports read back with Python's email package.

use std::sync::Arc;
use std::time::Duration;

use crate::harness::peers::{peers_dir, python};
use crate::harness::router::{tls_section, Router, RouterOptions};
use crate::harness::sink::{Received, Sink};

/// Sends one message with smtplib: `MAIL FROM:<FROM> MAIL_OPTIONS` then each `RCPT TO:<TO>
/// OPTIONS`; STARTTLS first when `tls`. Prints the reply codes.
const SEND: &str = r#"
import json, smtplib, ssl, sys
port, spec = int(sys.argv[1]), json.loads(sys.argv[2])
client = smtplib.SMTP("127.0.0.1", port, timeout=30)
client.ehlo()
if spec.get("tls"):
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client.starttls(context=context)
    client.ehlo()
print("esmtp", " ".join(sorted(k for k in client.esmtp_features if k in ("dsn", "requiretls"))))
code, _ = client.mail(spec["from"], spec["mail_options"])
print("mail", code)
if code != 250:
    client.quit()
    sys.exit(0)
for to, options in spec["rcpt"]:
    code, _ = client.rcpt(to, options)
    print("rcpt", code)
code, _ = client.data(("From: %s\r\nSubject: %s\r\n\r\nThe secret body.\r\n" % (spec["from"], spec["subject"])).encode())
print("data", code)
client.quit()
"#;

async fn smtplib(port: u16, spec: serde_json::Value) -> Vec<String> {
    python(vec![
        "-c".to_string(),
        SEND.to_string(),
        port.to_string(),
        spec.to_string(),
    ])
    .await
}

/// A DSN as Python's email package reads it (`tests/peers/dsn_parse.py`).
fn parse(dsn: &Received) -> serde_json::Value {
    use std::io::Write;
    let mut child = std::process::Command::new("python3")
        .arg(peers_dir().join("dsn_parse.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run dsn_parse.py");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(dsn.data.as_bytes())
        .expect("write");
    let output = crate::harness::process::wait_within(
        child,
        crate::harness::process::COMMAND_LIMIT,
        "dsn_parse.py",
    );
    serde_json::from_slice(&output.stdout).expect("JSON from dsn_parse.py")
}

/// Refuses `reject…` recipients for good and `defer…` ones for now.
fn sink_rule() -> crate::harness::sink::Rule {
    Arc::new(|address: &str, _| {
        if address.starts_with("reject") {
            Some("550 5.1.1 no such user".to_string())
        } else if address.starts_with("defer") {
            Some("451 4.2.0 try again later".to_string())
        } else {
            None
        }
    })
}

/// The reports (null sender) among what the sink got, parsed.
fn reports(received: &[Received]) -> Vec<serde_json::Value> {
    received
        .iter()
        .filter(|message| message.mail_from.is_empty())
        .map(parse)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_ret_orcpt_envid_delay_reports_and_requiretls() {
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, Some(sink_rule())).await;
    let certs = tempfile::tempdir().expect("tempdir");
    let router = Router::start(RouterOptions {
        retry: "intervals = [\"1s\"]\ndelay_warning = \"2s\"\n".to_string(),
        extra: tls_section(certs.path()),
        ..RouterOptions::relaying_to(sink.address, "")
    })
    .await;

    // NEVER, FAILURE with ORCPT and RET=HDRS, and SUCCESS to a next hop without DSN.
    let lines = smtplib(
        router.port,
        serde_json::json!({
            "from": "alice@sender.test",
            "subject": "first",
            "mail_options": ["RET=HDRS", "ENVID=QQ314159"],
            "rcpt": [
                ["reject-never@x.test", ["NOTIFY=NEVER"]],
                ["reject-told@x.test", ["NOTIFY=FAILURE", "ORCPT=rfc822;original+40x.test"]],
                ["ok@x.test", ["NOTIFY=SUCCESS"]],
            ],
        }),
    )
    .await;
    assert_eq!(
        lines,
        [
            "esmtp dsn",
            "mail 250",
            "rcpt 250",
            "rcpt 250",
            "rcpt 250",
            "data 250"
        ]
    );
    // The message, a failure report and a success report.
    let received = sink.wait_for(3, Duration::from_secs(15)).await;
    let reports = reports(&received);
    let failure = reports
        .iter()
        .find(|report| report["recipients"][0]["action"] == "failed")
        .unwrap_or_else(|| panic!("no failure report: {reports:?}"));
    assert_eq!(failure["content_type"], "multipart/report");
    assert_eq!(failure["report_type"], "delivery-status");
    assert_eq!(failure["envid"], "QQ314159");
    assert_eq!(
        failure["recipients"],
        serde_json::json!([{
            "final": "rfc822; reject-told@x.test",
            "original": "rfc822;original@x.test",
            "action": "failed",
            "status": "5.1.1",
        }]),
        "NOTIFY=NEVER is not reported: {failure}"
    );
    assert_eq!(failure["returned"], "headers");
    let success = reports
        .iter()
        .find(|report| report["recipients"][0]["action"] == "relayed")
        .unwrap_or_else(|| panic!("no success report: {reports:?}"));
    assert_eq!(success["recipients"][0]["final"], "rfc822; ok@x.test");
    assert_eq!(success["subject"], "Successful Mail Delivery Report");

    // NOTIFY=DELAY: one delay report once the message is two seconds old, and only one.
    let lines = smtplib(
        router.port,
        serde_json::json!({
            "from": "alice@sender.test",
            "subject": "slow",
            "mail_options": ["RET=FULL"],
            "rcpt": [["defer-me@x.test", ["NOTIFY=DELAY,FAILURE"]]],
        }),
    )
    .await;
    assert_eq!(lines.last().map(String::as_str), Some("data 250"));
    let received = sink.wait_for(4, Duration::from_secs(15)).await;
    let delay = parse(&received[3]);
    assert_eq!(delay["recipients"][0]["action"], "delayed", "{delay}");
    assert_eq!(delay["recipients"][0]["status"], "4.2.0");
    assert_eq!(
        delay["returned"], "headers",
        "a delay report returns headers only"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sink.received().len(), 4, "a second delay report was sent");

    // REQUIRETLS: the sink offers neither TLS nor REQUIRETLS, so the message fails.
    let lines = smtplib(
        router.port,
        serde_json::json!({
            "tls": true,
            "from": "alice@sender.test",
            "subject": "sealed",
            "mail_options": ["REQUIRETLS"],
            "rcpt": [["sealed@x.test", []]],
        }),
    )
    .await;
    assert_eq!(lines[..2], ["esmtp dsn requiretls", "mail 250"]);
    let received = sink.wait_for(5, Duration::from_secs(15)).await;
    let refused = parse(&received[4]);
    assert_eq!(refused["recipients"][0]["status"], "5.7.30", "{refused}");
    // RFC 8689 5: the report is redacted: nothing of the protected message comes back.
    assert_eq!(refused["returned"], serde_json::Value::Null, "{refused}");
    assert!(
        !received[4].data.contains("Subject: sealed") && !received[4].data.contains("secret body"),
        "{}",
        received[4].data
    );
    assert!(received
        .iter()
        .all(|message| !message.rcpt_to.contains(&"sealed@x.test".to_string())));
    // REQUIRETLS without TLS is refused at MAIL.
    let lines = smtplib(
        router.port,
        serde_json::json!({
            "from": "alice@sender.test",
            "subject": "x",
            "mail_options": ["REQUIRETLS"],
            "rcpt": [],
        }),
    )
    .await;
    assert_eq!(lines[1], "mail 530");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dsn_parameters_go_on_to_a_next_hop_that_offers_dsn() {
    // B offers DSN and keeps what it gets (its own next hop defers everything).
    let held = Sink::start(
        "127.0.0.1".parse().expect("ip"),
        0,
        Some(Arc::new(|_: &str, _| Some("451 4.2.0 hold".to_string()))),
    )
    .await;
    let b = Router::start(RouterOptions::relaying_to(held.address, "")).await;
    let a = Router::start(RouterOptions::relaying_to(
        format!("127.0.0.1:{}", b.port),
        "",
    ))
    .await;
    smtplib(
        a.port,
        serde_json::json!({
            "from": "alice@sender.test",
            "subject": "onward",
            "mail_options": ["RET=HDRS", "ENVID=QQ+2B1"],
            "rcpt": [["bob@x.test", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bob+40x.test"]]],
        }),
    )
    .await;
    let log = a.log_with(&["to=<bob@x.test>"]).await;
    assert!(log.contains("status=sent"), "{log}");
    assert!(
        !log.contains("sender success notification"),
        "B reports success, not A: {log}"
    );
    let listed = b.queue(&["list"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    let id = listed
        .lines()
        .find_map(|line| line.split_whitespace().next().filter(|id| id.len() == 26))
        .unwrap_or_else(|| panic!("nothing in B's queue: {listed}"))
        .to_string();
    let shown = b.queue(&["show", &id]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("dsn: ret=HDRS envid=QQ+2B1 requiretls=false"),
        "{shown}"
    );
    assert!(
        shown.contains("notify=SUCCESS,FAILURE orcpt=rfc822;bob+40x.test"),
        "{shown}"
    );
}

/// Malformed DSN parameters get a precise 501 (or 555 when given twice), and the transaction
/// goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_dsn_parameters_are_refused_precisely() {
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let router = Router::start(RouterOptions::relaying_to(sink.address, "")).await;
    let mut client = crate::harness::client::TestClient::connect(router.port).await;
    let long_envid = format!("MAIL FROM:<a@x.test> ENVID={}", "x".repeat(101));
    for (command, expected) in [
        (
            "MAIL FROM:<a@x.test> RET=ALL",
            "501 5.5.4 RET takes FULL or HDRS",
        ),
        (
            long_envid.as_str(),
            "501 5.5.4 ENVID must be 1 to 100 characters of xtext",
        ),
        (
            "MAIL FROM:<a@x.test> ENVID=a=b",
            "501 5.5.4 ENVID must be 1 to 100 characters of xtext",
        ),
        (
            "MAIL FROM:<a@x.test> RET=FULL RET=HDRS",
            "555 5.5.4 Unsupported parameter RET",
        ),
        (
            "MAIL FROM:<a@x.test> REQUIRETLS",
            "530 5.7.10 REQUIRETLS needs a TLS session",
        ),
        ("MAIL FROM:<a@x.test> RET=HDRS ENVID=QQ1", "250 2.1.0 Ok"),
        (
            "RCPT TO:<b@x.test> NOTIFY=SOMETIMES",
            "501 5.5.4 NOTIFY takes NEVER or a list of SUCCESS, FAILURE and DELAY",
        ),
        (
            "RCPT TO:<b@x.test> NOTIFY=NEVER,DELAY",
            "501 5.5.4 NOTIFY=NEVER cannot be combined with other values",
        ),
        (
            "RCPT TO:<b@x.test> ORCPT=b@x.test",
            "501 5.5.4 ORCPT must be addr-type;address",
        ),
        (
            "RCPT TO:<b@x.test> NOTIFY=FAILURE NOTIFY=DELAY",
            "555 5.5.4 Unsupported parameter NOTIFY",
        ),
        (
            "RCPT TO:<b@x.test> NOTIFY=FAILURE ORCPT=rfc822;b@x.test",
            "250 2.1.5 Ok",
        ),
    ] {
        let reply = client.command(command).await;
        assert_eq!(reply.text, expected, "{command}");
    }
}
