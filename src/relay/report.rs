//! Logging and counting what a batch came to: one line per row for the
//! failures that belong to the row, one per reason for those that hit a
//! whole batch, one per parked row once its park committed. Never a
//! payload.

use std::time::SystemTime;

use tracing::warn;

use super::Relay;
use crate::message::OutboxRow;
use crate::metrics::SourceError;
use crate::sink::{FailureReason, Outcome, Publisher};
use crate::source::{Capture, Plan, Settled};

/// Counts the broker's answers (failures by reason, the lag of delivered
/// rows) and logs the failures of rows that are not being parked.
pub fn answers<C: Capture, P: Publisher>(
    relay: &Relay<C, P>,
    rows: &[OutboxRow],
    outcomes: &[Outcome],
    plan: &Plan,
) {
    let confirmed_at = SystemTime::now();
    let mut by_reason: Vec<(FailureReason, usize, i64, &str)> = Vec::new();
    for (row, outcome) in rows.iter().zip(outcomes) {
        let f = match outcome {
            Outcome::Delivered => {
                relay.metrics.lag.observe(row.age_at(confirmed_at));
                continue;
            }
            Outcome::Failed(f) => f,
        };
        if plan.hold.contains(&row.id) {
            continue; // not refused: waits behind an earlier row, held
        }
        relay.metrics.failure(f.reason).inc();
        if plan.park.iter().any(|p| p.0 == row.id) {
            continue; // logged once parked
        }
        match f.reason {
            FailureReason::BadRow
            | FailureReason::Returned
            | FailureReason::ExchangeNotFound
            | FailureReason::Refused => {
                warn!(
                    source = %relay.config.name,
                    row_id = row.id,
                    event_type = %row.event_type,
                    attempt = i64::from(row.attempts) + 1,
                    reason = %f.reason,
                    error = %f.detail,
                    "row not delivered; will retry with backoff"
                );
            }
            FailureReason::Nacked | FailureReason::Timeout | FailureReason::Connection => {
                match by_reason.iter_mut().find(|(r, ..)| *r == f.reason) {
                    Some(entry) => entry.1 += 1,
                    None => by_reason.push((f.reason, 1, row.id, &f.detail)),
                }
            }
        }
    }
    for (reason, count, first_id, detail) in by_reason {
        warn!(
            source = %relay.config.name,
            rows = count,
            first_row_id = first_id,
            %reason,
            error = %detail,
            "rows not delivered; will retry with backoff"
        );
    }
}

/// Counts and logs what the committed settlement did beyond the plain
/// case: each parked row, and the rows the database would not settle as
/// planned. Returns how many rows left the outbox (delivered and removed).
pub fn settled<C: Capture, P: Publisher>(
    relay: &Relay<C, P>,
    rows: &[OutboxRow],
    outcomes: &[Outcome],
    plan: &Plan,
    settled: &Settled,
) -> usize {
    let name = &relay.config.name;
    for id in &settled.parked {
        let Some((row, outcome)) = rows.iter().zip(outcomes).find(|(r, _)| r.id == *id) else {
            continue;
        };
        let Outcome::Failed(f) = outcome else {
            continue;
        };
        if let Some(counter) = relay.metrics.parked(f.reason) {
            counter.inc();
        }
        warn!(
            source = %name,
            row_id = id,
            event_type = %row.event_type,
            attempt = i64::from(row.attempts) + 1,
            reason = %f.reason,
            error = %f.detail,
            "row parked in the dead-letter table (see `outboxd dead-letters list`)"
        );
    }
    for (id, error) in &settled.rescheduled {
        relay.metrics.error(SourceError::Settle).inc();
        warn!(source = %name, row_id = id, error, "the database refused to settle this row as planned; rescheduled with backoff instead");
    }
    for (id, error) in &settled.untouched {
        relay.metrics.error(SourceError::Settle).inc();
        warn!(source = %name, row_id = id, error, "the database refused every change to this row; it stays as it was and the source pauses");
    }
    if let Some(error) = &settled.release_failed {
        relay.metrics.error(SourceError::Settle).inc();
        warn!(source = %name, error, "releasing the next rows of delivered aggregates failed; the sweep releases them later");
    }
    for (refused, taken) in &plan.order_breaks {
        relay.metrics.order_breaks.inc();
        warn!(
            source = %name,
            refused_row_id = refused,
            taken_row_id = taken,
            "order break: the broker took a row while an earlier row of its aggregate was refused; consumers see the later row first (it is sent again, in order, after the earlier one)"
        );
    }
    let removed = plan
        .delivered
        .iter()
        .filter(|id| !settled.rescheduled.iter().any(|(r, _)| r == *id))
        .count();
    relay.metrics.published.inc_by(removed as u64);
    removed
}
