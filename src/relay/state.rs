//! The relay loop's state, in named parts: what the next claim should do
//! ([`Cursor`]), the producers' wake-up flag ([`WakeFlag`]), the pause after
//! failures ([`Pause`]), and the tasks in flight with what each holds
//! ([`InFlight`]).

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::{self, JoinSet};
use tokio::time::Instant;

use super::batch::BatchEnd;
use crate::backoff::Backoff;
use crate::source::{Claimed, DbError, FlagSet};

/// Pause after database errors: quick first retry, at most every 30 s.
pub const DB_RETRY: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));

/// How each task the loop runs ended, tagged by its kind: a failed flag
/// update frees the flag's slot, never the sweep's.
#[derive(Debug)]
pub enum TaskEnd {
    Batch(BatchEnd),
    Flag {
        armed: bool,
        result: Result<FlagSet, DbError>,
    },
    Sweep(Result<u64, DbError>),
}

/// What the next claim should do.
#[derive(Debug)]
pub struct Cursor {
    /// A wake-up, a poll or a claim that found rows says rows may be due.
    pub due: bool,
    /// The last claim came back full: keep the pipeline full.
    pub backlog: bool,
    /// While batches are in flight, the next claim (`ordering = "none"`)
    /// starts after this id (the highest claimed in this run) instead of at
    /// the table's head.
    pub frontier: i64,
    /// The next claim starts at the head of the table: it finds rows that
    /// a claim after the frontier cannot (retries come due, late commits of
    /// lower ids). Set by every poll tick and after errors.
    pub full_scan: bool,
    /// When a claim last found rows.
    pub last_rows_at: Option<Instant>,
    /// Claim again at this instant (lingering after a recent busy spell).
    pub linger_until: Option<Instant>,
}

impl Cursor {
    pub fn new() -> Self {
        Self {
            due: true,
            backlog: false,
            frontier: 0,
            full_scan: true,
            last_rows_at: None,
            linger_until: None,
        }
    }

    /// Whether the loop wants a claim.
    pub fn wants_claim(&self) -> bool {
        self.due || self.backlog
    }

    /// Taken in by each claim report.
    pub fn claimed(&mut self, report: &Claimed) {
        self.backlog = report.full;
        self.frontier = if report.full {
            self.frontier.max(report.max_id)
        } else {
            0
        };
        if report.rows > 0 {
            // More may have committed since: claim again (while this batch
            // publishes) until a claim comes back empty. While draining
            // too: a short claim of some partitions says nothing of others.
            self.due = true;
        }
    }

    /// After a failure: start over at the head of the table.
    pub fn restart(&mut self, draining: bool) {
        self.backlog = false;
        self.full_scan = true;
        self.due = !draining;
    }
}

/// The producers' wake-up flag, as the loop last set it.
#[derive(Debug)]
pub struct WakeFlag {
    /// What we last set it to (`None`: unknown).
    pub last: Option<bool>,
    /// A flag task is running.
    pub running: bool,
    /// The flag table exists (cleared for good when it does not).
    pub exists: bool,
    /// Set it on the next empty claim even if we think it is set: another
    /// relay on the same table may have disarmed it and gone away. Set by
    /// each poll tick.
    pub recheck: bool,
}

impl WakeFlag {
    pub fn new() -> Self {
        Self {
            last: None,
            running: false,
            exists: true,
            recheck: false,
        }
    }

    /// The flag to set after a claim that found `rows` (armed once caught
    /// up, disarmed while busy), or `None` if it is set already.
    pub fn wanted(&mut self, rows: usize) -> Option<bool> {
        if self.running || !self.exists {
            return None;
        }
        let want = rows == 0;
        let recheck = std::mem::take(&mut self.recheck);
        (self.last != Some(want) || (want && recheck)).then_some(want)
    }
}

/// The pause after failures.
#[derive(Debug, Default)]
pub struct Pause {
    /// No claims before this instant.
    pub until: Option<Instant>,
    db_failures: u32,
    /// When the database last failed. The failure count decays after a
    /// quiet spell, not after any one success: a claim that finds nothing
    /// must not reset the backoff of a batch that keeps failing.
    last_db_failure: Option<Instant>,
    /// Batches in a row whose rows the database refused to change at all.
    settle_failures: u32,
}

impl Pause {
    pub fn active(&self, now: Instant) -> bool {
        self.until.is_some_and(|t| now < t)
    }

    /// A database error: pause, longer each time. Returns the delay and
    /// the failure count.
    pub fn db_failed(&mut self) -> (Duration, u32) {
        self.db_failures += 1;
        self.last_db_failure = Some(Instant::now());
        let delay = DB_RETRY.jittered(self.db_failures.min(20));
        self.until = Some(Instant::now() + delay);
        (delay, self.db_failures)
    }

    /// The database answered. `settled`: a batch committed every change it
    /// planned, which ends a run of failures at once; any other success
    /// ends it only after a quiet spell as long as the longest pause.
    pub fn db_ok(&mut self, settled: bool) {
        let quiet = self
            .last_db_failure
            .is_none_or(|t| t.elapsed() >= DB_RETRY.max);
        if settled || quiet {
            self.db_failures = 0;
        }
    }

    /// Rows the database would not change at all were left as they were:
    /// they are due again at once, so pause (longer each time) before they
    /// are claimed again.
    pub fn settle_refused(&mut self) -> Duration {
        self.settle_failures += 1;
        let delay = DB_RETRY.jittered(self.settle_failures.min(20));
        self.until = Some(Instant::now() + delay);
        delay
    }

    pub fn settle_ok(&mut self) {
        self.settle_failures = 0;
    }
}

/// A batch in flight: what it holds.
#[derive(Debug, Default)]
pub struct Held {
    /// `ordering = "aggregate"`: its partitions.
    pub partitions: Vec<i32>,
    /// The rows it claimed (reported if the drain gives up on it).
    pub rows: usize,
}

/// The tasks in flight.
pub struct InFlight {
    pub set: JoinSet<TaskEnd>,
    /// The batch that is claiming now, and where its claim report comes.
    /// One claim runs at a time, so pipelined claims never walk each
    /// other's locked rows.
    pub claiming: Option<(task::Id, oneshot::Receiver<Claimed>)>,
    pub batches: HashMap<task::Id, Held>,
    /// A sweep task is running.
    pub sweep_running: bool,
}

impl InFlight {
    pub fn new() -> Self {
        Self {
            set: JoinSet::new(),
            claiming: None,
            batches: HashMap::new(),
            sweep_running: false,
        }
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Whether partition `p` is held by a batch in flight.
    pub fn holds(&self, p: i32) -> bool {
        self.batches.values().any(|b| b.partitions.contains(&p))
    }

    /// Rows claimed by the batches in flight.
    pub fn rows(&self) -> usize {
        self.batches.values().map(|b| b.rows).sum()
    }
}
