//! Step 2: claim a batch of committed, due rows.
//!
//! `FOR UPDATE SKIP LOCKED` inside a transaction that stays open across
//! publish and confirm: two batches in flight (or two relays) never take
//! the same row, and if the relay dies the row locks go with its connection,
//! so the rows are claimed again and republished. Rows of a producer
//! transaction that has not committed are invisible here, and rows of one
//! that rolled back never existed.

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};

use deadpool_postgres::{Object, Pool};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

mod columns;

pub use columns::{COLUMNS, column_name, decode, select_list};

use super::capture::{Claim, ClaimFrom, Claimed};
use super::{DbError, Source, step};
use crate::config::Ordering;
use crate::ident::TableName;
use crate::message::OutboxRow;

/// A claimed batch: a pooled connection with its transaction open, so the
/// claimed rows stay locked (`FOR UPDATE`) until the batch is settled or
/// given back. Dropped while still open (its task aborted, a step failed),
/// it is rolled back on a task of its own, and if even that fails the
/// connection leaves the pool: PostgreSQL rolls back when it closes.
pub struct PollBatch {
    client: Option<Object>,
    /// BEGIN was sent: a drop must roll back. Before it there is nothing
    /// to roll back, and a ROLLBACK would only draw PostgreSQL's "there is
    /// no transaction in progress" warning into the log.
    begun: AtomicBool,
}

impl PollBatch {
    /// A pooled connection for a batch. The caller begins the transaction
    /// in the same round trip as its first query (`begin_with`).
    async fn connect(pool: &Pool) -> Result<Self, DbError> {
        let client = step("get a connection", pool.get()).await?;
        Ok(Self {
            client: Some(client),
            begun: AtomicBool::new(false),
        })
    }

    /// The connection, inside the batch's transaction.
    pub fn client(&self) -> &Object {
        // Only `finish` takes it, and it consumes the batch.
        self.client
            .as_ref()
            .expect("a batch holds its connection until it is finished")
    }

    pub async fn commit(self) -> Result<(), DbError> {
        self.finish("commit", "COMMIT").await
    }

    pub async fn rollback(self) -> Result<(), DbError> {
        self.finish("rollback", "ROLLBACK").await
    }

    async fn finish(mut self, what: &'static str, sql: &str) -> Result<(), DbError> {
        step(what, self.client().batch_execute(sql)).await?;
        // Back to the pool, transaction closed.
        self.client.take();
        Ok(())
    }
}

impl Drop for PollBatch {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        if !self.begun.load(AtomicOrdering::Relaxed) {
            // Back to the pool as it came.
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let rolled_back =
                        tokio::time::timeout(super::DB_TIMEOUT, client.batch_execute("ROLLBACK"))
                            .await;
                    if !matches!(rolled_back, Ok(Ok(()))) {
                        drop(Object::take(client));
                    }
                });
            }
            Err(_) => drop(Object::take(client)),
        }
    }
}

/// The savepoint a batch's claim and its settlement run under. Row locks
/// (`FOR UPDATE`) and the delete or update that settles the row must come
/// from one and the same (sub)transaction: a row locked by the transaction
/// and deleted by a subtransaction of it gets a MultiXact as its xmax, and
/// PostgreSQL never marks index entries of such rows dead during scans
/// (`HeapTupleIsSurelyDead` gives up on a MultiXact). Every walk from the
/// front of the claim index then visited every deleted row again, and
/// looked each one up in pg_multixact, until vacuum came: measured 53 ms
/// per ordered claim of 500 rows over 1,000 aggregates, 21 ms without.
/// If settling fails, rolling back to it undoes the claim's own writes
/// (held marks) and row locks, but not the partition locks taken before
/// it, so no other batch can claim the rows while they are settled one by
/// one (`complete::settle`).
pub const BATCH_SAVEPOINT: &str = "outboxd_batch";

/// Claims the next due rows of `source`. Empty claims are finished here:
/// committed if the walk marked rows held, else rolled back, so the
/// connection is back in the pool before the loop hears of it.
pub async fn claim(source: &Source, from: ClaimFrom) -> Result<Claim<PollBatch>, DbError> {
    let batch = PollBatch::connect(&source.pool).await?;
    let (rows, report, looked) = match from {
        ClaimFrom::After(after) => after_id(source, &batch, after).await?,
        ClaimFrom::Partitions {
            free,
            most,
            share,
            probe,
        } => heads(source, &batch, free, most, share, probe).await?,
    };
    // Only a row without an id fails the claim; any other column that
    // cannot be read makes a bad row of its own (parked, named by its id).
    let rows = rows
        .iter()
        .map(decode)
        .collect::<Result<Vec<OutboxRow>, _>>()
        .map_err(|e| DbError::Failed {
            step: "decode claimed rows (does the table match sql/outbox.sql?)",
            source: Box::new(e),
        })?;
    if rows.is_empty() {
        // Commit rather than roll back when the walk looked at rows: it
        // may have marked some held, and that must stay.
        if looked {
            batch.commit().await?;
        } else {
            batch.rollback().await?;
        }
        return Ok(Claim {
            rows,
            report,
            batch: None,
        });
    }
    Ok(Claim {
        rows,
        report,
        batch: Some(batch),
    })
}

