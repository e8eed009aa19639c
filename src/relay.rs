//! The per-source loop: wake-up, claim, publish, confirm, settle.
//!
//! A [`Relay`] joins one [`Capture`] (where rows come from) and one
//! [`Publisher`] (where they go); `app.rs` builds both and hands them in.
//! Its [`Relay::run`] loop schedules batches; each batch runs as a task of
//! its own (`batch.rs`: claim, to message, send, decide, settle) and up to
//! `max_in_flight` of them run at once. Under low load a single row is
//! claimed and sent the moment its wake-up arrives; under backlog every
//! batch comes back full, so the loop keeps the pipeline full until a claim
//! comes back short.
//!
//! Every end of a task is handled in one `match` in `Loop::ended`: a
//! database error pauses the source with backoff (rows stay in the table),
//! a broker outage pauses it until the broker is back (rows untouched), and
//! row failures were already settled on the rows by the batch itself.

mod batch;
mod decide;
mod report;
mod state;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{Ordering, SourceConfig};
use crate::metrics::{SourceError, SourceMetrics};
use crate::sink::Publisher;
use crate::source::flag::RECHECK_AFTER_ARM;
use crate::source::{Capture, ClaimFrom, Claimed, DbError, FlagSet, SourceHealth};
use crate::telemetry::ErrorChain;
pub use batch::BatchEnd;
pub use decide::{Disposition, decide};
use state::{Cursor, Held, InFlight, Load, Pause, TaskEnd, WakeFlag};

/// While the load is busy ([`state::Load`]), after a claim comes back empty
/// within this long of one that found rows, the relay keeps claiming every
/// [`LINGER_STEP`] instead of arming the wake-up flag: under heavy load it
/// never goes idle, so producers do not pay for NOTIFY, and a new row waits
/// at most this step.
const LINGER_WINDOW: Duration = Duration::from_millis(20);
pub(crate) const LINGER_STEP: Duration = Duration::from_millis(2);

/// How often held rows are checked for a predecessor that went away without
/// the relay (a row deleted by hand, a purged dead letter).
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// One source's relay: where its rows come from, where they go, and what
/// it reports.
pub struct Relay<C, P> {
    pub config: SourceConfig,
    pub metrics: SourceMetrics,
    pub health: Arc<SourceHealth>,
    pub capture: Arc<C>,
    pub publisher: Arc<P>,
}

/// The scheduling state of one source's loop.
struct Loop<C, P> {
    relay: Arc<Relay<C, P>>,
    tasks: InFlight,
    cursor: Cursor,
    flag: WakeFlag,
    load: Load,
    pause: Pause,
    /// `ordering = "aggregate"`: the partitions we own (from the listener).
    owned: watch::Receiver<Arc<Vec<i32>>>,
    /// The operator's pause (`outboxd pause`, read by the listener): no
    /// claims and no sweeps while set; batches in flight finish.
    paused: watch::Receiver<bool>,
    next_sweep: Instant,
    draining: bool,
}

