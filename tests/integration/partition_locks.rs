//! A batch's partition lock takes only the partitions the batch will read.
//! The lock is `pg_try_advisory_xact_lock` in the query's filter; the
//! planner pushed that filter below the sort and limit that choose the
//! partitions, so one claim locked every partition it looked at (43 of the
//! 64 for a claim that used 4), and until it committed no other batch, of
//! this relay or another, could claim them.

use outboxd::config::Config;
use outboxd::source::order::{LockKeys, Sql, partition_of};

use std::collections::HashMap;
use std::time::Duration;

use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::eventually;
use crate::support::relay::{Relay, simple_config};

#[tokio::test]
async fn a_claim_locks_only_the_partitions_it_takes() {
    let db = TestDb::migrated("obx_plock").await;
    // 2,000 due rows over 1,000 aggregates: nearly every partition has some.
    interleave(&db, 2000, 1000).await;
    let (mut client, sql, keys) = relay_session(&db).await;
    let tx = client.transaction().await.unwrap();
    let every: Vec<i32> = (0..64).collect();
    let taken = lock(&tx, &sql, &keys, &every, 256, 4, 1).await;
    let held: i64 = tx
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(taken.len(), 4, "the claim takes 4 partitions: {taken:?}");
    assert_eq!(
        held, 4,
        "the transaction holds {held} partition locks for the 4 it takes"
    );
}

/// The partitions a claim takes are those of the oldest due rows: a hot
/// partition whose backlog fills the rows looked at is taken alone, so
/// quiet partitions are not locked beside it only to go unserved (its rows
/// would fill the batch), and other batches serve them meanwhile.
#[tokio::test]
async fn a_hot_partition_at_the_front_is_taken_alone() {
    let db = TestDb::migrated("obx_plock_hot").await;
    insert(&db, "'hot'", 600).await;
    insert(&db, "'q-' || g", 50).await;
    let (mut client, sql, keys) = relay_session(&db).await;
    let hot = partition(&db, "hot").await;
    // What the relay looks at for a batch of 16 partitions: 64 rows.
    assert_eq!(take(&mut client, &sql, &keys, 64, 16, 1).await, vec![hot]);
    let wide = take(&mut client, &sql, &keys, 1000, 16, 1).await;
    assert!(wide.contains(&hot), "the oldest partition: {wide:?}");
    assert!(
        wide.len() > 1,
        "looking past the hot 600 rows finds the quiet partitions: {wide:?}"
    );
}

/// Two batches in flight share the partitions that have rows. The first
/// claim of two takes half of them, not up to half of all 64 (its cap):
/// with few partitions holding rows, it took them all, the second claim
/// found nothing, and one batch was in flight at a time (measured over 100
/// aggregates, about 50 partitions with rows: half of a 100k drain ran so).
#[tokio::test]
async fn two_claims_share_the_partitions_that_have_rows() {
    let db = TestDb::migrated("obx_plock_share").await;
    // 100 rows on each of 6 aggregates, each in a partition of its own.
    db.client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'order', k.a, 'Step', '{}' FROM ( \
               SELECT DISTINCT ON (c.p) c.a FROM ( \
                 SELECT 'a-' || g AS a, (hashtextextended('order/a-' || g, 0) & 63)::int AS p \
                 FROM generate_series(1, 100) g) c \
               ORDER BY c.p, c.a LIMIT 6) k, generate_series(1, 100)",
        )
        .await
        .unwrap();
    let (mut first_session, sql, keys) = relay_session(&db).await;
    let (second_session, _, _) = relay_session(&db).await;
    let every: Vec<i32> = (0..64).collect();
    // max_in_flight 2 and nothing in flight: up to 32 partitions, and a
    // share of 2 (this claim and one more).
    let with_rows: Vec<i32> = db
        .client
        .query(
            &format!("SELECT DISTINCT {} FROM outbox", partition_of("")),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(with_rows.len(), 6);
    let having_rows = |taken: &[i32]| taken.iter().filter(|p| with_rows.contains(p)).count();
    let first_tx = first_session.transaction().await.unwrap();
    let first = lock(&first_tx, &sql, &keys, &every, 256, 32, 2).await;
    // (It may take an empty partition too, between two of them: a range.)
    assert_eq!(
        having_rows(&first),
        3,
        "the first claim takes half of the 6 partitions with rows: {first:?} of {with_rows:?}"
    );
    // Beside it, the last claim that may start: every other partition
    // with rows.
    let free: Vec<i32> = every
        .iter()
        .copied()
        .filter(|p| !first.contains(p))
        .collect();
    let second = lock(&second_session, &sql, &keys, &free, 256, 32, 1).await;
    assert_eq!(
        having_rows(&second),
        3,
        "the second claim takes the other 3: {second:?} beside {first:?}"
    );
    assert!(second.iter().all(|p| !first.contains(p)));
    first_tx.rollback().await.unwrap();
}

