//! The relay loop's state, in named parts: what the next claim should do
//! ([`Cursor`]), the producers' wake-up flag ([`WakeFlag`]) and the load
//! that sets it ([`Load`]), the pause after
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
    /// The last claim that found rows came back full: the batches in
    /// flight share the partitions that have rows (`ordering =
    /// "aggregate"`). Unlike `backlog`, an empty claim leaves it as it is.
    pub last_full: bool,
    /// The free partitions the running claim looks in (ordered claims).
    pub claiming_over: Option<Vec<i32>>,
    /// The free partitions of the last claim, if it found nothing to send.
    /// A claim over the same ones probes them one by one instead of
    /// looking at the front of the table: that front is the rows of the
    /// batches in flight (in a hot aggregate's drain, every row the look
    /// read was of the one busy partition), and the probes of partitions
    /// that were empty a moment ago cost little.
    pub empty_over: Option<Vec<i32>>,
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
            last_full: false,
            claiming_over: None,
            empty_over: None,
        }
    }

    /// Whether the loop wants a claim.
    pub fn wants_claim(&self) -> bool {
        self.due || self.backlog
    }

    /// Taken in by each claim report.
    pub fn claimed(&mut self, report: &Claimed) {
        let over = self.claiming_over.take();
        self.empty_over = if report.rows == 0 { over } else { None };
        self.backlog = report.full;
        self.frontier = if report.full {
            self.frontier.max(report.max_id)
        } else {
            0
        };
        if report.rows > 0 {
            self.last_full = report.full;
            // More may have committed since: claim again (while this batch
            // publishes) until a claim comes back empty. While draining
            // too: a short claim of some partitions says nothing of others.
            self.due = true;
        }
    }

    /// After a failure: start over at the head of the table.
    pub fn restart(&mut self, draining: bool) {
        self.claiming_over = None;
        self.empty_over = None;
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

    /// The flag to set, given whether the loop wants it armed, or `None`
    /// if it is set that way already.
    pub fn wanted(&mut self, want: bool) -> Option<bool> {
        if self.running || !self.exists {
            return None;
        }
        let recheck = std::mem::take(&mut self.recheck);
        (self.last != Some(want) || (want && recheck)).then_some(want)
    }

    /// The flag is known to be armed: notifications will come.
    pub fn armed(&self) -> bool {
        self.exists && self.last == Some(true)
    }
}

/// The window over which the claimed-row rate is judged.
pub const LOAD_WINDOW: Duration = Duration::from_millis(100);
/// Rows per window from which producers are spared NOTIFY (500 rows/s)...
pub const BUSY_ROWS: usize = 50;
/// ...and below which, over a whole window, they notify again (250 rows/s).
pub const CALM_ROWS: usize = 25;

/// The rate at which claims find rows, in two states with hysteresis:
/// busy from [`BUSY_ROWS`] rows in one [`LOAD_WINDOW`], calm again after a
/// whole window with fewer than [`CALM_ROWS`].
///
/// It decides who pays for a new row's pickup. Calm: the wake-up flag
/// stays armed, every commit notifies, and the relay claims the moment a
/// row commits instead of up to [`LINGER_STEP`](super::LINGER_STEP) later.
/// Busy: the flag is disarmed and the relay polls (claims back to back, or
/// every 2 ms while lingering): there a claim is seldom idle long enough
/// for a notification to win anything, and NOTIFY's database-wide commit
/// lock costs producers more the more they commit (measured at 1,000
/// commits/s: 1.7 ms a commit disarmed, 2.2 ms armed, with no gain in
/// delivery latency).
#[derive(Debug)]
pub struct Load {
    window_start: Instant,
    in_window: usize,
    busy: bool,
}

impl Load {
    pub fn new(now: Instant) -> Self {
        Self {
            window_start: now,
            in_window: 0,
            busy: false,
        }
    }

    /// A claim found `rows` at `now`.
    pub fn add(&mut self, now: Instant, rows: usize) {
        self.roll(now);
        self.in_window += rows;
        if self.in_window >= BUSY_ROWS {
            self.busy = true;
        }
    }

    pub fn busy(&mut self, now: Instant) -> bool {
        self.roll(now);
        self.busy
    }

    fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed < LOAD_WINDOW {
            return;
        }
        // The window that ended was calm, or more than a window passed
        // (the whole of the last window was then empty).
        if self.in_window < CALM_ROWS || elapsed >= 2 * LOAD_WINDOW {
            self.busy = false;
        }
        self.window_start = now;
        self.in_window = 0;
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

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn report(rows: usize, full: bool) -> Claimed {
        Claimed {
            rows,
            full,
            ..Claimed::default()
        }
    }

