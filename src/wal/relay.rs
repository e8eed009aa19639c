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
//! - **Memory** is bounded by one batch of pending messages plus the
//!   transport's read-ahead (`stream::READ_AHEAD` events), whatever the size of
//!   a transaction.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::pin;
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
use crate::sink::{Failure, FailureReason, Outcome, Publisher};
use crate::source::dead::DeadTable;
use crate::source::{DB_TIMEOUT, DbError, SourceHealth, step};
use crate::telemetry::ErrorChain;

/// Work for the task that deletes (or marks) delivered rows.
enum Job {
    Delete(Vec<i64>),
    /// Answered once every delete queued before it has run (or was given up).
    Flush(oneshot::Sender<()>),
}

/// Where a session queues deletes. Unbounded on purpose: publishing must
/// not wait for the database, or a PostgreSQL shutdown (which waits for
/// the relay to confirm everything its walsender sent) and a relay waiting
/// for deletes the shutting-down server refuses would wait on each other.
/// It holds one id (8 bytes) per delivered row not yet deleted.
type Deletes = mpsc::UnboundedSender<Job>;

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

/// How polling the table while the slot is gone ended.
enum Fallback {
    /// The slot exists and is usable again: stream.
    SlotBack,
    Drained,
    Aborted(usize),
    Failed(SessionError),
}

/// The stream while there is none (polling): nothing to acknowledge.
struct NoStream;

impl WalStream for NoStream {
    async fn recv(&mut self) -> Result<Option<Event>, StreamError> {
        std::future::pending().await
    }
    fn ack(&self, _lsn: u64) {}
    fn acked_on_server(&self) -> u64 {
        u64::MAX
    }
    fn stop(&self) {}
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
                     COALESCE($5::jsonb, 'null'::jsonb), COALESCE($6::jsonb, '{{}}'::jsonb), $7, $8, $9, \
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

    /// While the slot is missing or lost: send what the table holds, in
    /// id order, every poll interval (one relay of the source at a time,
    /// under an advisory lock), until the slot is usable again. Rows are
    /// deleted (or marked) before the next pass reads the table, so a pass
    /// repeats nothing the previous one delivered.
    async fn fallback(
        &self,
        drain: &CancellationToken,
        abort: &CancellationToken,
        deletes: &Deletes,
    ) -> Fallback {
        let name = &self.config.name;
        self.health.set_polling(true);
        if let Some(g) = &self.polling {
            g.set(1);
        }
        warn!(source = %name, slot = %self.wal.slot, "polling the outbox table while the replication slot is unusable");
        let ended = loop {
            self.health.beat();
            if self.health.paused() {
                tokio::select! {
                    _ = drain.cancelled() => break Fallback::Drained,
                    _ = abort.cancelled() => break Fallback::Aborted(0),
                    _ = tokio::time::sleep(self.config.poll_interval) => continue,
                }
            }
            match self.poll_pass(drain, abort, deletes).await {
                Ok(Some(end)) => {
                    break match end {
                        End::Drained => Fallback::Drained,
                        End::Aborted(n) => Fallback::Aborted(n),
                        // Paused mid-pass: the next pass (after resume) goes on.
                        End::Paused => continue,
                    };
                }
                Ok(None) => {}
                Err(e) => break Fallback::Failed(e),
            }
            tokio::select! {
                _ = drain.cancelled() => break Fallback::Drained,
                _ = abort.cancelled() => break Fallback::Aborted(0),
                _ = tokio::time::sleep(self.config.poll_interval) => {}
            }
            match self.slot_usable().await {
                Ok(true) => break Fallback::SlotBack,
                Ok(false) => {}
                Err(e) => break Fallback::Failed(e.into()),
            }
        };
        self.health.set_polling(false);
        if let Some(g) = &self.polling {
            g.set(0);
        }
        if matches!(ended, Fallback::SlotBack) {
            info!(source = %name, slot = %self.wal.slot, "the replication slot is back: streaming again");
        }
        ended
    }

