//! `ordering = "aggregate"`: per-aggregate order with any number of relays
//! on one table, coordinated by PostgreSQL alone.
//!
//! The key space (aggregate_type, aggregate_id) is hashed into
//! [`PARTITIONS`] partitions. Three kinds of advisory locks, each in its
//! own key space derived from the table name:
//!
//! - **member** (session, shared), on the listener connection: one per
//!   live relay, so every relay can count the others in `pg_locks`.
//! - **partition** (session), on the listener connection: ownership. Each
//!   relay [`rebalance`]s once per poll interval to hold its fair share,
//!   ceil(partitions / relays); a relay that dies loses them with its
//!   connection and the others take them on their next turn.
//! - **batch** (transaction), taken by every claim for the partitions it
//!   reads: at most one batch per partition in flight anywhere, even while
//!   ownership moves (a relay whose listener dropped may still have a batch
//!   running; the new owner cannot claim that partition until it ends).
//!
//! Since a batch holds its partitions, it is the only sender of their rows
//! anywhere, and it walks them in id order:
//!
//! - `ordering = "aggregate"` (pipelined): the walked rows of an aggregate
//!   go, in id order on one channel, up to the first one that an earlier
//!   row of the aggregate outside the walk holds back (retrying, parked,
//!   or held); that one and the rest are marked `held` so later claims
//!   skip them without looking. The
//!   broker keeps the order of one channel to one queue, so several rows
//!   of an aggregate are in flight at once. A failure stops the aggregate
//!   at its first failed row (`relay::decide`): the rows after it are held
//!   whatever the broker said, and sent again, in order, once it is
//!   delivered; the one that the broker took meanwhile is an order break
//!   (counted, logged). Settling releases every held row of each
//!   aggregate that went through.
//! - `ordering = "aggregate_strict"`: only the head of each aggregate (its
//!   lowest unsent row) goes; the rest of the walk is held (all of it when
//!   the head is not in the walk, all but the next one or two when it is),
//!   and settling releases the next row of each settled aggregate. A row
//!   is never sent while an earlier row of its aggregate is unconfirmed.
//!
//! Either way a row is never sent while an earlier row of its aggregate
//! waits for a retry or (with `on_park = "hold"`) is parked; and since each
//! batch commits before the partition's next one claims, a crash repeats
//! only the rows of its last batch, in order, never interleaving two.
//!
//! `ownership.rs` moves the partitions between relays, `index.rs` checks
//! the partition and claim indexes, `lock.rs` builds the partition lock
//! statements and how walks read what they locked; this file builds the
//! walks and the other statements of ordered claims.

mod index;
mod lock;
mod ownership;

pub use index::{IndexState, OrderedIndex, index_state, ordered_indexes, warn_if_unindexed};
pub use ownership::{RELAYS_SQL, join_sql, rebalance};

use lock::Locked;

use crate::config::{OnPark, Ordering, SourceConfig};
use crate::ident::TableName;

/// Fixed, so every relay of a table agrees on it without talking. 64 gives
/// each of up to 8 relays a share within 1 of the others, and is small
/// enough that owning all of them costs a relay little.
pub const PARTITIONS: i32 = 64;

/// How many of an aggregate's rows a claim leaves unheld (its head and the
/// next): holding costs a write now and a release later, which is wasted
/// on an aggregate with a row or two waiting (the common case: measured
/// 0.48 of the broker's ceiling when every second row was held, 1,000
/// aggregates); a hot aggregate still gets all but two of its rows held,
/// so claims stop walking over them.
const UNHELD_PER_AGGREGATE: i32 = 2;

/// A row's partition, in SQL, for columns qualified by `prefix` (`"o."`,
/// or `""` as in the partition index of `sql/outbox.sql`, which must use
/// exactly this expression; a test says it does). Public for the bench,
/// which locks one partition set's rows as a batch in flight would.
pub fn partition_of(prefix: &str) -> String {
    format!(
        "(hashtextextended({prefix}aggregate_type || '/' || {prefix}aggregate_id, 0) & {mask})::int",
        mask = PARTITIONS - 1
    )
}

/// A row's partition as the claim index's second column has it
/// (`sql/outbox.sql`, which must use exactly this expression; a test says
/// it does): [`partition_of`] `+ 0`, an expression of its own, so the
/// planner matches the walks' partition range to the claim index and
/// never to the partition index, which is ordered by partition first.
pub fn claim_partition_of(prefix: &str) -> String {
    format!("{} + 0", partition_of(prefix))
}

