//! Implicit TLS (RFC 8314) on a `submissions` listener, driven by Python's `smtplib.SMTP_SSL`:
//! AUTH as on 587, a certificate chosen by SNI, and that certificate replaced without a restart.

use std::time::Duration;

use crate::harness::certs::TestCa;
use crate::harness::peers::python;
use crate::harness::router::test_ca;
use crate::submission::{submission_as, ALICE, ALICE_PASSWORD};

/// Connects to 127.0.0.1:PORT with implicit TLS asking for NAME (SNI), verifying the
/// certificate against the CA files; then each ACTION: `login USER PASSWORD`, `send`, `cert`.
const CLIENT: &str = r#"
import hashlib, smtplib, socket, ssl, sys
port, name, cas = int(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
context = ssl.create_default_context(cafile=cas[0])
for ca in cas[1:]:
    context.load_verify_locations(cafile=ca)

class Pinned(smtplib.SMTP_SSL):
    """SMTP_SSL to loopback, with NAME for SNI and the certificate check."""
    def _get_socket(self, host, port, timeout):
        sock = socket.create_connection(("127.0.0.1", port), timeout)
        return self.context.wrap_socket(sock, server_hostname=name)

client = Pinned("127.0.0.1", port, context=context, timeout=30)
words = sys.argv[4:]
while words:
    action = words.pop(0)
    if action == "cert":
        der = client.sock.getpeercert(binary_form=True)
        print("cert", hashlib.sha256(der).hexdigest()[:16])
    elif action == "login":
        user, password = words.pop(0), words.pop(0)
        try:
            code, _ = client.login(user, password)
            print("login", code)
        except smtplib.SMTPAuthenticationError as error:
            print("login", error.smtp_code)
    elif action == "send":
        refused = client.sendmail(
            "alice@example.test", ["bob@switchyard.test"],
            "From: alice@example.test\r\nSubject: over 465\r\n\r\nHello.\r\n")
        print("sent", len(refused))
client.quit()
"#;

async fn smtplib(port: u16, name: &str, cas: &[&std::path::Path], actions: &[&str]) -> Vec<String> {
    let mut args = vec![
        "-c".to_string(),
        CLIENT.to_string(),
        port.to_string(),
        name.to_string(),
        cas.iter()
            .map(|ca| ca.display().to_string())
            .collect::<Vec<_>>()
            .join(","),
    ];
    args.extend(actions.iter().map(|action| action.to_string()));
    python(args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_ssl_logs_in_and_sends_and_sni_picks_a_certificate_that_reloads_live() {
    let sni_files = tempfile::tempdir().expect("tempdir");
    let sni_ca = TestCa::new(sni_files.path(), "hosted");
    // As certbot keeps them: live/ holds symlinks into archive/, and a renewal repoints them.
    let (archive, live) = (
        sni_files.path().join("archive"),
        sni_files.path().join("live"),
    );
    std::fs::create_dir_all(&archive).expect("archive");
    std::fs::create_dir_all(&live).expect("live");
    let first = sni_ca.issue(&archive, "acme1", &["mail.acme.test"]);
    let (certificate, private_key) = (live.join("acme.pem"), live.join("acme.key"));
    std::os::unix::fs::symlink(&first.certificate, &certificate).expect("symlink");
    std::os::unix::fs::symlink(&first.private_key, &private_key).expect("symlink");
    let server = submission_as(
        "submissions",
        &format!(
            "[[tls.sni]]\ncertificate = \"{}\"\nprivate_key = \"{}\"\n",
            certificate.display(),
            private_key.display()
        ),
    )
    .await;
    let port = server.router.port;
    let main_ca = test_ca(server.files.path());
    let cas = [main_ca.as_path(), sni_ca.certificate.as_path()];

    // The default certificate, AUTH and a message, as a mail client on port 465 does it.
    let lines = smtplib(
        port,
        "mx.switchyard.test",
        &cas,
        &[
            "cert",
            "login",
            "nobody@example.test",
            "wrong",
            "login",
            ALICE,
            ALICE_PASSWORD,
            "send",
        ],
    )
    .await;
    assert_eq!(
        lines[1..],
        ["login 535", "login 235", "sent 0"],
        "{lines:?}"
    );
    let default_cert = lines[0].clone();
    let received = server.sink.wait_for(1, Duration::from_secs(15)).await;
    assert!(
        received[0].data.contains("with ESMTPSA id"),
        "{}",
        received[0].data
    );

    // SNI: the hosted name gets its own certificate (Python checks it names mail.acme.test).
    let lines = smtplib(port, "mail.acme.test", &cas, &["cert"]).await;
    assert_ne!(lines[0], default_cert);
    let acme_cert = lines[0].clone();

    // A renewed certificate is served without a restart: new files in archive/, the live/
    // symlinks replaced by rename, as certbot does.
    let renewed = sni_ca.issue(&archive, "acme2", &["mail.acme.test"]);
    for (link, target) in [
        (&certificate, &renewed.certificate),
        (&private_key, &renewed.private_key),
    ] {
        let temporary = live.join("new-link");
        std::os::unix::fs::symlink(target, &temporary).expect("symlink");
        std::fs::rename(&temporary, link).expect("replace symlink");
    }
    server.router.log_with(&["TLS certificates reloaded"]).await;
    let lines = smtplib(port, "mail.acme.test", &cas, &["cert"]).await;
    assert_ne!(lines[0], acme_cert, "the old certificate is still served");
}

/// A tenant file's `[[certificate]]` is served for the tenant's names; one naming another's
/// domain is refused at reload and the tenant keeps the certificate it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_certificate_serves_its_names_and_no_others() {
    let files = tempfile::tempdir().expect("tempdir");
    let tenant_ca = TestCa::new(files.path(), "tenant");
    let tenants = files.path().join("tenants");
    std::fs::create_dir_all(&tenants).expect("tenants");
    let tenant_file = |issued: &crate::harness::certs::Issued| {
        format!(
            "domains = [\"acme.test\"]\n\n[[certificate]]\ncertificate = \"{}\"\nprivate_key = \"{}\"\n",
            issued.certificate.display(),
            issued.private_key.display()
        )
    };
    let good = tenant_ca.issue(files.path(), "good", &["mail.acme.test"]);
    std::fs::write(tenants.join("acme.toml"), tenant_file(&good)).expect("tenant file");
    let server = submission_as(
        "submissions",
        &format!("[tenants]\ndirectory = \"{}\"\n", tenants.display()),
    )
    .await;
    let port = server.router.port;
    let cas = [test_ca(server.files.path()), tenant_ca.certificate.clone()];
    let cas: Vec<&std::path::Path> = cas.iter().map(|ca| ca.as_path()).collect();
    let served = smtplib(port, "mail.acme.test", &cas, &["cert"]).await;

    let foreign = tenant_ca.issue(files.path(), "foreign", &["mail.bravo.test"]);
    let temporary = tenants.join(".acme.toml.tmp");
    std::fs::write(&temporary, tenant_file(&foreign)).expect("tenant file");
    std::fs::rename(&temporary, tenants.join("acme.toml")).expect("rename");
    server
        .router
        .log_with(&["`mail.bravo.test` is not one of the tenant's domains or below one"])
        .await;
    let after = smtplib(port, "mail.acme.test", &cas, &["cert"]).await;
    assert_eq!(after, served, "the tenant keeps its certificate");
}
