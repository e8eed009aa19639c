//! The per-source loop: wake-up, claim, publish, confirm, settle.
//!
//! One [`run`] task per source schedules batches; each batch runs as its
//! own task ([`batch`]) on its own pooled connection and its own channel,
//! and up to `max_in_flight` of them run at once. Under low load a single
//! row is claimed and sent the moment its NOTIFY arrives; under backlog
//! every batch comes back full, so the loop keeps the pipeline full until a
//! claim comes back short.
//!
//! Every outcome of a batch is decided in one `match` in [`Loop::settled`]:
//! a database error pauses the source with backoff (rows stay in the table),
//! a broker outage pauses it until the broker is back (rows untouched), and
//! row failures were already recorded on the rows by the batch itself.

mod batch;

use crate::metrics::SourceError;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::{self, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::config::Ordering as RowOrder;
use crate::sink::rabbitmq::Broker;
use crate::source::{DEAD_UNKNOWN, Source, flag};
pub use batch::{BatchEnd, ClaimFrom, Claimed, batch, set_flag, sweep};

/// After a claim comes back empty within this long of one that found rows,
/// the relay keeps claiming every [`LINGER_STEP`] instead of arming the
/// wake-up flag: under steady load it never goes idle, so producers never
/// pay for NOTIFY, and a new row waits at most this step.
const LINGER_WINDOW: Duration = Duration::from_millis(20);
const LINGER_STEP: Duration = Duration::from_millis(2);

/// How often held rows are checked for a predecessor that went away without
/// the relay (a row deleted by hand, a purged dead letter).
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Pause after database errors: quick first retry, at most every 30 s.
const DB_RETRY: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));

/// The scheduling state of one source's loop.
struct Loop {
    source: Arc<Source>,
    broker: Arc<Broker>,
    tasks: JoinSet<BatchEnd>,
    /// A wake-up or poll said rows may be due.
    due: bool,
    /// The last claim came back full: keep the pipeline full.
    backlog: bool,
    /// The claim report of the batch that is claiming now. One claim runs
    /// at a time, so pipelined claims never walk each other's locked rows.
    claiming: Option<oneshot::Receiver<Claimed>>,
    /// While batches are in flight, the next claim starts after this id
    /// (the highest id claimed in this run) instead of at the table's head.
    frontier: i64,
    /// The next claim starts at the head of the table: it finds rows that a
    /// claim after the frontier cannot (retries come due, late commits of
    /// lower ids). Set by every poll tick and after errors.
    full_scan: bool,
    /// What we last set the wake-up flag to (`None`: unknown, or no flag table).
    flag: Option<bool>,
    /// A flag task is running.
    flag_busy: bool,
    /// The flag table exists (cleared for good when it does not).
    flag_exists: bool,
    /// Set the flag on the next empty claim even if we think it is set:
    /// another relay on the same table may have disarmed it and gone away.
    /// Set by each poll tick.
    flag_recheck: bool,
    /// When a claim last found rows.
    last_rows_at: Option<Instant>,
    /// Claim again at this instant (lingering after a recent busy spell).
    linger_until: Option<Instant>,
    /// `ordering = "aggregate"`: the partitions we own (from the listener)...
    owned: watch::Receiver<Arc<Vec<i32>>>,
    /// ...and those each batch in flight holds.
    busy: HashMap<task::Id, Vec<i32>>,
    /// Rows each batch in flight claimed (reported if the drain gives up).
    in_flight: HashMap<task::Id, usize>,
    /// The task that is claiming now.
    claiming_task: Option<task::Id>,
    /// A sweep task is running.
    sweep_busy: bool,
    next_sweep: Instant,
    draining: bool,
    db_failures: u32,
    /// When the database last failed (the failure count decays after a
    /// quiet spell, not after any one success: a claim that finds nothing
    /// must not reset the backoff of a batch that keeps failing).
    last_db_failure: Option<Instant>,
    /// Batches in a row whose rows the database refused to change at all.
    settle_failures: u32,
    /// No claims before this instant (after a database error).
    paused_until: Option<Instant>,
}

