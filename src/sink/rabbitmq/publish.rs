//! Publishing one batch: take a channel, check exchanges, publish every
//! message with `mandatory`, then collect the confirms.
//!
//! Each batch in flight uses a channel of its own from a small per-source
//! pool, so a channel closed by the broker (404 on a deleted exchange, say)
//! only fails the batch that was using it. Exchanges named by rows are
//! checked with a passive declare on a throw-away channel before anything
//! is published to them, and the answer is cached (`channels.rs`): a row
//! that names a missing exchange fails on its own instead of closing the
//! channel under its neighbours.

use std::collections::{HashMap, HashSet};
use std::future::{Future, poll_fn};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::{Duration, Instant};

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{Channel, Connection, PublisherConfirm};

use super::confirm::{self, ChannelEnd};
use super::connection::Broker;
use super::frame;
use super::isolate::{self, Key, Suspects};
use super::ordered;
use crate::message::Outbound;
use crate::sink::{Failure, FailureReason, Outcome, Publisher, Unavailable};
use crate::telemetry::ErrorChain;
use tokio_util::sync::CancellationToken;

/// A publish of the batch failed before its confirm could be awaited.
pub(super) struct PublishFailed {
    /// The broker's reason, if it closed the channel over a message.
    refusal: Option<String>,
}

impl PublishFailed {
    /// A failure the broker gave no reason for (a lost or stalled connection).
    pub(super) fn without_reason() -> Self {
        Self { refusal: None }
    }

    /// The channel's end: what the confirms said (`end`), made worse by a
    /// publish that failed, if one did.
    pub(super) fn worsen(failed: Option<Self>, end: ChannelEnd) -> ChannelEnd {
        match (end, failed.map(|f| f.refusal)) {
            (ChannelEnd::Healthy, Some(Some(reason))) => ChannelEnd::Refused(reason),
            (ChannelEnd::Healthy, Some(None)) => ChannelEnd::Broken,
            (end, _) => end,
        }
    }
}

/// A source's publisher on RabbitMQ: its channel pool and its exchange
/// cache, over the process's one connection ([`Broker`]).
pub struct RabbitPublisher {
    pub(super) broker: Arc<Broker>,
    /// The ordered lane's channel and its batches in flight.
    pub(super) lane: Mutex<Option<ordered::Lane>>,
    pub(super) idle: Mutex<Vec<Channel>>,
    pub(super) exchanges: Mutex<HashMap<ShortString, Instant>>,
    pub(super) confirm_timeout: Duration,
    /// Rows that were in flight on a channel the broker closed: sent alone.
    pub(super) suspects: Suspects,
}

impl RabbitPublisher {
    pub fn new(broker: Arc<Broker>, confirm_timeout: Duration) -> Self {
        Self {
            broker,
            lane: Mutex::new(None),
            idle: Mutex::new(Vec::new()),
            exchanges: Mutex::new(HashMap::new()),
            confirm_timeout,
            suspects: Suspects::default(),
        }
    }

    /// Runs a step that waits for rabbitmq (opening a channel, checking an
    /// exchange) within the confirm timeout; without an answer by then the
    /// connection is given up on ([`Broker::abandon`]) and nothing is sent.
    pub(super) async fn answered<T>(
        &self,
        conn: &Arc<Connection>,
        what: &str,
        step: impl Future<Output = Result<T, Unavailable>>,
    ) -> Result<T, Unavailable> {
        match tokio::time::timeout(self.confirm_timeout, step).await {
            Ok(result) => result,
            Err(_) => {
                self.broker.abandon(conn);
                Err(Unavailable(format!(
                    "rabbitmq did not answer within {:?} while {what}; the connection is dropped and made again",
                    self.confirm_timeout
                )))
            }
        }
    }

    /// [`publish_in_order`] within the confirm timeout. `None` when the
    /// writes stalled (the socket's buffers are full): the connection is
    /// given up on ([`Broker::abandon`]), and since what was written may
    /// still reach the broker, the caller leaves every message "not
    /// confirmed", to be sent again.
    pub(super) async fn written(
        &self,
        conn: &Arc<Connection>,
        channel: &Channel,
        messages: Vec<(usize, Outbound)>,
        outcomes: &mut [Outcome],
    ) -> Option<(Vec<(usize, PublisherConfirm)>, Option<PublishFailed>)> {
        let publishing = publish_in_order(channel, messages, outcomes);
        let written = tokio::time::timeout(self.confirm_timeout, publishing).await;
        if written.is_err() {
            self.broker.abandon(conn);
        }
        written.ok()
    }

    pub(super) fn connected(&self) -> Result<Arc<Connection>, Unavailable> {
        self.broker
            .connection()
            .ok_or_else(|| Unavailable("not connected".to_owned()))
    }

