//! Turning the broker's answers into outcomes.
//!
//! The vector sink's history is the warning here: a nack counted as
//! delivered, and a returned message counted as success. With `mandatory`
//! set, an unroutable message comes back as `Ack(Some(returned))`, so the
//! match below has no catch-all arm and only `Ack(None)` is a delivery.

use std::time::Duration;

use lapin::message::BasicReturnMessage;
use lapin::protocol::AMQPErrorKind;
use lapin::types::AMQPValue;
use lapin::{Confirmation, ErrorKind, PublisherConfirm};
use tokio::time::Instant;

use super::isolate::Key;
use crate::sink::{Failure, FailureReason, Outcome};
use crate::telemetry::ErrorChain;

/// How a channel came out of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ChannelEnd {
    /// Fit for the next batch.
    Healthy,
    /// Not reusable: a confirm timed out (late confirms would belong to
    /// messages already given up on) or the connection failed.
    Broken,
    /// The broker closed the channel over a message it refused (a soft
    /// error: 403 ACCESS_REFUSED, 406 PRECONDITION_FAILED, …), with its reason.
    Refused(String),
}

/// Waits for every pending confirm until `timeout` has passed since the
/// call and writes each result into `outcomes[index]`.
pub(super) async fn collect(
    pending: Vec<(usize, PublisherConfirm)>,
    timeout: Duration,
    outcomes: &mut [Outcome],
    sent: &[(usize, Key)],
) -> ChannelEnd {
    let mut returned = Vec::new();
    let deadline = deadline_after(timeout);
    let mut end = ChannelEnd::Healthy;
    for (index, confirm) in pending {
        outcomes[index] = match tokio::time::timeout_at(deadline, confirm).await {
            Ok(Ok(confirmation)) => {
                let (outcome, back) = split(confirmation);
                returned.extend(back);
                outcome
            }
            Ok(Err(err)) => channel_failed(&err, &mut end),
            Err(_) => unanswered(timeout, &mut end),
        };
    }
    attribute_returns(returned, outcomes, sent);
    end
}

/// `timeout` from now. The config bounds the timeout; a year stands in for
/// "never" should an unbounded one reach here (Instant + Duration panics
/// on overflow).
pub(super) fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 86_400))
}

/// The outcome of a message whose confirm ended in `err`; `end` learns
/// what became of the channel.
pub(super) fn channel_failed(err: &lapin::Error, end: &mut ChannelEnd) -> Outcome {
    match refusal(err) {
        Some(reason) if *end == ChannelEnd::Healthy => *end = ChannelEnd::Refused(reason),
        Some(_) => {}
        None => *end = ChannelEnd::Broken,
    }
    Outcome::Failed(Failure::new(
        FailureReason::Connection,
        format!(
            "channel failed before the confirm arrived: {}",
            ErrorChain(err)
        ),
    ))
}

/// The outcome of a message whose confirm did not come within `timeout`;
/// the channel is not reused (a late confirm would belong to it).
pub(super) fn unanswered(timeout: Duration, end: &mut ChannelEnd) -> Outcome {
    *end = ChannelEnd::Broken;
    Outcome::Failed(Failure::new(
        FailureReason::Timeout,
        format!("no confirm from the broker within {timeout:?}"),
    ))
}

/// A confirm's outcome apart from any returned message lapin attached to
/// it. lapin hands each returned message to whichever confirm of the
/// channel it resolves next, and an ack for several delivery tags at once
/// resolves them in no set order: the message may sit on another row's
/// confirm. [`attribute_returns`] puts it back on its own row.
pub(super) fn split(confirmation: Confirmation) -> (Outcome, Option<BasicReturnMessage>) {
    match confirmation {
        Confirmation::Ack(returned) => (Outcome::Delivered, returned),
        Confirmation::Nack(returned) => (classify(Confirmation::Nack(None)), returned),
        Confirmation::NotRequested => (classify(Confirmation::NotRequested), None),
    }
}

/// Marks each returned message's own row as returned, found by the
/// `x-outbox-id` header every message carries. A returned message that
/// names no row of the batch marks every row the broker acked: a row is
/// never taken for delivered while the broker may have dropped it.
fn attribute_returns(
    returned: Vec<BasicReturnMessage>,
    outcomes: &mut [Outcome],
    sent: &[(usize, Key)],
) {
    for message in returned {
        let row_id = returned_row_id(&message);
        let own = row_id.and_then(|id| {
            sent.iter()
                .find(|(_, k)| k.row_id() == Some(id))
                .map(|(i, _)| *i)
        });
        let outcome = classify(Confirmation::Ack(Some(message)));
        match own {
            Some(index) => outcomes[index] = outcome,
            None => {
                for (index, _) in sent {
                    if outcomes[*index] == Outcome::Delivered
                        && let Outcome::Failed(f) = &outcome
                    {
                        outcomes[*index] = Outcome::Failed(Failure::new(
                            f.reason,
                            format!(
                                "{}; it names no row of this batch, so every acked row of the batch is sent again",
                                f.detail
                            ),
                        ));
                    }
                }
            }
        }
    }
}

/// The row a returned message names: its `x-outbox-id` header (an
/// `outbox_emit()` message has none).
pub(super) fn returned_row_id(message: &BasicReturnMessage) -> Option<i64> {
    message
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-outbox-id").cloned())
        .and_then(|v| match v {
            AMQPValue::LongLongInt(id) => Some(id),
            _ => None,
        })
}

/// The broker's reason, if `err` is a channel closed by the broker over a
/// message (a soft error; the connection stays up).
pub(super) fn refusal(err: &lapin::Error) -> Option<String> {
    match err.kind() {
        ErrorKind::ProtocolError(e) if matches!(e.kind(), AMQPErrorKind::Soft(_)) => {
            Some(format!("{} {}", e.get_id(), e.get_message()))
        }
        _ => None,
    }
}

/// The outcome of a message the broker returned as unroutable.
pub(super) fn returned(message: &BasicReturnMessage) -> Outcome {
    Outcome::Failed(Failure::new(
        FailureReason::Returned,
        format!(
            "returned as unroutable: {} {} (exchange {:?}, routing key {:?}); bind a queue that matches",
            message.reply_code,
            message.reply_text,
            message.delivery.exchange.as_str(),
            message.delivery.routing_key.as_str()
        ),
    ))
}

/// The single place that decides whether the broker took a message.
pub(super) fn classify(confirmation: Confirmation) -> Outcome {
    match confirmation {
        Confirmation::Ack(None) => Outcome::Delivered,
        Confirmation::Ack(Some(message)) => returned(&message),
        Confirmation::Nack(returned) => Outcome::Failed(Failure::new(
            FailureReason::Nacked,
            match returned {
                Some(r) => format!("nacked by the broker ({} {})", r.reply_code, r.reply_text),
                None => "nacked by the broker (queue full with overflow=reject-publish, or an internal error)".to_owned(),
            },
        )),
        // We always enable confirms; this would be our bug, and it is not a delivery.
        Confirmation::NotRequested => Outcome::Failed(Failure::new(
            FailureReason::Connection,
            "the channel was not in confirm mode; nothing was confirmed",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_plain_ack_is_a_delivery() {
        assert_eq!(classify(Confirmation::Ack(None)), Outcome::Delivered);
        let nack = classify(Confirmation::Nack(None));
        assert!(matches!(
            nack,
            Outcome::Failed(Failure {
                reason: FailureReason::Nacked,
                ..
            })
        ));
        let not_requested = classify(Confirmation::NotRequested);
        assert!(matches!(not_requested, Outcome::Failed(_)));
    }
}
