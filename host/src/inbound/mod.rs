//! The SMTP server, the inbound wing: listeners accept connections within the session limits and
//! run one [`session::Session`] per connection, which hands each accepted message to
//! [`crate::delivery::inbox`].

mod auth_budget;
mod authenticate;
mod content;
mod data;
mod data_reader;
mod envelope;
mod limits;
pub mod memory;
mod policy;
mod sasl;
pub mod services;
mod session;
mod submission;
mod tenancy;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

pub use auth_budget::AuthBudget;
pub use limits::SessionLimits;

use crate::config::ListenerConfig;
use crate::inbound::services::Services;

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

/// Accepts connections until the process stops; the socket closes then, so new connections are
/// refused by the kernel instead of waiting for a session that will not come.
pub async fn serve(
    socket: TcpListener,
    listener: ListenerConfig,
    services: Arc<Services>,
    limits: Arc<SessionLimits>,
) {
    let listener = Arc::new(listener);
    loop {
        let accepted = tokio::select! {
            accepted = socket.accept() => accepted,
            _ = services.shutdown.stopping() => {
                refuse_backlog(socket, &listener.name, &services.shutdown);
                return;
            }
        };
        let (stream, peer) = match accepted {
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
        let banned = if listener.role.is_submission() {
            services.auth_budget.refusal(peer.ip())
        } else {
            None
        };
        if let Some(reply) = banned {
            metrics::counter!("switchyard_smtp_refused_total", "listener" => listener.name.clone(), "reason" => "auth_ban").increment(1);
            tracing::info!(listener = %listener.name, client = %peer, reply = %reply, "connection refused");
            services.shutdown.spawn_session(refuse(stream, reply));
            continue;
        }
        if services
            .memory
            .as_ref()
            .is_some_and(|memory| !memory.admits(limits.total()))
        {
            metrics::counter!("switchyard_smtp_refused_total", "listener" => listener.name.clone(), "reason" => "memory").increment(1);
            let reply = crate::mail::reply::Reply::new(
                421,
                "4.3.2",
                "Too busy (memory is short), try again later",
            );
            tracing::info!(listener = %listener.name, client = %peer, reply = %reply, "connection refused");
            services.shutdown.spawn_session(refuse(stream, reply));
            continue;
        }
        match limits.enter(peer.ip()) {
            Ok(guard) => {
                let services = services.clone();
                let listener = listener.clone();
                let shutdown = services.shutdown.clone();
                shutdown.spawn_session(async move {
                    session::Session::run(stream, peer, listener, services).await;
                    drop(guard);
                });
            }
            Err(reply) => {
                tracing::info!(listener = %listener.name, client = %peer, reply = %reply, "connection refused");
                services.shutdown.spawn_session(refuse(stream, reply));
            }
        }
    }
}

/// At a stop: answers the connections the kernel accepted but the server has not yet taken
/// with 421, so no client that got connected is dropped without a word, then closes the socket.
fn refuse_backlog(socket: TcpListener, listener: &str, shutdown: &crate::shutdown::Shutdown) {
    let socket = match socket.into_std() {
        Ok(socket) => socket,
        Err(error) => {
            tracing::warn!(%listener, %error, "cannot drain the listen backlog");
            return;
        }
    };
    let stopping =
        crate::mail::reply::Reply::new(421, "4.3.2", "Service shutting down, try again later");
    // The socket is non-blocking (tokio made it so): accept until nothing waits.
    while let Ok((stream, peer)) = socket.accept() {
        let stream = stream
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpStream::from_std(stream));
        match stream {
            Ok(stream) => {
                tracing::info!(%listener, client = %peer, "connection refused: shutting down");
                shutdown.spawn_session(refuse(stream, stopping.clone()));
            }
            Err(error) => tracing::debug!(%listener, %error, "cannot answer a waiting connection"),
        }
    }
}

/// Sends `reply` to a connection that gets no session, and closes it.
async fn refuse(mut stream: tokio::net::TcpStream, reply: crate::mail::reply::Reply) {
    let _ = stream.write_all(reply.to_wire().as_bytes()).await;
    let _ = stream.shutdown().await;
}
