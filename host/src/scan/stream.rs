//! A connection to a scanner, over TCP or a Unix socket.

use tokio::io::{AsyncRead, AsyncWrite};

use super::ScanError;
use crate::config::Endpoint;

/// A byte stream either way.
pub(super) trait Connection: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Connection for T {}

/// Connects to `address`; a failure is [`ScanError::Refused`] naming the address.
pub(super) async fn connect(address: &Endpoint) -> Result<Box<dyn Connection>, ScanError> {
    let refused = |error: std::io::Error| ScanError::Refused(format!("{address}: {error}"));
    Ok(match address {
        Endpoint::Tcp(address) => {
            let stream = tokio::net::TcpStream::connect(address.as_str())
                .await
                .map_err(refused)?;
            // Requests are written whole and answered once: no reason to wait for Nagle.
            let _ = stream.set_nodelay(true);
            Box::new(stream)
        }
        Endpoint::Unix(path) => Box::new(
            tokio::net::UnixStream::connect(path)
                .await
                .map_err(refused)?,
        ),
    })
}
