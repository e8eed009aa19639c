//! The partition lock: which free partitions a claim takes, locked for
//! its transaction and left in settings for the walk sent with it
//! (`Sql::lock`, `Sql::lock_single`), and how walks read the locked
//! partitions (`Locked`).

use super::PARTITIONS;

/// The transaction-local settings in which the partition lock leaves the
/// partitions it locked, for the pipelined walk sent in the same round
/// trip: the array, its lowest and highest partition, and whether it holds
/// every partition between those.
const LOCKED_SETTING: &str = "outboxd.locked_partitions";
const LOCKED_LO: &str = "outboxd.locked_lo";
const LOCKED_HI: &str = "outboxd.locked_hi";
const LOCKED_WHOLE: &str = "outboxd.locked_whole";

/// A batch's locked partitions as the walks read them, in SQL: the array,
/// its lowest and highest partition (the range of the claim index a walk
/// reads), and whether the array holds every partition of that range (the
/// walk then skips the check on each row).
pub(super) struct Locked {
    pub(super) locked: String,
    pub(super) lo: String,
    pub(super) hi: String,
    pub(super) whole: String,
}

impl Locked {
    /// Derived from an `int[]` expression (the strict walk's parameter).
    pub(super) fn of_array(array: &str) -> Self {
        let of = |what: &str| format!("(SELECT {what} FROM unnest({array}) AS f(p))");
        Self {
            locked: array.to_owned(),
            lo: of("min(f.p)"),
            hi: of("max(f.p)"),
            whole: of("max(f.p) - min(f.p) + 1 = count(*)"),
        }
    }

    /// Read from the settings the partition lock leaves them in (the
    /// pipelined walk), each once per walk (a scalar subquery, run once as
    /// an InitPlan, not on every row). The cast outside the parentheses
    /// keeps `ANY(...)` from reading the scalar subquery as a row source.
    pub(super) fn settings() -> Self {
        let read = |name: &str, ty: &str| format!("(SELECT current_setting('{name}')::{ty})::{ty}");
        Self {
            locked: read(LOCKED_SETTING, "int[]"),
            lo: read(LOCKED_LO, "int"),
            hi: read(LOCKED_HI, "int"),
            whole: read(LOCKED_WHOLE, "bool"),
        }
    }
}

