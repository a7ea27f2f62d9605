//! The admin HTTP API through the real binary: bearer tokens, every route of the OpenAPI
//! document served and nothing else on those paths, schemathesis (an outside implementation of
//! OpenAPI) finding the answers conform to the document, and the CLI going through the API
//! while the server runs (hold, release, list, trace).

use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::client::{message, TestClient};
use crate::harness::process::{OutputWithin, COMMAND_LIMIT};
use crate::harness::router::{free_port, stdout, Router, RouterOptions};
use crate::harness::sink::Sink;
use crate::plugins::plugin;

pub const TOKEN: &str = "test-token-0123456789abcdef";

/// A plain HTTP/1.1 request; returns the status and the body.
pub async fn http(port: u16, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the admin API");
    let auth = token
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("read");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A router with the admin API on, whose deliveries go to 127.0.0.1:`smarthost` (where nothing
/// may listen yet: messages then stay queued, retried every hour).
pub async fn router_with_api(smarthost: u16, extra: &str) -> (Router, u16, tempfile::TempDir) {
    router_with_api_and(RouterOptions {
        extra: extra.to_string(),
        ..RouterOptions::relaying_to(format!("127.0.0.1:{smarthost}"), "")
    })
    .await
}

/// Like [`router_with_api`], with the router's other options (their `extra` keeps its lines).
pub async fn router_with_api_and(options: RouterOptions) -> (Router, u16, tempfile::TempDir) {
    let secrets = tempfile::tempdir().expect("tempdir");
    let tokens = secrets.path().join("tokens");
    std::fs::write(&tokens, format!("# operators\n{TOKEN}\n")).expect("tokens");
    let api = free_port();
    let router = Router::start(RouterOptions {
        extra: format!(
            "{}\n[admin]\nlisten = \"127.0.0.1:{api}\"\ntokens_file = \"{}\"\n",
            options.extra,
            tokens.display()
        ),
        retry: "intervals = [\"1h\"]\n".to_string(),
        ..options
    })
    .await;
    (router, api, secrets)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_refuses_a_missing_or_wrong_token() {
    let (router, api, _secrets) = router_with_api(free_port(), "").await;
    let (status, body) = http(api, "GET", "/v1/queue", None).await;
    assert_eq!(
        (status, body.as_str()),
        (401, "{\"error\":\"missing bearer token\"}")
    );
    let (status, body) = http(api, "GET", "/v1/queue", Some("not-the-token-at-all")).await;
    assert_eq!(
        (status, body.as_str()),
        (401, "{\"error\":\"wrong token\"}")
    );
    let (status, _) = http(api, "POST", "/v1/queue/retry", Some("")).await;
    assert_eq!(status, 401);
    let (status, body) = http(api, "GET", "/v1/queue", Some(TOKEN)).await;
    assert_eq!((status, body.as_str()), (200, "[]"));
    // The document itself is public: tools read it before they have a token.
    let (status, body) = http(api, "GET", "/v1/openapi.json", None).await;
    assert_eq!(status, 200);
    assert!(body.contains("\"openapi\": \"3.1.0\""), "{body}");
    router.log_with(&["admin API: wrong token"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_of_the_openapi_document_is_served_and_other_methods_are_not() {
    let (router, api, _secrets) = router_with_api(free_port(), "").await;
    let mut client = TestClient::connect(router.port).await;
    let id = client
        .send_accepted("s@sender.test", &["r@elsewhere.test"], &message("kept"))
        .await;
    let (_, document) = http(api, "GET", "/v1/openapi.json", None).await;
    let document: serde_json::Value = serde_json::from_str(&document).expect("JSON");
    let paths = document["paths"].as_object().expect("paths");
    assert_eq!(paths.len(), 16, "{:?}", paths.keys());
    // Actions that end the message go last.
    let mut operations: Vec<(String, String)> = paths
        .iter()
        .flat_map(|(path, item)| {
            let methods = item.as_object().expect("path item");
            methods
                .keys()
                .map(move |method| (path.clone(), method.to_uppercase()))
        })
        .collect();
    operations.sort_by_key(|(path, method)| {
        (
            method == "DELETE" || path.ends_with("/bounce"),
            path.clone(),
        )
    });
    for (path, method) in &operations {
        let concrete = path
            .replace("{id}", &id)
            .replace("{destination}", "elsewhere.test");
        let (status, body) = http(api, method, &concrete, Some(TOKEN)).await;
        let documented = &document["paths"][path][method.to_lowercase()]["responses"];
        assert!(
            documented.get(status.to_string()).is_some(),
            "{method} {concrete} answered {status}, which the document does not list: {body}"
        );
        assert!(
            !body.contains("no such route"),
            "{method} {concrete}: {body}"
        );
        // Methods the document does not list for the path are not served.
        for other in ["GET", "POST", "DELETE", "PUT", "PATCH"] {
            if paths[path].get(other.to_lowercase()).is_none() {
                let (status, _) = http(api, other, &concrete, Some(TOKEN)).await;
                assert_eq!(
                    status, 405,
                    "{other} {concrete} is served but not documented"
                );
            }
        }
    }
    let (status, body) = http(api, "GET", "/v1/nowhere", Some(TOKEN)).await;
    assert_eq!(
        (status, body.contains("no such route")),
        (404, true),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_the_answers_conform_to_the_document() {
    let (router, api, _secrets) = router_with_api(free_port(), "").await;
    let mut client = TestClient::connect(router.port).await;
    client
        .send_accepted("s@sender.test", &["r@elsewhere.test"], &message("kept"))
        .await;
    let document = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/admin-api.json");
    let output = Command::new("schemathesis")
        .args(["run", document, "--url"])
        .arg(format!("http://127.0.0.1:{api}"))
        .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
        .args(["--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"])
        .args(["--max-examples", "10", "--seed", "1"])
        .env("SCHEMATHESIS_HOOKS", "")
        .output_within(COMMAND_LIMIT);
    let said = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_goes_through_the_api_while_the_server_runs_and_holds_and_releases_mail() {
    let smarthost = free_port();
    let chain = plugin(
        "gate",
        "misbehave",
        "grants = [\"kv\"]\n[plugin.config]\nmode = \"seed\"\n",
    );
    let (router, _api, _secrets) = router_with_api(smarthost, &chain).await;
    let mut client = TestClient::connect(router.port).await;
    let id = client
        .send_accepted("s@sender.test", &["a@elsewhere.test"], &message("held"))
        .await;
    // Nothing listens at the smarthost yet: the first attempt defers it (next try in an hour).
    let deadline = Instant::now() + Duration::from_secs(15);
    while !stdout(&router.queue(&["list"])).contains("attempts=1") {
        assert!(Instant::now() < deadline, "never deferred");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let held = stdout(&router.queue(&["hold", &id]));
    assert!(held.contains("1 recipient(s) held"), "{held}");
    let listing = stdout(&router.queue(&["list"]));
    assert!(
        listing.contains("a@elsewhere.test  attempts=1  HELD"),
        "{listing}"
    );
    // A held recipient is not retried, even when told to retry everything.
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), smarthost, None).await;
    let retried = stdout(&router.queue(&["retry", "--all"]));
    assert!(retried.contains("0 recipient(s) scheduled"), "{retried}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        sink.received().is_empty(),
        "a held message is not delivered"
    );
    let released = stdout(&router.queue(&["release", &id]));
    assert!(released.contains("1 recipient(s) released"), "{released}");
    sink.wait_for(1, Duration::from_secs(15)).await;
    // The CLI's answers come from the server: an unknown id is the API's 404, in its words.
    let unknown = router.queue(&["show", "NOSUCHID"]);
    let said = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        !unknown.status.success()
            && said.contains("no message NOSUCHID in the queue (admin API: 404 Not Found)"),
        "{said}"
    );
    // The trace of the delivered message, through the API too: two attempts.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let output = router.queue(&["trace", &id]);
        let text = String::from_utf8_lossy(&output.stdout);
        if text.contains("a@elsewhere.test: delivered") {
            assert!(text.contains("a@elsewhere.test: deferred"), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // `plugins list` is live through the API (not the status file's last second).
    let listing = stdout(&router.plugins(&["list"]));
    assert!(
        listing.contains("-  gate  generation=1  sha256="),
        "{listing}"
    );
    assert!(
        !listing.contains("updated:"),
        "from the API, not the file: {listing}"
    );
}

/// A counter that plugin `stats` (delivery-stats) exported, as the metrics endpoint shows it.
async fn stats_counter(metrics_port: u16, name: &str) -> Option<String> {
    let scraped = crate::harness::router::scrape_metrics(metrics_port).await;
    let series =
        format!("switchyard_plugin_counter_total{{plugin=\"stats\",tenant=\"\",name=\"{name}\"}} ");
    scraped
        .lines()
        .find_map(|line| line.strip_prefix(&series).map(str::to_string))
}

/// An operator's bounce is a failure like any other: the message's bounce hook writes the
/// DSN's words and its delivery-result hook hears of each recipient, whether the bounce goes
/// through the server's API or, with no server running, straight to the queue (the command then
/// loads the plugins itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_bounce_runs_the_bounce_and_delivery_result_hooks() {
    let smarthost = free_port();
    let metrics_port = free_port();
    let chain = format!(
        "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n{}{}",
        plugin(
            "branding",
            "bounce-branding",
            "[plugin.config]\nsubject = \"Returned: {subject}\"\ntext = \"ACME returns:\\n{failures}\"\n"
        ),
        plugin("stats", "delivery-stats", "grants = [\"metrics\"]\n")
    );
    let (mut router, _api, _secrets) = router_with_api(smarthost, &chain).await;
    let mut client = TestClient::connect(router.port).await;
    let first = client
        .send_accepted("s@sender.test", &["a@elsewhere.test"], &message("first"))
        .await;
    let second = client
        .send_accepted("s@sender.test", &["b@elsewhere.test"], &message("second"))
        .await;
    // Nothing listens at the smarthost: both are deferred, next try in an hour.
    let deadline = Instant::now() + Duration::from_secs(15);
    while stdout(&router.queue(&["list"]))
        .matches("attempts=1")
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "never deferred");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The DSNs' next hop listens from now on (the deferred messages wait an hour).
    let sink = Sink::start("127.0.0.1".parse().expect("ip"), smarthost, None).await;

    // Through the API: the server's plugins run.
    let said = stdout(&router.queue(&["bounce", &first]));
    assert!(
        said.contains(&format!("bounced {first}: 1 recipient(s), DSN ")),
        "{said}"
    );
    let dsn = sink.wait_for(1, Duration::from_secs(15)).await;
    assert!(
        dsn[0].data.contains("Subject: Returned: first\r\n"),
        "{}",
        dsn[0].data
    );
    assert!(
        dsn[0].data.contains("ACME returns:\r\n  a@elsewhere.test: 550 5.0.0 message returned by the administrator\r\n"),
        "{}",
        dsn[0].data
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats_counter(metrics_port, "failed_total").await.as_deref() != Some("1") {
        assert!(
            Instant::now() < deadline,
            "the delivery-result hook never heard of the failure:\n{}",
            crate::harness::router::scrape_metrics(metrics_port).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // No server: the command loads the plugins and runs them itself.
    router.terminate();
    router.wait_exit(Duration::from_secs(20)).await;
    let said = stdout(&router.queue(&["bounce", &second]));
    assert!(
        said.contains(&format!("bounced {second}: 1 recipient(s), DSN ")),
        "{said}"
    );
    router.spawn().await;
    let dsn = sink.wait_for(2, Duration::from_secs(15)).await;
    assert!(
        dsn[1].data.contains("Subject: Returned: second\r\n"),
        "{}",
        dsn[1].data
    );
    assert!(
        dsn[1]
            .data
            .contains("ACME returns:\r\n  b@elsewhere.test: 550 5.0.0"),
        "{}",
        dsn[1].data
    );
}