/// Runs the source until a drain completes or `abort` fires.
///
/// `drain`: stop taking wake-ups, but keep claiming until a claim finds
/// nothing (with `ordering = "aggregate"`, a claim over every free
/// partition, after the batches that released rows have settled), then
/// return once nothing is in flight. `abort`: drop whatever is
/// in flight (its transactions roll back, its rows stay) and return.
/// Returns how many claimed rows were abandoned that way (0 after a
/// complete drain).
pub async fn run(
    source: Arc<Source>,
    broker: Arc<Broker>,
    drain: CancellationToken,
    abort: CancellationToken,
) -> usize {
    let mut abandoned = 0;
    let mut state = Loop {
        source: source.clone(),
        broker: broker.clone(),
        tasks: JoinSet::new(),
        due: true,
        backlog: false,
        claiming: None,
        frontier: 0,
        full_scan: true,
        flag: None,
        flag_busy: false,
        flag_exists: true,
        flag_recheck: false,
        last_rows_at: None,
        linger_until: None,
        owned: source.partitions.subscribe(),
        busy: HashMap::new(),
        in_flight: HashMap::new(),
        claiming_task: None,
        sweep_busy: false,
        next_sweep: Instant::now(),
        draining: false,
        db_failures: 0,
        last_db_failure: None,
        settle_failures: 0,
        paused_until: None,
    };
    let mut poll = tokio::time::interval(source.config.poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let max = source.config.max_in_flight;
    let ordered = source.config.ordering == RowOrder::Aggregate;
    info!(
        source = %source.config.name,
        database = %source.config.database_display,
        table = %source.config.table,
        "relay started"
    );
    loop {
        source.health.beat();
        let paused = state.paused_until.is_some_and(|t| Instant::now() < t);
        // The sweep goes before the next claim when it is due, so a steady
        // backlog (a claim always about to start) cannot starve it.
        if !paused
            && !state.draining
            && !state.sweep_busy
            && !state.flag_busy
            && state.claiming.is_none()
            && state.tasks.len() < max
            && Instant::now() >= state.next_sweep
        {
            state.sweep_busy = true;
            state.next_sweep = Instant::now() + SWEEP_EVERY;
            state.tasks.spawn(sweep(source.clone()));
        }
        let from = if !paused
            && broker.can_publish()
            && state.claiming.is_none()
            // Not beside a flag update or a sweep either: an idle source
            // then needs one pooled connection, not two.
            && !state.flag_busy
            && !state.sweep_busy
            && state.tasks.len() < max
            && (state.due || state.backlog)
        {
            state.claim_from()
        } else {
            None
        };
        if let Some(from) = from {
            state.full_scan = false;
            state.due = false;
            let (tx, rx) = oneshot::channel();
            state.claiming = Some(rx);
            let handle = state.tasks.spawn(batch(source.clone(), from, tx));
            state.claiming_task = Some(handle.id());
        }
        if state.draining
            && state.tasks.is_empty()
            && (!(state.due || state.backlog)
                || !broker.can_publish()
                // No partitions to claim from (the listener that holds
                // them is down): waiting cannot drain anything.
                || state.claim_from().is_none())
        {
            info!(source = %source.config.name, "drained; relay stopped");
            break;
        }
        let pause = state.paused_until;
        let linger = state.linger_until;
        tokio::select! {
            biased;
            _ = abort.cancelled() => {
                let n = state.tasks.len();
                abandoned = state.in_flight.values().sum();
                state.tasks.abort_all();
                while state.tasks.join_next().await.is_some() {}
                warn!(source = %source.config.name, batches = n, rows = abandoned, "drain time is up; in-flight batches rolled back, their rows stay in the outbox and are sent after a restart");
                break;
            }
            report = claim_report(&mut state.claiming), if state.claiming.is_some() => {
                state.claiming = None;
                if let Some(id) = state.claiming_task.take() {
                    if !report.partitions.is_empty() {
                        state.busy.insert(id, report.partitions.clone());
                    }
                    if report.rows > 0 {
                        state.in_flight.insert(id, report.rows);
                    }
                }
                state.backlog = report.full;
                state.frontier = if state.backlog {
                    state.frontier.max(report.max_id)
                } else {
                    0
                };
                if report.rows > 0 {
                    // More may have committed since: claim again (while this
                    // batch publishes) until a claim comes back empty. While
                    // draining too: a short claim of some partitions says
                    // nothing of the others.
                    state.due = true;
                }
                let now = Instant::now();
                if report.rows > 0 {
                    state.last_rows_at = Some(now);
                    state.flag_after(&report);
                } else if state.last_rows_at.is_some_and(|t| now - t < LINGER_WINDOW) {
                    // Busy a moment ago: look again shortly instead of arming
                    // the flag, so producers under steady load never notify.
                    state.linger_until = Some(now + LINGER_STEP);
                } else {
                    state.flag_after(&report);
                }
            }
            Some(joined) = state.tasks.join_next_with_id(), if !state.tasks.is_empty() => match joined {
                Ok((id, end)) => {
                    state.busy.remove(&id);
                    state.in_flight.remove(&id);
                    state.settled(end);
                }
                Err(join_error) => {
                    state.busy.remove(&join_error.id());
                    state.in_flight.remove(&join_error.id());
                    // A batch task panicked: a bug, but its transaction is
                    // gone with it and its rows are intact; carry on.
                    error!(source = %source.config.name, error = %join_error, "batch task failed unexpectedly; its rows will be claimed again");
                    state.due = true;
                    state.full_scan = true;
                }
            },
            _ = drain.cancelled(), if !state.draining => {
                state.draining = true;
                // One more claim takes whatever was committed before the signal.
                state.due = true;
                info!(source = %source.config.name, "draining: publishing what is committed, then stopping");
            }
            _ = source.wake.notified(), if !state.draining => state.due = true,
            Ok(()) = state.owned.changed(), if ordered => {
                // New partitions may hold rows; lost ones are skipped by the
                // next claim (and guarded by the batch lock meanwhile).
                state.due = !state.draining;
            }
            _ = poll.tick(), if !state.draining => {
                crate::source::pool::reap_idle(&source.pool);
                state.due = true;
                state.full_scan = true;
                state.flag_recheck = true;
            }
            _ = broker.wait_publishable(&abort), if !broker.can_publish() && !state.draining => {}
            _ = tokio::time::sleep_until(pause.unwrap_or_else(Instant::now)), if pause.is_some() => {
                state.paused_until = None;
            }
            _ = tokio::time::sleep_until(linger.unwrap_or_else(Instant::now)), if linger.is_some() => {
                state.linger_until = None;
                state.due = !state.draining;
            }
        }
    }
    source.publisher.close().await;
    abandoned
}

/// The claim report, or an empty one if the batch ended without sending it.
async fn claim_report(claiming: &mut Option<oneshot::Receiver<Claimed>>) -> Claimed {
    match claiming {
        Some(rx) => rx.await.unwrap_or_default(),
        None => std::future::pending().await,
    }
}

impl Loop {
    /// The one place that decides what a finished batch means for the source.
    fn settled(&mut self, end: BatchEnd) {
        let source = self.source.clone();
        let name = &source.config.name;
        match end {
            BatchEnd::Empty => self.db_ok(false),
            BatchEnd::Settled {
                claimed,
                delivered,
                failed,
                parked,
                refused,
                untouched,
            } => {
                self.db_ok(untouched == 0);
                // With the flag disarmed no notification will come for rows
                // committed meanwhile: claim again until a claim is empty.
                // While draining too: settling released the next rows of
                // the delivered aggregates.
                self.due = true;
                if untouched > 0 {
                    // Those rows are due again at once: without a pause
                    // they would be sent again and again.
                    self.settle_failures += 1;
                    let delay = DB_RETRY.jittered(self.settle_failures.min(20));
                    self.paused_until = Some(Instant::now() + delay);
                    warn!(source = %name, rows = untouched, retry_in = ?delay, "the database refused every change to some rows; pausing the source before they are claimed again");
                } else {
                    self.settle_failures = 0;
                }
                debug!(source = %name, claimed, delivered, failed, parked, refused, "batch settled");
            }
            BatchEnd::Flag { armed } => {
                self.flag_busy = false;
                self.flag = Some(armed);
                if armed {
                    self.linger_until = Some(Instant::now() + flag::RECHECK_AFTER_ARM);
                }
                // Claim once more. Just armed: for rows whose commit read the
                // flag before it was armed. Just disarmed: the claims may have
                // caught up meanwhile (an empty claim while this task ran could
                // not arm), and with the flag down nothing else would wake us.
                self.due = !self.draining;
            }
            BatchEnd::Swept(released) => {
                self.sweep_busy = false;
                self.db_ok(false);
                if released > 0 {
                    info!(source = %name, rows = released, "released held rows whose earlier rows are gone");
                    self.due = !self.draining;
                }
            }
            BatchEnd::FlagMissing(reason) => {
                self.flag_busy = false;
                self.flag_exists = false;
                warn!(source = %name, error = %reason, "the wake-up flag table is missing (run `outboxd migrate`); new rows are found by the poll every poll_interval");
            }
            BatchEnd::Db(err) => {
                self.flag_busy = false;
                self.sweep_busy = false;
                // Look again: the dead-letter table may be what went away.
                source.dead_table.store(DEAD_UNKNOWN, Ordering::SeqCst);
                self.db_failures += 1;
                self.last_db_failure = Some(Instant::now());
                self.backlog = false;
                self.full_scan = true;
                self.due = !self.draining;
                let delay = DB_RETRY.jittered(self.db_failures.min(20));
                self.paused_until = Some(Instant::now() + delay);
                self.source.metrics.error(SourceError::Database).inc();
                self.source.metrics.up.set(0);
                let was_up = self.source.health.set_db_up(false, Some(err.to_string()));
                if was_up || self.db_failures == 1 {
                    warn!(source = %name, error = %err, retry_in = ?delay, "source database failed; rows stay in the outbox, retrying");
                } else {
                    debug!(source = %name, error = %err, attempt = self.db_failures, retry_in = ?delay, "source database still failing");
                }
                if self.draining {
                    warn!(source = %name, "cannot drain while the database fails; stopping with rows left for the next start");
                }
            }
            BatchEnd::BrokerDown(reason) => {
                self.backlog = false;
                self.full_scan = true;
                self.due = !self.draining;
                self.broker.report_failure();
                debug!(source = %name, %reason, "broker unavailable; waiting for it before claiming again");
            }
        }
    }

    /// Keeps the wake-up flag in step with the claims: armed once caught
    /// up (an empty claim), disarmed while busy (a claim that found rows).
    fn flag_after(&mut self, report: &Claimed) {
        if self.flag_busy || self.sweep_busy || !self.flag_exists || self.draining {
            return;
        }
        let want = report.rows == 0;
        let recheck = std::mem::take(&mut self.flag_recheck);
        if self.flag != Some(want) || (want && recheck) {
            self.flag_busy = true;
            self.tasks.spawn(set_flag(self.source.clone(), want));
        }
    }

    /// What the next claim takes, or `None` if there is nothing to claim
    /// from (aggregate order with every owned partition busy or none owned).
    fn claim_from(&self) -> Option<ClaimFrom> {
        let cfg = &self.source.config;
        if cfg.ordering == RowOrder::None {
            // Only a backlog run claims after the frontier: there the head
            // of the table is locked by the batches in flight. Otherwise the
            // claim starts at the head, where a row with a lower id that
            // committed late (ids are taken at insert, not at commit) waits.
            let after = if self.full_scan || !self.backlog {
                0
            } else {
                self.frontier
            };
            return Some(ClaimFrom::After(after));
        }
        let owned = self.owned.borrow().clone();
        let free: Vec<i32> = owned
            .iter()
            .copied()
            .filter(|p| !self.busy.values().any(|held| held.contains(p)))
            .collect();
        if free.is_empty() {
            return None;
        }
        // Leave partitions for the other batches that may be in flight;
        // while draining, one claim looks at every free partition, so an
        // empty claim means there is nothing left.
        let most = if self.draining {
            free.len() as i64
        } else {
            owned.len().div_ceil(cfg.max_in_flight) as i64
        };
        Some(ClaimFrom::Partitions { free, most })
    }

    /// The database answered. `settled`: a batch committed every change it
    /// planned, which ends a run of failures at once; any other success
    /// ends it only after a quiet spell as long as the longest pause.
    fn db_ok(&mut self, settled: bool) {
        let quiet = self
            .last_db_failure
            .is_none_or(|t| t.elapsed() >= DB_RETRY.max);
        if settled || quiet {
            self.db_failures = 0;
        }
        self.source.metrics.up.set(1);
        if !self.source.health.set_db_up(true, None) {
            info!(source = %self.source.config.name, "source database reachable");
        }
    }
}