    /// One pass over the table, if no other relay of the source polls it.
    async fn poll_pass(
        &self,
        drain: &CancellationToken,
        abort: &CancellationToken,
        deletes: &Deletes,
    ) -> Result<Option<End>, SessionError> {
        // A connection of its own: the lock goes with it, whatever happens.
        let lock = tokio::time::timeout(DB_TIMEOUT, crate::source::connect(&self.config))
            .await
            .map_err(|_| DbError::TimedOut {
                step: "connect to poll the table",
            })?
            .map_err(|e| DbError::Failed {
                step: "connect to poll the table",
                source: Box::new(e),
            })?;
        let key = format!("outboxd wal polling {}", self.config.table);
        let got: bool = step(
            "take the polling lock",
            lock.query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&key]),
        )
        .await?
        .get(0);
        if !got {
            return Ok(None);
        }
        let mut st = State::new(deletes.clone());
        let ended = self.snapshot(&mut st, &NoStream, drain, abort).await;
        // Every delete of this pass done before the next pass reads.
        self.flush_deletes(deletes).await;
        drop(lock);
        ended
    }

    /// Waits (at most `DB_TIMEOUT`) until every queued delete has run.
    async fn flush_deletes(&self, deletes: &Deletes) {
        let (done, flushed) = oneshot::channel();
        if deletes.send(Job::Flush(done)).is_ok()
            && tokio::time::timeout(DB_TIMEOUT, flushed).await.is_err()
        {
            warn!(source = %self.config.name, "deletes of delivered rows are behind; reading the table may send some of them again");
        }
    }

    /// Whether the slot exists and can be streamed from.
    async fn slot_usable(&self) -> Result<bool, DbError> {
        let client = step("take a connection", self.pool.get()).await?;
        let row = step(
            "look for the slot",
            client.query_opt(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()",
                &[&self.wal.slot],
            ),
        )
        .await?;
        Ok(match row {
            None => false,
            Some(r) => !matches!(
                r.try_get::<_, Option<String>>(0).ok().flatten().as_deref(),
                Some("lost")
            ),
        })
    }

    /// Paused: no replication connection until the source is resumed (or
    /// the relay stops). `Some` if the relay stops meanwhile.
    async fn wait_resumed(
        &self,
        drain: &CancellationToken,
        abort: &CancellationToken,
    ) -> Option<End> {
        let mut paused = self.health.paused_changes();
        info!(source = %self.config.name, slot = %self.wal.slot, "paused: replication connection closed; the slot keeps the WAL from its position until `outboxd resume`");
        while *paused.borrow_and_update() {
            // /healthz: a paused loop still turns.
            self.health.beat();
            tokio::select! {
                _ = drain.cancelled() => return Some(End::Drained),
                _ = abort.cancelled() => return Some(End::Aborted(0)),
                _ = paused.changed() => {}
                _ = tokio::time::sleep(self.config.poll_interval) => {}
            }
        }
        None
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

    /// Reads the rows the table holds, in id order, and sends them before
    /// anything from the stream. `Some` if the session ended meanwhile.
    async fn snapshot<S: WalStream>(
        &self,
        st: &mut State,
        stream: &S,
        drain: &CancellationToken,
        abort: &CancellationToken,
    ) -> Result<Option<End>, SessionError> {
        let batch = i64::try_from(self.config.batch_size).unwrap_or(i64::MAX);
        let mut after = 0i64;
        let mut total = 0usize;
        // Taken before the first page: whatever it counts as committed,
        // every page sees.
        let client = step("take a connection", self.pool.get()).await?;
        let seen: String = step(
            "read the transaction snapshot",
            client.query_one("SELECT txid_current_snapshot()::text", &[]),
        )
        .await?
        .try_get(0)
        .unwrap_or_default();
        drop(client);
        st.read_before = XidSnapshot::parse(&seen);
        loop {
            let client = step("take a connection", self.pool.get()).await?;
            let rows = step(
                "read the outbox table",
                client.query(&self.sql.snapshot, &[&after, &batch]),
            )
            .await?;
            let short = (rows.len() as i64) < batch;
            for r in &rows {
                let row = crate::source::claim::decode(r).map_err(|e| DbError::Failed {
                    step: "read the outbox table",
                    source: Box::new(e),
                })?;
                after = after.max(row.id);
                st.skip.insert(row.id);
                st.pending.push_back(Item {
                    row,
                    seq: None,
                    from_table: true,
                    retry_at: None,
                });
            }
            total += rows.len();
            if short {
                // Every row read above committed before this position: the
                // stream's copies of them all come before it.
                let lsn = step(
                    "read the log position",
                    client.query_one(
                        "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint",
                        &[],
                    ),
                )
                .await?;
                st.snapshot_lsn = lsn
                    .try_get::<_, i64>(0)
                    .map(|v| v as u64)
                    .unwrap_or(u64::MAX);
            }
            drop(client);
            while !st.pending.is_empty() {
                if self.health.paused() {
                    return Ok(Some(End::Paused));
                }
                if let Some(end) = self.send_next(st, stream, drain, abort).await? {
                    return Ok(Some(end));
                }
            }
            if short {
                if total > 0 {
                    info!(source = %self.config.name, rows = total, "sent the rows the table held before streaming");
                }
                return Ok(None);
            }
        }
    }

    /// Follows the stream.
    async fn follow<S: WalStream>(
        &self,
        st: &mut State,
        stream: &mut S,
        drain: &CancellationToken,
        abort: &CancellationToken,
    ) -> Result<End, SessionError> {
        let mut tick = tokio::time::interval(self.config.poll_interval.min(STATUS_INTERVAL));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let cap = self.config.batch_size;
        let mut paused = self.health.paused_changes();
        loop {
            self.health.beat();
            if drain.is_cancelled() {
                return Ok(End::Drained);
            }
            // Between batches: nothing is in flight.
            if *paused.borrow_and_update() {
                return Ok(End::Paused);
            }
            // Take in what is ready, up to a batch.
            while st.pending.len() < cap {
                match now_or_never(stream.recv()) {
                    Some(event) => self.handle(st, stream, event?)?,
                    None => break,
                }
            }
            let front_waits = st
                .pending
                .front()
                .and_then(|i| i.retry_at)
                .filter(|at| *at > Instant::now());
            if !st.pending.is_empty() && front_waits.is_none() {
                if let Some(end) = self.send_next(st, stream, drain, abort).await? {
                    return Ok(end);
                }
                continue;
            }
            let retry = async {
                match front_waits {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = abort.cancelled() => return Ok(End::Aborted(0)),
                _ = drain.cancelled() => return Ok(End::Drained),
                event = stream.recv(), if st.pending.len() < cap => self.handle(st, stream, event?)?,
                _ = retry => {}
                _ = tick.tick() => {}
                Ok(()) = paused.changed() => {}
            }
        }
    }

    /// One event of the stream.
    fn handle<S: WalStream>(
        &self,
        st: &mut State,
        stream: &S,
        event: Option<Event>,
    ) -> Result<(), SessionError> {
        let Some(event) = event else {
            return Err(
                StreamError::Other("the server ended the replication stream".into()).into(),
            );
        };
        match event {
            Event::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                if final_lsn >= st.snapshot_lsn && !st.skip.is_empty() {
                    st.skip = HashSet::new();
                }
                st.txn = Some(Txn {
                    seq: st.ledger.begin(),
                    commit_lsn: final_lsn,
                    commit_time: row::pg_time(commit_time_micros),
                    ordinal: 0,
                    read_before: st.read_before.as_ref().is_some_and(|s| s.saw(xid)),
                });
            }
            Event::Change(data) => {
                let Change::Insert(ins) = st.decoder.decode(&data)? else {
                    return Ok(());
                };
                let table = &self.config.table;
                if ins.schema != table.schema || ins.table != table.table {
                    return Ok(());
                }
                let Some(txn) = &st.txn else {
                    return Err(StreamError::Other("an insert outside a transaction".into()).into());
                };
                let row = row::from_insert(&ins, txn.commit_time);
                // Either way the table read sent it, or it had been sent
                // (and deleted) before: a slot whose position went back (a
                // crash, PostgreSQL < 17 restarting) repeats those.
                if st.skip.remove(&row.id) || txn.read_before {
                    return Ok(());
                }
                st.ledger.add(txn.seq);
                st.pending.push_back(Item {
                    row,
                    seq: Some(txn.seq),
                    from_table: true,
                    retry_at: None,
                });
            }
            Event::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                if prefix != MESSAGE_PREFIX {
                    return Ok(());
                }
                let (seq, row) = match (&mut st.txn, transactional) {
                    (Some(txn), true) => {
                        let row = row::from_message(
                            &content,
                            txn.commit_lsn,
                            txn.ordinal,
                            txn.commit_time,
                        );
                        txn.ordinal += 1;
                        (txn.seq, row)
                    }
                    _ => {
                        // A non-transactional message is a transaction of its own.
                        let seq = st.ledger.begin();
                        st.ledger.commit(seq, lsn);
                        (seq, row::from_message(&content, lsn, 0, SystemTime::now()))
                    }
                };
                st.ledger.add(seq);
                st.pending.push_back(Item {
                    row,
                    seq: Some(seq),
                    from_table: false,
                    retry_at: None,
                });
            }
            Event::Commit { end_lsn } => {
                if let Some(txn) = st.txn.take() {
                    st.ledger.commit(txn.seq, end_lsn);
                }
                self.move_slot(st, stream);
            }
            Event::KeepAlive { wal_end } => {
                if st.ledger.is_empty()
                    && st.txn.is_none()
                    && st.pending.is_empty()
                    && wal_end > st.acked
                {
                    st.acked = wal_end;
                    stream.ack(wal_end);
                }
            }
        }
        Ok(())
    }

    fn move_slot<S: WalStream>(&self, st: &mut State, stream: &S) {
        if let Some(lsn) = st.ledger.advance()
            && lsn > st.acked
        {
            st.acked = lsn;
            stream.ack(lsn);
        }
    }

    /// Before the session ends: the last acknowledgement, and a bounded
    /// wait until the server has it (the transport sends it on its own
    /// schedule, and not at all once stopped).
    async fn settle_slot<S: WalStream>(&self, st: &mut State, stream: &S) {
        self.move_slot(st, stream);
        let deadline = Instant::now() + STATUS_INTERVAL * 3;
        while stream.acked_on_server() < st.acked && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if stream.acked_on_server() < st.acked {
            warn!(source = %self.config.name, acked = %lsn_text(st.acked), on_server = %lsn_text(stream.acked_on_server()), "the last slot position did not reach the server; what came after it is sent again");
        } else {
            debug!(source = %self.config.name, position = %lsn_text(st.acked), "slot position reached the server");
        }
    }

    /// Sends the next batch from the front of the queue and settles its
    /// answers. `Some` if the session ended meanwhile.
    async fn send_next<S: WalStream>(
        &self,
        st: &mut State,
        stream: &S,
        drain: &CancellationToken,
        abort: &CancellationToken,
    ) -> Result<Option<End>, SessionError> {
        let cfg = &self.config;
        if let Some(at) = st.pending.front().and_then(|i| i.retry_at) {
            tokio::select! {
                _ = abort.cancelled() => return Ok(Some(End::Aborted(0))),
                _ = drain.cancelled() => return Ok(Some(End::Drained)),
                _ = tokio::time::sleep_until(at) => {}
            }
        }
        if !self.publisher.can_publish() {
            tokio::select! {
                _ = abort.cancelled() => return Ok(Some(End::Aborted(0))),
                _ = drain.cancelled() => return Ok(Some(End::Drained)),
                _ = self.publisher.publishable(drain) => {}
            }
            if drain.is_cancelled() {
                return Ok(Some(End::Drained));
            }
        }
        let n = st.pending.len().min(cfg.batch_size);
        let routing = Routing::of(cfg);
        let messages: Vec<_> = st
            .pending
            .iter()
            .take(n)
            .map(|i| {
                i.row
                    .to_outbound(&routing)
                    .map_err(|bad| Failure::new(FailureReason::BadRow, bad.to_string()))
            })
            .collect();
        self.metrics.batch_size.observe(n as f64);
        let outcomes = tokio::select! {
            _ = abort.cancelled() => return Ok(Some(End::Aborted(n))),
            sent = self.publisher.send(messages) => match sent {
                Ok(o) => o,
                Err(unavailable) => {
                    self.publisher.report_failure();
                    debug!(source = %cfg.name, error = %unavailable, "broker unavailable; waiting");
                    return Ok(None);
                }
            },
        };
        let confirmed_at = SystemTime::now();
        let first_failed = outcomes
            .iter()
            .position(|o| matches!(o, Outcome::Failed(_)));
        let delivered = first_failed.unwrap_or(outcomes.len()).min(n);
        let mut ids = Vec::new();
        for _ in 0..delivered {
            let Some(item) = st.pending.pop_front() else {
                break;
            };
            self.metrics.lag.observe(item.row.age_at(confirmed_at));
            if let Some(seq) = item.seq {
                st.ledger.done(seq);
            }
            if item.from_table {
                ids.push(item.row.id);
            }
        }
        self.metrics.published.inc_by(delivered as u64);
        if let Some(k) = first_failed
            && let Some(Outcome::Failed(failure)) = outcomes.get(k)
        {
            self.failed(st, failure, &outcomes[k + 1..]).await;
        }
        self.move_slot(st, stream);
        if !ids.is_empty() {
            // Only fails once the deleter is gone (the relay is stopping):
            // the rows stay and go out again after a restart.
            let _ = st.deletes.send(Job::Delete(ids));
        }
        Ok(None)
    }

    /// The front message failed: park it or set it to wait; count the
    /// later messages of its aggregate the broker took (order breaks).
    async fn failed(&self, st: &mut State, failure: &Failure, later: &[Outcome]) {
        let name = &self.config.name;
        self.metrics.failure(failure.reason).inc();
        let Some(front) = st.pending.front() else {
            return;
        };
        let aggregate = (
            front.row.aggregate_type.clone(),
            front.row.aggregate_id.clone(),
        );
        let breaks = st
            .pending
            .iter()
            .skip(1)
            .zip(later)
            .filter(|(i, o)| {
                matches!(o, Outcome::Delivered)
                    && i.row.aggregate() == (aggregate.0.as_str(), aggregate.1.as_str())
            })
            .count();
        if breaks > 0 {
            self.metrics.order_breaks.inc_by(breaks as u64);
            warn!(source = %name, row_id = front.row.id, dedup_key = %front.row.dedup_key, later = breaks, "order break: the broker took later messages of this aggregate while refusing this one; they are sent again after it");
        }
        let attempt = u32::try_from(front.row.attempts)
            .unwrap_or(0)
            .saturating_add(1);
        let disposition = decide(failure.reason, attempt, self.config.max_attempts);
        if disposition == Disposition::Park {
            match self.park(&front.row, failure, attempt).await {
                Ok(true) => {
                    if let Some(counter) = self.metrics.parked(failure.reason) {
                        counter.inc();
                    }
                    warn!(source = %name, row_id = front.row.id, dedup_key = %front.row.dedup_key, attempt, error = %failure, "parked in the dead-letter table; the source goes on with the next message");
                    if let Some(item) = st.pending.pop_front()
                        && let Some(seq) = item.seq
                    {
                        st.ledger.done(seq);
                    }
                    return;
                }
                Ok(false) => {}
                Err(err) => {
                    self.metrics.error(SourceError::Settle).inc();
                    warn!(source = %name, row_id = front.row.id, error = %ErrorChain(&err), "parking failed; retrying the message instead");
                }
            }
        }
        let delay = self.config.retry.jittered(attempt);
        if let Some(front) = st.pending.front_mut() {
            front.row.attempts = front.row.attempts.saturating_add(1);
            front.retry_at = Some(Instant::now() + delay);
        }
        warn!(source = %name, attempt, retry_in_ms = delay.as_millis() as u64, error = %failure, "delivery failed; the source waits and sends it, and everything after it, again");
    }

    /// Moves a message into the dead-letter table. `Ok(false)` when there
    /// is no dead-letter table (the message is retried instead).
    async fn park(
        &self,
        row: &OutboxRow,
        failure: &Failure,
        attempt: u32,
    ) -> Result<bool, DbError> {
        let client = step("take a connection", self.pool.get()).await?;
        if !self.dead.exists(&client).await? {
            return Ok(false);
        }
        let err = failure.to_string();
        let reason = failure.reason.as_str().to_owned();
        if row.id > 0 {
            let moved = step(
                "park a row",
                client.execute(
                    &self.sql.park_rows,
                    &[&vec![row.id], &vec![err], &vec![reason]],
                ),
            )
            .await?;
            // Gone already (deleted by hand): nothing to park.
            let _ = moved;
        } else {
            let table = format!("{}.{}", self.config.table.schema, self.config.table.table);
            let attempts = i32::try_from(attempt).unwrap_or(i32::MAX);
            let payload = (!row.payload.is_empty()).then_some(row.payload.as_str());
            let headers = (!row.headers.is_empty()).then_some(row.headers.as_str());
            step(
                "park a message",
                client.execute(
                    &self.sql.park_messages,
                    &[
                        &table,
                        &row.aggregate_type,
                        &row.aggregate_id,
                        &row.event_type,
                        &payload,
                        &headers,
                        &row.dedup_key,
                        &row.exchange,
                        &row.routing_key,
                        &attempts,
                        &err,
                        &reason,
                    ],
                ),
            )
            .await?;
        }
        Ok(true)
    }
}

