//! A row the broker does not take (returned, nacked, missing exchange, bad
//! content) stays in the table with its attempts and last error, is retried
//! with backoff, and does not hold up other rows.

use std::time::Duration;

use lapin::ExchangeKind;
use lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};

use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::relay::{Relay, SourceSpec, config, simple_config};
use crate::support::{AMQP_URL, eventually, unique};

const WAIT: Duration = Duration::from_secs(20);

/// Waits until row `id` has failed at least `n` times with an error containing `needle`.
async fn wait_attempts(db: &TestDb, id: i64, n: i32, needle: &str) -> String {
    eventually(
        &format!("row {id} to fail {n} times with {needle:?}"),
        WAIT,
        || async {
            match db.row_state(id).await {
                Some((attempts, Some(err), false)) if attempts >= n && err.contains(needle) => {
                    Some(err)
                }
                _ => None,
            }
        },
    )
    .await
}

async fn bind(broker: &TestBroker, queue: &str, key: &str) {
    broker
        .channel
        .queue_bind(
            queue.into(),
            broker.exchange.as_str().into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_row_is_retried_until_a_queue_is_bound_while_others_flow() {
    let db = TestDb::migrated("obx_returned").await;
    let mut broker = TestBroker::new("order.#").await;
    let relay = Relay::start(&no_parking(&db.url, &broker.exchange)).await;

    let stuck = db.insert_one("X", "routing_key", "'nowhere'").await;
    let err = wait_attempts(&db, stuck, 2, "NO_ROUTE").await;
    assert!(err.starts_with("returned"), "{err}");
    // Other rows are not held up by the failing one.
    db.insert_one("OrderCreated", "", "").await;
    let m = broker.next(WAIT).await.expect("a routable row still flows");
    assert_eq!(m.routing_key, "order.OrderCreated");
    let returned = relay
        .metric("outboxd_publish_failures_total{reason=\"returned\",source=\"orders\"}")
        .await
        .unwrap_or(0.0);
    assert!(returned >= 2.0, "returned failures counted: {returned}");
    assert!(
        !relay.log_lines_with("row not delivered").is_empty(),
        "a log line names the failed row"
    );

    // Fix the topology: the retry delivers it, and only then is it removed.
    bind(&broker, &broker.queue.clone(), "nowhere").await;
    let m = broker.next(WAIT).await.expect("the retried row arrives");
    assert_eq!(
        m.headers.get("x-outbox-id"),
        Some(&AMQPValue::LongLongInt(stuck))
    );
    eventually("the row to be deleted", WAIT, || async {
        db.row_state(stuck).await.is_none().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_row_is_retried_past_max_attempts_and_never_parked() {
    let db = TestDb::migrated("obx_nack").await;
    // A queue that rejects every publish: the broker nacks.
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish".as_bytes().to_vec())),
    );
    let mut broker = TestBroker::with_queue_args("#", args).await;
    // max_attempts = 2, which a nack does not count toward: RabbitMQ nacks
    // for a queue's state, never for the message, so the row is retried
    // past it and never parked.
    let cfg = config(
        AMQP_URL,
        &[SourceSpec::new("orders", &db.url, &broker.exchange).set("max_attempts", "2")],
    );
    let relay = Relay::start(&cfg).await;

    let id = db.insert_one("OrderCreated", "", "").await;
    let err = wait_attempts(&db, id, 4, "nacked").await;
    assert!(err.starts_with("nacked"), "{err}");
    let nacked = relay
        .metric("outboxd_publish_failures_total{reason=\"nacked\",source=\"orders\"}")
        .await
        .unwrap_or(0.0);
    assert!(nacked >= 4.0, "nacks counted: {nacked}");
    let dead = db.dead_count().await;
    assert_eq!(dead, 0, "a nacked row is never parked");
    assert_eq!(
        relay
            .metric("outboxd_parked_total{reason=\"nacked\",source=\"orders\"}")
            .await,
        None,
        "nacked is no reason to park"
    );

    // Bind a normal queue next to the full one, then drop the full one (in
    // that order: the exchange is auto-delete). The next retry is delivered.
    let full = broker.queue.clone();
    let fresh = unique("obx.q");
    broker
        .channel
        .queue_declare(
            fresh.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare queue");
    bind(&broker, &fresh, "#").await;
    broker
        .channel
        .queue_delete(full.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete queue");
    broker.queue = fresh;
    let m = broker.next(WAIT).await.expect("the retried row arrives");
    assert_eq!(
        m.headers.get("x-outbox-id"),
        Some(&AMQPValue::LongLongInt(id))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_naming_a_missing_exchange_does_not_block_its_batch() {
    let db = TestDb::migrated("obx_noexch").await;
    let mut broker = TestBroker::new("#").await;
    let missing = unique("obx.missing");
    // The bad row and 50 good ones commit together, so they share a batch.
    let tx_sql = format!(
        "BEGIN; \
         INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, exchange) VALUES ('order', 'o-x', 'X', '{{}}', '{missing}'); \
         INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) SELECT 'order', 'o-' || g, 'OrderCreated', '{{}}' FROM generate_series(1, 50) g; \
         COMMIT;"
    );
    db.client
        .batch_execute(&tx_sql)
        .await
        .expect("insert batch");
    let relay = Relay::start(&no_parking(&db.url, &broker.exchange)).await;

    let got = broker.collect(50, WAIT).await;
    assert_eq!(got.len(), 50, "the 50 good rows arrive");
    let bad_id: i64 = db
        .client
        .query_one("SELECT id FROM outbox WHERE event_type = 'X'", &[])
        .await
        .expect("the bad row is still there")
        .get(0);
    let err = wait_attempts(&db, bad_id, 1, "does not exist").await;
    assert!(err.starts_with("exchange_not_found"), "{err}");
    assert!(
        relay
            .metric(
                "outboxd_publish_failures_total{reason=\"exchange_not_found\",source=\"orders\"}"
            )
            .await
            .unwrap_or(0.0)
            >= 1.0
    );

    // Create the exchange and bind our queue to it: the row goes out.
    broker
        .channel
        .exchange_declare(
            missing.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare exchange");
    broker
        .channel
        .queue_bind(
            broker.queue.as_str().into(),
            missing.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    let m = broker
        .next(WAIT)
        .await
        .expect("the row arrives once its exchange exists");
    assert_eq!(m.exchange, missing);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_row_is_parked_at_once_with_a_reason_naming_it_and_others_flow() {
    let db = TestDb::migrated("obx_badrow").await;
    let mut broker = TestBroker::new("#").await;
    let relay = Relay::start(&simple_config(&db.url, &broker.exchange)).await;

    let long_key = db
        .insert_one("OrderCreated", "dedup_key", "repeat('k', 300)")
        .await;
    let nested = db
        .insert_one("OrderCreated", "headers", r#"'{"deep": {"a": 1}}'"#)
        .await;
    let good = db.insert_one("OrderCreated", "", "").await;

    let m = broker.next(WAIT).await.expect("the good row arrives");
    assert_eq!(
        m.headers.get("x-outbox-id"),
        Some(&AMQPValue::LongLongInt(good))
    );
    // Retrying cannot fix a row's content: parked on the first attempt.
    let (reason, error, attempts) = parked(&db, long_key).await;
    assert_eq!((reason.as_str(), attempts), ("bad_row", 1), "{error}");
    assert!(error.contains("dedup_key is 300 bytes"), "{error}");
    let (_, error, _) = parked(&db, nested).await;
    assert!(error.contains("header \"deep\" is an object"), "{error}");
    // The good row's message can reach the consumer a moment before its
    // batch commits the delete.
    eventually("nothing left in the outbox", WAIT, || async {
        (db.count().await == 0).then_some(())
    })
    .await;
    // The lines are written after the batch commits, so they can come a
    // moment after the table is empty.
    let named = || {
        relay
            .log_lines_with("row parked")
            .iter()
            .filter_map(|l| l["row_id"].as_i64())
            .collect::<Vec<i64>>()
    };
    eventually("log lines name both parked rows", WAIT, || async {
        let logged = named();
        (logged.contains(&long_key) && logged.contains(&nested)).then_some(())
    })
    .await;
    relay
        .wait_metric(
            "outboxd_parked_total{reason=\"bad_row\",source=\"orders\"}",
            2.0,
            WAIT,
        )
        .await;
    relay
        .wait_metric("outboxd_dead_letters{source=\"orders\"}", 2.0, WAIT)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_refused_max_attempts_times_is_parked_and_others_flow() {
    let db = TestDb::migrated("obx_park").await;
    let mut broker = TestBroker::new("order.#").await;
    let cfg = config(
        AMQP_URL,
        &[SourceSpec::new("orders", &db.url, &broker.exchange).set("max_attempts", "3")],
    );
    let relay = Relay::start(&cfg).await;
    let stuck = db.insert_one("X", "routing_key", "'nowhere'").await;
    let (reason, error, attempts) = parked(&db, stuck).await;
    assert_eq!((reason.as_str(), attempts), ("returned", 3), "{error}");
    assert!(error.contains("NO_ROUTE"), "{error}");
    db.insert_one("OrderCreated", "", "").await;
    broker.next(WAIT).await.expect("other rows keep flowing");
    relay
        .wait_metric(
            "outboxd_parked_total{reason=\"returned\",source=\"orders\"}",
            1.0,
            WAIT,
        )
        .await;
}

/// Waits until row `id` is in the dead-letter table: (reason, last_error, attempts).
pub async fn parked(db: &TestDb, id: i64) -> (String, String, i32) {
    eventually(&format!("row {id} to be parked"), WAIT, || async {
        db.client
            .query_opt(
                "SELECT reason, last_error, attempts FROM outbox_dead WHERE id = $1",
                &[&id],
            )
            .await
            .expect("query dead letters")
            .map(|r| (r.get(0), r.get(1), r.get(2)))
    })
    .await
}

/// The usual config, with parking out of reach so retries can be watched.
fn no_parking(database_url: &str, exchange: &str) -> String {
    config(
        AMQP_URL,
        &[SourceSpec::new("orders", database_url, exchange).set("max_attempts", "1000")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_dead_letter_table_failing_rows_are_retried_not_parked() {
    let db = TestDb::migrated("obx_nodead").await;
    db.client
        .batch_execute("DROP TABLE outbox_dead")
        .await
        .unwrap();
    let mut broker = TestBroker::new("#").await;
    let cfg = config(
        AMQP_URL,
        &[SourceSpec::new("orders", &db.url, &broker.exchange).set("max_attempts", "1")],
    );
    let relay = Relay::start(&cfg).await;
    // The bad row and a good one in one transaction, so in one batch.
    db.client
        .batch_execute(
            "BEGIN; \
             INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, dedup_key) \
                 VALUES ('order', 'o-1', 'Bad', '{}', repeat('k', 300)); \
             INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                 VALUES ('order', 'o-2', 'Good', '{}'); \
             COMMIT;",
        )
        .await
        .unwrap();
    let m = broker.next(WAIT).await.expect("the good row goes out");
    assert_eq!(m.kind.as_deref(), Some("Good"));
    let bad: i64 = db
        .client
        .query_one("SELECT id FROM outbox WHERE event_type = 'Bad'", &[])
        .await
        .unwrap()
        .get(0);
    // Parking would fail and roll back the whole batch; instead the bad row
    // is retried, and the good one is not sent again.
    wait_attempts(&db, bad, 2, "dedup_key is 300 bytes").await;
    assert!(
        broker.next(Duration::from_millis(500)).await.is_none(),
        "the good row was sent once"
    );
    assert!(
        !relay
            .log_lines_with("dead-letter table is missing")
            .is_empty()
    );
}

/// A claim that fails before its transaction begins (here: preparing the
/// claim, on a table that no longer matches) is reported as a database
/// failure naming the cause, and retried; nothing tries to roll back a
/// transaction that never began (PostgreSQL would answer each such
/// ROLLBACK with a warning the relay logs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_failing_before_its_transaction_is_retried_without_a_stray_rollback() {
    let db = TestDb::migrated("obx_fail_prebegin").await;
    db.client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             VALUES ('order', 'o-1', 'Created', '{}'); \
             ALTER TABLE outbox RENAME COLUMN headers TO headers_gone",
        )
        .await
        .unwrap();
    let broker = TestBroker::new("#").await;
    let relay = Relay::start(&simple_config(&db.url, &broker.exchange)).await;
    let first = eventually("the database failure", WAIT, || async {
        relay.log_lines_with("source database failed").pop()
    })
    .await;
    assert!(
        first["error"]
            .as_str()
            .is_some_and(|e| e.contains("headers")),
        "{first}"
    );
    // Two retries later, any stray ROLLBACK's warning would be in the log.
    eventually("two retries", WAIT, || async {
        (relay.log_lines_with("source database still failing").len() >= 2).then_some(())
    })
    .await;
    let stray = relay.log_lines_with("no transaction in progress");
    assert!(stray.is_empty(), "{stray:?}");
}
