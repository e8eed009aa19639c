//! A batch's partition lock takes only the partitions the batch will read.
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
        .query_one(&sql.lock, &[&every, &256i64, &keys.batch, &4i64])
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
    assert_eq!(taken.len(), 4, "the claim takes 4 partitions: {taken:?}");
    assert_eq!(
        held, 4,
        "the transaction holds {held} partition locks for the 4 it takes"
    );
}