/// The key spaces, as text hashed by PostgreSQL (`hashtext`).
pub struct LockKeys {
    pub member: String,
    pub partition: String,
    pub batch: String,
}

impl LockKeys {
    pub fn new(table: &TableName) -> Self {
        let t = format!("{}.{}", table.schema, table.table);
        Self {
            member: format!("outboxd member {t}"),
            partition: format!("outboxd partition {t}"),
            batch: format!("outboxd batch {t}"),
        }
    }
}

pub struct Sql {
    /// $1 free partitions, $2 rows to look at (0: probe each free
    /// partition instead), $3 batch key, $4 most
    /// partitions to take, $5 claims that may still share them (this one
    /// included): the partitions with the oldest due rows that no other
    /// batch holds, at most a $5th of those found (rounded up), locked for
    /// this transaction, and left in the transaction's settings too
    /// (`outboxd.locked_partitions` and the others beside it).
    pub lock: String,
    /// [`Sql::lock`] for a claim that shares with no other ($5 = 1), which
    /// it may then leave out: the same parameters and result, a smaller
    /// statement. See [`Sql::lock_for`].
    pub lock_single: String,
    /// One row per walked row. Strict: $1 locked partitions, $2 rows to
    /// walk; the row's columns only for heads (the others are marked held).
    /// Pipelined: $1 rows to walk, of the partitions in `outboxd.locked_partitions`
    /// (so it can go out with the lock, in one round trip); every row's
    /// columns, and whether it is blocked.
    pub claim: String,
    /// The same without looking at the dead-letter table (for when it is
    /// missing: the relay then retries instead of parking).
    pub claim_no_dead: String,
    /// $1 aggregate types, $2 aggregate ids: release the next row of each.
    pub release_next: String,
    /// Release held rows that nothing holds back any more (or, with
    /// `ordering = "none"`, every held row).
    pub sweep: String,
    pub sweep_no_dead: String,
    /// $1 member key: how many relays run on this table.
    pub members: String,
}

impl Sql {
    /// The partition lock for a claim that `share`s the found partitions
    /// with this many (itself included): [`Sql::lock_single`] for 1.
    pub fn lock_for(&self, share: i64) -> &str {
        if share > 1 {
            &self.lock
        } else {
            &self.lock_single
        }
    }

