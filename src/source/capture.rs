//! The seam between where rows come from and the relay loop that sends
//! them: a [`Capture`] claims batches of due rows and settles them once the
//! broker has answered. The polling claim on a `Source` (`poll.rs`) is
//! one; a logical-replication capture plugs in beside it, and the publish,
//! confirm and settle path in `relay/` does not change.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Notify, watch};

use super::DbError;
use super::complete::{Plan, Settled};
use crate::message::OutboxRow;

/// Where the next claim looks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimFrom {
    /// `ordering = "none"`: any due row with `id > after`.
    After(i64),
    /// Ordered: the sendable rows of the aggregates in at most
    /// `most` of these partitions (those with the oldest rows that no other
    /// batch holds), and at most a `share`th of those that have due rows
    /// (`share`: how many claims may still run while this batch is in
    /// flight, this one included). `probe`: find them with one probe per
    /// free partition, without the look at the front of the table (see
    /// `order.rs`).
    Partitions {
        free: Vec<i32>,
        most: i64,
        share: i64,
        probe: bool,
    },
}

/// What a claim found, reported to the loop as soon as the claim is done
/// (before publishing): the loop starts the next claim right after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claimed {
    pub rows: usize,
    pub max_id: i64,
    /// The claim looked at a full batch of rows: there may be more.
    pub full: bool,
    /// `ordering = "aggregate"`: the partitions this batch holds.
    pub partitions: Vec<i32>,
}

/// A claim: its rows, what to report, and the batch to settle (`None` when
/// it found nothing to send; the capture has finished it already).
pub struct Claim<B> {
    pub rows: Vec<OutboxRow>,
    pub report: Claimed,
    pub batch: Option<B>,
}

/// What setting the wake-up flag came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlagSet {
    Done,
    /// There is no flag (an outbox migrated by an older version or by
    /// hand, or dropped): wake-ups come from the poll only.
    Missing(String),
}

/// Where rows come from.
///
/// A claimed batch stays claimed (no other batch or relay takes its rows)
/// until it is settled or given back; if the relay dies or drops it, its
/// rows are claimed again later, never lost. Only rows that are due and
/// committed are claimed.
pub trait Capture: Send + Sync + 'static {
    /// A claimed batch, held until settled or given back.
    type Batch: Send + 'static;

    /// Claims the next due rows.
    fn claim(
        &self,
        from: ClaimFrom,
    ) -> impl Future<Output = Result<Claim<Self::Batch>, DbError>> + Send;

    /// Whether failed rows can be parked now (the dead-letter table exists).
    fn can_park(&self, batch: &Self::Batch) -> impl Future<Output = Result<bool, DbError>> + Send;

    /// Carries out `plan` for the batch: delivered rows leave, failed ones
    /// are rescheduled or parked. Rows the store refuses are reported.
    fn settle(
        &self,
        batch: Self::Batch,
        plan: &Plan,
    ) -> impl Future<Output = Result<Settled, DbError>> + Send;

    /// Releases a batch unchanged (nothing of it was sent).
    fn give_back(&self, batch: Self::Batch) -> impl Future<Output = Result<(), DbError>> + Send;

    /// Arms (caught up) or disarms (busy) the producers' wake-up flag.
    fn set_flag(&self, armed: bool) -> impl Future<Output = Result<FlagSet, DbError>> + Send;

    /// Releases held rows whose earlier row went away without the relay;
    /// returns how many.
    fn sweep(&self) -> impl Future<Output = Result<u64, DbError>> + Send;

    /// Notified when rows may have come in.
    fn wake(&self) -> &Notify;

    /// `ordering = "aggregate"`: the partitions this relay owns.
    fn partitions(&self) -> watch::Receiver<Arc<Vec<i32>>>;

    /// Called on each poll tick (closes idle connections).
    fn upkeep(&self);

    /// Called after a database error: forget what may have changed.
    fn after_error(&self);
}
