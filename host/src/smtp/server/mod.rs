//! The SMTP server: listeners accept connections within the session limits and run one
//! [`session::Session`] per connection.

mod authenticate;
mod content;
mod limits;
mod policy;
mod sasl;
mod session;
mod submission;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

pub use limits::SessionLimits;

use crate::config::ListenerConfig;
use crate::services::Services;

/// Binds a listener's socket (done before serving, so a bad address fails start-up).
pub async fn bind(listener: &ListenerConfig) -> anyhow::Result<TcpListener> {
    let address: SocketAddr = listener.address.get_ref().parse()?;
    TcpListener::bind(address).await.map_err(|error| {
        anyhow::anyhow!(
            "listener `{}`: cannot bind {address}: {error}",
            listener.name
        )
    })
}

/// Accepts connections forever.
pub async fn serve(
    socket: TcpListener,
    listener: ListenerConfig,
    services: Arc<Services>,
    limits: Arc<SessionLimits>,
) {
    let listener = Arc::new(listener);
    loop {
        let (mut stream, peer) = match socket.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: wait a little instead of spinning.
                tracing::warn!(listener = %listener.name, %error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        metrics::counter!("switchyard_smtp_sessions_total", "listener" => listener.name.clone())
            .increment(1);
        match limits.enter(peer.ip()) {
            Ok(guard) => {
                let services = services.clone();
                let listener = listener.clone();
                tokio::spawn(async move {
                    session::Session::run(stream, peer, listener, services).await;
                    drop(guard);
                });
            }
            Err(reply) => {
                tracing::info!(listener = %listener.name, client = %peer, reply = %reply, "connection refused");
                tokio::spawn(async move {
                    let _ = stream.write_all(reply.to_wire().as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        }
    }
}
