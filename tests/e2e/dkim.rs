//! DKIM signing of outbound mail, judged by dkimpy (`tests/peers/dkim_verify.py`): RSA and
//! Ed25519 keys made by `switchyard dkim keygen`, a selector rotated by a live reload, and mail
//! from an untrusted client left unsigned.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::harness::client::TestClient;
use crate::harness::peers::{peers_dir, python, PySink};
use crate::harness::process::{OutputWithin, COMMAND_LIMIT};
use crate::harness::router::{Router, RouterOptions};

/// Runs `switchyard dkim keygen` and returns the record's name and text, as DNS would give it.
fn keygen(dir: &Path, domain: &str, selector: &str, algorithm: &str) -> (String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "dkim",
            "keygen",
            domain,
            selector,
            "--algorithm",
            algorithm,
            "--out",
        ])
        .arg(dir)
        .output_within(COMMAND_LIMIT);
    let printed = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (name, text) = printed
        .trim()
        .split_once(". IN TXT ")
        .expect("a zone file line");
    // The zone file's strings, joined as a resolver joins them.
    let text: String = text
        .split('"')
        .enumerate()
        .filter(|(index, _)| index % 2 == 1)
        .map(|(_, part)| part)
        .collect();
    (name.to_string(), text)
}

fn dkim_entry(dir: &Path, domain: &str, selector: &str, active: bool) -> String {
    format!(
        "[[dkim]]\ndomain = \"{domain}\"\nselector = \"{selector}\"\nprivate_key = \"{}\"\nactive = {active}\n\n",
        dir.join(format!("{domain}.{selector}.key")).display()
    )
}

/// dkimpy's verdict on each signature of `message`: "SELECTOR ALGORITHM pass|fail".
async fn dkimpy(message: &str, records: &BTreeMap<String, String>) -> Vec<String> {
    dkimpy_run(&[], message, records).await
}

/// dkimpy's verdict on the ARC chain of `message`: "CV REASON".
async fn dkimpy_arc(message: &str, records: &BTreeMap<String, String>) -> Vec<String> {
    dkimpy_run(&["--arc"], message, records).await
}

/// Runs `tests/peers/dkim_verify.py` with `options` on `message`, with `records` standing in
/// for DNS.
async fn dkimpy_run(
    options: &[&str],
    message: &str,
    records: &BTreeMap<String, String>,
) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let message_file = dir.path().join("message.eml");
    let records_file = dir.path().join("records.json");
    std::fs::write(&message_file, message).expect("write message");
    std::fs::write(&records_file, serde_json::to_string(records).expect("json")).expect("write");
    let mut args = vec![peers_dir().join("dkim_verify.py").display().to_string()];
    args.extend(options.iter().map(|option| option.to_string()));
    args.push(message_file.display().to_string());
    args.push(records_file.display().to_string());
    python(args).await
}

