//! A scripted [`Publisher`] for the unit tests of the relay loop: it acks,
//! nacks, returns, refuses, times out, drops the connection or blocks, per
//! message, as told, and records every message it was sent.
//!
//! It fakes our own seam, never the broker: whether RabbitMQ really
//! behaves so is what the integration tests check against the real one.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::{Failure, FailureReason, Outcome, Publisher, Unavailable};
use crate::message::Outbound;

/// What the fake answers for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A plain ack: delivered.
    Ack,
    Nack,
    /// Returned as unroutable (acked with the message returned).
    Return,
    /// The broker closed the channel over it.
    Refuse,
    /// No confirm: fails with `timeout` once the confirm timeout has passed.
    Timeout,
    /// The connection drops at this message: it and every later message of
    /// the batch fail with `connection`, and the publisher is unavailable
    /// until [`MemoryPublisher::set_connected`].
    DropConnection,
    /// No answer until [`MemoryPublisher::release`], then an ack.
    Block,
}

#[derive(Default)]
struct State {
    /// Answers per row id, used up in order; then `default`.
    scripts: HashMap<i64, VecDeque<Answer>>,
    default: Option<Answer>,
    sent: Vec<Outbound>,
    disconnected: bool,
    blocked: bool,
    failures_reported: usize,
    closed: bool,
}

/// A batch the fake has answered, waiting to be finished.
#[derive(Default)]
pub struct Begun {
    outcomes: Vec<Outcome>,
    /// Messages answered on [`MemoryPublisher::release`].
    blocked: Vec<usize>,
    /// A message whose confirm never comes: finishing waits out the timeout.
    timed_out: bool,
}

pub struct MemoryPublisher {
    confirm_timeout: Duration,
    state: Mutex<State>,
    /// Mirrors "connected and not blocked", for `publishable`.
    ready: watch::Sender<bool>,
    released: Notify,
}