    /// Each message's outcome until its confirm arrives, and the messages
    /// to publish: a message for a missing exchange or over the frame size
    /// fails here, and the suspects of an earlier refusal are sent one by
    /// one first (each is the first row of its aggregate in the batch: the
    /// rows after it were held when it failed, so sending it ahead of the
    /// rest keeps every aggregate in order).
    pub(super) async fn prepare(
        &self,
        conn: &Connection,
        messages: Vec<Result<Outbound, Failure>>,
        missing: &HashSet<ShortString>,
    ) -> (Vec<Outcome>, Vec<(usize, Outbound)>) {
        let frame_max = conn.configuration().frame_max();
        let mut outcomes = Vec::with_capacity(messages.len());
        let mut to_send = Vec::with_capacity(messages.len());
        let mut alone = Vec::new();
        for (index, message) in messages.into_iter().enumerate() {
            match message {
                Err(failure) => outcomes.push(Outcome::Failed(failure)),
                Ok(m) if missing.contains(&m.exchange) => {
                    outcomes.push(Outcome::Failed(Failure::new(
                        FailureReason::ExchangeNotFound,
                        format!("exchange {:?} does not exist", m.exchange.as_str()),
                    )));
                }
                Ok(m) => {
                    if let Some(why) = frame::too_large(&m.properties, frame_max) {
                        outcomes.push(Outcome::Failed(Failure::new(FailureReason::BadRow, why)));
                        continue;
                    }
                    // Until its confirm arrives, a message counts as not confirmed.
                    outcomes.push(Outcome::Failed(Failure::new(
                        FailureReason::Timeout,
                        "not confirmed",
                    )));
                    if self.suspects.contains(&m) {
                        alone.push((index, m));
                    } else {
                        to_send.push((index, m));
                    }
                }
            }
        }
        if !alone.is_empty() {
            isolate::send_alone(
                conn,
                alone,
                self.confirm_timeout,
                &mut outcomes,
                &self.suspects,
            )
            .await;
        }
        (outcomes, to_send)
    }

    /// What a batch's channel end means for the publisher; whether the
    /// channel is fit for the next batch.
    pub(super) fn after_batch(
        &self,
        conn: &Connection,
        channel: &Channel,
        end: ChannelEnd,
        sent: &[(usize, Key)],
        outcomes: &mut [Outcome],
    ) -> bool {
        let nacked = outcomes
            .iter()
            .any(|o| matches!(o, Outcome::Failed(f) if f.reason == FailureReason::Nacked));
        match end {
            // A nack means the broker's end of this channel could not take
            // a message. In the cluster failover test, after the node with
            // a quorum queue's leader stopped, every publish on the new
            // connection's channels was nacked for three minutes while the
            // queue had a new leader, until the retried rows were parked.
            // Whether a fresh channel gets through there is not shown yet;
            // a channel is cheap, so one that nacked is not reused.
            ChannelEnd::Healthy if channel.status().connected() => !nacked,
            ChannelEnd::Refused(reason) if conn.status().connected() => {
                // The broker refused one of these messages and closed the
                // channel; which one cannot be told apart from the others
                // that had no answer yet. Each of those goes alone next time,
                // so the refusal lands on the row that caused it (and counts
                // toward its max_attempts) and the rest go through. The
                // connection is fine: nothing reconnects.
                self.forget_exchanges();
                for (index, key) in sent {
                    if let Outcome::Failed(f) = &mut outcomes[*index]
                        && f.reason == FailureReason::Connection
                    {
                        self.suspects.insert(key.clone());
                        f.detail = format!(
                            "the broker closed the channel ({reason}) while this message was in flight; it is sent on its own next time to find the row that caused it"
                        );
                    }
                }
                false
            }
            _ => {
                // The channel is dropped (and so closed). Whatever closed it
                // may have been a deleted exchange: forget what we knew.
                self.forget_exchanges();
                self.broker.report_failure();
                false
            }
        }
    }
}

impl Publisher for RabbitPublisher {
    fn can_publish(&self) -> bool {
        self.broker.can_publish()
    }

    async fn publishable(&self, stop: &CancellationToken) {
        self.broker.wait_publishable(stop).await;
    }

    fn report_failure(&self) {
        self.broker.report_failure();
    }

