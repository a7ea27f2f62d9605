//! Wake-ups between nodes: every node LISTENs on its queue's channel, and a transaction that
//! queues unleased work (a bounce, a retry order) NOTIFYs it at commit. A notification only
//! shortens the wait for the next scan; a missed one (a reconnect) costs at most a scan
//! interval.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::Notify;

/// Listens on `channel` for as long as the process runs, waking `work` on each notification.
pub(super) async fn run(pool: PgPool, channel: String, work: Arc<Notify>) {
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, "queue notifications: cannot connect; scanning only");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(error) = listener.listen(&channel).await {
            tracing::warn!(%error, "queue notifications: LISTEN failed; scanning only");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        loop {
            match listener.recv().await {
                Ok(_) => work.notify_one(),
                Err(error) => {
                    tracing::warn!(%error, "queue notifications lost; reconnecting");
                    // What was notified meanwhile is found by a scan.
                    work.notify_one();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
            }
        }
    }
}