    #[test]
    fn only_a_claim_with_rows_says_whether_the_claims_come_back_full() {
        let mut cursor = Cursor::new();
        assert!(!cursor.last_full, "no claim yet");
        cursor.claimed(&report(1000, true));
        assert!(cursor.last_full && cursor.backlog);
        // An empty claim beside a full batch ends the backlog, but the
        // batches still share the partitions with rows: the next claim
        // after the full one settles takes its share, not all of them.
        cursor.claimed(&report(0, false));
        assert!(!cursor.backlog);
        assert!(cursor.last_full, "an empty claim leaves it");
        cursor.claimed(&report(3, false));
        assert!(!cursor.last_full, "a short claim with rows ends it");
    }

    #[test]
    fn a_claim_over_the_partitions_of_an_empty_one_is_known() {
        let mut cursor = Cursor::new();
        cursor.claiming_over = Some(vec![1, 2, 3]);
        cursor.claimed(&report(0, false));
        assert_eq!(cursor.empty_over.as_deref(), Some(&[1, 2, 3][..]));
        assert_eq!(cursor.claiming_over, None, "taken by the report");
        // A claim that found rows ends it, whatever it looked in.
        cursor.claiming_over = Some(vec![1, 2, 3]);
        cursor.claimed(&report(5, false));
        assert_eq!(cursor.empty_over, None);
        // An unordered claim has no partitions to remember.
        cursor.claimed(&report(0, false));
        assert_eq!(cursor.empty_over, None);
        // Nor does a cursor that starts over after a failure.
        cursor.claiming_over = Some(vec![4]);
        cursor.claimed(&report(0, false));
        assert!(cursor.empty_over.is_some());
        cursor.restart(false);
        assert_eq!(cursor.empty_over, None);
    }

    #[test]
    fn the_load_turns_busy_within_a_window_and_calm_after_a_calm_window() {
        let t0 = Instant::now();
        let mut load = Load::new(t0);
        // 2 rows every 10 ms (200 rows/s): calm throughout.
        for i in 0..50u32 {
            load.add(t0 + i * 10 * MS, 2);
            assert!(!load.busy(t0 + i * 10 * MS), "200 rows/s is calm");
        }
        // A full batch (a backlog) is busy at once, not a window later.
        let t1 = t0 + 600 * MS;
        load.add(t1, 500);
        assert!(load.busy(t1));
        // Between the thresholds (400 rows/s) it stays busy.
        for i in 1..=30u32 {
            load.add(t1 + i * 10 * MS, 4);
        }
        assert!(load.busy(t1 + 300 * MS));
        // A window under 250 rows/s ends it.
        let t2 = t1 + 310 * MS;
        for i in 0..10u32 {
            load.add(t2 + i * 10 * MS, 2);
        }
        assert!(!load.busy(t2 + 205 * MS), "200 rows/s is calm again");
        // And from calm, 400 rows/s does not make it busy.
        let t3 = t2 + 300 * MS;
        for i in 0..30u32 {
            load.add(t3 + i * 10 * MS, 4);
            assert!(
                !load.busy(t3 + i * 10 * MS),
                "between the thresholds it stays calm"
            );
        }
    }

    #[test]
    fn a_quiet_spell_longer_than_two_windows_is_calm() {
        let t0 = Instant::now();
        let mut load = Load::new(t0);
        load.add(t0, 30);
        // 30 then another 30 within one window: busy.
        load.add(t0 + 50 * MS, 30);
        assert!(load.busy(t0 + 60 * MS));
        // Nothing for 250 ms: the next look finds it calm.
        assert!(!load.busy(t0 + 310 * MS));
    }

    #[test]
    fn the_flag_is_set_only_when_it_changes_or_on_a_recheck() {
        let mut flag = WakeFlag::new();
        assert_eq!(flag.wanted(true), Some(true), "unknown: set it");
        flag.last = Some(true);
        assert!(flag.armed());
        assert_eq!(flag.wanted(true), None, "armed already");
        assert_eq!(flag.wanted(false), Some(false));
        flag.last = Some(false);
        assert!(!flag.armed());
        flag.last = Some(true);
        flag.recheck = true;
        assert_eq!(
            flag.wanted(true),
            Some(true),
            "a poll tick rechecks an armed flag"
        );
        assert_eq!(flag.wanted(true), None, "once");
        flag.running = true;
        assert_eq!(flag.wanted(false), None, "not beside a running update");
    }
}
