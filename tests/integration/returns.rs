//! A returned (unroutable) message is pinned on its own row, however the
//! broker batches its acks.

use std::time::Duration;

use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::relay::{Relay, SourceSpec, config};
use crate::support::{AMQP_URL, eventually};

const WAIT: Duration = Duration::from_secs(20);

/// lapin hands a returned message to whichever confirm it resolves next,
/// and an ack for many delivery tags resolves them in no set order: the
/// unroutable row could be taken for delivered (and deleted, lost) and a
/// delivered one parked. Among hundreds of rows acked together, exactly
/// the unroutable ones must be parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_rows_among_many_are_the_ones_parked() {
    let db = TestDb::migrated("obx_returns").await;
    let bad: Vec<i64> = db
        .client
        .query(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, routing_key) \
             SELECT 'order', 'o-' || g, 'E', '{}', CASE WHEN g % 97 = 0 THEN 'nowhere.x' END \
             FROM generate_series(1, 400) g ORDER BY g RETURNING id, routing_key",
            &[],
        )
        .await
        .expect("insert")
        .iter()
        .filter(|r| r.get::<_, Option<&str>>(1).is_some())
        .map(|r| r.get(0))
        .collect();
    let mut broker = TestBroker::new("order.#").await;
    let cfg = config(
        AMQP_URL,
        &[SourceSpec::new("orders", &db.url, &broker.exchange)
            .set("max_attempts", "1")
            .set("ordering", "\"none\"")],
    );
    let _relay = Relay::start(&cfg).await;
    let got = broker.collect(400 - bad.len(), WAIT).await;
    assert_eq!(got.len(), 400 - bad.len());
    eventually("every row settled", WAIT, || async {
        (db.count().await == 0).then_some(())
    })
    .await;
    let parked: Vec<i64> = db
        .client
        .query("SELECT id FROM outbox_dead ORDER BY id", &[])
        .await
        .expect("dead letters")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(parked, bad, "exactly the unroutable rows are parked");
}
