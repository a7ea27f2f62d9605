//! `switchyard check-config`: the effective configuration, or file:line and a precise message.

use std::process::Command;

use crate::harness::process::{OutputWithin, COMMAND_LIMIT};

fn check(text: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("switchyard.toml");
    std::fs::write(&path, text).expect("write config");
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("check-config")
        .arg(&path)
        .output_within(COMMAND_LIMIT);
    let stderr =
        String::from_utf8_lossy(&output.stderr).replace(&path.display().to_string(), "FILE");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).to_string(),
        stderr,
    )
}

#[test]
fn valid_config_prints_every_default() {
    let (ok, stdout, _) = check("[delivery]\nport = 2526\n");
    assert!(ok);
    for key in [
        "max_message_size = 26214400",
        "port = 2526",
        "max_lifetime = \"5days\"",
        "[[listener]]",
    ] {
        assert!(stdout.contains(key), "{key} missing from:\n{stdout}");
    }
}

#[test]
fn errors_name_file_line_and_problem() {
    let cases = [
        (
            "[smtp]\nmax_recipients = \"ten\"\n",
            "FILE:2:18: invalid type: string \"ten\", expected usize",
        ),
        ("[relay]\nnetworks = [\"10.0.0.0/33\"]\n", "FILE:2:"),
        (
            "[[route]]\ndomain = \"example.com\"\n",
            "FILE:2:1: route `example.com`: give one of smarthost (SMTP) and lmtp",
        ),
        (
            "[delivery]\ntls = \"sometimes\"\n",
            "FILE:2:7: unknown variant `sometimes`",
        ),
        (
            "hostname = \"mx\"\nlistner = 1\n",
            "FILE:2:1: unknown field `listner`",
        ),
        (
            "[smtp]\nmax_data_line = 100\n",
            "FILE:2:1: max_data_line must be at least 998",
        ),
    ];
    for (text, expected) in cases {
        let (ok, _, stderr) = check(text);
        assert!(!ok, "{text:?} should be refused");
        assert!(
            stderr.contains(expected),
            "{text:?}: expected {expected:?} in {stderr:?}"
        );
    }
}

#[test]
fn submission_listeners_need_accounts_and_tls() {
    let listener = "[[listener]]\nname = \"submission\"\naddress = \"127.0.0.1:2587\"\nrole = \"submission\"\n";
    let (ok, _, stderr) = check(listener);
    assert!(!ok);
    assert!(
        stderr.contains(
            "FILE:3:11: listener `submission` is a submission listener, which needs AUTH"
        ),
        "{stderr}"
    );
    let (ok, _, _) = check(&format!("{listener}[submission]\nrequire_auth = false\n"));
    assert!(ok, "relay.networks alone is a choice");
    let (ok, _, stderr) = check(&format!("{listener}[submission]\nusers_file = \"users\"\n"));
    assert!(!ok);
    assert!(
        stderr.contains("FILE:6:1: submission.users_file: SMTP AUTH needs [tls]"),
        "{stderr}"
    );
}

#[test]
fn a_bad_users_file_line_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let generated = rcgen::generate_simple_self_signed(vec!["mx.test".to_string()]).expect("cert");
    std::fs::write(dir.path().join("cert.pem"), generated.cert.pem()).expect("cert");
    std::fs::write(
        dir.path().join("key.pem"),
        generated.signing_key.serialize_pem(),
    )
    .expect("key");
    std::fs::write(dir.path().join("users"), "# accounts\nalice:plaintext\n").expect("users");
    let config = dir.path().join("switchyard.toml");
    std::fs::write(
        &config,
        "[tls]\ncertificate = \"cert.pem\"\nprivate_key = \"key.pem\"\n\n\
         [submission]\nusers_file = \"users\"\n",
    )
    .expect("config");
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("check-config")
        .arg(&config)
        .output_within(COMMAND_LIMIT);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("users:2: user `alice`: not a PHC hash string"),
        "{stderr}"
    );
}

#[test]
fn every_tenant_file_is_checked_and_a_domain_claimed_twice_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tenants = dir.path().join("tenants");
    std::fs::create_dir(&tenants).expect("tenants dir");
    std::fs::write(tenants.join("acme.toml"), "domains = [\"acme.test\"]\n").expect("acme");
    std::fs::write(
        tenants.join("bravo.toml"),
        "domains = [\"bravo.test\",\n  \"acme.test\"]\n",
    )
    .expect("bravo");
    let config = dir.path().join("switchyard.toml");
    std::fs::write(&config, "[tenants]\ndirectory = \"tenants\"\n").expect("config");
    let run = || {
        let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("check-config")
            .arg(&config)
            .output_within(COMMAND_LIMIT);
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).to_string(),
        )
    };
    let (ok, stderr) = run();
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "{}:2:3: domain `acme.test` is already claimed by tenant `acme`",
            tenants.join("bravo.toml").display()
        )),
        "{stderr}"
    );
    std::fs::write(
        tenants.join("bravo.toml"),
        "domains = [\"bravo.test\"]\n[limits]\nmessages_per_hour = \"many\"\n",
    )
    .expect("bravo");
    let (ok, stderr) = run();
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "{}:3:21: invalid type",
            tenants.join("bravo.toml").display()
        )),
        "{stderr}"
    );
    std::fs::write(tenants.join("bravo.toml"), "domains = [\"bravo.test\"]\n").expect("bravo");
    let (ok, stderr) = run();
    assert!(ok, "{stderr}");
    assert!(stderr.contains("2 tenant file(s) valid"), "{stderr}");
}