    /// Sends a batch. `messages[i]` is either a message or the reason the
    /// row could not become one; the result has one outcome per entry, in
    /// order. `Err` means nothing was sent (no connection, no channel).
    async fn send(
        &self,
        messages: Vec<Result<Outbound, Failure>>,
    ) -> Result<Vec<Outcome>, Unavailable> {
        let conn = self.connected()?;
        let setup = async {
            let missing = self.missing_exchanges(&conn, &messages).await?;
            Ok((missing, self.channel(&conn).await?))
        };
        let (missing, channel) = self.answered(&conn, "opening a channel", setup).await?;
        let (mut outcomes, to_send) = self.prepare(&conn, messages, &missing).await;
        let sent: Vec<(usize, Key)> = to_send.iter().map(|(i, m)| (*i, Key::of(m))).collect();
        let Some((pending, broken)) = self.written(&conn, &channel, to_send, &mut outcomes).await
        else {
            // The writes stalled: every message stays "not confirmed", a
            // timeout, and is sent again; the channel is dropped.
            return Ok(outcomes);
        };
        let end = confirm::collect(pending, self.confirm_timeout, &mut outcomes, &sent).await;
        let end = PublishFailed::worsen(broken, end);
        if self.after_batch(&conn, &channel, end, &sent, &mut outcomes) {
            self.idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(channel);
        }
        Ok(outcomes)
    }

    type Begun = ordered::Begun;

    async fn begin(
        &self,
        messages: Vec<Result<Outbound, Failure>>,
    ) -> Result<ordered::Begun, Unavailable> {
        self.begin_ordered(messages).await
    }

    async fn finish(&self, begun: ordered::Begun) -> Vec<Outcome> {
        self.finish_ordered(begun).await
    }

    /// Closes the idle channels (at shutdown, before the connection closes,
    /// so lapin does not report channels closing on a closed connection).
    async fn close(&self) {
        let mut idle: Vec<Channel> =
            std::mem::take(&mut *self.idle.lock().unwrap_or_else(PoisonError::into_inner));
        let lane = self
            .lane
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        idle.extend(lane.map(|l| l.channel));
        for ch in idle {
            if ch.status().connected() {
                let _ = ch.close(200, "outboxd shutting down".into()).await;
            }
        }
    }
}

/// Publishes every message with `mandatory` set, in order, without waiting
/// for each write before starting the next.
///
/// `basic_publish` queues its frames (and takes its delivery tag) on its
/// first poll, then waits for lapin's I/O loop to write them. Awaiting each
/// in turn would cost one I/O-loop round trip per message, so every future
/// is polled once in row order (which fixes the order on the wire), and
/// then all are driven together. Writes finish in order, so after the first
/// pass only the oldest unfinished one needs polling. Returns the pending
/// confirms and, if a publish failed, why (the messages that failed are
/// marked in `outcomes`).
async fn publish_in_order(
    channel: &Channel,
    messages: Vec<(usize, Outbound)>,
    outcomes: &mut [Outcome],
) -> (Vec<(usize, PublisherConfirm)>, Option<PublishFailed>) {
    let options = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    let mut indices = Vec::with_capacity(messages.len());
    let mut bodies = Vec::with_capacity(messages.len());
    let mut heads = Vec::with_capacity(messages.len());
    for (index, m) in messages {
        indices.push(index);
        bodies.push(m.body);
        heads.push((m.exchange, m.routing_key, m.properties));
    }
    let mut futures: Vec<_> = heads
        .into_iter()
        .zip(&bodies)
        .map(|((exchange, routing_key, properties), body)| {
            Box::pin(channel.basic_publish(exchange, routing_key, options, body, properties))
        })
        .collect();
    let mut results: Vec<Option<lapin::Result<PublisherConfirm>>> =
        Vec::with_capacity(futures.len());
    results.resize_with(futures.len(), || None);
    let mut first_pass = true;
    let mut next = 0;
    poll_fn(|cx| {
        let start = if first_pass { 0 } else { next };
        for i in start..futures.len() {
            if results[i].is_some() {
                continue;
            }
            match futures[i].as_mut().poll(cx) {
                Poll::Ready(r) => results[i] = Some(r),
                Poll::Pending if first_pass => {}
                Poll::Pending => break,
            }
        }
        first_pass = false;
        while next < results.len() && results[next].is_some() {
            next += 1;
        }
        if next == results.len() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    drop(futures);

    let mut pending = Vec::with_capacity(indices.len());
    let mut broken = None;
    for (index, result) in indices.into_iter().zip(results) {
        match result {
            Some(Ok(confirm)) => pending.push((index, confirm)),
            Some(Err(err)) => {
                let detail = format!("publish failed: {}", ErrorChain(&err));
                outcomes[index] = Outcome::Failed(Failure::new(FailureReason::Connection, detail));
                broken.get_or_insert(PublishFailed {
                    refusal: confirm::refusal(&err),
                });
            }
            // poll_fn above returns only once every result is in.
            None => {}
        }
    }
    (pending, broken)
}
