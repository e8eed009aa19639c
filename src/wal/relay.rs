//! One `capture = "wal"` source's loop: hold the slot, send the rows the
//! table still holds, then follow the stream, publishing every outbox
//! insert and `outbox_emit()` message in commit order on one channel and
//! moving the slot past each transaction once all of it is done.
//!
//! - **Order.** Batches go one after another, each on one channel, so the
//!   broker sees the commit order. A failed message stops the source at
//!   it: it and everything after it go again, in order, after the retry
//!   delay. A later message of the same aggregate the broker took in the
//!   meantime is an order break (counted, logged).
//! - **The slot** moves only past a prefix of transactions whose every
//!   message is delivered (a plain ack) or parked ([`Ledger`]); with
//!   nothing open or waiting, to the server's keepalive position too, so
//!   an idle slot does not pin WAL. The stream always starts at the slot's
//!   `confirmed_flush`: never from a position of ours.
//! - **Rows already in the table** (a backlog from polling, rows whose
//!   delete did not happen before a crash) are read first, in id order,
//!   and sent before anything from the stream; the stream's copies of the
//!   same rows are skipped until it reaches what committed after that read.
//! - **After the confirm** a table row is deleted (or marked), in batches,
//!   by a task of its own; if that fails the row stays and is sent again
//!   after a restart (a duplicate, never a loss).
//! - **One streamer per slot.** The server lets one session stream from a
//!   slot; a second relay gets "slot in use" and stands by, trying again
//!   every poll interval, and takes over once the first one's session ends.
//! - **Pause** (`outboxd pause`, read every poll interval by
//!   `source::pause::watch`): the session stops taking events once the
//!   batch in flight is confirmed, gives the slot what is done, and closes
//!   the replication connection (an unread stream would be ended by the
//!   server's `wal_sender_timeout` anyway); on resume a new session starts
//!   from the slot. Meanwhile the slot keeps the WAL from its position.
//! - **Memory** is bounded by two batches of pending messages (both may be
//!   in flight, see `send.rs`) plus the
//!   transport's read-ahead (`stream::READ_AHEAD` events), whatever the
//!   size of a transaction.
//!
//! The parts: this file runs sessions (connect, stream); `snapshot.rs`
//! sends what the table holds before streaming, `follow.rs` follows the
//! stream after it, `events.rs` takes the stream's events into the queue
//! and moves the slot, `send.rs` publishes from the queue and handles
//! failures, `delete.rs` removes delivered rows, and `fallback.rs` polls
//! the table while the slot is unusable or waits out a pause.

mod delete;
mod events;
mod fallback;
mod follow;
mod send;
mod snapshot;

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::decode::{Change, DecodeError, Decoder};
use super::ledger::Ledger;
use super::row::{self, MESSAGE_PREFIX};
use super::stream::{Event, PgStream, STATUS_INTERVAL, StreamError, WalStream, lsn_text};
use crate::config::{AfterPublish, SourceConfig, WalCapture};
use crate::message::{OutboxRow, Routing};
use crate::metrics::{SourceError, SourceMetrics};
use crate::relay::{Disposition, decide};
use crate::sink::{Failure, Outcome, Publisher};
use crate::source::dead::DeadTable;
use crate::source::{DB_TIMEOUT, DbError, SourceHealth, step};
use crate::telemetry::ErrorChain;

use delete::{Deletes, Job, delete_confirmed};
use fallback::Fallback;
use snapshot::XidSnapshot;

/// How many batches the stream keeps on the publisher's ordered lane at
/// once (`follow.rs`): the next one is written while the broker confirms
/// the first, and the queue of pending messages holds at most this many
/// batches. Deeper was no faster: two interleaved pairs of `outboxd-bench
/// --only wal` with 4 gave the four flows 0.94–1.01× and 0.97–1.01× of
/// those with 2 (and 3, in an earlier session, +0.5 to +3.6%), while the
/// broker alone on one channel took 0.87 of its ceiling with two chunks of
/// 1,000 in flight and 0.97–1.02 with four: the lane is not what holds
/// the flows back.
const LANE_DEPTH: usize = 2;

