//! Committed rows reach the broker as documented, and only then leave the table.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::types::AMQPValue;

use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::relay::{Relay, SourceSpec, config, simple_config};
use crate::support::{AMQP_URL, eventually};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_row_arrives_with_the_documented_message_and_leaves_the_table() {
    let db = TestDb::migrated("obx_deliver").await;
    let mut broker = TestBroker::new("#").await;
    let relay = Relay::start(&simple_config(&db.url, &broker.exchange)).await;

    let id = db
        .insert_one(
            "OrderCreated",
            "headers, dedup_key",
            r#"'{"tenant": "t1", "n": 5, "ok": true}', 'key-1'"#,
        )
        .await;
    let m = broker.next(WAIT).await.expect("the message arrives");
    assert_eq!(m.exchange, broker.exchange);
    assert_eq!(m.routing_key, "order.OrderCreated");
    assert_eq!(m.message_id.as_deref(), Some("key-1"));
    assert_eq!(m.kind.as_deref(), Some("OrderCreated"));
    assert_eq!(m.content_type.as_deref(), Some("application/json"));
    assert_eq!(m.delivery_mode, Some(2));
    assert_eq!(m.app_id.as_deref(), Some("outboxd"));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let ts = m.timestamp.expect("timestamp is set");
    assert!(
        ts <= now && now - ts < 60,
        "timestamp {ts} is created_at, not {now}"
    );
    assert_eq!(m.body, br#"{"k":"v"}"#, "payload is sent as compact JSON");
    assert_eq!(
        m.headers.get("x-outbox-id"),
        Some(&AMQPValue::LongLongInt(id))
    );
    assert_eq!(m.header_str("x-outbox-source").as_deref(), Some("orders"));
    assert_eq!(m.header_str("x-aggregate-type").as_deref(), Some("order"));
    assert_eq!(m.header_str("x-aggregate-id").as_deref(), Some("o-1"));
    assert_eq!(m.header_str("tenant").as_deref(), Some("t1"));
    assert_eq!(m.headers.get("n"), Some(&AMQPValue::LongLongInt(5)));
    assert_eq!(m.headers.get("ok"), Some(&AMQPValue::Boolean(true)));

    eventually("the row to be deleted", WAIT, || async {
        (db.row_state(id).await.is_none()).then_some(())
    })
    .await;
    relay
        .wait_metric(
            "outboxd_messages_published_total{source=\"orders\"}",
            1.0,
            WAIT,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_drains_completely_in_several_batches() {
    let db = TestDb::migrated("obx_backlog").await;
    let keys = db.insert_rows(3000, 64).await;
    let mut broker = TestBroker::new("#").await;
    let cfg = config(
        AMQP_URL,
        &[SourceSpec::new("orders", &db.url, &broker.exchange).set("batch_size", "200")],
    );
    let relay = Relay::start(&cfg).await;

    let got = broker.collect(keys.len(), WAIT).await;
    let ids: HashSet<String> = got.iter().filter_map(|m| m.message_id.clone()).collect();
    assert_eq!(
        ids,
        keys.iter().cloned().collect::<HashSet<_>>(),
        "every row arrives, by dedup key"
    );
    eventually("an empty table", WAIT, || async {
        (db.count().await == 0).then_some(())
    })
    .await;
    let batches = relay
        .metric("outboxd_batch_size_count{source=\"orders\"}")
        .await
        .unwrap_or(0.0);
    assert!(
        batches >= 15.0,
        "3000 rows at batch_size 200 take at least 15 batches, saw {batches}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mark_mode_sets_published_at_and_never_sends_the_row_again() {
    let db = TestDb::migrated("obx_mark").await;
    let mut broker = TestBroker::new("#").await;
    let cfg = config(
        AMQP_URL,
        &[SourceSpec::new("orders", &db.url, &broker.exchange).set("after_publish", "\"mark\"")],
    );
    let relay = Relay::start(&cfg).await;

    let first = db.insert_one("OrderCreated", "", "").await;
    broker.next(WAIT).await.expect("first message");
    eventually("the row to be marked", WAIT, || async {
        matches!(db.row_state(first).await, Some((_, _, true))).then_some(())
    })
    .await;
    // A second row goes out; the marked one does not go out again.
    let second = db.insert_one("OrderShipped", "", "").await;
    let m = broker.next(WAIT).await.expect("second message");
    assert_eq!(
        m.headers.get("x-outbox-id"),
        Some(&AMQPValue::LongLongInt(second))
    );
    relay
        .wait_metric(
            "outboxd_messages_published_total{source=\"orders\"}",
            2.0,
            WAIT,
        )
        .await;
    assert!(
        broker.next(Duration::from_millis(500)).await.is_none(),
        "a marked row is sent once"
    );
    assert_eq!(db.count().await, 2, "mark keeps both rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rows_exchange_and_routing_key_override_the_source_defaults() {
    let db = TestDb::migrated("obx_override").await;
    let mut default_broker = TestBroker::new("#").await;
    let mut other = TestBroker::new("custom.key").await;
    let _relay = Relay::start(&simple_config(&db.url, &default_broker.exchange)).await;

    db.insert_one(
        "OrderCreated",
        "exchange, routing_key",
        &format!("'{}', 'custom.key'", other.exchange),
    )
    .await;
    let m = other
        .next(WAIT)
        .await
        .expect("message on the row's exchange");
    assert_eq!(m.routing_key, "custom.key");
    assert_eq!(m.exchange, other.exchange);
    db.insert_one("OrderCreated", "", "").await;
    let m = default_broker
        .next(WAIT)
        .await
        .expect("message on the default exchange");
    assert_eq!(m.routing_key, "order.OrderCreated");
}
