//! Fetching a policy file: `https://mta-sts.DOMAIN/.well-known/mta-sts.txt` (RFC 8461 3.3) with
//! hyper's HTTP/1.1 client over a TLS connection whose certificate must verify for the policy
//! host. No redirects are followed, the answer must be `200` with `text/plain`, and at most 64 KiB
//! is read.

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::net::dns::Dns;
use crate::net::verify::{server_name, ClientTls};

/// The largest policy file read (RFC 8461 3.3 suggests 64 KiB).
const MAX_POLICY_BYTES: usize = 64 * 1024;

/// Fetches the policy text of `domain`, from port `port` of its policy host.
pub async fn policy_text(
    domain: &str,
    port: u16,
    dns: &Dns,
    tls: &ClientTls,
    timeout: Duration,
) -> Result<String, String> {
    match tokio::time::timeout(timeout, fetch(domain, port, dns, tls)).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no policy from mta-sts.{domain} within {timeout:?}"
        )),
    }
}

async fn fetch(domain: &str, port: u16, dns: &Dns, tls: &ClientTls) -> Result<String, String> {
    let host = format!("mta-sts.{domain}");
    let target = dns
        .host_target(&host, port)
        .await
        .map_err(|reply| reply.one_line())?;
    let address = target
        .addresses
        .first()
        .ok_or_else(|| format!("{host} has no address"))?;
    let tcp = TcpStream::connect(address)
        .await
        .map_err(|error| format!("connect to {host} ({address}): {error}"))?;
    let config = tls.config(true)?;
    let name = server_name(&host)?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|error| format!("TLS with {host}: {error}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| format!("HTTP with {host}: {error}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = hyper::Request::get("/.well-known/mta-sts.txt")
        .header(hyper::header::HOST, &host)
        .header(hyper::header::USER_AGENT, "Switchyard")
        .body(Empty::<Bytes>::new())
        .map_err(|error| error.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|error| format!("HTTP with {host}: {error}"))?;
    if response.status() != hyper::StatusCode::OK {
        return Err(format!(
            "{host} answered {} (redirects are not followed)",
            response.status()
        ));
    }
    let plain = response
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .trim_start()
                .to_ascii_lowercase()
                .starts_with("text/plain")
        });
    if !plain {
        return Err(format!("{host}: the policy is not text/plain"));
    }
    let body = Limited::new(response.into_body(), MAX_POLICY_BYTES)
        .collect()
        .await
        .map_err(|error| format!("{host}: policy body: {error}"))?
        .to_bytes();
    String::from_utf8(body.to_vec()).map_err(|_| format!("{host}: the policy is not UTF-8"))
}
