//! Group commit: one task owns the database's write connection and applies every write that arrives
//! while the previous commit was being flushed in a single transaction. Concurrent SMTP sessions
//! thereby share one fsync instead of paying one each, and a 250 reply still waits for its own
//! commit.

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
}

impl<A: Apply> Clone for Writer<A> {
    fn clone(&self) -> Self {
        Writer {
            sender: self.sender.clone(),
        }
    }
}

impl<A: Apply> Writer<A> {
    /// Starts the writer task. `window` is how long to wait for company before committing.
    pub fn spawn(mut applier: A, window: Duration) -> Writer<A> {
        let (sender, mut receiver) = mpsc::unbounded_channel::<Request<A>>();
        tokio::spawn(async move {
            while let Some(first) = receiver.recv().await {
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
                commit_batch(&mut applier, batch).await;
            }
        });
        Writer { sender }
    }

    pub async fn submit(&self, op: A::Op) -> Result<A::Output, QueueError> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Request { op, reply })
            .map_err(|_| QueueError::WriterGone)?;
        answer.await.map_err(|_| QueueError::WriterGone)?
    }
}

async fn run_transaction<A: Apply>(
    applier: &mut A,
    ops: &[&A::Op],
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
    Ok(outputs)
}

async fn commit_batch<A: Apply>(applier: &mut A, batch: Vec<Request<A>>) {
    let ops: Vec<&A::Op> = batch.iter().map(|request| &request.op).collect();
    match run_transaction(applier, &ops).await {
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
        Err(error) => {
            // One bad operation must not fail its neighbours: retry each on its own.
            tracing::warn!(%error, operations = batch.len(), "group commit failed; retrying one by one");
            for request in batch {
                let result = run_transaction(applier, &[&request.op])
                    .await
                    .map(|mut outputs| outputs.remove(0));
                let _ = request.reply.send(result);
            }
        }
    }
}