    pub fn new(config: &SourceConfig) -> Self {
        let t = config.table.quoted();
        let dead = config.table.sibling("_dead");
        let dead_free = |alias: &str, dead_table: bool| match config.on_park {
            OnPark::Hold if dead_table => format!(
                " AND NOT EXISTS (SELECT 1 FROM {dead} d \
                    WHERE d.aggregate_type = {alias}.aggregate_type AND d.aggregate_id = {alias}.aggregate_id)"
            ),
            _ => String::new(),
        };
        let first_unsent = |alias: &str| {
            format!(
                "NOT EXISTS (SELECT 1 FROM {t} e \
                    WHERE e.aggregate_type = {alias}.aggregate_type AND e.aggregate_id = {alias}.aggregate_id \
                      AND e.published_at IS NULL AND e.id < {alias}.id)"
            )
        };
        let part = partition_of("o.");
        // The walks read the claim index in id order, from the oldest
        // unsent row of their partitions on (each found on the partition
        // index, in the walk's own snapshot, so no due row of them is
        // below it), within the range of partitions the batch holds: the
        // claim index has each row's partition as its second column, so
        // the rows of partitions outside the range are passed over in the
        // index without a read of the table row (with two batches in
        // flight, each holding half the partitions, that was one row read
        // and hashed for every row taken). The lock gives a batch a range
        // of partitions where it can (see `lock`); a partition inside the
        // range that the batch does not hold is filtered on the row, unless
        // the batch holds every partition of its range. The claim index's
        // expression (`+ 0`) keeps the planner off the partition index for
        // the walk itself: it would read every row of a hot partition and
        // sort them (measured 165 ms for a 50k-row partition).
        let walk_from_in = |held: &Locked| {
            format!(
                "o.id >= (SELECT min((SELECT min(e.id) FROM {t} e \
                     WHERE {part_e} = f.p AND e.published_at IS NULL AND NOT e.held)) \
                   FROM unnest({locked}) AS f(p)) \
                 AND {claim_part} BETWEEN {lo} AND {hi} \
                 AND ({whole} OR {claim_part} = ANY({locked}))",
                part_e = partition_of("e."),
                claim_part = claim_partition_of("o."),
                locked = held.locked,
                lo = held.lo,
                hi = held.hi,
                whole = held.whole,
            )
        };
        let walk_from = walk_from_in(&Locked::of_array("$1::int[]"));
        let due = "o.published_at IS NULL AND NOT o.held AND o.available_at <= clock_timestamp()";
        // The walk every strict claim takes: due, unheld rows of the
        // partitions in $1, in id order, at most $2 of them.
        let due_in_partitions = format!("WHERE {due} AND {walk_from} ORDER BY o.id LIMIT $2");
        let (lock, lock_single) = lock::statements(&t, &part, due);
        // Strict (`ordering = "aggregate_strict"`): one row in flight per
        // aggregate. A walked row that is not its aggregate's head waits
        // for an earlier row. If that row is in this walk (the head, sent
        // now), the next one or two are left unheld: they are likely to go
        // in the next claim, and holding them would cost a write now and a
        // release later. If it is not (retrying, parked, or held itself),
        // every row of the aggregate is held: left unheld they would fill
        // every later walk of their partitions, and a few hundred
        // aggregates stuck behind parked rows would starve every other
        // aggregate there.
        let strict_sql = |dead_table: bool| {
            format!(
                "WITH walk AS ( \
                   SELECT o.id, o.aggregate_type, o.aggregate_id, {head}{dead_free} AS head FROM {t} o \
                   {due_in_partitions} \
                   FOR UPDATE OF o SKIP LOCKED), \
                 ranked AS ( \
                   SELECT w.id, w.head, \
                          row_number() OVER (PARTITION BY w.aggregate_type, w.aggregate_id ORDER BY w.id) AS n, \
                          bool_or(w.head) OVER (PARTITION BY w.aggregate_type, w.aggregate_id) AS led \
                   FROM walk w), \
                 hold AS (UPDATE {t} h SET held = true FROM ranked r \
                   WHERE h.id = r.id AND NOT r.head AND (r.n > {unheld} OR NOT r.led)) \
                 SELECT {columns} \
                 FROM ranked w LEFT JOIN {t} o ON w.head AND o.id = w.id \
                 ORDER BY w.id",
                unheld = UNHELD_PER_AGGREGATE,
                head = first_unsent("o"),
                dead_free = dead_free("o", dead_table),
                columns = super::claim::select_list("o"),
            )
        };
        // Pipelined (`ordering = "aggregate"`): the batch holds its
        // partitions, so no other batch anywhere sends their rows, and it
        // walks them in id order. A walked row goes unless an earlier row
        // of its aggregate is waiting outside the walk: held (behind a
        // failure), not due yet (a retry's backoff), or parked (with
        // `on_park = "hold"`). Each row says so itself (`blocked`, the last
        // column), and the relay holds it and every later walked row of its
        // aggregate (`claim::heads`). The probes run only while the table
        // has a waiting row at all, or a dead letter: one uncorrelated
        // look each (an InitPlan, once per claim), so the common claim
        // costs PostgreSQL what the unordered one does, plus the partition
        // filter. (Measured with pgbench on 100k rows over 1,000
        // aggregates: one statement of walk, per-aggregate verdicts and a
        // hold CTE took about 2× the unordered claim; this walk alone takes
        // about what the unordered claim does.) `statement_timestamp()`,
        // not `clock_timestamp()`: the walk and the probes must agree on
        // which rows are due, or a row becoming due between the two would
        // be neither walked nor waited for. (A row some other session
        // holds locked is skipped by the walk and not seen by the probes:
        // only an operator's own `FOR UPDATE` can do that.)
        let pipelined_sql = |dead_table: bool| {
            let waiting = "e.published_at IS NULL AND (e.held OR e.available_at > e.created_at)";
            let parked = match config.on_park {
                OnPark::Hold if dead_table => format!(
                    " OR ((SELECT EXISTS (SELECT 1 FROM {dead})) AND EXISTS (SELECT 1 FROM {dead} d \
                       WHERE d.aggregate_type = o.aggregate_type AND d.aggregate_id = o.aggregate_id))"
                ),
                _ => String::new(),
            };
            format!(
                "SELECT {columns}, \
                   ((SELECT EXISTS (SELECT 1 FROM {t} e WHERE {waiting})) AND EXISTS (SELECT 1 FROM {t} e \
                      WHERE e.aggregate_type = o.aggregate_type AND e.aggregate_id = o.aggregate_id \
                        AND {waiting} AND e.id < o.id \
                        AND (e.held OR e.available_at > statement_timestamp()))){parked} AS blocked \
                 FROM {t} o \
                 WHERE o.published_at IS NULL AND NOT o.held AND o.available_at <= statement_timestamp() \
                   AND {walk_from} \
                 ORDER BY o.id LIMIT $1 \
                 FOR UPDATE OF o SKIP LOCKED",
                columns = super::claim::select_list("o"),
                walk_from = walk_from_in(&Locked::settings()),
            )
        };
        let claim_sql = |dead_table: bool| match config.ordering {
            Ordering::AggregateStrict => strict_sql(dead_table),
            Ordering::Aggregate | Ordering::None => pipelined_sql(dead_table),
        };
        // Strict: the next row of each settled aggregate (one at a time).
        // Pipelined: every held row of each settled aggregate (the next
        // batch sends them in order), and nothing at all, without a probe
        // per aggregate, while no row of the table is held (the common
        // case: the uncorrelated probe is checked once, on the held index).
        // Not `EXISTS (... WHERE h.held)`: on a table not analyzed yet (a new
        // one, or a big backlog just inserted) the planner takes half the
        // rows for held and answers that with a sequential scan, which
        // reads the whole table when none is held: measured with
        // auto_explain in a 100k-row drain, 8,334 buffers and 15 to 25 ms
        // on every settle. Ordered by id, only the held index answers it
        // cheaply, with or without statistics.
        let release_next = match config.ordering {
            Ordering::AggregateStrict => format!(
                "UPDATE {t} o SET held = false \
                 FROM (SELECT DISTINCT k.t, k.a FROM unnest($1::text[], $2::text[]) AS k(t, a)) k \
                 WHERE o.held AND o.id = (SELECT min(e.id) FROM {t} e \
                     WHERE e.aggregate_type = k.t AND e.aggregate_id = k.a AND e.published_at IS NULL)"
            ),
            Ordering::Aggregate | Ordering::None => format!(
                "UPDATE {t} o SET held = false \
                 FROM (SELECT DISTINCT k.t, k.a FROM unnest($1::text[], $2::text[]) AS k(t, a)) k \
                 WHERE (SELECT h.id FROM {t} h WHERE h.held ORDER BY h.id LIMIT 1) IS NOT NULL \
                   AND o.held AND o.published_at IS NULL \
                   AND o.aggregate_type = k.t AND o.aggregate_id = k.a"
            ),
        };
        let sweep_sql = |dead_table: bool| match config.ordering {
            Ordering::Aggregate | Ordering::AggregateStrict => format!(
                "UPDATE {t} o SET held = false \
                 WHERE o.held AND o.published_at IS NULL AND {head}{dead_free}",
                head = first_unsent("o"),
                dead_free = dead_free("o", dead_table),
            ),
            Ordering::None => format!("UPDATE {t} SET held = false WHERE held"),
        };
        let members = "SELECT count(*)::int FROM pg_catalog.pg_locks \
             WHERE locktype = 'advisory' AND granted AND objid = 0 AND objsubid = 2 \
               AND classid = (hashtext($1)::bigint & 4294967295)::oid \
               AND database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())"
            .to_owned();
        Self {
            lock,
            lock_single,
            claim: claim_sql(true),
            claim_no_dead: claim_sql(false),
            release_next,
            sweep: sweep_sql(true),
            sweep_no_dead: sweep_sql(false),
            members,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partition_index_uses_the_relays_expression() {
        let sql = include_str!("../../sql/outbox.sql");
        let expected = format!("(({}), id)", partition_of(""));
        assert!(sql.contains(&expected), "sql/outbox.sql lacks {expected}");
    }

    #[test]
    fn the_claim_index_uses_the_walks_expression() {
        let sql = include_str!("../../sql/outbox.sql");
        let expected = format!("(id, (({})))", claim_partition_of(""));
        assert!(sql.contains(&expected), "sql/outbox.sql lacks {expected}");
    }
}
