//! Group commit: a writer task applies every write that arrived while the previous commit was
//! being flushed in a single transaction. Concurrent SMTP sessions thereby share one fsync instead
//! of paying one each, and a 250 reply still waits for its own commit. SQLite has one writer
//! task (one write connection); PostgreSQL several, each committing its own group.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::QueueError;

/// Most operations committed together; bounds the latency of the first in a very long burst.
const MAX_BATCH: usize = 512;

/// Applies one kind of operation inside an open transaction.
#[async_trait::async_trait]
pub(crate) trait Apply: Send + 'static {
    type Op: Send + Sync + 'static;
    type Output: Send + 'static;

    async fn begin(&mut self) -> Result<(), QueueError>;
    /// Applies a group's operations in the open transaction, returning one output per
    /// operation, in order; an error fails the whole group.
    async fn apply(&mut self, ops: &[&Self::Op]) -> Result<Vec<Self::Output>, QueueError>;
    async fn commit(&mut self) -> Result<(), QueueError>;
    async fn rollback(&mut self);
}

struct Request<A: Apply> {
    op: A::Op,
    reply: oneshot::Sender<Result<A::Output, QueueError>>,
}

/// A handle to the writer task.
pub(crate) struct Writer<A: Apply> {
    sender: mpsc::UnboundedSender<Request<A>>,
    /// Transactions committed so far (each a group of one or more operations).
    commits: Arc<AtomicU64>,
}

impl<A: Apply> Clone for Writer<A> {
    fn clone(&self) -> Self {
        Writer {
            sender: self.sender.clone(),
            commits: self.commits.clone(),
        }
    }
}

impl<A: Apply> Writer<A> {
    /// Starts one writer task per applier. `window` is how long to wait for company before
    /// committing. With several, a task gathers the next group while the others commit theirs
    /// (for a server engine, whose transactions can run side by side); each request is in
    /// exactly one group.
    pub fn spawn(appliers: Vec<A>, window: Duration) -> Writer<A> {
        let (sender, receiver) = mpsc::unbounded_channel::<Request<A>>();
        let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
        let commits = Arc::new(AtomicU64::new(0));
        for mut applier in appliers {
            let receiver = receiver.clone();
            let commits = commits.clone();
            tokio::spawn(async move {
                while let Some(batch) = gather(&receiver, window).await {
                    commit_batch(&mut applier, batch, &commits).await;
                }
            });
        }
        Writer { sender, commits }
    }

    /// Transactions committed so far: with group commit, fewer than the operations.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    pub async fn submit(&self, op: A::Op) -> Result<A::Output, QueueError> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Request { op, reply })
            .map_err(|_| QueueError::WriterGone)?;
        answer.await.map_err(|_| QueueError::WriterGone)?
    }
}

/// The next group: the first request to arrive, and what else arrives within `window` (or is
/// waiting already), up to [`MAX_BATCH`]. `None` once every handle is gone.
async fn gather<A: Apply>(
    receiver: &tokio::sync::Mutex<mpsc::UnboundedReceiver<Request<A>>>,
    window: Duration,
) -> Option<Vec<Request<A>>> {
    // Held while gathering: the next group is gathered by one task at a time.
    let mut receiver = receiver.lock().await;
    let first = receiver.recv().await?;
    let mut batch = vec![first];
    if !window.is_zero() {
        tokio::time::sleep(window).await;
    }
    while batch.len() < MAX_BATCH {
        match receiver.try_recv() {
            Ok(request) => batch.push(request),
            Err(_) => break,
        }
    }
    Some(batch)
}

async fn run_transaction<A: Apply>(
    applier: &mut A,
    ops: &[&A::Op],
    commits: &AtomicU64,
) -> Result<Vec<A::Output>, QueueError> {
    applier.begin().await?;
    let outputs = match applier.apply(ops).await {
        Ok(outputs) => outputs,
        Err(error) => {
            applier.rollback().await;
            return Err(error);
        }
    };
    if let Err(error) = applier.commit().await {
        applier.rollback().await;
        return Err(error);
    }
    commits.fetch_add(1, Ordering::Relaxed);
    Ok(outputs)
}

async fn commit_batch<A: Apply>(applier: &mut A, batch: Vec<Request<A>>, commits: &AtomicU64) {
    let ops: Vec<&A::Op> = batch.iter().map(|request| &request.op).collect();
    match run_transaction(applier, &ops, commits).await {
        Ok(outputs) => {
            for (request, output) in batch.into_iter().zip(outputs) {
                let _ = request.reply.send(Ok(output));
            }
        }
        Err(error) if batch.len() == 1 => {
            if let Some(request) = batch.into_iter().next() {
                let _ = request.reply.send(Err(error));
            }
        }
        Err(error) if error.is_unavailable() => {
            // Nothing else would commit now either: every operation of the group is answered
            // at once (a session gets its 451 now, not after one retry per neighbour). After a
            // COMMIT whose answer was lost, retrying could also apply an operation twice.
            tracing::warn!(%error, operations = batch.len(), "group commit failed: database unavailable");
            let text = match &error {
                QueueError::Unavailable(text) => text.clone(),
                other => other.to_string(),
            };
            for request in batch {
                let _ = request
                    .reply
                    .send(Err(QueueError::Unavailable(text.clone())));
            }
        }
        Err(error) => {
            // One bad operation must not fail its neighbours: retry each on its own.
            tracing::warn!(%error, operations = batch.len(), "group commit failed; retrying one by one");
            for request in batch {
                let result = run_transaction(applier, &[&request.op], commits)
                    .await
                    .map(|mut outputs| outputs.remove(0));
                let _ = request.reply.send(result);
            }
        }
    }
}
