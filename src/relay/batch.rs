//! One batch, from claim to settlement, as a task of its own: claim, turn
//! the rows into messages, send them, decide what becomes of each row,
//! settle. [`BatchEnd`] is what it reports back to the loop in `relay.rs`.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;
use tracing::{debug, trace, warn};

use super::{Relay, decide, report};
use crate::config::OnPark;
use crate::message::Routing;
use crate::sink::{Outcome, Publisher};
use crate::source::{Capture, ClaimFrom, Claimed, DbError};
use crate::telemetry::ErrorChain;

/// What one batch came to.
#[derive(Debug)]
pub enum BatchEnd {
    /// The claim found nothing due.
    Empty,
    /// Rows were claimed and settled (delivered ones removed, failed ones
    /// rescheduled or parked) and the transaction committed.
    Settled {
        claimed: usize,
        delivered: usize,
        failed: usize,
        parked: usize,
        /// Rows the database would not settle as planned.
        refused: usize,
        /// Of those, rows it would not change at all: claimed again at
        /// once unless the source pauses.
        untouched: usize,
    },
    /// The database failed; the batch is rolled back, rows unchanged (or,
    /// after a confirm, sent again later: at-least-once).
    Db(DbError),
    /// No broker connection or channel: nothing was sent, rows unchanged.
    BrokerDown(String),
}

/// Runs one batch to its end. Sends [`Claimed`] on `claimed` once the
/// claim is done (an empty one if it failed). Never panics on row content.
pub async fn batch<C: Capture, P: Publisher>(
    relay: Arc<Relay<C, P>>,
    from: ClaimFrom,
    claimed: oneshot::Sender<Claimed>,
) -> BatchEnd {
    let mut claimed = Some(claimed);
    let end = run(&relay, from, &mut claimed)
        .await
        .unwrap_or_else(BatchEnd::Db);
    if let Some(tx) = claimed {
        let _ = tx.send(Claimed::default());
    }
    end
}

async fn run<C: Capture, P: Publisher>(
    relay: &Relay<C, P>,
    from: ClaimFrom,
    claimed: &mut Option<oneshot::Sender<Claimed>>,
) -> Result<BatchEnd, DbError> {
    let cfg = &relay.config;
    let started = Instant::now();
    let claim = relay.capture.claim(from).await?;
    if let Some(tx) = claimed.take() {
        let _ = tx.send(claim.report.clone());
    }
    let (rows, Some(batch)) = (claim.rows, claim.batch) else {
        trace!(source = %cfg.name, claim_ms = started.elapsed().as_secs_f64() * 1e3, "claim found nothing");
        return Ok(BatchEnd::Empty);
    };
    relay.metrics.batch_size.observe(rows.len() as f64);

    let routing = Routing::of(cfg);
    let mut messages: Vec<_> = rows.iter().map(|row| row.to_sendable(&routing)).collect();
    if cfg.ordering.ordered() && cfg.on_park == OnPark::Hold {
        decide::behind_bad_rows(&rows, &mut messages);
    }
    let claimed_in = started.elapsed();
    // When the claim returned: the debug line below gives how long the
    // batch's oldest row had waited by then (its pickup delay).
    let claimed_at = std::time::SystemTime::now();
    let outcomes = match relay.publisher.send(messages).await {
        Ok(outcomes) => outcomes,
        Err(unavailable) => {
            // Nothing went out: give the rows back as they were.
            relay.capture.give_back(batch).await?;
            return Ok(BatchEnd::BrokerDown(unavailable.0));
        }
    };
    let sent_in = started.elapsed() - claimed_in;

    let any_failed = outcomes.iter().any(|o| matches!(o, Outcome::Failed(_)));
    let can_park = any_failed && relay.capture.can_park(&batch).await?;
    let plan = decide::plan(cfg, &rows, &outcomes, can_park);
    report::answers(relay, &rows, &outcomes, &plan);
    let settled = match relay.capture.settle(batch, &plan).await {
        Ok(settled) => settled,
        Err(err) => {
            if !plan.delivered.is_empty() {
                warn!(
                    source = %cfg.name,
                    rows = plan.delivered.len(),
                    error = %ErrorChain(&err),
                    "rows were confirmed by the broker but could not be removed; they will be sent again (duplicates)"
                );
            }
            return Err(err);
        }
    };
    let removed = report::settled(relay, &rows, &outcomes, &plan, &settled);
    debug!(
        source = %cfg.name,
        rows = rows.len(),
        claim_ms = claimed_in.as_secs_f64() * 1e3,
        // Evaluated only when the line is logged.
        oldest_waited_ms = rows
            .iter()
            .map(|r| r.age_at(claimed_at))
            .fold(0.0, f64::max)
            * 1e3,
        publish_confirm_ms = sent_in.as_secs_f64() * 1e3,
        settle_ms = (started.elapsed() - claimed_in - sent_in).as_secs_f64() * 1e3,
        "batch timings"
    );
    Ok(BatchEnd::Settled {
        claimed: rows.len(),
        delivered: removed,
        failed: plan.retry.len(),
        parked: settled.parked.len(),
        refused: settled.rescheduled.len() + settled.untouched.len(),
        untouched: settled.untouched.len(),
    })
}
