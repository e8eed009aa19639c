//! Publishing from the front of the queue, and what a failure does:
//! retry from the failed message, or park it in the dead-letter table.
//!
//! While following the stream, batches go out on the publisher's ordered
//! lane two at a time (`follow` in `relay.rs`): the next batch is written
//! while the broker confirms the one before, so its one channel does not
//! wait on the relay. Batches are settled in the order they were sent. A
//! failure stops the queue at the failed message: the batch after it is
//! finished first, and all of it goes again after the failed one (a later
//! message of the failed one's aggregate that the broker took is an order
//! break, as within a batch).

use super::*;
use crate::message::Outbound;
use crate::sink::Unavailable;

impl<P: Publisher> WalRelay<P> {
    /// Waits until the front message may go: its retry time, and a
    /// publisher that can publish. `Some` if the session ended meanwhile.
    async fn ready_to_send(
        &self,
        st: &State,
        drain: &CancellationToken,
        abort: &CancellationToken,
    ) -> Option<End> {
        if let Some(at) = st.pending.front().and_then(|i| i.retry_at) {
            tokio::select! {
                _ = abort.cancelled() => return Some(End::Aborted(0)),
                _ = drain.cancelled() => return Some(End::Drained),
                _ = tokio::time::sleep_until(at) => {}
            }
        }
        if !self.publisher.can_publish() {
            tokio::select! {
                _ = abort.cancelled() => return Some(End::Aborted(0)),
                _ = drain.cancelled() => return Some(End::Drained),
                _ = self.publisher.publishable(drain) => {}
            }
            if drain.is_cancelled() {
                return Some(End::Drained);
            }
        }
        None
    }

    /// The messages of the next batch: up to `batch_size` queued items
    /// after the first `skip` (those are in flight already).
    pub(super) fn next_batch(&self, st: &State, skip: usize) -> Vec<Result<Outbound, Failure>> {
        let routing = Routing::of(&self.config);
        let batch: Vec<_> = st
            .pending
            .iter()
            .skip(skip)
            .take(self.config.batch_size)
            .map(|i| i.row.to_sendable(&routing))
            .collect();
        self.metrics.batch_size.observe(batch.len() as f64);
        batch
    }

    /// Sends the next batch from the front of the queue, waits for its
    /// answers and settles them: one batch at a time (the table read
    /// before streaming). `Some` if the session ended meanwhile.
    pub(super) async fn send_next<S: WalStream>(
        &self,
        st: &mut State,
        stream: &S,
        drain: &CancellationToken,
        abort: &CancellationToken,
    ) -> Result<Option<End>, SessionError> {
        if let Some(end) = self.ready_to_send(st, drain, abort).await {
            return Ok(Some(end));
        }
        let messages = self.next_batch(st, 0);
        let n = messages.len();
        let outcomes = tokio::select! {
            _ = abort.cancelled() => return Ok(Some(End::Aborted(n))),
            sent = async {
                let begun = self.publisher.begin(messages).await?;
                Ok::<_, Unavailable>(self.publisher.finish(begun).await)
            } => match sent {
                Ok(o) => o,
                Err(unavailable) => {
                    self.publisher.report_failure();
                    debug!(source = %self.config.name, error = %unavailable, "broker unavailable; waiting");
                    return Ok(None);
                }
            },
        };
        self.settle(st, stream, &outcomes, &[]).await;
        Ok(None)
    }

    /// Settles the front batch's `outcomes` (one per queued item from the
    /// front): the delivered prefix leaves the queue, its transactions are
    /// done in the ledger and its rows go to the deleter; the first failure
    /// stops there (`later`: the outcomes of a batch sent after this one,
    /// whose messages are all sent again).
    pub(super) async fn settle<S: WalStream>(
        &self,
        st: &mut State,
        stream: &S,
        outcomes: &[Outcome],
        later: &[Outcome],
    ) {
        let confirmed_at = SystemTime::now();
        let first_failed = outcomes
            .iter()
            .position(|o| matches!(o, Outcome::Failed(_)));
        let delivered = first_failed.unwrap_or(outcomes.len());
        let mut ids = Vec::new();
        for _ in 0..delivered {
            let Some(item) = st.pending.pop_front() else {
                break;
            };
            self.metrics.lag.observe(item.row.age_at(confirmed_at));
            if let Some(seq) = item.seq {
                st.ledger.done(seq);
            }
            if item.from_table {
                ids.push(item.row.id);
            }
        }
        self.metrics.published.inc_by(delivered as u64);
        if let Some(k) = first_failed
            && let Some(Outcome::Failed(failure)) = outcomes.get(k)
        {
            let after: Vec<Outcome> = outcomes[k + 1..].iter().chain(later).cloned().collect();
            self.failed(st, failure, &after).await;
        }
        self.move_slot(st, stream);
        if !ids.is_empty() {
            // Only fails once the deleter is gone (the relay is stopping):
            // the rows stay and go out again after a restart.
            let _ = st.deletes.send(Job::Delete(ids));
        }
    }