/// `ordering = "none"`: due rows after an id. Returns (rows, report, walked).
async fn after_id(
    source: &Source,
    batch: &PollBatch,
    after: i64,
) -> Result<(Vec<Row>, Claimed, bool), DbError> {
    let client = batch.client();
    let limit = source.config.batch_size as i64;
    let stmt = step(
        "prepare claim",
        client.prepare_cached(&source.queries.claim),
    )
    .await?;
    let params: [&(dyn ToSql + Sync); 2] = [&limit, &after];
    let (rows, _) = begin_with(
        batch,
        &format!("BEGIN; SAVEPOINT {BATCH_SAVEPOINT}"),
        async {
            tokio::try_join!(
                step("claim", client.query(&stmt, &params)),
                end_walk(client),
            )
        },
    )
    .await?;
    let report = Claimed {
        rows: rows.len(),
        max_id: rows
            .last()
            .and_then(|r| r.try_get::<_, i64>(0).ok())
            .unwrap_or(after),
        full: rows.len() >= source.config.batch_size,
        partitions: Vec::new(),
    };
    Ok((rows, report, false))
}

/// How many rows at the front of the claim index the partition lock
/// looks at ($2 of `order::Sql::lock`) to find the partitions with the
/// oldest rows, when it takes `most` of them for batches of `limit`: a few
/// rows per partition wanted are enough; the claim walks the full batch.
/// None at all with `probe`: the lock then probes each free partition.
/// Public for the bench, which asks as the relay does.
pub fn look(most: i64, limit: i64, probe: bool) -> i64 {
    if probe {
        0
    } else {
        (most * 4).clamp(64, limit.max(64))
    }
}

/// `ordering = "aggregate"`: lock the free partitions with the oldest due
/// rows, then the rows of each aggregate in them that may go (see `order.rs`).
async fn heads(
    source: &Source,
    batch: &PollBatch,
    free: Vec<i32>,
    most: i64,
    share: i64,
    probe: bool,
) -> Result<(Vec<Row>, Claimed, bool), DbError> {
    let client = batch.client();
    let order = &source.queries.order;
    let limit = source.config.batch_size as i64;
    let look = look(most, limit, probe);
    let lock = step(
        "prepare partition lock",
        client.prepare_cached(order.lock_for(share)),
    )
    .await?;
    let lock_params: [&(dyn ToSql + Sync); 5] =
        [&free, &look, &source.queries.lock_keys.batch, &most, &share];
    let walk_sql = if source.dead.exists(client).await? {
        &order.claim
    } else {
        &order.claim_no_dead
    };
    let walk = step("prepare claim", client.prepare_cached(walk_sql)).await?;
    let savepoint = format!("SAVEPOINT {BATCH_SAVEPOINT}");
    // The walk is a statement after the lock, so its snapshot sees every
    // commit of the batches that held these partitions before us; the
    // partition locks stay outside the savepoint.
    let (locked, mut walked): (Vec<i32>, Vec<Row>) =
        if source.config.ordering == Ordering::AggregateStrict {
            let locked: Vec<i32> = begin_with(
                batch,
                "BEGIN",
                step("lock partitions", client.query_one(&lock, &lock_params)),
            )
            .await?
            .try_get(0)
            .unwrap_or_default();
            let mut walked = Vec::new();
            if !locked.is_empty() {
                // The savepoint and the walk in one round trip, as above.
                let open = step("open the batch savepoint", client.batch_execute(&savepoint));
                let params: [&(dyn ToSql + Sync); 2] = [&locked, &limit];
                let walk = step("claim", client.query(&walk, &params));
                walked = tokio::try_join!(open, walk, end_walk(client))?.1;
            }
            (locked, walked)
        } else {
            // All four in one round trip: the pipelined walk reads the
            // locked partitions from the transaction-local setting the
            // lock leaves them in (`order.rs`), and finds nothing when the
            // lock took none. If any step fails, so does the claim.
            let params: [&(dyn ToSql + Sync); 1] = [&limit];
            let (lock_row, _, walked, _) = begin_with(batch, "BEGIN", async {
                tokio::try_join!(
                    step("lock partitions", client.query_one(&lock, &lock_params)),
                    step("open the batch savepoint", client.batch_execute(&savepoint)),
                    step("claim", client.query(&walk, &params)),
                    end_walk(client),
                )
            })
            .await?;
            (lock_row.try_get(0).unwrap_or_default(), walked)
        };
    let looked_at = walked.len();
    if source.config.ordering == Ordering::AggregateStrict {
        // Rows that are not the head of their aggregate come back with no
        // columns; the claim may have marked them held.
        walked.retain(|r| r.try_get::<_, Option<i64>>(0).ok().flatten().is_some());
    } else {
        walked = hold_blocked(client, &source.queries.complete.hold, walked).await?;
    }
    let report = Claimed {
        rows: walked.len(),
        max_id: 0,
        full: looked_at >= source.config.batch_size,
        // A batch with nothing to send ends at once and holds nothing.
        partitions: if walked.is_empty() {
            Vec::new()
        } else {
            locked
        },
    };
    Ok((walked, report, looked_at > 0))
}