impl<C: Capture, P: Publisher> Relay<C, P> {
    /// Runs the source until a drain completes or `abort` fires.
    ///
    /// `drain`: stop taking wake-ups, but keep claiming until a claim finds
    /// nothing (with `ordering = "aggregate"`, a claim over every free
    /// partition, after the batches that released rows have settled), then
    /// return once nothing is in flight. `abort`: drop whatever is in
    /// flight (its transactions roll back, its rows stay) and return.
    /// Returns how many claimed rows were abandoned that way (0 after a
    /// complete drain).
    pub async fn run(self: Arc<Self>, drain: CancellationToken, abort: CancellationToken) -> usize {
        let mut state = Loop {
            owned: self.capture.partitions(),
            paused: self.health.paused_changes(),
            relay: self.clone(),
            tasks: InFlight::new(),
            cursor: Cursor::new(),
            flag: WakeFlag::new(),
            load: Load::new(Instant::now()),
            pause: Pause::default(),
            next_sweep: Instant::now(),
            draining: false,
        };
        let mut poll = tokio::time::interval(self.config.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ordered = self.config.ordering.ordered();
        let name = &self.config.name;
        info!(
            source = %name,
            database = %self.config.database_display,
            table = %self.config.table,
            "relay started"
        );
        let mut abandoned = 0;
        loop {
            self.health.beat();
            let now = Instant::now();
            // The sweep goes before the next claim when it is due, so a
            // steady backlog (a claim always about to start) cannot starve it.
            if state.can_sweep(now) {
                state.start_sweep(now);
            }
            if state.can_claim(now)
                && let Some(from) = state.claim_from()
            {
                state.start_batch(from);
            }
            if state.drained() {
                info!(source = %name, "drained; relay stopped");
                break;
            }
            let pause = state.pause.until;
            let linger = state.cursor.linger_until;
            tokio::select! {
                biased;
                _ = abort.cancelled() => {
                    let batches = state.tasks.batches.len();
                    abandoned = state.tasks.rows();
                    state.tasks.set.abort_all();
                    while state.tasks.set.join_next().await.is_some() {}
                    warn!(source = %name, batches, rows = abandoned, "drain time is up; in-flight batches rolled back, their rows stay in the outbox and are sent after a restart");
                    break;
                }
                report = claim_report(&mut state.tasks.claiming), if state.tasks.claiming.is_some() => {
                    state.claimed(report);
                }
                Some(joined) = state.tasks.set.join_next_with_id(), if !state.tasks.is_empty() => match joined {
                    Ok((id, end)) => {
                        state.tasks.batches.remove(&id);
                        state.ended(end);
                    }
                    Err(join_error) => {
                        state.tasks.batches.remove(&join_error.id());
                        // A task panicked: a bug, but a batch's transaction
                        // is gone with it and its rows are intact; carry on.
                        error!(source = %name, error = %join_error, "a relay task failed unexpectedly; its rows will be claimed again");
                        state.cursor.due = true;
                        state.cursor.full_scan = true;
                    }
                },
                _ = drain.cancelled(), if !state.draining => {
                    state.draining = true;
                    // One more claim takes whatever was committed before the signal.
                    state.cursor.due = true;
                    info!(source = %name, "draining: publishing what is committed, then stopping");
                }
                _ = self.capture.wake().notified(), if !state.draining => state.cursor.due = true,
                Ok(()) = state.owned.changed(), if ordered => {
                    // New partitions may hold rows; lost ones are skipped by
                    // the next claim (and guarded by the batch lock meanwhile).
                    state.cursor.due = !state.draining;
                }
                Ok(()) = state.paused.changed() => {
                    if !*state.paused.borrow_and_update() {
                        // Resumed: look at the whole table, and set the
                        // wake-up flag afresh (pause disarmed it).
                        state.cursor.due = !state.draining;
                        state.cursor.full_scan = true;
                        state.flag.last = None;
                    }
                }
                _ = poll.tick(), if !state.draining => {
                    self.capture.upkeep();
                    state.cursor.due = true;
                    state.cursor.full_scan = true;
                    state.flag.recheck = true;
                }
                _ = self.publisher.publishable(&abort), if !self.publisher.can_publish() && !state.draining => {}
                _ = tokio::time::sleep_until(pause.unwrap_or_else(Instant::now)), if pause.is_some() => {
                    state.pause.until = None;
                }
                _ = tokio::time::sleep_until(linger.unwrap_or_else(Instant::now)), if linger.is_some() => {
                    state.cursor.linger_until = None;
                    state.cursor.due = !state.draining;
                }
            }
        }
        self.publisher.close().await;
        abandoned
    }
}

/// The claim report, or an empty one if the batch ended without sending it.
async fn claim_report(
    claiming: &mut Option<(tokio::task::Id, oneshot::Receiver<Claimed>)>,
) -> Claimed {
    match claiming {
        Some((_, rx)) => rx.await.unwrap_or_default(),
        None => std::future::pending().await,
    }
}

impl<C: Capture, P: Publisher> Loop<C, P> {
    fn max_in_flight(&self) -> usize {
        self.relay.config.max_in_flight
    }

    /// A sweep may start: due, nothing else running beside which it would
    /// need a second connection, room in flight.
    fn can_sweep(&self, now: Instant) -> bool {
        !self.pause.active(now)
            && !*self.paused.borrow()
            && !self.draining
            && !self.tasks.sweep_running
            && !self.flag.running
            && self.tasks.claiming.is_none()
            && self.tasks.len() < self.max_in_flight()
            && now >= self.next_sweep
    }

    /// A claim may start: not paused (after failures or by an operator), the broker takes messages, no claim
    /// running, not beside a flag update or a sweep (an idle source then
    /// needs one pooled connection, not two), room in flight, and a reason.
    fn can_claim(&self, now: Instant) -> bool {
        !self.pause.active(now)
            && !*self.paused.borrow()
            && self.relay.publisher.can_publish()
            && self.tasks.claiming.is_none()
            && !self.flag.running
            && !self.tasks.sweep_running
            && self.tasks.len() < self.max_in_flight()
            && self.cursor.wants_claim()
    }