/// One `capture = "wal"` source.
pub struct WalRelay<P> {
    pub config: SourceConfig,
    pub wal: WalCapture,
    pub metrics: SourceMetrics,
    pub health: Arc<SourceHealth>,
    pub pool: Pool,
    pub publisher: Arc<P>,
    pub dead: DeadTable,
    /// `outboxd_wal_polling`: 1 while the table is polled for want of a slot.
    pub polling: Option<prometheus::IntGauge>,
    sql: Sql,
}

struct Sql {
    /// $1 after this id, $2 at most: the table's unsent rows, in id order.
    snapshot: String,
    /// $1 ids: delete or mark delivered rows.
    delivered: String,
    /// Move rows into the dead-letter table: $1 ids, $2 errors, $3 reasons.
    park_rows: String,
    /// Park messages that have no row; ids come from the table's sequence.
    park_messages: String,
}

/// A message waiting to be sent, and where it came from.
struct Item {
    row: OutboxRow,
    /// Its transaction in the ledger; `None` for rows read from the table.
    seq: Option<u64>,
    from_table: bool,
    /// Not before this (after a failure).
    retry_at: Option<Instant>,
}

impl Item {
    fn new(row: OutboxRow, seq: Option<u64>, from_table: bool) -> Self {
        Item {
            row,
            seq,
            from_table,
            retry_at: None,
        }
    }
}

/// How a session ended when it did not fail.
enum End {
    Drained,
    /// An operator paused the source: the session ended cleanly.
    Paused,
    /// Abandoned at the drain timeout with this many messages in flight
    /// (sent again after a restart).
    Aborted(usize),
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("cannot decode the replication stream: {0}")]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("no answer from the replication connection within {DB_TIMEOUT:?}")]
    StartTimeout,
}

/// Per session: what is waiting, what the slot waits for.
struct State {
    pending: VecDeque<Item>,
    ledger: Ledger,
    decoder: Decoder,
    /// The transaction being read.
    txn: Option<Txn>,
    /// Ids read from the table before streaming: their inserts in the
    /// stream are skipped, until the stream passes `snapshot_lsn`.
    skip: HashSet<i64>,
    snapshot_lsn: u64,
    /// The transactions committed before the table was read.
    read_before: Option<XidSnapshot>,
    /// The last position given to the stream.
    acked: u64,
    deletes: Deletes,
}

impl State {
    fn new(deletes: Deletes) -> Self {
        State {
            pending: VecDeque::new(),
            ledger: Ledger::new(),
            decoder: Decoder::new(),
            txn: None,
            skip: HashSet::new(),
            snapshot_lsn: 0,
            read_before: None,
            acked: 0,
            deletes,
        }
    }
}

struct Txn {
    seq: u64,
    commit_lsn: u64,
    commit_time: SystemTime,
    ordinal: u32,
    /// Committed before the read of the table: its rows were sent from the
    /// table, or had left it (delivered or parked) before.
    read_before: bool,
}

