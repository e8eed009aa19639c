//! What became of one message: the vocabulary the broker side answers in
//! and the relay, the metrics and the settlement read. Its own module, so
//! that neither side has to import the other to speak it.

use std::fmt;

/// Why a row was not delivered; also the `reason` label of
/// `outboxd_publish_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// The broker answered with basic.nack.
    Nacked,
    /// The message was returned as unroutable (mandatory, no binding matched).
    Returned,
    /// No confirm arrived within `rabbitmq.confirm_timeout`.
    Timeout,
    /// The channel or connection failed while the message was in flight.
    Connection,
    /// The target exchange does not exist (checked before publishing).
    ExchangeNotFound,
    /// The row cannot be expressed as an AMQP message.
    BadRow,
    /// The broker closed the channel over this message (403 access
    /// refused, 406 precondition failed, …), having taken nothing.
    Refused,
}

impl FailureReason {
    /// Every reason, in declaration order (metrics index by `as usize`).
    pub const ALL: [FailureReason; 7] = [
        FailureReason::Nacked,
        FailureReason::Returned,
        FailureReason::Timeout,
        FailureReason::Connection,
        FailureReason::ExchangeNotFound,
        FailureReason::BadRow,
        FailureReason::Refused,
    ];

    /// Whether a failure for this reason can end with the row parked (see
    /// `relay::decide`); the others are retried forever.
    pub fn can_park(self) -> bool {
        !matches!(
            self,
            FailureReason::Nacked | FailureReason::Timeout | FailureReason::Connection
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Nacked => "nacked",
            FailureReason::Returned => "returned",
            FailureReason::Timeout => "timeout",
            FailureReason::Connection => "connection",
            FailureReason::ExchangeNotFound => "exchange_not_found",
            FailureReason::BadRow => "bad_row",
            FailureReason::Refused => "refused",
        }
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed delivery: the reason class plus a human-readable detail that is
/// stored in the row's `last_error` (never the payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: FailureReason,
    pub detail: String,
}

impl Failure {
    pub fn new(reason: FailureReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

/// What happened to one message of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Failed(Failure),
}
