//! The relay sees only committed rows: a rolled-back row never goes out, and
//! a row of a transaction still open goes out only after its commit.

use std::time::Duration;

use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::eventually;
use crate::support::relay::{Relay, simple_config};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_rolled_back_or_open_transactions_are_not_published() {
    let db = TestDb::migrated("obx_rollback").await;
    let mut broker = TestBroker::new("#").await;
    let _relay = Relay::start(&simple_config(&db.url, &broker.exchange)).await;

    let insert = |event: &str| {
        format!(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', 'o-1', '{event}', '{{}}')"
        )
    };
    // A transaction that rolls back.
    let rolled = db.connect().await;
    rolled
        .batch_execute(&format!("BEGIN; {}; ROLLBACK;", insert("RolledBack")))
        .await
        .unwrap();
    // A transaction left open: its row has a lower id than the next one.
    let open = db.connect().await;
    open.batch_execute(&format!("BEGIN; {};", insert("OpenThenCommitted")))
        .await
        .unwrap();
    db.client.batch_execute(&insert("Committed")).await.unwrap();

    // The claim that took "Committed" ran in id order past the open row, so
    // it could not see it; anything published before would arrive first.
    let first = broker.next(WAIT).await.expect("the committed row arrives");
    assert_eq!(first.kind.as_deref(), Some("Committed"));

    open.batch_execute("COMMIT").await.unwrap();
    let second = broker
        .next(WAIT)
        .await
        .expect("the row arrives after its commit");
    assert_eq!(second.kind.as_deref(), Some("OpenThenCommitted"));

    // A marker committed last: once it is in, everything before it was processed.
    db.client.batch_execute(&insert("Marker")).await.unwrap();
    let third = broker.next(WAIT).await.expect("marker");
    assert_eq!(third.kind.as_deref(), Some("Marker"));
    // The message reaches the consumer just before the relay's delete commits.
    eventually("the table to be empty", WAIT, || async {
        (db.count().await == 0).then_some(())
    })
    .await;
    assert!(
        broker.next(Duration::from_millis(300)).await.is_none(),
        "nothing else (no rolled-back row) was published"
    );
}