impl<P: Publisher> WalRelay<P> {
    pub fn new(
        config: SourceConfig,
        wal: WalCapture,
        metrics: SourceMetrics,
        health: Arc<SourceHealth>,
        pool: Pool,
        publisher: Arc<P>,
    ) -> Self {
        let t = config.table.quoted();
        let dead = config.table.sibling("_dead");
        let cols = crate::source::claim::select_list("o");
        let sql = Sql {
            snapshot: format!(
                "SELECT {cols} FROM {t} o WHERE o.published_at IS NULL AND o.id > $1 ORDER BY o.id LIMIT $2"
            ),
            delivered: match config.after_publish {
                AfterPublish::Delete => format!("DELETE FROM {t} WHERE id = ANY($1) RETURNING id"),
                AfterPublish::Mark => format!(
                    "UPDATE {t} SET published_at = clock_timestamp() WHERE id = ANY($1) AND published_at IS NULL RETURNING id"
                ),
            },
            park_rows: format!(
                "WITH moved AS (DELETE FROM {t} WHERE id = ANY($1) RETURNING *) \
                 INSERT INTO {dead} (id, aggregate_type, aggregate_id, event_type, payload, headers, \
                     dedup_key, exchange, routing_key, created_at, attempts, last_error, reason, parked_at) \
                 SELECT o.id, o.aggregate_type, o.aggregate_id, o.event_type, o.payload, o.headers, \
                     o.dedup_key, o.exchange, o.routing_key, o.created_at, o.attempts + 1, p.err, p.reason, \
                     clock_timestamp() \
                 FROM moved o JOIN unnest($1::bigint[], $2::text[], $3::text[]) AS p(id, err, reason) \
                     ON p.id = o.id"
            ),
            park_messages: format!(
                "INSERT INTO {dead} (id, aggregate_type, aggregate_id, event_type, payload, headers, \
                     dedup_key, exchange, routing_key, created_at, attempts, last_error, reason, parked_at) \
                 SELECT nextval(pg_get_serial_sequence($1, 'id')), $2, $3, $4, \
                     COALESCE($5::text::jsonb, 'null'::jsonb), COALESCE($6::text::jsonb, '{{}}'::jsonb), $7, $8, $9, \
                     clock_timestamp(), $10, $11, $12, clock_timestamp()"
            ),
        };
        Self {
            dead: DeadTable::new(&config.name, &config.table),
            config,
            wal,
            metrics,
            health,
            pool,
            publisher,
            polling: None,
            sql,
        }
    }

    /// Runs the source until a drain completes or `abort` fires; returns
    /// how many messages were in flight when it was aborted.
    pub async fn run(self: Arc<Self>, drain: CancellationToken, abort: CancellationToken) -> usize {
        let (deletes, rx) = mpsc::unbounded_channel();
        let deleter = tokio::spawn(delete_confirmed(
            self.pool.clone(),
            self.sql.delivered.clone(),
            rx,
            self.metrics.clone(),
            self.config.name.clone(),
        ));
        let abandoned = self.run_sessions(&drain, &abort, &deletes).await;
        drop(deletes);
        if tokio::time::timeout(DB_TIMEOUT, deleter).await.is_err() {
            warn!(source = %self.config.name, "deletes of delivered rows did not finish; those rows are sent again after a restart");
        }
        abandoned
    }

