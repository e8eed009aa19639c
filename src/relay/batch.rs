//! One batch, from claim to commit, as a task of its own: claim (after an
//! id, or the heads of the aggregates in a set of partitions), publish,
//! wait for the confirms, settle every row in the claim transaction. Also
//! the small tasks the loop runs beside batches: setting the wake-up flag
//! and the sweep of held rows. [`BatchEnd`] is what each reports back to
//! the loop in `relay.rs`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::config::{OnPark, Ordering as RowOrder};
use crate::message::{OutboxRow, Routing};
use crate::metrics::SourceError;
use crate::sink::{Failure, FailureReason, Outcome};
use crate::source::complete::{self, Disposition, Plan, Settled};
use crate::source::{DEAD_EXISTS, DEAD_MISSING, DbError, Source, claim, flag, step};

/// What one batch came to.
#[derive(Debug)]
pub enum BatchEnd {
    /// The claim found nothing due.
    Empty,
    /// Rows were claimed and settled (delivered ones removed, failed ones
    /// rescheduled) and the transaction committed.
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
    /// The database failed; the transaction is rolled back, rows unchanged
    /// (or, after a confirm, sent again later: at-least-once).
    Db(DbError),
    /// No broker connection or channel: nothing was sent, rows unchanged.
    BrokerDown(String),
    /// The wake-up flag was set to `armed`.
    Flag { armed: bool },
    /// The wake-up flag table does not exist: wake-ups come from the poll only.
    FlagMissing(String),
    /// The sweep released this many held rows.
    Swept(u64),
}

/// Releases held rows whose predecessor went away without us (a task of
/// its own, like a batch).
pub async fn sweep(source: Arc<Source>) -> BatchEnd {
    let run = async {
        let client = step("get a connection", source.pool.get()).await?;
        let dead = look_for_dead_table(&source, &client).await?;
        let sql = if dead {
            &source.queries.order.sweep
        } else {
            &source.queries.order.sweep_no_dead
        };
        step("release held rows", client.execute(sql, &[])).await
    };
    match run.await {
        Ok(n) => BatchEnd::Swept(n),
        Err(err) => BatchEnd::Db(err),
    }
}

/// Looks up whether the dead-letter table exists, remembers it in
/// `source.dead_table`, and warns when it turns out missing. The one place
/// that asks: parking (a batch with failed rows), the claims of
/// `ordering = "aggregate"` (parked rows hold their aggregate) and the
/// sweep all go through it.
async fn look_for_dead_table(
    source: &Source,
    client: &impl deadpool_postgres::GenericClient,
) -> Result<bool, DbError> {
    let row = step(
        "look for the dead-letter table",
        client.query_one(&source.queries.dead_exists, &[]),
    )
    .await?;
    let exists: bool = row.try_get(0).unwrap_or(false);
    let was = source.dead_table.swap(
        if exists { DEAD_EXISTS } else { DEAD_MISSING },
        Ordering::SeqCst,
    );
    if !exists && was != DEAD_MISSING {
        warn!(source = %source.config.name, "the dead-letter table is missing (run `outboxd migrate`); failing rows are retried instead of parked, and no aggregate waits for a parked row");
    }
    Ok(exists)
}

/// Where a batch claims from.
#[derive(Debug, Clone)]
pub enum ClaimFrom {
    /// `ordering = "none"`: any due row with `id > after`.
    After(i64),
    /// `ordering = "aggregate"`: the heads of the aggregates in at most
    /// `most` of these partitions (those with the oldest rows that no other
    /// batch holds).
    Partitions { free: Vec<i32>, most: i64 },
}

/// Sets the wake-up flag (a task of its own, like a batch).
pub async fn set_flag(source: Arc<Source>, armed: bool) -> BatchEnd {
    match flag::set(&source, armed).await {
        Ok(flag::Set::Done) => BatchEnd::Flag { armed },
        Ok(flag::Set::Missing(reason)) => BatchEnd::FlagMissing(reason),
        Err(err) => BatchEnd::Db(err),
    }
}