/// How often rows a delete did not find are looked for again, and how many
/// times: the stream can bring a transaction as soon as its commit record
/// is flushed, a moment before the committing session makes it visible to
/// others, so a fast confirm can send the DELETE before the row is there.
const LATE_RETRY: Duration = Duration::from_millis(100);
const LATE_TRIES: u32 = 30;

/// Deletes (or marks) delivered rows, merging what queued up meanwhile.
/// Rows the statement did not find are tried again a few times (see
/// [`LATE_RETRY`]). A failed statement (the database may be restarting) is
/// retried until the relay stops; what is left then stays in the table and
/// is sent again after a restart.
async fn delete_confirmed(
    pool: Pool,
    sql: String,
    mut rx: mpsc::UnboundedReceiver<Job>,
    metrics: SourceMetrics,
    name: String,
) {
    let mut failures = 0u32;
    let mut flushes = Vec::new();
    // (id, statements that did not find it)
    let mut late: Vec<(i64, u32)> = Vec::new();
    let mut closed = false;
    loop {
        let first = if closed {
            if late.is_empty() {
                return;
            }
            tokio::time::sleep(LATE_RETRY).await;
            None
        } else if late.is_empty() {
            match rx.recv().await {
                Some(job) => Some(job),
                None => return,
            }
        } else {
            match tokio::time::timeout(LATE_RETRY, rx.recv()).await {
                Ok(Some(job)) => Some(job),
                Ok(None) => {
                    closed = true;
                    None
                }
                Err(_) => None,
            }
        };
        let mut fresh = Vec::new();
        let mut next = first;
        // Everything queued up to the first flush goes in one statement.
        while let Some(job) = next.take() {
            match job {
                Job::Delete(more) => fresh.extend(more),
                Job::Flush(done) => {
                    flushes.push(done);
                    break;
                }
            }
            next = rx.try_recv().ok();
        }
        let ids: Vec<i64> = fresh
            .iter()
            .copied()
            .chain(late.iter().map(|(id, _)| *id))
            .collect();
        while !ids.is_empty() {
            let done = async {
                let client = step("take a connection", pool.get()).await?;
                step("delete delivered rows", client.query(&sql, &[&ids])).await
            }
            .await;
            match done {
                Ok(rows) => {
                    failures = 0;
                    let found: HashSet<i64> =
                        rows.iter().filter_map(|r| r.try_get(0).ok()).collect();
                    let mut still = Vec::new();
                    for (id, tries) in fresh.iter().map(|id| (*id, 0)).chain(late.drain(..)) {
                        if found.contains(&id) {
                            continue;
                        }
                        if tries + 1 >= LATE_TRIES {
                            debug!(source = %name, row_id = id, "a delivered row was not found to delete (deleted by someone else, or parked)");
                        } else {
                            still.push((id, tries + 1));
                        }
                    }
                    late = still;
                    break;
                }
                Err(err) => {
                    failures = failures.saturating_add(1);
                    metrics.error(SourceError::Database).inc();
                    warn!(source = %name, rows = ids.len(), error = %ErrorChain(&err), "removing delivered rows failed; retrying (until then they would be sent again after a restart)");
                    if rx.is_closed() && failures > 3 {
                        warn!(source = %name, rows = ids.len(), "giving up removing delivered rows at shutdown; they are sent again after a restart");
                        late.clear();
                        break;
                    }
                    let delay = Duration::from_millis(200).saturating_mul(failures.min(25));
                    tokio::time::sleep(delay).await;
                }
            }
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

/// A transaction snapshot (`txid_current_snapshot()`), on 32-bit xids as
/// the stream's Begin carries them: which transactions had committed when
/// it was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
struct XidSnapshot {
    xmin: u32,
    xmax: u32,
    running: Vec<u32>,
}

impl XidSnapshot {
    /// `xmin:xmax:xip,xip` (64-bit, epoch included).
    fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim().splitn(3, ':');
        let low = |v: &str| v.trim().parse::<u64>().ok().map(|x| x as u32);
        let xmin = low(parts.next()?)?;
        let xmax = low(parts.next()?)?;
        let running = match parts.next() {
            Some(list) if !list.trim().is_empty() => {
                list.split(',').map(low).collect::<Option<Vec<u32>>>()?
            }
            _ => Vec::new(),
        };
        Some(Self {
            xmin,
            xmax,
            running,
        })
    }

    /// Whether `xid` had ended when the snapshot was taken (as the stream
    /// only brings committed ones: committed). Comparisons wrap, as
    /// PostgreSQL's do.
    fn saw(&self, xid: u32) -> bool {
        let precedes = |a: u32, b: u32| (a.wrapping_sub(b) as i32) < 0;
        if precedes(xid, self.xmin) {
            return true;
        }
        if !precedes(xid, self.xmax) {
            return false;
        }
        !self.running.contains(&xid)
    }
}

/// Polls `f` once: its output if it is ready now.
fn now_or_never<F: Future>(f: F) -> Option<F::Output> {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(f).poll(&mut cx) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

#[cfg(test)]
mod tests {
    use super::XidSnapshot;

    #[test]
    fn a_transaction_snapshot_says_what_had_committed() {
        let s = XidSnapshot::parse("100:110:103,105").unwrap();
        assert!(s.saw(99) && s.saw(100) && s.saw(104) && s.saw(109));
        assert!(!s.saw(103) && !s.saw(105), "running when it was taken");
        assert!(!s.saw(110) && !s.saw(111), "not begun");
        let empty = XidSnapshot::parse("7:7:").unwrap();
        assert!(empty.saw(6) && !empty.saw(7));
        // 64-bit with an epoch: the low 32 bits, compared with wraparound.
        let e = (1u64 << 32) + u64::from(u32::MAX - 1);
        let s = XidSnapshot::parse(&format!("{e}:{}:", e + 4)).unwrap();
        assert!(s.saw(u32::MAX - 2), "before xmin");
        assert!(
            s.saw(u32::MAX) && s.saw(0) && s.saw(1),
            "between, across the wrap"
        );
        assert!(!s.saw(2) && !s.saw(3), "at or after xmax");
        assert_eq!(XidSnapshot::parse("nonsense"), None);
        assert_eq!(XidSnapshot::parse("1:x:"), None);
    }
}
