//! Embedded sequencer: a single committer task group-commits concurrent sends into the store
//! (many sends, one transaction, one fsync), then fans the accepted ones out in seq order.
//!
//! One task owns all message writes, so seq order, commit order and fan-out order are the same.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use super::{Receipt, SendOutcome, Sequencer};
use crate::breaker::Breakers;
use crate::error::ApiError;
use crate::fanout::Fanout;
use crate::metrics as m;
use crate::store::{AppendOutcome, SendRequest, Store, StoreError};

/// Most sends one transaction takes; bounds the latency one batch adds to the next.
const MAX_BATCH: usize = 512;
/// Sends queued before callers wait; back-pressure instead of unbounded memory.
const QUEUE: usize = 16_384;

type Reply = oneshot::Sender<Result<AppendOutcome, StoreError>>;

pub struct GroupCommitSequencer {
    queue: mpsc::Sender<(SendRequest, Reply)>,
}

impl GroupCommitSequencer {
    pub fn start(store: Arc<dyn Store>, fanout: Arc<dyn Fanout>, breakers: Arc<Breakers>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(commit_loop(rx, store, fanout, breakers));
        Self { queue: tx }
    }
}

async fn commit_loop(
    mut rx: mpsc::Receiver<(SendRequest, Reply)>,
    store: Arc<dyn Store>,
    fanout: Arc<dyn Fanout>,
    breakers: Arc<Breakers>,
) {
    let mut jobs = Vec::with_capacity(MAX_BATCH);
    // recv_many returns whatever is queued (at least one): under load batches grow by themselves,
    // at low load a send commits alone without waiting for company.
    while rx.recv_many(&mut jobs, MAX_BATCH).await > 0 {
        let (reqs, replies): (Vec<SendRequest>, Vec<Reply>) = jobs.drain(..).unzip();
        metrics::histogram!(m::COMMIT_BATCH_SIZE).record(reqs.len() as f64);
        if !breakers.store.allow() {
            for reply in replies {
                let _ = reply.send(Err(StoreError::Unavailable("the store is failing (circuit open)".into())));
            }
            continue;
        }
        let started = Instant::now();
        let result = store.append_messages(&reqs).await;
        match &result {
            Ok(_) => breakers.store.success(),
            Err(_) => breakers.store.failure(),
        }
        metrics::histogram!(m::COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
        m::dependency_latency("store", "append_batch", started);
        match result {
            Ok(outcomes) => {
                let committed = Instant::now();
                let accepted: Vec<_> = outcomes
                    .iter()
                    .filter_map(|o| match o {
                        AppendOutcome::Accepted(msg) => Some(msg.clone()),
                        _ => None,
                    })
                    .collect();
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
                for msg in &accepted {
                    fanout.publish_message(msg).await;
                }
                if !accepted.is_empty() {
                    metrics::histogram!(m::DELIVERY_LATENCY).record(committed.elapsed().as_secs_f64());
                }
            }
            Err(e) => {
                // Nothing of the batch was committed: every caller gets the error and may retry.
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

#[async_trait]
impl Sequencer for GroupCommitSequencer {
    fn span_name(&self) -> &'static str {
        "store group commit"
    }

    async fn submit(&self, req: SendRequest) -> Result<Receipt, ApiError> {
        let (tx, rx) = oneshot::channel();
        // A bounded channel's waiters are served first come, first served: submission order holds.
        self.queue.send((req, tx)).await.map_err(|_| ApiError::Unavailable("the sequencer is shutting down".into()))?;
        Ok(Box::pin(async move {
            let outcome = rx.await.map_err(|_| ApiError::Unavailable("the sequencer stopped".into()))??;
            match outcome {
                AppendOutcome::Accepted(msg) => Ok(SendOutcome::Accepted(msg)),
                AppendOutcome::Duplicate(msg) => Ok(SendOutcome::Duplicate(msg)),
                AppendOutcome::Conflict => {
                    Err(ApiError::Conflict("client_msg_id was already used with a different body".into()))
                }
                AppendOutcome::RoomMissing => Err(ApiError::room_not_found()),
            }
        }))
    }
}