    /// Draining is over: nothing in flight, and nothing left to claim (or
    /// no way to: the broker is away, there are no partitions, or an
    /// operator paused the source).
    fn drained(&self) -> bool {
        self.draining
            && self.tasks.is_empty()
            && (!self.cursor.wants_claim()
                || *self.paused.borrow()
                || !self.relay.publisher.can_publish()
                || self.claim_from().is_none())
    }

    fn start_sweep(&mut self, now: Instant) {
        self.tasks.sweep_running = true;
        self.next_sweep = now + SWEEP_EVERY;
        let capture = self.relay.capture.clone();
        self.tasks
            .set
            .spawn(async move { TaskEnd::Sweep(capture.sweep().await) });
    }

    fn start_batch(&mut self, from: ClaimFrom) {
        self.cursor.full_scan = false;
        self.cursor.due = false;
        self.cursor.claiming_over = match &from {
            ClaimFrom::Partitions { free, .. } => Some(free.clone()),
            ClaimFrom::After(_) => None,
        };
        let (tx, rx) = oneshot::channel();
        let relay = self.relay.clone();
        let handle = self
            .tasks
            .set
            .spawn(async move { TaskEnd::Batch(batch::batch(relay, from, tx).await) });
        self.tasks.claiming = Some((handle.id(), rx));
    }

    fn start_flag(&mut self, armed: bool) {
        self.flag.running = true;
        let capture = self.relay.capture.clone();
        self.tasks.set.spawn(async move {
            TaskEnd::Flag {
                armed,
                result: capture.set_flag(armed).await,
            }
        });
    }

    /// A claim report came in.
    fn claimed(&mut self, report: Claimed) {
        if let Some((id, _)) = self.tasks.claiming.take()
            && report.rows > 0
        {
            self.tasks.batches.insert(
                id,
                Held {
                    partitions: report.partitions.clone(),
                    rows: report.rows,
                },
            );
        }
        self.cursor.claimed(&report);
        let now = Instant::now();
        if report.rows > 0 {
            self.cursor.last_rows_at = Some(now);
            self.load.add(now, report.rows);
            self.flag_after(report.rows);
        } else if !self.flag.armed()
            && self.load.busy(now)
            && self
                .cursor
                .last_rows_at
                .is_some_and(|t| now - t < LINGER_WINDOW)
        {
            // Busy a moment ago: look again shortly instead of arming the
            // flag, so producers under heavy load never notify.
            self.cursor.linger_until = Some(now + LINGER_STEP);
        } else {
            self.flag_after(0);
        }
    }

    /// Keeps the wake-up flag in step with the claims: armed once caught up
    /// (an empty claim) or while the load is calm, disarmed while it is
    /// busy (see [`state::Load`]).
    fn flag_after(&mut self, rows: usize) {
        if self.tasks.sweep_running || self.draining {
            return;
        }
        let want = rows == 0 || !self.load.busy(Instant::now());
        if let Some(armed) = self.flag.wanted(want) {
            self.start_flag(armed);
        }
    }

    /// The one place that decides what a finished task means for the source.
    fn ended(&mut self, end: TaskEnd) {
        let name = self.relay.config.name.clone();
        match end {
            TaskEnd::Batch(BatchEnd::Empty) => self.db_ok(false),
            TaskEnd::Batch(BatchEnd::Settled {
                claimed,
                delivered,
                failed,
                parked,
                refused,
                untouched,
            }) => {
                self.db_ok(untouched == 0);
                // With the flag disarmed no notification will come for rows
                // committed meanwhile: claim again until a claim is empty.
                // While draining too: settling released the next rows of
                // the delivered aggregates.
                self.cursor.due = true;
                if untouched > 0 {
                    let delay = self.pause.settle_refused();
                    warn!(source = %name, rows = untouched, retry_in = ?delay, "the database refused every change to some rows; pausing the source before they are claimed again");
                } else {
                    self.pause.settle_ok();
                }
                debug!(source = %name, claimed, delivered, failed, parked, refused, "batch settled");
            }
            TaskEnd::Batch(BatchEnd::BrokerDown(reason)) => {
                self.cursor.restart(self.draining);
                self.relay.publisher.report_failure();
                debug!(source = %name, %reason, "broker unavailable; waiting for it before claiming again");
            }
            TaskEnd::Batch(BatchEnd::Db(err)) => self.db_failed(&err),
            TaskEnd::Flag { armed, result } => {
                self.flag.running = false;
                match result {
                    Ok(FlagSet::Done) => {
                        self.flag.last = Some(armed);
                        if armed {
                            self.cursor.linger_until = Some(Instant::now() + RECHECK_AFTER_ARM);
                        }
                        // Claim once more. Just armed: for rows whose commit
                        // read the flag before it was armed. Just disarmed:
                        // the claims may have caught up meanwhile (an empty
                        // claim while this task ran could not arm), and with
                        // the flag down nothing else would wake us.
                        self.cursor.due = !self.draining;
                    }
                    Ok(FlagSet::Missing(reason)) => {
                        self.flag.exists = false;
                        warn!(source = %name, error = %reason, "the wake-up flag table is missing (run `outboxd migrate`); new rows are found by the poll every poll_interval");
                    }
                    Err(err) => self.db_failed(&err),
                }
            }
            TaskEnd::Sweep(result) => {
                self.tasks.sweep_running = false;
                match result {
                    Ok(released) => {
                        self.db_ok(false);
                        if released > 0 {
                            info!(source = %name, rows = released, "released held rows whose earlier rows are gone");
                            self.cursor.due = !self.draining;
                        }
                    }
                    Err(err) => self.db_failed(&err),
                }
            }
        }
    }

