//! A batch's partition lock takes only the partitions the batch will read,
//! and finds them with one probe per partition.
//! The lock is `pg_try_advisory_xact_lock` in the query's filter; the
//! planner pushed that filter below the sort and limit that choose the
//! partitions, so one claim locked every partition it looked at (43 of the
//! 64 for a claim that used 4), and until it committed no other batch, of
//! this relay or another, could claim them.

use outboxd::config::Config;
use outboxd::source::order::{LockKeys, Sql};

use crate::support::db::TestDb;
use crate::support::relay::simple_config;

#[tokio::test]
async fn a_claim_locks_only_the_partitions_it_takes() {
    let db = TestDb::migrated("obx_plock").await;
    // 2,000 due rows over 1,000 aggregates: nearly every partition has some.
    db.client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'order', 'a-' || (g % 1000), 'Step', '{}' FROM generate_series(1, 2000) g",
        )
        .await
        .unwrap();
    let config = Config::from_toml(&simple_config(&db.url, "unused"), &|_| None)
        .expect("the test config is valid");
    let source = &config.sources[0];
    let sql = Sql::new(source);
    let keys = LockKeys::new(&source.table);

    let mut client = db.connect().await;
    // As the relay's pooled sessions run it.
    client
        .batch_execute("SET enable_sort = off; SET jit = off")
        .await
        .unwrap();
    let tx = client.transaction().await.unwrap();
    let every: Vec<i32> = (0..64).collect();
    let taken: Vec<i32> = tx
        .query_one(&sql.lock, &[&every, &keys.batch, &4i64, &499i64])
        .await
        .expect("the lock query runs")
        .get(0);
    let held: i64 = tx
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // One probe per partition on the partition index, not a walk in id
    // order past the rows of busy partitions.
    let plan: String = tx
        .query(
            &format!("EXPLAIN {}", sql.lock),
            &[&every, &keys.batch, &4i64, &499i64],
        )
        .await
        .expect("explain the lock query")
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        plan.contains("outbox_partition_idx"),
        "the lock query probes the partition index:\n{plan}"
    );
    assert_eq!(taken.len(), 4, "the claim takes 4 partitions: {taken:?}");
    assert_eq!(
        held, 4,
        "the transaction holds {held} partition locks for the 4 it takes"
    );
}

/// A partition whose oldest row comes after a full batch of the oldest
/// partition's rows would get nothing from the claim: it is not locked, so
/// another batch can serve it meanwhile (the hot-aggregate starvation the
/// ordering tests measure).
#[tokio::test]
async fn a_hot_partition_that_fills_the_batch_is_locked_alone() {
    let db = TestDb::migrated("obx_plock_hot").await;
    db.client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'order', 'hot', 'Step', '{}' FROM generate_series(1, 600); \
             INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'order', 'q-' || g, 'Step', '{}' FROM generate_series(1, 50) g",
        )
        .await
        .unwrap();
    let config = Config::from_toml(&simple_config(&db.url, "unused"), &|_| None)
        .expect("the test config is valid");
    let source = &config.sources[0];
    let sql = Sql::new(source);
    let keys = LockKeys::new(&source.table);
    let hot: i32 = db
        .client
        .query_one("SELECT (hashtextextended('order/hot', 0) & 63)::int", &[])
        .await
        .unwrap()
        .get(0);
    let mut client = db.connect().await;
    assert_eq!(
        take(&mut client, &sql, &keys, 500).await,
        vec![hot],
        "a batch of 500 is all hot rows"
    );
    let wide = take(&mut client, &sql, &keys, 1000).await;
    assert_eq!(
        wide.first(),
        Some(&hot),
        "the oldest partition first: {wide:?}"
    );
    assert!(
        wide.len() > 1,
        "a batch of 1,000 reaches the quiet rows after the hot 600: {wide:?}"
    );
}

/// Runs the lock query for every partition, at most 16, for a batch of
/// `batch` rows, and rolls back.
async fn take(
    client: &mut tokio_postgres::Client,
    sql: &Sql,
    keys: &LockKeys,
    batch: i64,
) -> Vec<i32> {
    let every: Vec<i32> = (0..64).collect();
    let tx = client.transaction().await.unwrap();
    let taken: Vec<i32> = tx
        .query_one(&sql.lock, &[&every, &keys.batch, &16i64, &(batch - 1)])
        .await
        .expect("the lock query runs")
        .get(0);
    tx.rollback().await.unwrap();
    taken
}
