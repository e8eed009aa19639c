//! Where rows go: the broker side of the relay, behind the [`Publisher`]
//! trait. [`rabbitmq`] is the real one; [`memory`] is a scripted fake for
//! the unit tests of the relay loop.

pub mod memory;
pub mod rabbitmq;

use std::future::Future;

use tokio_util::sync::CancellationToken;

use crate::message::Outbound;
pub use crate::outcome::{Failure, FailureReason, Outcome};

/// Sends the messages of claimed rows to the broker and says, for each,
/// whether the broker took it.
///
/// # Contract
/// [`Publisher::send`] gets a batch (one entry per claimed row: a message,
/// or the reason the row could not become one) and answers with one
/// [`Outcome`] per entry, in the same order. Only [`Outcome::Delivered`]
/// lets a row leave the outbox, and an implementation returns it only when
/// the broker confirmed that message with a plain ack: a message published
/// with `mandatory` and acked without being returned. A nack, a returned
/// (unroutable) message, a confirm that does not arrive in time, a refusal,
/// and a connection lost mid-batch are all failures with a
/// [`FailureReason`]; so is an entry that was never a message.
///
/// Delivery is **at-least-once**: a message whose ack was lost, or whose
/// row could not be removed afterwards, is sent again. Consumers must
/// expect duplicates and drop them by `message_id` (the row's dedup key).
/// `Err(Unavailable)` promises that nothing of the batch was sent.
pub trait Publisher: Send + Sync + 'static {
    /// Whether a new batch may start now (connected, not blocked by a
    /// broker resource alarm).
    fn can_publish(&self) -> bool;

    /// Resolves once [`Publisher::can_publish`] holds, or `stop` fires.
    fn publishable(&self, stop: &CancellationToken) -> impl Future<Output = ()> + Send;

    /// Sends a batch; see the contract above.
    fn send(
        &self,
        messages: Vec<Result<Outbound, Failure>>,
    ) -> impl Future<Output = Result<Vec<Outcome>, Unavailable>> + Send;

    /// A batch begun with [`Publisher::begin`], waiting for its confirms.
    type Begun: Send + 'static;

    /// Publishes a batch on this publisher's **ordered lane** and returns
    /// once its messages are written, before their confirms:
    /// [`Publisher::finish`] gives the outcomes, under the contract of
    /// [`Publisher::send`]. A batch begun after another reaches the broker
    /// after it (one channel is kept for the lane), so a caller may publish
    /// the next batch while the broker confirms this one.
    ///
    /// The caller finishes every begun batch, in the order they were begun,
    /// and begins none while a failure is being handled: after a failed
    /// batch it finishes the ones in flight before it begins again.
    /// `Err(Unavailable)`: nothing of this batch was sent.
    fn begin(
        &self,
        messages: Vec<Result<Outbound, Failure>>,
    ) -> impl Future<Output = Result<Self::Begun, Unavailable>> + Send;

    /// The outcomes of a begun batch, one per entry, in order.
    fn finish(&self, begun: Self::Begun) -> impl Future<Output = Vec<Outcome>> + Send;

    /// A batch found the publisher unavailable: check the connection now
    /// rather than at the next periodic check.
    fn report_failure(&self);

    /// Lets go of what is kept between batches (channels), before shutdown.
    fn close(&self) -> impl Future<Output = ()> + Send;
}

/// The broker could not be used at all; no message of the batch was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rabbitmq is unavailable: {0}")]
pub struct Unavailable(pub String);
