//! ordering = "aggregate" with on_park = "hold": a parked row holds back the
//! later rows of its own aggregate (counted), never another aggregate;
//! replaying it sends it first and then the rest in order; purging it
//! releases the rest at once.

use std::time::Duration;

use crate::failures::parked;
use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::relay::{Relay, SourceSpec, config, run_to_end};
use crate::support::{AMQP_URL, eventually};

const WAIT: Duration = Duration::from_secs(20);

async fn insert(db: &TestDb, aggregate: &str, event: &str, routing_key: Option<&str>) -> i64 {
    db.client
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, routing_key) \
             VALUES ('order', $1, $2, '{}', $3) RETURNING id",
            &[&aggregate, &event, &routing_key],
        )
        .await
        .expect("insert")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_row_holds_back_only_its_own_aggregate_until_replayed_or_purged() {
    let db = TestDb::migrated("obx_held").await;
    let mut broker = TestBroker::new("order.#").await;
    let cfg = config(
        AMQP_URL,
        &[SourceSpec::new("orders", &db.url, &broker.exchange).set("max_attempts", "1")],
    );
    let relay = Relay::start(&cfg).await;

    // a-1 is unroutable and parked at its first refusal; a-2 and a-3 wait.
    let a1 = insert(&db, "a", "A1", Some("nowhere.a")).await;
    parked(&db, a1).await;
    insert(&db, "a", "A2", None).await;
    insert(&db, "a", "A3", None).await;
    // Another aggregate flows past them.
    insert(&db, "b", "B1", None).await;
    let m = broker.next(WAIT).await.expect("b's row arrives");
    assert_eq!(m.kind.as_deref(), Some("B1"));
    relay
        .wait_metric("outboxd_held_by_dead_letters{source=\"orders\"}", 2.0, WAIT)
        .await;
    let waiting: i64 = db
        .client
        .query_one("SELECT count(*) FROM outbox WHERE aggregate_id = 'a'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(waiting, 2, "a-2 and a-3 wait in the outbox");
    assert!(
        broker.next(Duration::from_millis(300)).await.is_none(),
        "nothing of aggregate a went out"
    );

    // Fix the route and replay a-1: it goes first, then a-2 and a-3.
    broker.bind("nowhere.#").await;
    let (code, _, err) = run_to_end(
        &[
            "dead-letters",
            "replay",
            "--source",
            "orders",
            "--id",
            &a1.to_string(),
        ],
        &cfg,
    );
    assert_eq!(code, Some(0), "{err}");
    let got: Vec<String> = broker
        .collect(3, WAIT)
        .await
        .iter()
        .map(|m| m.kind.clone().unwrap_or_default())
        .collect();
    assert_eq!(got, ["A1", "A2", "A3"], "aggregate a in id order");

    // A bad row (dedup key over 255 bytes) parks c-1; purging it releases c-2.
    let c1: i64 = db
        .client
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, dedup_key) \
             VALUES ('order', 'c', 'C1', '{}', repeat('k', 300)) RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    parked(&db, c1).await;
    insert(&db, "c", "C2", None).await;
    relay
        .wait_metric("outboxd_held_by_dead_letters{source=\"orders\"}", 1.0, WAIT)
        .await;
    let (code, _, err) = run_to_end(
        &[
            "dead-letters",
            "purge",
            "--source",
            "orders",
            "--id",
            &c1.to_string(),
            "--yes",
        ],
        &cfg,
    );
    assert_eq!(code, Some(0), "{err}");
    let m = broker
        .next(WAIT)
        .await
        .expect("c-2 goes out after the purge");
    assert_eq!(m.kind.as_deref(), Some("C2"));
    eventually("an empty outbox", WAIT, || async {
        (db.count().await == 0).then_some(())
    })
    .await;
}
