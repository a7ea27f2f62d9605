//! A graceful stop. The first SIGTERM (or SIGINT) stops the listeners at once; sessions get
//! `421 4.3.2` at their next command (at once when idle), and a message whose content is under
//! way is still read and answered; the queue scan stops and no delivery starts, while those under
//! way finish. The process exits when all of that is done, or when the drain time is over, or at a
//! second signal. Nothing that got a 250 is lost either way: it is in the queue, and a cut
//! delivery is tried again after the restart.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Shared by the listeners, the sessions, the dispatcher and the scanner.
#[derive(Clone, Default)]
pub struct Shutdown {
    stopping: CancellationToken,
    sessions: TaskTracker,
    deliveries: TaskTracker,
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every session and delivery finished.
    Completely,
    /// The drain time ran out first.
    TimedOut,
    /// A second signal came first.
    Interrupted,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Starts the stop: no new sessions, no new deliveries.
    pub fn begin(&self) {
        self.stopping.cancel();
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.is_cancelled()
    }

    /// Completes once the stop has begun.
    pub async fn stopping(&self) {
        self.stopping.cancelled().await
    }

    /// Runs an SMTP session, which the stop waits for.
    pub fn spawn_session<F>(&self, session: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.sessions.spawn(session);
    }

    /// Runs delivery work (routing a message, a connection to a destination), which the stop
    /// waits for.
    pub fn spawn_delivery<F>(&self, work: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.deliveries.spawn(work);
    }

    /// Sessions and deliveries still running.
    pub fn running(&self) -> (usize, usize) {
        (self.sessions.len(), self.deliveries.len())
    }

    /// After [`Shutdown::begin`]: waits until every session and delivery has finished, at most
    /// `drain`, and no longer than until `interrupt` completes.
    pub async fn drain(&self, drain: Duration, interrupt: impl Future<Output = ()>) -> Drained {
        self.sessions.close();
        self.deliveries.close();
        let finished = async {
            self.sessions.wait().await;
            self.deliveries.wait().await;
        };
        tokio::select! {
            _ = finished => Drained::Completely,
            _ = tokio::time::sleep(drain) => Drained::TimedOut,
            _ = interrupt => Drained::Interrupted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_work_within_its_time() {
        let shutdown = Shutdown::new();
        shutdown.spawn_session(tokio::time::sleep(Duration::from_millis(50)));
        shutdown.spawn_delivery(tokio::time::sleep(Duration::from_millis(80)));
        shutdown.begin();
        assert!(shutdown.is_stopping());
        let drained = shutdown
            .drain(Duration::from_secs(5), std::future::pending())
            .await;
        assert_eq!(drained, Drained::Completely);
        assert_eq!(shutdown.running(), (0, 0));

        let shutdown = Shutdown::new();
        shutdown.spawn_delivery(tokio::time::sleep(Duration::from_secs(60)));
        shutdown.begin();
        let drained = shutdown
            .drain(Duration::from_millis(20), std::future::pending())
            .await;
        assert_eq!(drained, Drained::TimedOut);
        let drained = shutdown.drain(Duration::from_secs(60), async {}).await;
        assert_eq!(drained, Drained::Interrupted);
    }
}
