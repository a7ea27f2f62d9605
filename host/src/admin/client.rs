//! The CLI's side of the admin API: when the configuration has `[admin] listen` and a server
//! answers there, `switchyard queue ...` and `plugins ...` ask it (the server's view, its live
//! counters, no second writer on the queue); when nothing answers, they work on the queue
//! directly.

use std::net::SocketAddr;

use anyhow::{bail, Context};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use super::tokens::Tokens;
use super::views::ErrorView;
use crate::config::Config;

/// A connection to a running server's admin API.
pub struct AdminClient {
    address: SocketAddr,
    token: String,
}

impl AdminClient {
    /// The API of the server `config` describes, if it has one and something listens there.
    /// The token is `SWITCHYARD_ADMIN_TOKEN`, else the first of the tokens file.
    pub async fn reach(config: &Config) -> anyhow::Result<Option<AdminClient>> {
        let Some(address) = config.admin.listen else {
            return Ok(None);
        };
        if tokio::net::TcpStream::connect(address).await.is_err() {
            return Ok(None);
        }
        let token = match std::env::var("SWITCHYARD_ADMIN_TOKEN") {
            Ok(token) if !token.is_empty() => token,
            _ => config
                .admin
                .tokens_file
                .as_deref()
                .and_then(Tokens::first)
                .context(
                    "the admin API answers, but there is no token: set SWITCHYARD_ADMIN_TOKEN \
                     or make the tokens file readable",
                )?,
        };
        Ok(Some(AdminClient { address, token }))
    }

    /// `GET path` as `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(Method::GET, path).await
    }

    /// `POST path` as `T`.
    pub async fn post<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(Method::POST, path).await
    }

    /// `DELETE path`, answered without a body.
    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        let (status, body) = self.send(Method::DELETE, path).await?;
        check(status, &body)
    }

    async fn call<T: DeserializeOwned>(&self, method: Method, path: &str) -> anyhow::Result<T> {
        let (status, body) = self.send(method, path).await?;
        // A failed reload answers 422 with the status that says why; the caller shows it.
        if status == StatusCode::UNPROCESSABLE_ENTITY {
            if let Ok(value) = serde_json::from_slice(&body) {
                return Ok(value);
            }
        }
        check(status, &body)?;
        serde_json::from_slice(&body)
            .with_context(|| format!("the admin API answered {path} with unexpected JSON"))
    }

    async fn send(&self, method: Method, path: &str) -> anyhow::Result<(StatusCode, Bytes)> {
        let stream = tokio::net::TcpStream::connect(self.address)
            .await
            .with_context(|| format!("connecting to the admin API at {}", self.address))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.address.to_string())
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .body(Full::new(Bytes::new()))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// An error answer as the API worded it.
fn check(status: StatusCode, body: &[u8]) -> anyhow::Result<()> {
    if status.is_success() {
        return Ok(());
    }
    match serde_json::from_slice::<ErrorView>(body) {
        Ok(error) => bail!("{} (admin API: {status})", error.error),
        Err(_) => bail!("admin API: {status}"),
    }
}

/// Percent-encodes a query value or path segment.
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