impl MemoryPublisher {
    pub fn new(confirm_timeout: Duration) -> Self {
        Self {
            confirm_timeout,
            state: Mutex::new(State::default()),
            ready: watch::Sender::new(true),
            released: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next answers for the message of row `row_id`.
    pub fn script(&self, row_id: i64, answers: impl IntoIterator<Item = Answer>) {
        self.state()
            .scripts
            .entry(row_id)
            .or_default()
            .extend(answers);
    }

    /// The answer for messages without a script (an ack unless set).
    pub fn set_default(&self, answer: Answer) {
        self.state().default = Some(answer);
    }

    /// Every message published so far, in order.
    pub fn sent(&self) -> Vec<Outbound> {
        self.state().sent.clone()
    }

    /// The row ids of [`MemoryPublisher::sent`].
    pub fn sent_ids(&self) -> Vec<i64> {
        self.state().sent.iter().map(|m| m.row_id).collect()
    }

    pub fn set_connected(&self, connected: bool) {
        let mut s = self.state();
        s.disconnected = !connected;
        self.ready.send_replace(!s.disconnected && !s.blocked);
    }

    /// A broker resource alarm: no new batch may start.
    pub fn set_blocked(&self, blocked: bool) {
        let mut s = self.state();
        s.blocked = blocked;
        self.ready.send_replace(!s.disconnected && !s.blocked);
    }

    /// Answers every message waiting on [`Answer::Block`] (with an ack).
    pub fn release(&self) {
        self.released.notify_waiters();
    }

    /// How often a batch reported the publisher unavailable.
    pub fn failures_reported(&self) -> usize {
        self.state().failures_reported
    }

    pub fn closed(&self) -> bool {
        self.state().closed
    }

    fn next_answer(&self, row_id: i64) -> Answer {
        let mut s = self.state();
        let scripted = s.scripts.get_mut(&row_id).and_then(VecDeque::pop_front);
        scripted.or(s.default).unwrap_or(Answer::Ack)
    }
}

impl Publisher for MemoryPublisher {
    fn can_publish(&self) -> bool {
        *self.ready.borrow()
    }

    async fn publishable(&self, stop: &CancellationToken) {
        let mut rx = self.ready.subscribe();
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = rx.wait_for(|ready| *ready) => {}
        }
    }

    async fn send(
        &self,
        messages: Vec<Result<Outbound, Failure>>,
    ) -> Result<Vec<Outcome>, Unavailable> {
        let begun = self.begin(messages).await?;
        Ok(self.finish(begun).await)
    }

    type Begun = Begun;

    /// Decides every answer and records the messages as sent; the waiting
    /// (blocked messages, timeouts) is [`Publisher::finish`]'s.
    async fn begin(&self, messages: Vec<Result<Outbound, Failure>>) -> Result<Begun, Unavailable> {
        if self.state().disconnected {
            return Err(Unavailable("not connected".to_owned()));
        }
        let mut b = Begun::default();
        let mut dropped = false;
        for message in messages {
            let m = match message {
                Err(failure) => {
                    b.outcomes.push(Outcome::Failed(failure));
                    continue;
                }
                Ok(m) => m,
            };
            if dropped {
                b.outcomes
                    .push(failed(FailureReason::Connection, "connection lost"));
                continue;
            }
            let answer = self.next_answer(m.row_id);
            self.state().sent.push(m);
            b.outcomes.push(match answer {
                Answer::Ack => Outcome::Delivered,
                Answer::Nack => failed(FailureReason::Nacked, "nacked by the fake"),
                Answer::Return => failed(FailureReason::Returned, "returned by the fake"),
                Answer::Refuse => failed(FailureReason::Refused, "refused by the fake"),
                Answer::Timeout => {
                    b.timed_out = true;
                    failed(FailureReason::Timeout, "not confirmed")
                }
                Answer::Block => {
                    b.blocked.push(b.outcomes.len());
                    failed(FailureReason::Timeout, "not confirmed")
                }
                Answer::DropConnection => {
                    dropped = true;
                    self.set_connected(false);
                    failed(FailureReason::Connection, "connection lost")
                }
            });
        }
        Ok(b)
    }

    async fn finish(&self, mut b: Begun) -> Vec<Outcome> {
        if !b.blocked.is_empty() {
            // Blocked messages are acked on release, unless the confirm
            // timeout passes first.
            let released = self.released.notified();
            if tokio::time::timeout(self.confirm_timeout, released)
                .await
                .is_ok()
            {
                for i in b.blocked {
                    b.outcomes[i] = Outcome::Delivered;
                }
            }
        } else if b.timed_out {
            tokio::time::sleep(self.confirm_timeout).await;
        }
        b.outcomes
    }

    fn report_failure(&self) {
        self.state().failures_reported += 1;
    }

    async fn close(&self) {
        self.state().closed = true;
    }
}

fn failed(reason: FailureReason, detail: &str) -> Outcome {
    Outcome::Failed(Failure::new(reason, detail))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::BasicProperties;

    fn message(row_id: i64) -> Result<Outbound, Failure> {
        Ok(Outbound {
            row_id,
            exchange: "".into(),
            routing_key: "k".into(),
            body: Vec::new(),
            properties: BasicProperties::default(),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn answers_each_message_as_scripted_and_records_what_it_was_sent() {
        let p = MemoryPublisher::new(Duration::from_secs(5));
        p.script(2, [Answer::Nack, Answer::Ack]);
        p.script(3, [Answer::Return]);
        let bad = Err(Failure::new(FailureReason::BadRow, "bad"));
        let first = p
            .send(vec![message(1), message(2), message(3), bad])
            .await
            .unwrap();
        let reasons: Vec<Option<FailureReason>> = first
            .iter()
            .map(|o| match o {
                Outcome::Delivered => None,
                Outcome::Failed(f) => Some(f.reason),
            })
            .collect();
        assert_eq!(
            reasons,
            [
                None,
                Some(FailureReason::Nacked),
                Some(FailureReason::Returned),
                Some(FailureReason::BadRow)
            ]
        );
        // The script is used up in order: the second try of row 2 is acked.
        assert_eq!(
            p.send(vec![message(2)]).await.unwrap(),
            [Outcome::Delivered]
        );
        assert_eq!(p.sent_ids(), [1, 2, 3, 2], "the bad entry was never sent");
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_connection_fails_the_rest_of_the_batch_and_later_sends() {
        let p = MemoryPublisher::new(Duration::from_secs(5));
        p.script(2, [Answer::DropConnection]);
        let out = p
            .send(vec![message(1), message(2), message(3)])
            .await
            .unwrap();
        assert_eq!(out[0], Outcome::Delivered);
        assert!(matches!(&out[2], Outcome::Failed(f) if f.reason == FailureReason::Connection));
        assert!(!p.can_publish());
        assert!(
            p.send(vec![message(4)]).await.is_err(),
            "nothing sent while down"
        );
        assert_eq!(p.sent_ids(), [1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_takes_the_confirm_timeout() {
        let p = MemoryPublisher::new(Duration::from_secs(5));
        p.set_default(Answer::Timeout);
        let started = tokio::time::Instant::now();
        let out = p.send(vec![message(1)]).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert!(matches!(&out[0], Outcome::Failed(f) if f.reason == FailureReason::Timeout));
    }
}