    /// The front message failed: park it or set it to wait; count the
    /// later messages of its aggregate the broker took (order breaks).
    pub(super) async fn failed(&self, st: &mut State, failure: &Failure, later: &[Outcome]) {
        let name = &self.config.name;
        self.metrics.failure(failure.reason).inc();
        let Some(front) = st.pending.front() else {
            return;
        };
        let aggregate = (
            front.row.aggregate_type.clone(),
            front.row.aggregate_id.clone(),
        );
        let breaks = st
            .pending
            .iter()
            .skip(1)
            .zip(later)
            .filter(|(i, o)| {
                matches!(o, Outcome::Delivered)
                    && i.row.aggregate() == (aggregate.0.as_str(), aggregate.1.as_str())
            })
            .count();
        if breaks > 0 {
            self.metrics.order_breaks.inc_by(breaks as u64);
            warn!(source = %name, row_id = front.row.id, dedup_key = %front.row.dedup_key, later = breaks, "order break: the broker took later messages of this aggregate while refusing this one; they are sent again after it");
        }
        let attempt = u32::try_from(front.row.attempts)
            .unwrap_or(0)
            .saturating_add(1);
        let disposition = decide(failure.reason, attempt, self.config.max_attempts);
        if disposition == Disposition::Park {
            match self.park(&front.row, failure, attempt).await {
                Ok(true) => {
                    if let Some(counter) = self.metrics.parked(failure.reason) {
                        counter.inc();
                    }
                    warn!(source = %name, row_id = front.row.id, dedup_key = %front.row.dedup_key, attempt, error = %failure, "parked in the dead-letter table; the source goes on with the next message");
                    if let Some(item) = st.pending.pop_front()
                        && let Some(seq) = item.seq
                    {
                        st.ledger.done(seq);
                    }
                    return;
                }
                Ok(false) => {}
                Err(err) => {
                    self.metrics.error(SourceError::Settle).inc();
                    warn!(source = %name, row_id = front.row.id, error = %ErrorChain(&err), "parking failed; retrying the message instead");
                }
            }
        }
        let delay = self.config.retry.jittered(attempt);
        if let Some(front) = st.pending.front_mut() {
            front.row.attempts = front.row.attempts.saturating_add(1);
            front.retry_at = Some(Instant::now() + delay);
        }
        warn!(source = %name, attempt, retry_in_ms = delay.as_millis() as u64, error = %failure, "delivery failed; the source waits and sends it, and everything after it, again");
    }

    /// Moves a message into the dead-letter table. `Ok(false)` when there
    /// is no dead-letter table (the message is retried instead).
    pub(super) async fn park(
        &self,
        row: &OutboxRow,
        failure: &Failure,
        attempt: u32,
    ) -> Result<bool, DbError> {
        let client = step("take a connection", self.pool.get()).await?;
        if !self.dead.exists(&client).await? {
            return Ok(false);
        }
        let err = failure.to_string();
        let reason = failure.reason.as_str().to_owned();
        if row.id > 0 {
            let moved = step(
                "park a row",
                client.execute(
                    &self.sql.park_rows,
                    &[&vec![row.id], &vec![err], &vec![reason]],
                ),
            )
            .await?;
            // Gone already (deleted by hand): nothing to park.
            let _ = moved;
        } else {
            let table = format!("{}.{}", self.config.table.schema, self.config.table.table);
            let attempts = i32::try_from(attempt).unwrap_or(i32::MAX);
            let payload = (!row.payload.is_empty()).then_some(row.payload.as_str());
            let headers = (!row.headers.is_empty()).then_some(row.headers.as_str());
            step(
                "park a message",
                client.execute(
                    &self.sql.park_messages,
                    &[
                        &table,
                        &row.aggregate_type,
                        &row.aggregate_id,
                        &row.event_type,
                        &payload,
                        &headers,
                        &row.dedup_key,
                        &row.exchange,
                        &row.routing_key,
                        &attempts,
                        &err,
                        &reason,
                    ],
                ),
            )
            .await?;
        }
        Ok(true)
    }
}