/// Under a backlog in nearly every partition, the first of two claims
/// takes a range of the partitions, at one end and holding the oldest
/// row's; the second, the last that may start, every other one (the
/// relay asks it to). Each walk then stays in its range of the claim
/// index, whose second column is the partition, and passes the other
/// batch's rows there without reading them: with the two batches' sets
/// interleaved, every walk read about one row of the other batch for
/// each row it took.
#[tokio::test]
async fn a_backlog_in_every_partition_splits_into_two_ranges() {
    // The first claim of a drain: the relay does not know yet that others
    // follow (its last claim was not full), so it asks for a share of 1.
    // It took the oldest 32 partitions then, and the two batches of the
    // drain held interleaved sets to its end.
    splits_into_two_ranges("obx_plock_range1", 1).await;
}

/// The same with a share of 2: a claim with nothing in flight after a
/// full one.
#[tokio::test]
async fn a_backlog_in_every_partition_splits_into_two_ranges_when_shared() {
    splits_into_two_ranges("obx_plock_range2", 2).await;
}

async fn splits_into_two_ranges(name: &str, share: i64) {
    let db = TestDb::migrated(name).await;
    interleave(&db, 4000, 1000).await;
    let (mut first_session, sql, keys) = relay_session(&db).await;
    let (mut second_session, _, _) = relay_session(&db).await;
    let every: Vec<i32> = (0..64).collect();
    let oldest: i32 = db
        .client
        .query_one(
            &format!(
                "SELECT {} FROM outbox ORDER BY id LIMIT 1",
                partition_of("")
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // As the relay asks with max_in_flight 2 and nothing in flight: up to
    // 32 partitions, looking at 128 rows.
    let first_tx = first_session.transaction().await.unwrap();
    let mut first = lock(&first_tx, &sql, &keys, &every, 128, 32, share).await;
    first.sort_unstable();
    assert!(is_range(&first), "a range: {first:?}");
    assert!(
        first[0] == 0 || first[first.len() - 1] == 63,
        "at one end: {first:?}"
    );
    assert!(first.contains(&oldest), "{oldest} in {first:?}");
    assert!((16..=48).contains(&first.len()), "{first:?}");
    let rest: Vec<i32> = every
        .iter()
        .copied()
        .filter(|p| !first.contains(p))
        .collect();
    let second_tx = second_session.transaction().await.unwrap();
    let most = rest.len() as i64;
    let mut second = lock(&second_tx, &sql, &keys, &rest, 128, most, 1).await;
    second.sort_unstable();
    assert_eq!(second, rest, "the last claim takes every other partition");

    // The walk of the first batch: its rows only, through the claim index
    // with its range of partitions as an index condition.
    let limit = 4000i64;
    let plan: Vec<String> = first_tx
        .query(&format!("EXPLAIN {}", sql.claim), &[&limit])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(
        plan.contains("outbox_claim_part_idx")
            && plan
                .lines()
                .any(|l| l.contains("Index Cond") && l.contains("+ 0) >=")),
        "the walk's partition range is an index condition:\n{plan}"
    );
    let walked: Vec<i64> = first_tx
        .query(&sql.claim, &[&limit])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let count = |ids: Option<Vec<i64>>| {
        let (client, first) = (&db.client, &first);
        async move {
            client
                .query_one(
                    &format!(
                        "SELECT count(*) FROM outbox WHERE {} = ANY($1) \
                           AND ($2::bigint[] IS NULL OR id = ANY($2))",
                        partition_of("")
                    ),
                    &[first, &ids],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    let of_the_batch = count(None).await;
    assert!(of_the_batch > 0 && of_the_batch < 4000);
    assert_eq!(
        (walked.len() as i64, count(Some(walked)).await),
        (of_the_batch, of_the_batch),
        "every row of the batch's partitions, and no other"
    );
    second_tx.rollback().await.unwrap();
    first_tx.rollback().await.unwrap();
}

fn is_range(sorted: &[i32]) -> bool {
    !sorted.is_empty() && sorted.windows(2).all(|w| w[1] == w[0] + 1)
}

/// Without the look at the front of the table (`look` 0, what a claim over
/// the same free partitions as an empty one passes), the lock probes each
/// free partition and takes the same partitions, in the same order of age.
#[tokio::test]
async fn probing_each_partition_takes_what_the_look_takes() {
    let db = TestDb::migrated("obx_plock_probe").await;
    // 5 rows on each of 40 aggregates, interleaved: a few partitions hold
    // two or more aggregates.
    interleave(&db, 200, 40).await;
    let (mut client, sql, keys) = relay_session(&db).await;
    let looked = take(&mut client, &sql, &keys, 256, 8, 2).await;
    let probed = take(&mut client, &sql, &keys, 0, 8, 2).await;
    assert!(!looked.is_empty(), "the look takes partitions");
    assert!(looked.len() <= 8);
    assert_eq!(
        probed, looked,
        "the probes take what the look takes, oldest first"
    );
}

/// The partitions of a batch in flight are not free: when their rows fill
/// the front of the table that the lock looks at, the lock probes each free
/// partition and finds the rows behind them; when the front holds every
/// due row and none is in a free partition, there is nothing to probe for.
#[tokio::test]
async fn the_probes_find_free_partitions_behind_a_busy_front() {
    let db = TestDb::migrated("obx_plock_behind").await;
    insert(&db, "'busy'", 300).await;
    insert(&db, "'quiet'", 1).await;
    let (mut client, sql, keys) = relay_session(&db).await;
    let busy = partition(&db, "busy").await;
    let quiet = partition(&db, "quiet").await;
    assert_ne!(busy, quiet, "the test needs two partitions");
    let free: Vec<i32> = (0..64).filter(|p| *p != busy).collect();
    for share in [1, 2] {
        // The look (64: 128 rows of the front) sees only the busy rows.
        let taken = take_from(&mut client, &sql, &keys, &free, 64, 32, share).await;
        assert_eq!(taken, vec![quiet], "share {share}");
    }
    // Once the front is shorter than the look, it is every due row: none
    // of a free partition, none taken.
    db.client
        .batch_execute(&format!(
            "DELETE FROM outbox WHERE {} <> {busy} OR id > 100",
            partition_of("")
        ))
        .await
        .unwrap();
    let taken = take_from(&mut client, &sql, &keys, &free, 64, 32, 1).await;
    assert!(taken.is_empty(), "{taken:?}");
}

/// The partition of aggregate `order`/`id`, as the relay computes it.
async fn partition(db: &TestDb, id: &str) -> i32 {
    db.client
        .query_one(
            &format!(
                "SELECT {} FROM (SELECT 'order'::text AS aggregate_type, $1::text AS aggregate_id) k",
                partition_of("k.")
            ),
            &[&id],
        )
        .await
        .unwrap()
        .get(0)
}

/// Runs the lock query over every partition, taking at most `most` among
/// the first `look` due rows with `share` claims sharing them, and rolls
/// back.
/// `rows` due rows over `aggregates` aggregates (`a-0`, `a-1`, ...), taken
/// in turn: row g belongs to `a-{g % aggregates}`.
async fn interleave(db: &TestDb, rows: i32, aggregates: i32) {
    db.client
        .execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'order', 'a-' || (g % $2), 'Step', '{}' FROM generate_series(1, $1) g",
            &[&rows, &aggregates],
        )
        .await
        .unwrap();
}

async fn take(
    client: &mut tokio_postgres::Client,
    sql: &Sql,
    keys: &LockKeys,
    look: i64,
    most: i64,
    share: i64,
) -> Vec<i32> {
    let every: Vec<i32> = (0..64).collect();
    take_from(client, sql, keys, &every, look, most, share).await
}

/// [`take`] over the `free` partitions only.
async fn take_from(
    client: &mut tokio_postgres::Client,
    sql: &Sql,
    keys: &LockKeys,
    free: &[i32],
    look: i64,
    most: i64,
    share: i64,
) -> Vec<i32> {
    let tx = client.transaction().await.unwrap();
    let taken = lock(&tx, sql, keys, free, look, most, share).await;
    tx.rollback().await.unwrap();
    taken
}

/// `n` due rows of aggregate `order`/`id`, `id` an SQL expression that may
/// use the row's number `g` (1 to `n`).
async fn insert(db: &TestDb, id: &str, n: i32) {
    db.client
        .execute(
            &format!(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                 SELECT 'order', {id}, 'Step', '{{}}' FROM generate_series(1, $1) g"
            ),
            &[&n],
        )
        .await
        .unwrap();
}

/// Runs the relay's partition lock statement: `free` partitions, `look`
/// rows looked at, at most `most` taken, `share` claims sharing them.
/// Returns the partitions it locked.
async fn lock(
    client: &impl tokio_postgres::GenericClient,
    sql: &Sql,
    keys: &LockKeys,
    free: &[i32],
    look: i64,
    most: i64,
    share: i64,
) -> Vec<i32> {
    client
        .query_one(
            sql.lock_for(share),
            &[&free, &look, &keys.batch, &most, &share],
        )
        .await
        .expect("the lock query runs")
        .get(0)
}

/// A session set up as the relay's pooled ones are, with the relay's own
/// SQL and lock keys for the default source on `db`.
async fn relay_session(db: &TestDb) -> (tokio_postgres::Client, Sql, LockKeys) {
    let config = Config::from_toml(&simple_config(&db.url, "unused"), &|_| None)
        .expect("the test config is valid");
    let source = &config.sources[0];
    let client = db.connect().await;
    client
        .batch_execute("SET enable_sort = off; SET jit = off")
        .await
        .unwrap();
    (client, Sql::new(source), LockKeys::new(&source.table))
}

/// A table migrated by an older outboxd has no partition index, and its
/// claim index is on the id alone: the relay says so at start, and ordered
/// delivery still works, every aggregate complete and in order (the looks
/// and walks fall back to the older claim index).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_an_older_table_the_relay_warns_and_keeps_order() {
    let db = TestDb::migrated("obx_plock_noidx").await;
    db.client
        .batch_execute(
            "DROP INDEX outbox_partition_idx; DROP INDEX outbox_claim_part_idx; \
             CREATE INDEX outbox_claim_idx ON outbox (id) WHERE published_at IS NULL AND NOT held; \
             INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'order', 'a-' || (g % 7), 'Step', jsonb_build_object('agg', 'a-' || (g % 7), 'seq', g) \
             FROM generate_series(1, 700) g ORDER BY g",
        )
        .await
        .unwrap();
    let mut broker = TestBroker::new("#").await;
    let relay = Relay::start(&simple_config(&db.url, &broker.exchange)).await;
    let got = broker.collect(700, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 700, "every row arrives");
    let mut last: HashMap<String, i64> = HashMap::new();
    for m in &got {
        let v: serde_json::Value = serde_json::from_slice(&m.body).expect("a JSON body");
        let (agg, seq) = (
            v["agg"].as_str().unwrap().to_owned(),
            v["seq"].as_i64().unwrap(),
        );
        let before = last.insert(agg.clone(), seq);
        assert!(
            before.is_none_or(|b| b < seq),
            "{agg}: {seq} after {before:?}"
        );
    }
    let warned = eventually("the start-up warning", Duration::from_secs(30), || async {
        relay.log_lines_with("partition index is missing").pop()
    })
    .await;
    assert_eq!(
        warned["index"].as_str(),
        Some("\"public\".\"outbox_partition_idx\""),
        "{warned}"
    );
    let warned = eventually(
        "the claim index warning",
        Duration::from_secs(30),
        || async { relay.log_lines_with("claim index is missing").pop() },
    )
    .await;
    assert_eq!(
        warned["index"].as_str(),
        Some("\"public\".\"outbox_claim_part_idx\""),
        "{warned}"
    );
}