/// What a batch reports as soon as its claim is done, before publishing:
/// the loop starts the next claim right after the rows this one took.
#[derive(Debug, Clone, Default)]
pub struct Claimed {
    pub rows: usize,
    pub max_id: i64,
    /// The claim looked at a full batch of rows: there may be more.
    pub full: bool,
    /// `ordering = "aggregate"`: the partitions this batch holds.
    pub partitions: Vec<i32>,
}

/// Runs one batch to its end, claiming rows with `id > after_id`. Sends
/// [`Claimed`] on `claimed` once the claim is done (rows = 0 if it failed).
/// Never panics on row content.
pub async fn batch(
    source: Arc<Source>,
    from: ClaimFrom,
    claimed: oneshot::Sender<Claimed>,
) -> BatchEnd {
    let mut claimed = Some(claimed);
    let end = match batch_inner(&source, from, &mut claimed).await {
        Ok(end) => end,
        Err(err) => BatchEnd::Db(err),
    };
    if let Some(tx) = claimed {
        let _ = tx.send(Claimed::default());
    }
    end
}

async fn batch_inner(
    source: &Source,
    from: ClaimFrom,
    claimed: &mut Option<oneshot::Sender<Claimed>>,
) -> Result<BatchEnd, DbError> {
    let cfg = &source.config;
    let started = std::time::Instant::now();
    let mut client = step("get a connection", source.pool.get()).await?;
    let tx = step("begin", client.transaction()).await?;
    let limit = cfg.batch_size as i64;
    // `looked`: the claim walked rows (it may have marked some held).
    let (rows, report, looked) = match from {
        ClaimFrom::After(after_id) => {
            let stmt = step("prepare claim", tx.prepare_cached(&source.queries.claim)).await?;
            let rows = step("claim", tx.query(&stmt, &[&limit, &after_id])).await?;
            let max_id = rows
                .last()
                .and_then(|r| r.try_get::<_, i64>(0).ok())
                .unwrap_or(after_id);
            let report = Claimed {
                rows: rows.len(),
                max_id,
                full: rows.len() >= cfg.batch_size,
                partitions: Vec::new(),
            };
            (rows, report, false)
        }
        ClaimFrom::Partitions { free, most } => {
            let order = &source.queries.order;
            // To find the partitions with the oldest rows, a few rows per
            // partition wanted are enough; the claim walks the full batch.
            let look = (most * 4).clamp(64, limit.max(64));
            let stmt = step("prepare partition lock", tx.prepare_cached(&order.lock)).await?;
            let locked: Vec<i32> = step(
                "lock partitions",
                tx.query_one(
                    &stmt,
                    &[&free, &look, &source.queries.lock_keys.batch, &most],
                ),
            )
            .await?
            .try_get(0)
            .unwrap_or_default();
            let mut walked = Vec::new();
            if !locked.is_empty() {
                // A new statement, so its snapshot sees every commit of the
                // batches that held these partitions before us.
                let dead = match source.dead_table.load(Ordering::SeqCst) {
                    DEAD_EXISTS => true,
                    DEAD_MISSING => false,
                    _ => look_for_dead_table(source, &tx).await?,
                };
                let sql = if dead {
                    &order.claim
                } else {
                    &order.claim_no_dead
                };
                let stmt = step("prepare claim", tx.prepare_cached(sql)).await?;
                walked = step("claim", tx.query(&stmt, &[&locked, &limit])).await?;
            }
            let looked_at = walked.len();
            // Rows that are not the head of their aggregate come back with
            // no columns; the claim may have marked them held.
            walked.retain(|r| r.try_get::<_, Option<i64>>(0).ok().flatten().is_some());
            let report = Claimed {
                rows: walked.len(),
                max_id: 0,
                full: looked_at >= cfg.batch_size,
                // A batch with nothing to send ends at once and holds nothing.
                partitions: if walked.is_empty() {
                    Vec::new()
                } else {
                    locked
                },
            };
            (walked, report, looked_at > 0)
        }
    };
    if rows.is_empty() {
        // Nothing to send. Commit rather than roll back when the walk looked
        // at rows: it may have marked some held, and that must stay.
        if looked {
            step("commit holds", tx.commit()).await?;
        } else {
            step("rollback", tx.rollback()).await?;
        }
        // Back to the pool before the report, so whatever the loop starts
        // next (a flag update, another claim) reuses this connection.
        drop(client);
        if let Some(tx) = claimed.take() {
            let _ = tx.send(report);
        }
        return Ok(BatchEnd::Empty);
    }
    if let Some(tx) = claimed.take() {
        let _ = tx.send(report);
    }
    // Only a row without an id fails its batch; any other column that
    // cannot be read makes a bad row of its own (parked, named by its id).
    let rows = rows
        .iter()
        .map(claim::decode)
        .collect::<Result<Vec<OutboxRow>, _>>()
        .map_err(|e| DbError::Failed {
            step: "decode claimed rows (does the table match sql/outbox.sql?)",
            message: crate::telemetry::ErrorChain(&e).to_string(),
        })?;
    source.metrics.batch_size.observe(rows.len() as f64);

    let routing = Routing {
        source: &cfg.name,
        exchange: &cfg.exchange,
        routing_key: &cfg.routing_key,
        max_body: cfg.max_message_bytes,
    };
    let messages = rows
        .iter()
        .map(|row| {
            row.to_outbound(&routing)
                .map_err(|bad| Failure::new(FailureReason::BadRow, bad.to_string()))
        })
        .collect();
    let claimed_in = started.elapsed();
    let outcomes = match source.publisher.send(messages).await {
        Ok(outcomes) => outcomes,
        Err(unavailable) => {
            // Nothing went out: give the rows back as they were.
            step("rollback", tx.rollback()).await?;
            return Ok(BatchEnd::BrokerDown(unavailable.0));
        }
    };

    let any_failed = outcomes.iter().any(|o| matches!(o, Outcome::Failed(_)));
    // Parking needs the dead-letter table; while it is missing (looked up
    // again by every batch with failed rows) failing rows are retried.
    let can_park = !any_failed
        || source.dead_table.load(Ordering::SeqCst) == DEAD_EXISTS
        || look_for_dead_table(source, &tx).await?;
    let confirmed_at = SystemTime::now();
    let sent_in = started.elapsed() - claimed_in;
    let mut plan = Plan::default();
    for (row, outcome) in rows.iter().zip(&outcomes) {
        let attempt = u32::try_from(row.attempts).unwrap_or(0).saturating_add(1);
        let delay_ms = |attempt: u32| {
            i64::try_from(cfg.retry.jittered(attempt).as_millis()).unwrap_or(i64::MAX)
        };
        plan.fallback_delay_ms.push((row.id, delay_ms(attempt)));
        match outcome {
            Outcome::Delivered => {
                plan.delivered.push(row.id);
                source.metrics.lag.observe(row.age_at(confirmed_at));
            }
            Outcome::Failed(f) => {
                source.metrics.failure(f.reason).inc();
                let disposition = if can_park {
                    complete::decide(f.reason, attempt, cfg.max_attempts)
                } else {
                    Disposition::Retry
                };
                match disposition {
                    Disposition::Retry => plan.retry(row.id, &f.to_string(), delay_ms(attempt)),
                    Disposition::Park => plan.park(row.id, &f.to_string(), f.reason),
                }
            }
        }
    }
    let parked_ids: Vec<i64> = plan.park.iter().map(|p| p.0).collect();
    log_failures(source, &rows, &outcomes, &parked_ids);
    plan.release = release_list(source, &rows, &plan.delivered, &parked_ids);
    let settled = async {
        let settled = complete::settle(&tx, &source.queries.complete, &plan).await?;
        tx.commit().await?;
        Ok::<_, tokio_postgres::Error>(settled)
    };
    let settled = match step("settle and commit", settled).await {
        Ok(settled) => settled,
        Err(err) => {
            if !plan.delivered.is_empty() {
                warn!(
                    source = %cfg.name,
                    rows = plan.delivered.len(),
                    "rows were confirmed by the broker but could not be removed; they will be sent again (duplicates)"
                );
            }
            return Err(err);
        }
    };
    // Counted and logged only now that the transaction committed.
    let removed = plan.delivered.len()
        - plan
            .delivered
            .iter()
            .filter(|id| settled.rescheduled.iter().any(|(r, _)| r == *id))
            .count();
    source.metrics.published.inc_by(removed as u64);
    report_settled(source, &rows, &plan, &settled);
    debug!(
        source = %cfg.name,
        rows = rows.len(),
        claim_ms = claimed_in.as_secs_f64() * 1e3,
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

/// Logs and counts what the settlement did beyond the plain case: each
/// parked row (one line each, naming it), and the rows the database
/// would not settle as planned.
fn report_settled(source: &Source, rows: &[OutboxRow], plan: &Plan, settled: &Settled) {
    let cfg = &source.config;
    for (id, reason) in &settled.parked {
        if let Some(counter) = source.metrics.parked(*reason) {
            counter.inc();
        }
        let row = rows.iter().find(|r| r.id == *id);
        let error = plan
            .park
            .iter()
            .find(|p| p.0 == *id)
            .map_or("", |p| p.1.as_str());
        warn!(
            source = %cfg.name,
            row_id = id,
            event_type = row.map_or("", |r| r.event_type.as_str()),
            attempt = row.map_or(0, |r| i64::from(r.attempts) + 1),
            %reason,
            error,
            "row parked in the dead-letter table (see `outboxd dead-letters list`)"
        );
    }
    for (id, error) in &settled.rescheduled {
        source.metrics.error(SourceError::Settle).inc();
        warn!(
            source = %cfg.name,
            row_id = id,
            error,
            "the database refused to settle this row as planned; rescheduled with backoff instead"
        );
    }
    for (id, error) in &settled.untouched {
        source.metrics.error(SourceError::Settle).inc();
        warn!(
            source = %cfg.name,
            row_id = id,
            error,
            "the database refused every change to this row; it stays as it was and the source pauses"
        );
    }
    if let Some(error) = &settled.release_failed {
        source.metrics.error(SourceError::Settle).inc();
        warn!(source = %cfg.name, error, "releasing the next rows of delivered aggregates failed; the sweep releases them later");
    }
}

/// `ordering = "aggregate"`: the aggregates whose next row may go now,
/// those of the delivered rows (and of the parked ones with
/// `on_park = "continue"`), as (types, ids).
fn release_list(
    source: &Source,
    rows: &[OutboxRow],
    delivered: &[i64],
    parked: &[i64],
) -> Option<(Vec<String>, Vec<String>)> {
    if source.config.ordering != RowOrder::Aggregate {
        return None;
    }
    let go_on = source.config.on_park == OnPark::Continue;
    let (types, ids): (Vec<String>, Vec<String>) = rows
        .iter()
        .filter(|r| delivered.contains(&r.id) || (go_on && parked.contains(&r.id)))
        .map(|r| (r.aggregate_type.clone(), r.aggregate_id.clone()))
        .unzip();
    (!types.is_empty()).then_some((types, ids))
}

/// One line per failed row for failures that belong to the row (bad row,
/// returned, missing exchange); one line per reason for the rest, which
/// usually hit a whole batch at once. Never the payload.
fn log_failures(source: &Source, rows: &[OutboxRow], outcomes: &[Outcome], parked: &[i64]) {
    let mut by_reason: Vec<(FailureReason, usize, i64, &str)> = Vec::new();
    for (row, outcome) in rows.iter().zip(outcomes) {
        let Outcome::Failed(f) = outcome else {
            continue;
        };
        if parked.contains(&row.id) {
            continue; // logged when parked
        }
        match f.reason {
            FailureReason::BadRow
            | FailureReason::Returned
            | FailureReason::ExchangeNotFound
            | FailureReason::Refused => {
                warn!(
                    source = %source.config.name,
                    row_id = row.id,
                    event_type = %row.event_type,
                    attempt = row.attempts + 1,
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
            source = %source.config.name,
            rows = count,
            first_row_id = first_id,
            %reason,
            error = %detail,
            "rows not delivered; will retry with backoff"
        );
    }
}