/// Pipelined claims: holds each walked row that an earlier row of its
/// aggregate outside the walk holds back, and every later walked row of
/// that aggregate; returns the others, which go.
async fn hold_blocked(client: &Object, hold: &str, walked: Vec<Row>) -> Result<Vec<Row>, DbError> {
    let keys = walked.iter().map(|r| {
        let text = |i: usize| r.try_get::<_, Option<&str>>(i).ok().flatten().unwrap_or("");
        // Unreadable cannot happen (the claim computes it as a boolean);
        // if it did, holding is the safe side: the sweep releases a held
        // row that nothing holds back.
        let blocked = r.try_get::<_, bool>(BLOCKED).unwrap_or(true);
        ((text(1), text(2)), blocked)
    });
    let held = blocked_from_first(keys);
    if !held.iter().any(|h| *h) {
        return Ok(walked);
    }
    let ids: Vec<i64> = walked
        .iter()
        .zip(&held)
        .filter(|(_, h)| **h)
        .filter_map(|(r, _)| r.try_get::<_, i64>(0).ok())
        .collect();
    let stmt = step("prepare hold", client.prepare_cached(hold)).await?;
    step(
        "hold rows behind a waiting one",
        client.execute(&stmt, &[&ids]),
    )
    .await?;
    Ok(walked
        .into_iter()
        .zip(held)
        .filter_map(|(r, h)| (!h).then_some(r))
        .collect())
}

/// The pipelined claim's last column: an earlier row of the aggregate
/// waits outside the walk.
const BLOCKED: usize = COLUMNS.len();

/// Given each walked row's aggregate and whether it is blocked, in walk
/// (id) order: which rows to hold. Once a row of an aggregate is held,
/// so is every later one of it, whatever its own flag says.
fn blocked_from_first<K: Eq + std::hash::Hash>(rows: impl Iterator<Item = (K, bool)>) -> Vec<bool> {
    let mut stopped = std::collections::HashSet::new();
    rows.map(|(key, blocked)| {
        if blocked || stopped.contains(&key) {
            stopped.insert(key);
            true
        } else {
            false
        }
    })
    .collect()
}

/// Sent right after a walk, in the same round trip: a statement of the
/// simple query protocol, which PostgreSQL runs in the unnamed portal and
/// drops at once. It takes the walk's place there. A portal is dropped
/// only by the next one or at the end of the transaction, and the walk's,
/// a `SELECT`, kept its snapshot, and so an xmin, while the batch
/// published: the rows that the other batch in flight deleted stayed
/// visible to it, and the index entries of those rows could not be marked
/// dead by the next walk that passed them, only by the one after
/// (`pg_stat_activity` in a drain: each batch idle in its transaction with
/// the other's xid as its xmin; auto_explain: the start probe of every
/// walk read two batches' deleted rows, 7,500 buffers for 4,000 rows).
async fn end_walk(client: &Object) -> Result<(), DbError> {
    step("end the claim's walk", client.batch_execute("SELECT")).await
}

/// Runs `begin` (the statements that open the batch's transaction) and the
/// batch's first query in one round trip: tokio-postgres pipelines requests
/// that are polled together, sending them in the order they are first
/// polled, and PostgreSQL runs them in that order. The query's result is
/// returned only if the transaction began too; otherwise it ran outside any
/// transaction (its row locks already gone) and is thrown away with the error.
async fn begin_with<T>(
    batch: &PollBatch,
    begin: &str,
    first: impl std::future::Future<Output = Result<T, DbError>>,
) -> Result<T, DbError> {
    batch.begun.store(true, AtomicOrdering::Relaxed);
    let client = batch.client();
    let (_, result) = tokio::try_join!(step("begin", client.batch_execute(begin)), first)?;
    Ok(result)
}

/// The columns every claim returns, in this order: the one definition that
/// both claim statements (`ordering` none and aggregate) and [`decode`] use.
pub fn sql(table: &TableName) -> String {
    format!(
        "SELECT {} \
         FROM {} o \
         WHERE o.id > $2 AND o.published_at IS NULL AND NOT o.held AND o.available_at <= clock_timestamp() \
         ORDER BY o.id \
         LIMIT $1 \
         FOR UPDATE OF o SKIP LOCKED",
        select_list("o"),
        table.quoted()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_an_aggregate_from_its_first_blocked_row_on() {
        let walk = [
            ("a", false),
            ("b", true),
            ("a", false),
            ("b", false),
            ("c", false),
            ("a", true),
            ("a", false),
            ("c", false),
        ];
        assert_eq!(
            blocked_from_first(walk.into_iter()),
            [false, true, false, true, false, true, true, false]
        );
        assert!(blocked_from_first(std::iter::empty::<(&str, bool)>()).is_empty());
    }
}