    fn db_failed(&mut self, err: &DbError) {
        let name = &self.relay.config.name;
        // Look again: the dead-letter table may be what went away.
        self.relay.capture.after_error();
        self.cursor.restart(self.draining);
        let (delay, failures) = self.pause.db_failed();
        self.relay.metrics.error(SourceError::Database).inc();
        self.relay.metrics.up.set(0);
        let error = ErrorChain(err).to_string();
        let was_up = self.relay.health.set_db_up(false, Some(error.clone()));
        if was_up || failures == 1 {
            warn!(source = %name, %error, retry_in = ?delay, "source database failed; rows stay in the outbox, retrying");
        } else {
            debug!(source = %name, %error, attempt = failures, retry_in = ?delay, "source database still failing");
        }
        if self.draining {
            warn!(source = %name, "cannot drain while the database fails; stopping with rows left for the next start");
        }
    }

    fn db_ok(&mut self, settled: bool) {
        self.pause.db_ok(settled);
        self.relay.metrics.up.set(1);
        if !self.relay.health.set_db_up(true, None) {
            info!(source = %self.relay.config.name, "source database reachable");
        }
    }

    /// What the next claim takes, or `None` if there is nothing to claim
    /// from (aggregate order with every owned partition busy or none owned).
    fn claim_from(&self) -> Option<ClaimFrom> {
        let cfg = &self.relay.config;
        if cfg.ordering == Ordering::None {
            // Only a backlog run claims after the frontier: there the head
            // of the table is locked by the batches in flight. Otherwise the
            // claim starts at the head, where a row with a lower id that
            // committed late (ids are taken at insert, not at commit) waits.
            let after = if self.cursor.full_scan || !self.cursor.backlog {
                0
            } else {
                self.cursor.frontier
            };
            return Some(ClaimFrom::After(after));
        }
        let owned = self.owned.borrow().clone();
        let free: Vec<i32> = owned
            .iter()
            .copied()
            .filter(|p| !self.tasks.holds(*p))
            .collect();
        if free.is_empty() {
            return None;
        }
        // Under a backlog (the last claim that found rows came back full),
        // the claims that may still start while this batch is in flight,
        // this one included, share the partitions that have rows, so each
        // finds rows. Short claims take them all: split, their few rows
        // would cost two claims and two settles instead of one. While
        // draining, one claim takes them all.
        let share = if self.draining || !self.cursor.last_full {
            1
        } else {
            cfg.max_in_flight
                .saturating_sub(self.tasks.batches.len())
                .max(1) as i64
        };
        // Leave partitions for the other batches that may be in flight.
        // While draining, one claim looks at every free partition, so an
        // empty claim means there is nothing left; under a backlog, the
        // last claim that may start takes every free partition too: no
        // other claim can use them while it is in flight, and so a backlog
        // drain keeps the split of its first two claims, each a range of
        // the partitions (`order::lock`), instead of leaving the
        // partitions this claim would not take to the next one's range.
        let most = if self.draining || (self.cursor.last_full && share == 1) {
            free.len() as i64
        } else {
            owned.len().div_ceil(cfg.max_in_flight) as i64
        };
        // Over the same free partitions as a claim that found nothing,
        // probe them (see `Cursor::empty_over`).
        let probe = self.cursor.empty_over.as_deref() == Some(&free[..]);
        Some(ClaimFrom::Partitions {
            free,
            most,
            share,
            probe,
        })
    }
}