/// The two partition lock statements (`Sql::lock`, `Sql::lock_single`)
/// for table `t`, with `part` a row's partition (alias `o`) and `due` the
/// claim's due condition on `o`.
pub(super) fn statements(t: &str, part: &str, due: &str) -> (String, String) {
    // $1 free partitions, $2 rows to look at: the partitions of the
    // oldest due rows. First among the front of the claim index (at
    // most 2 × $2 rows, of any partition: with two batches in flight
    // about half of them are in free partitions, and every row looked
    // at is hashed, on every claim), where they nearly always are;
    // only if none is there and the front was cut short by its limit
    // (or $2 is 0, after a claim over the same free partitions found
    // nothing), one probe per free partition on the partition index. A
    // front shorter than its limit is every due row of the table, so
    // the probes could find nothing it did not: a caught-up relay's
    // claim after the one that found rows (its front is the rows of
    // the batch in flight) probed every free partition for nothing.
    // The front is counted again for that, and only when near is
    // empty: one CTE of the front read by both would cost every look a
    // sort (a CTE scan has no order the planner knows), where near now
    // stops reading at its $2th row of a free partition. Either way a
    // look costs the same behind any
    // backlog of the busy partitions (it walked past all of it before:
    // 13 ms per look behind 50k rows on one aggregate), and a hot
    // partition at the front is taken alone when its rows fill the
    // look (the batch would be all its rows anyway). OFFSET 0 keeps
    // the planner from pushing the lock filter below the ORDER BY (it
    // may push a volatile filter into a subquery without LIMIT): the
    // locks must be tried in order of age and, outside a range, only
    // until $4 are taken, not on every partition looked at, or the batch holds partitions
    // it never reads and no other batch can claim them until it commits.
    // Of the partitions found with due rows, a claim takes its share,
    // a $5th, so the claims that may follow it while it is in flight
    // find rows too. $4 alone (half of the owned partitions with two in
    // flight) did that only while every partition had rows: over 100
    // aggregates (about 50 partitions with rows) the first claim took
    // 32 and the second the other 18, whose rows ran out halfway
    // through a 100k drain. From then on one claim took every partition
    // that had rows, the other claimed nothing every 2 ms, and one
    // batch was in flight at a time (PostgreSQL's statement log: 302 of
    // 402 claims empty).
    // Which of them: where the found partitions are dense (the claim
    // shares them, $5 > 1, and its share fills at least half of the
    // free partitions it spans), a range: the window, by partition
    // number, of its share that holds the oldest, at either end of the
    // free partitions where that holds it, with every free partition
    // in it, found or not, and no cap at $4. The claim that follows it
    // gets the rest, a range too, so each walk passes over the other
    // batch's rows inside the claim index (see `walk_from_in`). Where
    // they are sparse (a hot partition and a few quiet ones), the
    // oldest of its share: a range would put quiet partitions behind
    // the hot one's rows in the walk.
    // When $4 covers every free partition (the second batch in flight,
    // and every claim while draining) there is nothing to choose: all
    // of them are tried, without the look. The look found nothing there
    // anyway (the front of the table is the rows of the batch in flight)
    // and fell back to the probes, which read the dead entries of the
    // rows deleted since the last vacuum (measured with auto_explain
    // in a 1-relay drain: 1,000 to 1,900 buffers a claim).
    // The two looks for the partitions with the oldest due rows: near
    // (the front of the claim index) and far (one probe per free
    // partition), as described above.
    let choosing = "cardinality($1::int[]) > $4::bigint";
    let looks = format!(
        "near AS MATERIALIZED ( \
           SELECT f.p, min(f.id) AS first FROM ( \
             SELECT n.p, n.id FROM ( \
               SELECT {part} AS p, o.id FROM ( \
                 SELECT o.id, o.aggregate_type, o.aggregate_id FROM {t} o \
                 WHERE {choosing} AND {due} ORDER BY o.id LIMIT $2::bigint * 2) o) n \
             WHERE n.p = ANY($1) ORDER BY n.id LIMIT $2) f \
           GROUP BY f.p), \
         far AS ( \
           SELECT f.p, (SELECT o.id FROM {t} o WHERE {part} = f.p AND {due} \
               ORDER BY o.id LIMIT 1) AS first \
           FROM unnest($1::int[]) AS f(p) WHERE {choosing} AND NOT EXISTS (SELECT 1 FROM near) \
             AND (SELECT count(*) FROM ( \
               SELECT 1 FROM {t} o WHERE {due} ORDER BY o.id LIMIT $2::bigint * 2) o) >= $2::bigint * 2)"
    );
    // Every free partition, first, when there is nothing to choose.
    let all_free = format!(
        "SELECT f.p, 0::bigint AS first FROM unnest($1::int[]) AS f(p) WHERE NOT {choosing}"
    );
    // The candidates tried in order of their oldest row, locked until
    // `most` are taken, and left in the transaction's settings for the
    // walk: the array, its lowest and highest partition, and whether
    // it holds every partition between them (`Locked::settings`).
    let take = |most: &str| {
        format!(
            "SELECT l.locked, set_config('{LOCKED_SETTING}', l.locked::text, true), \
               set_config('{LOCKED_LO}', COALESCE(l.lo, 0)::text, true), \
               set_config('{LOCKED_HI}', COALESCE(l.hi, -1)::text, true), \
               set_config('{LOCKED_WHOLE}', COALESCE(l.hi - l.lo + 1 = l.n, false)::text, true) FROM ( \
             SELECT COALESCE(array_agg(l.p), '{{}}') AS locked, min(l.p) AS lo, max(l.p) AS hi, count(*) AS n FROM ( \
               SELECT c.p FROM ( \
                 SELECT c.p FROM candidates c ORDER BY c.first, c.p OFFSET 0) c \
               WHERE pg_try_advisory_xact_lock(hashtext($3), c.p) \
               LIMIT {most}) l) l"
        )
    };
    let lock = format!(
        "WITH {looks}, \
         found AS MATERIALIZED ( \
           SELECT u.p, u.first, row_number() OVER (ORDER BY u.first, u.p) AS k, \
                  row_number() OVER (ORDER BY u.p) AS r, count(*) OVER () AS n FROM ( \
             SELECT p, first FROM near \
             UNION ALL SELECT p, first FROM far WHERE first IS NOT NULL) u), \
         span AS ( \
           SELECT w.m, \
             CASE WHEN w.a = 1 THEN -1 ELSE (SELECT f.p FROM found f WHERE f.r = w.a) END AS lo, \
             CASE WHEN w.a + w.m > w.n THEN {PARTITIONS} \
               ELSE (SELECT f.p FROM found f WHERE f.r = w.a + w.m - 1) END AS hi \
           FROM (SELECT o.m, o.n, \
                   CASE WHEN o.r <= o.m THEN 1 WHEN o.r > o.n - o.m THEN o.n - o.m + 1 ELSE o.r END AS a \
                 FROM (SELECT f.r, f.n, ceil(f.n::numeric / $5::bigint)::bigint AS m \
                       FROM found f WHERE f.k = 1) o) w), \
         ranged AS ( \
           SELECT s.lo, s.hi FROM span s \
           WHERE $5::bigint > 1 \
             AND 2 * s.m >= (SELECT count(*) FROM unnest($1::int[]) AS f(p) WHERE f.p BETWEEN s.lo AND s.hi)), \
         candidates AS ( \
           {all_free} \
           UNION ALL \
           SELECT f.p, COALESCE((SELECT d.first FROM found d WHERE d.p = f.p), {LAST}) \
           FROM unnest($1::int[]) AS f(p), ranged g WHERE f.p BETWEEN g.lo AND g.hi \
           UNION ALL \
           SELECT f.p, f.first FROM found f \
           WHERE NOT EXISTS (SELECT 1 FROM ranged) AND f.k <= ceil(f.n::numeric / $5::bigint)) \
         {take}",
        take = take("CASE WHEN EXISTS (SELECT 1 FROM ranged) THEN NULL ELSE $4::bigint END"),
        LAST = i64::MAX,
    );
    // A claim that shares with no other ($5 = 1) takes the found
    // partitions up to $4, oldest first: no share to cut. The statement
    // above does the same then (without the range below), but the executor
    // sets up its every node on each claim, which at small claims (a
    // caught-up relay, one or two rows a claim) cost more than the
    // look itself: measured with pgbench on the claim's five
    // statements, 0.13 ms for the lock above against 0.05 ms for this
    // one, beside 0.35 ms for the transaction around them. $5 is only
    // passed through, so both take the same parameters.
    //
    // Where the look found rows in at least half of $4 free partitions
    // in a row by number (a backlog over most of them; the first claim of
    // a drain, which does not know yet that others will follow), it takes
    // those $4 partitions, at the end that holds the oldest row's (or from
    // that one on, if $4 is too few to reach an end), as the range of the
    // lock above does. Every claim after it takes the free partitions, those
    // that the batches in flight do not hold: the rest of the range. With
    // the oldest $4 instead, the two batches of a drain held interleaved
    // partitions for the whole drain, and each walk read from the table,
    // and filtered out, one row of the other batch for each row it took
    // (auto_explain of a 100k-row drain over 1,000 aggregates: 3,550 to
    // 4,000 rows removed by the filter in every walk of 4,000).
    let lock_single = format!(
        "WITH {looks}, \
         ranked AS ( \
           SELECT f.p, row_number() OVER (ORDER BY f.p) AS r FROM unnest($1::int[]) AS f(p) \
           WHERE {choosing} AND 2 * (SELECT count(*) FROM near) >= $4::bigint), \
         placed AS (SELECT n.p, n.first, f.r FROM near n JOIN ranked f ON f.p = n.p), \
         start AS ( \
           SELECT s.a FROM ( \
             SELECT CASE WHEN f.r <= $4::bigint THEN 1 \
               WHEN f.r > cardinality($1::int[]) - $4::bigint THEN cardinality($1::int[]) - $4::bigint + 1 \
               ELSE f.r END AS a \
             FROM placed f ORDER BY f.first, f.p LIMIT 1) s \
           WHERE 2 * (SELECT count(*) FROM placed f WHERE f.r >= s.a AND f.r < s.a + $4::bigint) \
             >= $4::bigint), \
         candidates AS ( \
           {all_free} \
           UNION ALL SELECT f.p, 0::bigint FROM ranked f, start s \
             WHERE f.r >= s.a AND f.r < s.a + $4::bigint \
           UNION ALL SELECT p, first FROM near WHERE NOT EXISTS (SELECT 1 FROM start) \
           UNION ALL SELECT p, first FROM far WHERE first IS NOT NULL) \
         SELECT t.*, $5::bigint AS share FROM ({take}) t",
        take = take("$4::bigint"),
    );
    (lock, lock_single)
}
