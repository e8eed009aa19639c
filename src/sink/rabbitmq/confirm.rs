//! Turning the broker's answers into outcomes.
//!
//! The vector sink's history is the warning here: a nack counted as
//! delivered, and a returned message counted as success. With `mandatory`
//! set, an unroutable message comes back as `Ack(Some(returned))`, so the
//! match below has no catch-all arm and only `Ack(None)` is a delivery.

use std::time::Duration;

use lapin::{Confirmation, PublisherConfirm};
use tokio::time::Instant;

use crate::sink::{Failure, FailureReason, Outcome};
use crate::telemetry::ErrorChain;

/// Waits for every pending confirm until `timeout` has passed since the
/// call and writes each result into `outcomes[index]`. Returns whether the
/// channel is still fit for reuse: after a timeout or a channel error it is
/// not, since late confirms would belong to messages we already gave up on.
pub(super) async fn collect(
    pending: Vec<(usize, PublisherConfirm)>,
    timeout: Duration,
    outcomes: &mut [Outcome],
) -> bool {
    let deadline = Instant::now() + timeout;
    let mut healthy = true;
    for (index, confirm) in pending {
        outcomes[index] = match tokio::time::timeout_at(deadline, confirm).await {
            Ok(Ok(confirmation)) => classify(confirmation),
            Ok(Err(err)) => {
                healthy = false;
                Outcome::Failed(Failure::new(
                    FailureReason::Connection,
                    format!(
                        "channel failed before the confirm arrived: {}",
                        ErrorChain(&err)
                    ),
                ))
            }
            Err(_) => {
                healthy = false;
                Outcome::Failed(Failure::new(
                    FailureReason::Timeout,
                    format!("no confirm from the broker within {timeout:?}"),
                ))
            }
        };
    }
    healthy
}

/// The single place that decides whether the broker took a message.
pub(super) fn classify(confirmation: Confirmation) -> Outcome {
    match confirmation {
        Confirmation::Ack(None) => Outcome::Delivered,
        Confirmation::Ack(Some(returned)) => Outcome::Failed(Failure::new(
            FailureReason::Returned,
            format!(
                "returned as unroutable: {} {} (exchange {:?}, routing key {:?}); bind a queue that matches",
                returned.reply_code,
                returned.reply_text,
                returned.delivery.exchange.as_str(),
                returned.delivery.routing_key.as_str()
            ),
        )),
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