    async fn run_sessions(
        &self,
        drain: &CancellationToken,
        abort: &CancellationToken,
        deletes: &Deletes,
    ) -> usize {
        let name = &self.config.name;
        info!(source = %name, slot = %self.wal.slot, publication = %self.wal.publication, table = %self.config.table, "wal relay started");
        let mut failures = 0u32;
        let mut standing_by = false;
        let mut slot_gone = false;
        loop {
            self.health.beat();
            if drain.is_cancelled() {
                info!(source = %name, "drained; relay stopped");
                return 0;
            }
            let ended = self
                .session(drain, abort, deletes, &mut standing_by, &mut slot_gone)
                .await;
            let error = match ended {
                Ok(End::Drained) => {
                    info!(source = %name, "drained; relay stopped");
                    return 0;
                }
                Ok(End::Paused) => match self.wait_resumed(drain, abort).await {
                    Some(End::Aborted(n)) => return n,
                    Some(_) => {
                        info!(source = %name, "drained; relay stopped");
                        return 0;
                    }
                    None => continue,
                },
                Ok(End::Aborted(n)) => {
                    warn!(source = %name, messages = n, "drain time is up; messages in flight are sent again after a restart");
                    return n;
                }
                Err(e) => e,
            };
            self.metrics.up.set(0);
            let wait = match &error {
                SessionError::Stream(StreamError::SlotBusy(_)) => {
                    // Another relay streams: stand by.
                    if !standing_by {
                        info!(source = %name, slot = %self.wal.slot, "the slot is in use by another session; standing by to take over");
                        standing_by = true;
                    }
                    self.health.set_db_up(
                        true,
                        Some("standing by: the slot is in use by another session".into()),
                    );
                    failures = 0;
                    self.config.poll_interval
                }
                other => {
                    failures = failures.saturating_add(1);
                    let message = ErrorChain(other).to_string();
                    self.health.set_db_up(false, Some(message.clone()));
                    self.metrics.error(SourceError::Replication).inc();
                    match other {
                        SessionError::Stream(
                            StreamError::SlotMissing(_) | StreamError::SlotLost(_),
                        ) => {
                            // Once per outage, not once per retry.
                            if !slot_gone {
                                error!(source = %name, slot = %self.wal.slot, error = %message, "the replication slot is gone or unusable: polling the outbox table until it is back (`outboxd migrate` makes it); outbox_emit() messages cannot be recovered");
                                slot_gone = true;
                            } else {
                                debug!(source = %name, error = %message, "the replication slot is still unusable");
                            }
                            match self.fallback(drain, abort, deletes).await {
                                Fallback::SlotBack => continue,
                                Fallback::Drained => {
                                    info!(source = %name, "drained; relay stopped");
                                    return 0;
                                }
                                Fallback::Aborted(n) => return n,
                                Fallback::Failed(err) => {
                                    self.metrics.error(SourceError::Database).inc();
                                    warn!(source = %name, error = %ErrorChain(&err), "polling the table failed; trying again");
                                }
                            }
                        }
                        _ => {
                            warn!(source = %name, error = %message, "the replication stream failed; reconnecting")
                        }
                    }
                    self.config.retry.jittered(failures)
                }
            };
            tokio::select! {
                _ = drain.cancelled() => {}
                _ = abort.cancelled() => return 0,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn session(
        &self,
        drain: &CancellationToken,
        abort: &CancellationToken,
        deletes: &Deletes,
        standing_by: &mut bool,
        slot_gone: &mut bool,
    ) -> Result<End, SessionError> {
        if self.health.paused() {
            return Ok(End::Paused);
        }
        let stream = tokio::select! {
            _ = drain.cancelled() => return Ok(End::Drained),
            started = tokio::time::timeout(DB_TIMEOUT, PgStream::start(&self.config, &self.wal)) => {
                started.map_err(|_| SessionError::StartTimeout)??
            }
        };
        if std::mem::take(standing_by) {
            info!(source = %self.config.name, slot = %self.wal.slot, "took over the slot");
        }
        if std::mem::take(slot_gone) {
            info!(source = %self.config.name, slot = %self.wal.slot, "the replication slot is usable again");
        }
        self.stream(stream, drain, abort, deletes).await
    }

    /// Streams from a started stream until drained, aborted or failed.
    async fn stream<S: WalStream>(
        &self,
        mut stream: S,
        drain: &CancellationToken,
        abort: &CancellationToken,
        deletes: &Deletes,
    ) -> Result<End, SessionError> {
        self.health.set_db_up(true, None);
        self.health.set_streaming(true);
        self.metrics.up.set(1);
        let mut st = State::new(deletes.clone());
        // Deletes still queued from the last session (the database was
        // away) run first: else the read of the table sends their rows again.
        self.flush_deletes(deletes).await;
        let result = async {
            if let Some(end) = self.snapshot(&mut st, &stream, drain, abort).await? {
                return Ok(end);
            }
            self.follow(&mut st, &mut stream, drain, abort).await
        }
        .await;
        // A clean end: the slot gets what is done before the stream stops
        // (after a failure the connection is gone; what is not on the
        // server is sent again). Queued deletes run on either way.
        if result.is_ok() {
            self.settle_slot(&mut st, &stream).await;
        }
        stream.stop();
        self.health.set_streaming(false);
        result
    }
}
