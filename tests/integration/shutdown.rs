//! SIGTERM: drain what is committed, then exit 0 within the drain timeout.

use std::collections::HashSet;
use std::time::Duration;

use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::eventually;
use crate::support::relay::{Relay, simple_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_an_idle_relay_exits_zero() {
    let db = TestDb::migrated("obx_term_idle").await;
    let broker = TestBroker::new("#").await;
    let mut relay = Relay::start(&simple_config(&db.url, &broker.exchange)).await;
    relay.wait_ready(200, Duration::from_secs(20)).await;
    relay.signal("-TERM");
    let status = relay
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits within the drain timeout");
    assert_eq!(status.code(), Some(0));
    assert!(!relay.log_lines_with("outboxd stopped").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_zero_and_loses_nothing() {
    const ROWS: usize = 20_000;
    let db = TestDb::migrated("obx_term_load").await;
    let keys = db.insert_rows(ROWS, 100).await;
    let mut broker = TestBroker::new("#").await;
    let mut relay = Relay::start(&simple_config(&db.url, &broker.exchange)).await;
    eventually("rows to flow", Duration::from_secs(30), || async {
        (db.count().await < ROWS as i64).then_some(())
    })
    .await;
    relay.signal("-TERM");
    // drain_timeout is 5 s in the test config, plus a few seconds to wind down.
    let status = relay
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("exits in bounded time");
    assert_eq!(status.code(), Some(0));

    // Nothing lost: every row was either delivered or is still in the table.
    let left: HashSet<String> = db
        .client
        .query("SELECT dedup_key FROM outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let got = broker.collect(ROWS * 2, Duration::from_secs(2)).await;
    let sent: HashSet<String> = got.iter().filter_map(|m| m.message_id.clone()).collect();
    let lost = keys
        .iter()
        .filter(|k| !left.contains(*k) && !sent.contains(*k))
        .count();
    assert_eq!(lost, 0, "rows neither delivered nor left in the table");
    println!(
        "SIGTERM under load: {} delivered, {} left for the next start",
        sent.len(),
        left.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_cut_short_by_its_timeout_counts_the_rows_left_and_exits_3() {
    let db = TestDb::migrated("obx_term_stuck").await;
    let broker = TestBroker::new("#").await;
    let mut relay = Relay::start(&simple_config(&db.url, &broker.exchange)).await;
    // A batch stuck settling: parking its bad row waits for a lock the
    // test holds on the dead-letter table (reads still pass).
    let mut locker = db.connect().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE outbox_dead IN SHARE MODE")
        .await
        .unwrap();
    let bad = db.insert_one("E", "headers", "'[1]'").await;
    eventually("the park to wait for the lock", Duration::from_secs(20), || async {
        let waiting: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'outbox_dead'::regclass",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (waiting > 0).then_some(())
    })
    .await;
    relay.signal("-TERM");
    // drain_timeout is 5 s in the test config, plus a few seconds to wind down.
    let status = relay
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("exits in bounded time");
    lock.rollback().await.unwrap();
    assert_eq!(
        status.code(),
        Some(3),
        "a distinct code for rows left behind"
    );
    let lines = relay.log_lines_with("drain time is up");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["rows"], 1, "{}", lines[0]);
    assert!(
        db.row_state(bad).await.is_some(),
        "the row stays in the outbox"
    );
}
