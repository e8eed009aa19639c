//! RabbitMQ stopped and PostgreSQL restarted while rows flow.

use std::time::Duration;

use crate::support::db::TestDb;
use crate::support::eventually;
use crate::support::relay::{Relay, simple_config};
use crate::{DurableQueue, LONG, PgGuard, RabbitGuard, all_arrived, service};

const ROWS: usize = 20_000;

/// 20k rows, a relay publishing them, and 1,000 of them already gone.
async fn flowing(prefix: &str) -> (TestDb, DurableQueue, Vec<String>, Relay) {
    let db = TestDb::migrated(prefix).await;
    let q = DurableQueue::new().await;
    let keys = db.insert_rows(ROWS, 100).await;
    let relay = Relay::start(&simple_config(&db.url, &q.exchange)).await;
    eventually("rows to flow", LONG, || async {
        (db.count().await < ROWS as i64 - 1000).then_some(())
    })
    .await;
    (db, q, keys, relay)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_stopped_for_seconds_then_started_every_row_arrives() {
    let (db, q, keys, mut relay) = flowing("obx_rmq_stop").await;

    let guard = RabbitGuard;
    service("rabbitmqctl", &["stop_app"]);
    relay.wait_metric("outboxd_broker_up", 0.0, LONG).await;
    relay.wait_ready(503, LONG).await;
    // The outage itself: several seconds with the broker away.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        relay.wait_exit(Duration::ZERO).await.is_none(),
        "the relay is still running"
    );
    service("rabbitmqctl", &["start_app"]);
    drop(guard);

    relay.wait_metric("outboxd_broker_up", 1.0, LONG).await;
    relay.wait_ready(200, LONG).await;
    eventually("an empty table", LONG, || async {
        (db.count().await == 0).then_some(())
    })
    .await;
    let duplicates = all_arrived(&keys, &q.drain().await);
    println!("rabbitmq stop_app 5 s during {ROWS} rows: all arrived, {duplicates} duplicates");
    assert!(
        relay.wait_exit(Duration::ZERO).await.is_none(),
        "the relay never exits"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_while_rows_flow_every_row_arrives() {
    let (db, q, keys, mut relay) = flowing("obx_pg_restart").await;

    let guard = PgGuard;
    service(
        "sh",
        &[
            "-c",
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | sort -V | tail -n 1) main restart -m fast",
        ],
    );
    drop(guard);
    // The gauge may flip back faster than a scrape; the error count stays.
    eventually("the relay to see the database go", LONG, || async {
        let n = relay
            .metric("outboxd_source_errors_total{reason=\"database\",source=\"orders\"}")
            .await?;
        (n >= 1.0).then_some(())
    })
    .await;
    relay
        .wait_metric("outboxd_source_up{source=\"orders\"}", 1.0, LONG)
        .await;
    relay.wait_ready(200, LONG).await;
    // The test's own connection died with the restart.
    let db2 = db.connect().await;
    eventually("an empty table", LONG, || async {
        let n: i64 = db2
            .query_one("SELECT count(*) FROM outbox", &[])
            .await
            .ok()?
            .get(0);
        (n == 0).then_some(())
    })
    .await;
    let duplicates = all_arrived(&keys, &q.drain().await);
    println!("postgres restart -m fast during {ROWS} rows: all arrived, {duplicates} duplicates");
    assert!(
        relay.wait_exit(Duration::ZERO).await.is_none(),
        "the relay never exits"
    );
}