fn letter(subject: &str) -> String {
    format!(
        "From: Alice <alice@signer.test>\r\nTo: bob@example.test\r\nSubject: {subject}\r\n\
         Date: Mon, 30 Nov 2026 12:00:00 +0000\r\n\r\nSigned body.\r\n.leading dot\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_and_ed25519_signatures_verify_with_dkimpy_and_a_selector_rotates_live() {
    let keys = tempfile::tempdir().expect("tempdir");
    let mut records = BTreeMap::new();
    for (selector, algorithm) in [("rsa1", "rsa"), ("ed1", "ed25519"), ("rsa2", "rsa")] {
        let (name, text) = keygen(keys.path(), "signer.test", selector, algorithm);
        records.insert(name, text);
    }
    assert!(records["rsa1._domainkey.signer.test"].starts_with("v=DKIM1; k=rsa; p=MII"));
    assert!(records["ed1._domainkey.signer.test"].starts_with("v=DKIM1; k=ed25519; p="));
    let sink = PySink::start(None);
    let entries = |rsa1: bool, rsa2: bool| {
        [
            dkim_entry(keys.path(), "signer.test", "rsa1", rsa1),
            dkim_entry(keys.path(), "signer.test", "ed1", true),
            dkim_entry(keys.path(), "signer.test", "rsa2", rsa2),
        ]
        .concat()
    };
    let router = Router::start(RouterOptions {
        extra: entries(true, false),
        ..RouterOptions::relaying_to(format!("127.0.0.1:{}", sink.port), "")
    })
    .await;
    let mut client = TestClient::connect(router.port).await;
    client
        .send_accepted("alice@signer.test", &["bob@example.test"], &letter("first"))
        .await;
    let received = sink.wait_for(1, Duration::from_secs(15)).await;
    let first = received[0]["data"].as_str().expect("data").to_string();
    assert_eq!(
        dkimpy(&first, &records).await,
        ["rsa1 rsa-sha256 pass", "ed1 ed25519-sha256 pass"],
        "{first}"
    );
    // The verifier can say no: a changed Subject fails both signatures.
    let tampered = first.replace("Subject: first", "Subject: changed");
    assert_eq!(
        dkimpy(&tampered, &records).await,
        ["rsa1 rsa-sha256 fail", "ed1 ed25519-sha256 fail"]
    );
    // Over-signing: a second From: added on the way breaks the signatures too.
    let added = format!("From: mallory@evil.test\r\n{first}");
    assert!(dkimpy(&added, &records)
        .await
        .iter()
        .all(|line| line.ends_with(" fail")));

    // Rotation: rsa1 retires, rsa2 signs; the configuration is reloaded without a restart.
    let text = std::fs::read_to_string(&router.config_path).expect("config");
    let rotated = text.replace(&entries(true, false), &entries(false, true));
    assert_ne!(text, rotated);
    std::fs::write(&router.config_path, rotated).expect("write config");
    router.log_with(&["DKIM keys reloaded"]).await;
    client
        .send_accepted(
            "alice@signer.test",
            &["bob@example.test"],
            &letter("second"),
        )
        .await;
    let received = sink.wait_for(2, Duration::from_secs(15)).await;
    let second = received[1]["data"].as_str().expect("data").to_string();
    assert_eq!(
        dkimpy(&second, &records).await,
        ["ed1 ed25519-sha256 pass", "rsa2 rsa-sha256 pass"],
        "{second}"
    );
    // The retired key's record is still listed for publication.
    let listed = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["dkim", "records", "--config"])
        .arg(&router.config_path)
        .output_within(COMMAND_LIMIT);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains(
            "; tenant -, retired\nrsa1._domainkey.signer.test. IN TXT \"v=DKIM1; k=rsa; p="
        ),
        "{listed}"
    );
}

/// The message among `received` (records of the Python sink) whose Subject is `subject`.
fn with_subject(received: &[serde_json::Value], subject: &str) -> String {
    received
        .iter()
        .filter_map(|record| record["data"].as_str())
        .find(|data| data.contains(&format!("Subject: {subject}\r\n")))
        .unwrap_or_else(|| panic!("no message {subject}"))
        .to_string()
}

/// Sends a [`letter`] from `sender` to `recipient` through `router`, which relays it to `sink`,
/// and returns the message as the sink received it (the first it received).
async fn relayed(
    router: &Router,
    sink: &PySink,
    (sender, recipient): (&str, &str),
    subject: &str,
) -> String {
    let mut client = TestClient::connect(router.port).await;
    client
        .send_accepted(sender, &[recipient], &letter(subject))
        .await;
    let received = sink.wait_for(1, Duration::from_secs(15)).await;
    received[0]["data"].as_str().expect("data").to_string()
}

/// `openssl genpkey` making a 2048-bit RSA key in PKCS#8 (the file follows).
const GENPKEY_RSA: &[&str] = &[
    "genpkey",
    "-algorithm",
    "RSA",
    "-pkeyopt",
    "rsa_keygen_bits:2048",
    "-out",
];

/// Runs `openssl ARGS FILE`; panics with what it said unless it succeeds; returns its stdout.
fn openssl(args: &[&str], file: &Path) -> Vec<u8> {
    openssl_around(args, file, &[])
}