/// Trust settings that cannot work are refused by `check-config`, each with its reason.
#[test]
fn trust_settings_that_cannot_work_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keygen = |selector: &str, algorithm: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args([
                "dkim",
                "keygen",
                "example.test",
                selector,
                "--algorithm",
                algorithm,
                "--out",
            ])
            .arg(dir.path())
            .output_within(COMMAND_LIMIT);
        assert!(output.status.success());
        dir.path().join(format!("example.test.{selector}.key"))
    };
    let ed = keygen("ed", "ed25519");
    let not_a_key = dir.path().join("not-a-key.pem");
    std::fs::write(&not_a_key, "hello\n").expect("write");
    let credentials = dir.path().join("passwords");
    std::fs::write(&credentials, "relay.test\n").expect("write");
    let dkim = |selector: &str, key: &std::path::Path| {
        format!(
            "[[dkim]]\ndomain = \"example.test\"\nselector = \"{selector}\"\nprivate_key = \"{}\"\n",
            key.display()
        )
    };
    let cases = [
        (
            dkim("s1", &dir.path().join("missing.key")),
            "dkim: example.test/s1: no such private_key file".to_string(),
        ),
        (
            dkim("s1", &not_a_key),
            format!("{}: no private key in PEM file", not_a_key.display()),
        ),
        (
            format!("{}[arc]\nseal = true\ndomain = \"example.test\"\nselector = \"s9\"\n", dkim("ed", &ed)),
            "arc: no [[dkim]] key s9._domainkey.example.test to seal with".to_string(),
        ),
        (
            format!("{}[arc]\nseal = true\ndomain = \"example.test\"\nselector = \"ed\"\n", dkim("ed", &ed)),
            "ARC seals with RSA keys only".to_string(),
        ),
        (
            format!("{}{}", dkim("ed", &ed), dkim("ed", &ed)),
            "dkim: ed._domainkey.example.test is configured twice".to_string(),
        ),
        (
            "[[listener]]\nname = \"smtps\"\naddress = \"127.0.0.1:4650\"\nrole = \"submissions\"\n\n[submission]\nrequire_auth = false\n".to_string(),
            "has role `submissions` (implicit TLS), which needs a certificate".to_string(),
        ),
        (
            "[delivery]\nca_file = \"/nonexistent/ca.pem\"\n".to_string(),
            "delivery.ca_file: no such file `/nonexistent/ca.pem`".to_string(),
        ),
        (
            format!("[delivery]\ncredentials_file = \"{}\"\n", credentials.display()),
            format!("{}:1: expected `HOST[:PORT] USERNAME:PASSWORD`", credentials.display()),
        ),
    ];
    for (text, expected) in cases {
        let (ok, _, stderr) = check(&text);
        assert!(!ok, "{text:?} should be refused");
        assert!(
            stderr.contains(&expected),
            "{text:?}: expected {expected:?} in {stderr:?}"
        );
    }
}

/// Queue settings: PostgreSQL keys with the SQLite engine, bad names and leases are refused
/// with the line; a PostgreSQL queue is connected to, and a wrong address, user or database
/// fails with the server's reason.
#[test]
fn queue_engine_settings_are_checked_and_the_database_reached() {
    let cases = [
        (
            "[queue]\nurl = \"postgres://x@127.0.0.1/test\"\n",
            "FILE:2:1: queue.url and queue.schema are for engine = \"postgres\"",
        ),
        (
            "node_id = \"a\"\n[queue]\nengine = \"postgres\"\nschema = \"Bad-Name\"\n",
            "FILE:4:1: queue.schema `Bad-Name`: use lower-case letters, digits and _",
        ),
        (
            "[queue]\nlease = \"1s\"\n",
            "FILE:2:1: queue.lease must be at least 3s",
        ),
        (
            "node_id = \"two words\"\n",
            "FILE:1:1: node_id `two words`: a name without spaces",
        ),
        (
            "[queue]\nengine = \"mysql\"\n",
            "FILE:2:10: unknown variant `mysql`, expected `sqlite` or `postgres`",
        ),
    ];
    for (text, expected) in cases {
        let (ok, _, stderr) = check(text);
        assert!(!ok, "{text} accepted");
        assert!(stderr.contains(expected), "{text}: {stderr}");
    }
    let url = crate::harness::router::database_url();
    let (ok, _, stderr) = check(&format!(
        "node_id = \"a\"\n[queue]\nengine = \"postgres\"\nurl = \"{url}\"\nschema = \"check_config_probe\"\n"
    ));
    assert!(ok, "{stderr}");
    assert!(stderr.contains("reachable, schema version"), "{stderr}");
    for (wrong, reason) in [
        (
            "postgres://postgres@127.0.0.1:5432/no_such_db",
            "no_such_db",
        ),
        (
            "postgres://no_such_role@127.0.0.1:5432/test",
            "no_such_role",
        ),
        ("postgres://postgres@127.0.0.1:1/test", "Connection refused"),
    ] {
        let (ok, _, stderr) = check(&format!(
            "node_id = \"a\"\n[queue]\nengine = \"postgres\"\nurl = \"{wrong}\"\n"
        ));
        assert!(!ok, "{wrong} accepted");
        assert!(stderr.contains("connecting to the queue"), "{stderr}");
        assert!(stderr.contains(reason), "{wrong}: {stderr}");
    }
}
