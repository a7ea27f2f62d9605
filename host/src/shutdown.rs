//! A graceful stop. The first SIGTERM (or SIGINT) stops the listeners at once; sessions get
//! `421 4.3.2` at their next command (at once when idle), and a message whose content is under
//! way is still read and answered; the queue scan stops and no delivery starts, while those under
//! way finish. The process exits when all of that is done, or when the drain time is over, or at a
//! second signal; then a session still reading a message or an AUTH answer is told 421 too, and
//! given a moment to say it. Nothing that got a 250 is lost either way: it is in the queue, and a
//! cut delivery is tried again after the restart.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Shared by the listeners, the sessions, the dispatcher and the scanner.
#[derive(Clone, Default)]
pub struct Shutdown {
    stopping: CancellationToken,
    /// Fired when the drain ends before everything finished: work still under way is cut.
    cut: CancellationToken,
    sessions: TaskTracker,
    deliveries: TaskTracker,
}

/// How long sessions cut at the end of a drain get to send their 421.
const CUT_GRACE: Duration = Duration::from_secs(1);

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

    /// Completes once the drain has ended with work still under way: a session still reading a
    /// message's content says 421 and closes.
    pub async fn cut(&self) {
        self.cut.cancelled().await
    }

    /// Runs an SMTP session (or a listener, or a refusal), which the stop waits for.
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
    /// `drain`, and no longer than until `interrupt` completes. If work is left then, it is cut:
    /// sessions get a moment to send their 421.
    pub async fn drain(&self, drain: Duration, interrupt: impl Future<Output = ()>) -> Drained {
        self.sessions.close();
        self.deliveries.close();
        let finished = async {
            self.sessions.wait().await;
            self.deliveries.wait().await;
        };
        let drained = tokio::select! {
            _ = finished => Drained::Completely,
            _ = tokio::time::sleep(drain) => Drained::TimedOut,
            _ = interrupt => Drained::Interrupted,
        };
        if drained != Drained::Completely {
            self.cut.cancel();
            let _ = tokio::time::timeout(CUT_GRACE, self.sessions.wait()).await;
        }
        drained
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