/// Runs `openssl BEFORE FILE AFTER` (genrsa takes the size after the file), as [`openssl`].
fn openssl_around(before: &[&str], file: &Path, after: &[&str]) -> Vec<u8> {
    let args = before;
    let output = Command::new("openssl")
        .args(before)
        .arg(file)
        .args(after)
        .output_within(COMMAND_LIMIT);
    assert!(
        output.status.success(),
        "openssl {args:?} {}: {}",
        file.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// The DKIM record of the key in `file`, made by OpenSSL from the key: `p=` is the
/// SubjectPublicKeyInfo for RSA, the raw 32 bytes for Ed25519 (RFC 8463).
fn openssl_record(file: &Path, algorithm: &str) -> String {
    use base64::Engine;
    let spki = openssl(&["pkey", "-pubout", "-outform", "DER", "-in"], file);
    let public = match algorithm {
        "ed25519" => spki[spki.len() - 32..].to_vec(),
        _ => spki,
    };
    format!(
        "v=DKIM1; k={algorithm}; p={}",
        base64::engine::general_purpose::STANDARD.encode(public)
    )
}

/// Keys travel both ways: OpenSSL reads every key `dkim keygen` writes, and keys OpenSSL makes
/// (Ed25519 and RSA in PKCS#8, as `genpkey` writes them; RSA in PKCS#1, as `genrsa
/// -traditional` and opendkim-genkey do) sign mail that dkimpy verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_made_by_openssl_sign_and_openssl_reads_the_keys_keygen_writes() {
    let keys = tempfile::tempdir().expect("tempdir");
    for (selector, algorithm) in [("ours-rsa", "rsa"), ("ours-ed", "ed25519")] {
        keygen(keys.path(), "signer.test", selector, algorithm);
        let file = keys.path().join(format!("signer.test.{selector}.key"));
        let text = String::from_utf8_lossy(&openssl(&["pkey", "-noout", "-text", "-in"], &file))
            .into_owned();
        let kind = if algorithm == "rsa" {
            "Private-Key: (2048 bit"
        } else {
            "ED25519 Private-Key:"
        };
        assert!(text.contains(kind), "{selector}: {text}");
    }

    let mut records = BTreeMap::new();
    let mut entries = String::new();
    // (selector, algorithm, openssl's arguments before the file, after it)
    let made: [(&str, &str, &[&str], &[&str]); 3] = [
        (
            "ossl-ed",
            "ed25519",
            &["genpkey", "-algorithm", "ed25519", "-out"],
            &[],
        ),
        ("ossl-rsa8", "rsa", GENPKEY_RSA, &[]),
        (
            "ossl-rsa1",
            "rsa",
            &["genrsa", "-traditional", "-out"],
            &["2048"],
        ),
    ];
    for (selector, algorithm, before, after) in made {
        let file = keys.path().join(format!("signer.test.{selector}.key"));
        openssl_around(before, &file, after);
        let pem = std::fs::read_to_string(&file).expect("key");
        let header = if selector == "ossl-rsa1" {
            "-----BEGIN RSA PRIVATE KEY-----"
        } else {
            "-----BEGIN PRIVATE KEY-----"
        };
        assert!(pem.starts_with(header), "{selector}: {pem}");
        records.insert(
            format!("{selector}._domainkey.signer.test"),
            openssl_record(&file, algorithm),
        );
        entries.push_str(&dkim_entry(keys.path(), "signer.test", selector, true));
    }
    let sink = PySink::start(None);
    let router = Router::start(RouterOptions {
        extra: entries,
        ..RouterOptions::relaying_to(format!("127.0.0.1:{}", sink.port), "")
    })
    .await;
    let signed = relayed(
        &router,
        &sink,
        ("alice@signer.test", "bob@example.test"),
        "openssl keys",
    )
    .await;
    assert_eq!(
        dkimpy(&signed, &records).await,
        [
            "ossl-ed ed25519-sha256 pass",
            "ossl-rsa8 rsa-sha256 pass",
            "ossl-rsa1 rsa-sha256 pass"
        ],
        "{signed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_from_an_untrusted_client_is_not_signed() {
    let keys = tempfile::tempdir().expect("tempdir");
    keygen(keys.path(), "signer.test", "ed1", "ed25519");
    let sink = PySink::start(None);
    let router = Router::start(RouterOptions {
        // 127.0.0.1 is no relay network here: it may only send to switchyard.test.
        relay: "domains = [\"switchyard.test\"]\nnetworks = []\n".to_string(),
        extra: dkim_entry(keys.path(), "signer.test", "ed1", true),
        ..RouterOptions::relaying_to(format!("127.0.0.1:{}", sink.port), "")
    })
    .await;
    let mut client = TestClient::connect(router.port).await;
    client
        .send_accepted(
            "alice@signer.test",
            &["bob@switchyard.test"],
            &letter("forged?"),
        )
        .await;
    let received = sink.wait_for(1, Duration::from_secs(15)).await;
    let data = received[0]["data"].as_str().expect("data");
    assert!(!data.contains("DKIM-Signature"), "{data}");
}

/// A forwarder's sealing key (`forwarder.test`, selector `arc1`, RSA), its record for dkimpy,
/// a sink, and the loopback DNS server that turns the inbound checks on.
struct ArcFixture {
    keys: tempfile::TempDir,
    records: BTreeMap<String, String>,
    sink: PySink,
    dns: crate::harness::dns::DnsServer,
}

impl ArcFixture {
    async fn new() -> ArcFixture {
        let keys = tempfile::tempdir().expect("tempdir");
        let (name, text) = keygen(keys.path(), "forwarder.test", "arc1", "rsa");
        ArcFixture {
            keys,
            records: BTreeMap::from([(name, text)]),
            sink: PySink::start(None),
            dns: crate::harness::dns::DnsServer::start().await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checked_inbound_mail_is_arc_sealed_and_dkimpy_verifies_the_chain() {
    // 127.0.0.1 is no relay network here, so the message is checked (and not DKIM-signed)
    // and then forwarded to the sink.
    let fixture = ArcFixture::new().await;
    let (keys, records, sink) = (&fixture.keys, &fixture.records, &fixture.sink);
    let router = Router::start(RouterOptions {
        dns: Some(fixture.dns.address),
        relay: "domains = [\"switchyard.test\"]\nnetworks = []\n".to_string(),
        extra: format!(
            "{}[arc]\nseal = true\ndomain = \"forwarder.test\"\nselector = \"arc1\"\n",
            dkim_entry(keys.path(), "forwarder.test", "arc1", true)
        ),
        ..RouterOptions::relaying_to(format!("127.0.0.1:{}", sink.port), "")
    })
    .await;
    let data = relayed(
        &router,
        sink,
        ("alice@sender.test", "bob@switchyard.test"),
        "forwarded",
    )
    .await;
    assert!(data.starts_with("ARC-Seal: i=1; a=rsa-sha256;"), "{data}");
    assert!(data.contains("cv=none"), "{data}");
    assert!(
        data.contains("arc=none"),
        "the hop's results name the chain: {data}"
    );
    assert!(
        !data.contains("\nDKIM-Signature:"),
        "not ours to sign: {data}"
    );
    let verdict = dkimpy_arc(&data, records).await;
    assert!(verdict[0].starts_with("pass"), "{verdict:?}\n{data}");
    // The verifier can say no: a changed body breaks the seal's message signature.
    let tampered = data.replace("Signed body.", "Changed body.");
    let verdict = dkimpy_arc(&tampered, records).await;
    assert!(verdict[0].starts_with("fail"), "{verdict:?}");
}

/// Two forwarders: the second verifies the first one's seal (its results say `arc=pass`) and
/// adds its own; dkimpy verifies the chain of two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_forwarder_verifies_the_first_seal_and_extends_the_chain() {
    let keys = tempfile::tempdir().expect("tempdir");
    let (first_name, first_text) = keygen(keys.path(), "first.test", "arc1", "rsa");
    let (second_name, second_text) = keygen(keys.path(), "second.test", "arc2", "rsa");
    let dns = crate::harness::dns::DnsServer::start().await;
    dns.txt(&first_name, &first_text);
    let records = BTreeMap::from([(first_name, first_text), (second_name, second_text)]);
    let sink = PySink::start(None);
    let forwarder = |domain: &str, selector: &str, next: String| RouterOptions {
        dns: Some(dns.address),
        relay: "domains = [\"switchyard.test\"]\nnetworks = []\n".to_string(),
        extra: format!(
            "{}[arc]\nseal = true\ndomain = \"{domain}\"\nselector = \"{selector}\"\n",
            dkim_entry(keys.path(), domain, selector, true)
        ),
        ..RouterOptions::relaying_to(next, "")
    };
    let second = Router::start(forwarder(
        "second.test",
        "arc2",
        format!("127.0.0.1:{}", sink.port),
    ))
    .await;
    let first = Router::start(forwarder(
        "first.test",
        "arc1",
        format!("127.0.0.1:{}", second.port),
    ))
    .await;
    let mut client = TestClient::connect(first.port).await;
    client
        .send_accepted(
            "alice@sender.test",
            &["bob@switchyard.test"],
            &letter("twice"),
        )
        .await;
    let received = sink.wait_for(1, Duration::from_secs(15)).await;
    let data = received[0]["data"].as_str().expect("data").to_string();
    assert!(
        data.starts_with("ARC-Seal: i=2; a=rsa-sha256;") && data.contains("cv=pass"),
        "{data}"
    );
    assert!(data.contains("arc=pass"), "{data}");
    let verdict = dkimpy_arc(&data, &records).await;
    assert!(verdict[0].starts_with("pass"), "{verdict:?}\n{data}");
}

/// `arc_seal` on a route seals the checked mail forwarded through it, and only that mail, when
/// `[arc] seal` itself is off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_with_arc_seal_seals_what_it_forwards_and_nothing_else() {
    let fixture = ArcFixture::new().await;
    let (keys, records, sink) = (&fixture.keys, &fixture.records, &fixture.sink);
    let router = Router::start(RouterOptions {
        dns: Some(fixture.dns.address),
        relay: "domains = [\"forward.test\", \"plain.test\"]\nnetworks = []\n".to_string(),
        extra: format!(
            "{}[arc]\ndomain = \"forwarder.test\"\nselector = \"arc1\"\n\n\
             [[route]]\ndomain = \"forward.test\"\nsmarthost = \"127.0.0.1:{port}\"\narc_seal = true\n\n\
             [[route]]\ndomain = \"plain.test\"\nsmarthost = \"127.0.0.1:{port}\"\n",
            dkim_entry(keys.path(), "forwarder.test", "arc1", true),
            port = sink.port
        ),
        ..RouterOptions::default()
    })
    .await;
    let mut client = TestClient::connect(router.port).await;
    for recipient in ["bob@forward.test", "bob@plain.test"] {
        client
            .send_accepted("alice@sender.test", &[recipient], &letter(recipient))
            .await;
    }
    let received = sink.wait_for(2, Duration::from_secs(15)).await;
    let data_for = |recipient: &str| {
        received
            .iter()
            .find(|message| message["rcpt_tos"][0] == recipient)
            .and_then(|message| message["data"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    let forwarded = data_for("bob@forward.test");
    assert!(forwarded.starts_with("ARC-Seal: i=1;"), "{forwarded}");
    let verdict = dkimpy_arc(&forwarded, records).await;
    assert!(verdict[0].starts_with("pass"), "{verdict:?}");
    let plain = data_for("bob@plain.test");
    assert!(!plain.contains("ARC-Seal"), "{plain}");
}

/// Python's `email` reading a received message: its Content-Transfer-Encoding and its decoded
/// body.
async fn decoded(record: &serde_json::Value) -> Vec<String> {
    python(vec![
        "-c".to_string(),
        "import email, email.policy, sys\nm = email.message_from_string(sys.argv[1], policy=email.policy.default)\nprint(m['Content-Transfer-Encoding'])\nprint(m.get_content().rstrip())".to_string(),
        record["data"].as_str().expect("data").to_string(),
    ])
    .await
}

/// DATA of `content` after `MAIL FROM:<from> PARAMS` and one RCPT: the final reply's text.
async fn send_with(client: &mut TestClient, mail: &str, to: &str, content: &str) -> String {
    assert_eq!(client.command(mail).await.code, 250, "{mail}");
    assert_eq!(client.command(&format!("RCPT TO:<{to}>")).await.code, 250);
    assert_eq!(client.command("DATA").await.code, 354);
    client.send(content.as_bytes()).await;
    client.send(b".\r\n").await;
    client.reply().await.text
}

/// A next hop that offers neither 8BITMIME nor SMTPUTF8 (aiosmtpd told not to) gets 8-bit mail
/// as RFC 6152 requires: converted to 7 bits, a signed message signed after the conversion (so
/// dkimpy verifies it there), and what cannot be converted returned to its sender with 5.6.3
/// (8-bit bytes in a header) or 5.6.7 (an address that needs SMTPUTF8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_bit_mail_to_a_seven_bit_server_is_converted_signed_after_or_bounced() {
    let keys = tempfile::tempdir().expect("tempdir");
    let (name, text) = keygen(keys.path(), "signer.test", "ed1", "ed25519");
    let records = BTreeMap::from([(name, text)]);
    let sink = PySink::start_seven_bit();
    let router = Router::start(RouterOptions {
        extra: dkim_entry(keys.path(), "signer.test", "ed1", true),
        ..RouterOptions::relaying_to(format!("127.0.0.1:{}", sink.port), "")
    })
    .await;
    let mut client = TestClient::connect(router.port).await;
    let body = "Grüße aus Köln, naïve café.\r\n";
    // Signed (signer.test has a key): converted before signing.
    let signed = format!(
        "From: alice@signer.test\r\nTo: bob@example.test\r\nSubject: signed\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\r\n{body}"
    );
    // Not signed (no key for sender.test): converted on the way out.
    let plain =
        format!("From: a@sender.test\r\nTo: bob@example.test\r\nSubject: plain\r\n\r\n{body}");
    // 8-bit bytes in a header: cannot be converted, returned with 5.6.3.
    let header =
        format!("From: a@sender.test\r\nTo: bob@example.test\r\nSubject: Grüße\r\n\r\n{body}");
    for (mail, recipient, content) in [
        (
            "MAIL FROM:<alice@signer.test> BODY=8BITMIME",
            "bob@example.test",
            &signed,
        ),
        (
            "MAIL FROM:<a@sender.test> BODY=8BITMIME",
            "bob@example.test",
            &plain,
        ),
        (
            "MAIL FROM:<a@sender.test> BODY=8BITMIME",
            "bob@example.test",
            &header,
        ),
        // An address that needs SMTPUTF8: returned with 5.6.7.
        (
            "MAIL FROM:<a@sender.test> SMTPUTF8",
            "jürgen@example.test",
            &plain,
        ),
    ] {
        let reply = send_with(&mut client, mail, recipient, content).await;
        assert!(reply.starts_with("250 "), "{mail}: {reply}");
    }

    // Two messages and two DSNs (to a@sender.test, through the same next hop).
    let received = sink.wait_for(4, Duration::from_secs(20)).await;
    let subject = |record: &serde_json::Value, wanted: &str| {
        record["data"]
            .as_str()
            .is_some_and(|data| data.contains(&format!("\r\nSubject: {wanted}\r\n")))
    };
    for record in &received {
        assert_eq!(record["eight_bit"], false, "7-bit on the wire: {record}");
        let options = record["mail_options"].as_array().expect("options");
        let size = record["data"].as_str().map(str::len).unwrap_or(0);
        assert!(
            options.iter().all(|option| option
                .as_str()
                .is_some_and(|option| option.starts_with("SIZE="))),
            "no BODY=8BITMIME or SMTPUTF8: {record}"
        );
        assert!(size > 0);
    }

    let signed = received
        .iter()
        .find(|r| subject(r, "signed"))
        .expect("the signed message");
    assert_eq!(
        decoded(signed).await,
        ["quoted-printable", "Grüße aus Köln, naïve café."]
    );
    let data = signed["data"].as_str().expect("data").to_string();
    assert_eq!(
        dkimpy(&data, &records).await,
        ["ed1 ed25519-sha256 pass"],
        "{data}"
    );
    let plain = received
        .iter()
        .find(|r| subject(r, "plain"))
        .expect("the unsigned message");
    assert_eq!(
        decoded(plain).await,
        ["quoted-printable", "Grüße aus Köln, naïve café."]
    );

    let dsns: Vec<&str> = received
        .iter()
        .filter(|r| r["mail_from"] == "<>")
        .filter_map(|r| r["data"].as_str())
        .collect();
    assert_eq!(dsns.len(), 2, "{received:?}");
    assert!(
        dsns.iter()
            .any(|dsn| dsn.contains("Status: 5.6.3") && dsn.contains("does not support 8BITMIME")),
        "{dsns:?}"
    );
    // Its delivery-status part names a UTF-8 address, so it travels in base64 here.
    assert!(dsns.iter().any(|dsn| dsn.contains("553 5.6.7")), "{dsns:?}");
}

/// Inbound mail signed by someone else's implementation (dkimpy, with a key OpenSSL made) is
/// verified: `dkim=pass` in the Authentication-Results the host adds; a copy whose body changed
/// after signing gets `dkim=neutral (body hash did not verify)` and one whose Subject changed
/// `dkim=fail`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_mail_signed_by_dkimpy_verifies_and_a_changed_copy_fails() {
    let keys = tempfile::tempdir().expect("tempdir");
    let key = keys.path().join("sel.pem");
    openssl_around(GENPKEY_RSA, &key, &[]);
    let dns = crate::harness::dns::DnsServer::start().await;
    dns.txt("sel._domainkey.signed.test", &openssl_record(&key, "rsa"));
    dns.txt("signed.test", "v=spf1 ip4:127.0.0.1 -all");
    dns.txt("_dmarc.signed.test", "v=DMARC1; p=reject");
    let sink = crate::harness::sink::Sink::start("127.0.0.1".parse().expect("ip"), 0, None).await;
    let router = Router::start(RouterOptions {
        dns: Some(dns.address),
        // 127.0.0.1 is not trusted here: its mail is checked like the internet's.
        relay: "domains = [\"switchyard.test\"]\nnetworks = []\n".to_string(),
        ..RouterOptions::relaying_to(sink.address, "")
    })
    .await;
    let message = keys.path().join("message.eml");
    let signed = keys.path().join("signed.eml");
    std::fs::write(
        &message,
        "From: alice@signed.test\r\nTo: bob@switchyard.test\r\nSubject: signed by dkimpy\r\n\r\nA body the signature covers.\r\n",
    )
    .expect("message");
    python(vec![
        "-c".to_string(),
        "import dkim, sys\nmessage = open(sys.argv[1], 'rb').read()\nsignature = dkim.sign(message, b'sel', b'signed.test', open(sys.argv[2], 'rb').read(), include_headers=[b'from', b'to', b'subject'])\nopen(sys.argv[3], 'wb').write(signature + message)".to_string(),
        message.display().to_string(),
        key.display().to_string(),
        signed.display().to_string(),
    ])
    .await;
    let signed = std::fs::read_to_string(&signed).expect("signed");
    assert!(signed.starts_with("DKIM-Signature: "), "{signed}");
    let changed = signed.replace("A body the signature covers.", "A body changed on the way.");
    let retitled = signed.replace("Subject: signed by dkimpy", "Subject: retitled on the way");
    let mut client = TestClient::connect(router.port).await;
    client
        .send_accepted("alice@signed.test", &["bob@switchyard.test"], &signed)
        .await;
    client
        .send_accepted("alice@signed.test", &["carol@switchyard.test"], &changed)
        .await;
    client
        .send_accepted("alice@signed.test", &["dave@switchyard.test"], &retitled)
        .await;
    let received = sink.wait_for(3, Duration::from_secs(15)).await;
    let results = |recipient: &str| -> String {
        let message = received
            .iter()
            .find(|m| m.rcpt_to.iter().any(|to| to == recipient))
            .unwrap_or_else(|| panic!("nothing for {recipient}"));
        message
            .data
            .lines()
            .skip_while(|line| !line.starts_with("Authentication-Results: mx.switchyard.test;"))
            .take_while(|line| !line.starts_with("Received: "))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let passed = results("bob@switchyard.test");
    assert!(
        passed.contains("dkim=pass header.i=@signed.test header.s=sel"),
        "{passed}"
    );
    assert!(passed.contains("dmarc=pass"), "{passed}");
    // A changed body: mail-auth reports the body hash's mismatch as neutral, with the reason.
    let changed = results("carol@switchyard.test");
    assert!(
        changed.contains("dkim=neutral (body hash did not verify)"),
        "{changed}"
    );
    // A changed signed header: the signature itself fails.
    let retitled = results("dave@switchyard.test");
    assert!(retitled.contains("dkim=fail"), "{retitled}");
}

/// A tenant's own `[[dkim]]` key signs the tenant's mail, and only that: dkimpy verifies acme's
/// signature on acme's message, and the same From: in mail of no tenant goes unsigned (the main
/// file has no key for it, and acme's key is acme's alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_own_key_signs_its_mail_and_no_one_elses() {
    let keys = tempfile::tempdir().expect("tempdir");
    let (name, text) = keygen(keys.path(), "acme.test", "t1", "ed25519");
    let records = BTreeMap::from([(name, text)]);
    let tenants = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        tenants.path().join("acme.toml"),
        format!(
            "domains = [\"acme.test\"]\n\n{}",
            dkim_entry(keys.path(), "acme.test", "t1", true)
        ),
    )
    .expect("tenant file");
    let sink = PySink::start(None);
    let router = Router::start(RouterOptions {
        extra: format!("[tenants]\ndirectory = \"{}\"\n", tenants.path().display()),
        ..RouterOptions::relaying_to(format!("127.0.0.1:{}", sink.port), "")
    })
    .await;
    let letter = |to: &str, subject: &str| {
        format!(
            "From: news@acme.test\r\nTo: {to}\r\nSubject: {subject}\r\n\
             Date: Mon, 07 Dec 2026 12:00:00 +0000\r\n\r\nFrom acme.\r\n"
        )
    };
    let mut client = TestClient::connect(router.port).await;
    // To acme's own domain from a trusted network: acme's mail.
    client
        .send_accepted(
            "news@acme.test",
            &["team@acme.test"],
            &letter("team@acme.test", "acme's"),
        )
        .await;
    // To a domain of no tenant: mail of no tenant, whatever its From: says.
    client
        .send_accepted(
            "news@acme.test",
            &["x@elsewhere.test"],
            &letter("x@elsewhere.test", "no tenant's"),
        )
        .await;
    let received = sink.wait_for(2, Duration::from_secs(15)).await;
    let data = |subject: &str| with_subject(&received, subject);
    let signed = data("acme's");
    assert_eq!(
        dkimpy(&signed, &records).await,
        ["t1 ed25519-sha256 pass"],
        "{signed}"
    );
    let unsigned = data("no tenant's");
    assert!(!unsigned.contains("DKIM-Signature:"), "{unsigned}");
    router.log_with(&["tenant=acme"]).await;
}

/// A tenant's own `[arc]` seals the tenant's checked inbound mail with the tenant's key (dkimpy
/// verifies the seal), and mail of no tenant through the same router is not sealed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_own_arc_seals_its_inbound_mail_only() {
    let fixture = ArcFixture::new().await;
    let (name, text) = keygen(fixture.keys.path(), "acme.test", "arc1", "rsa");
    let records = BTreeMap::from([(name, text)]);
    let tenants = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        tenants.path().join("acme.toml"),
        format!(
            "domains = [\"acme.test\"]\n\n{}[arc]\nseal = true\ndomain = \"acme.test\"\nselector = \"arc1\"\n",
            dkim_entry(fixture.keys.path(), "acme.test", "arc1", true)
        ),
    )
    .expect("tenant file");
    let router = Router::start(RouterOptions {
        dns: Some(fixture.dns.address),
        // 127.0.0.1 is no relay network here: its mail is checked, so it may be sealed.
        relay: "domains = [\"switchyard.test\"]\nnetworks = []\n".to_string(),
        extra: format!("[tenants]\ndirectory = \"{}\"\n", tenants.path().display()),
        ..RouterOptions::relaying_to(format!("127.0.0.1:{}", fixture.sink.port), "")
    })
    .await;
    let mut client = TestClient::connect(router.port).await;
    client
        .send_accepted("alice@sender.test", &["bob@acme.test"], &letter("to acme"))
        .await;
    client
        .send_accepted(
            "alice@sender.test",
            &["carol@switchyard.test"],
            &letter("to no tenant"),
        )
        .await;
    let received = fixture.sink.wait_for(2, Duration::from_secs(15)).await;
    let data = |subject: &str| with_subject(&received, subject);
    let sealed = data("to acme");
    assert!(
        sealed.starts_with("ARC-Seal: i=1; a=rsa-sha256;") && sealed.contains("d=acme.test"),
        "{sealed}"
    );
    let verdict = dkimpy_arc(&sealed, &records).await;
    assert!(verdict[0].starts_with("pass"), "{verdict:?}\n{sealed}");
    let unsealed = data("to no tenant");
    assert!(!unsealed.contains("ARC-Seal:"), "{unsealed}");
}
