//! Rows that can never be sent, and rows the database will not settle, as
//! a hostile user writes them (issue "hardening"): each ends parked with a
//! reason naming it, or rescheduled with growing backoff, and none of them
//! stops, floods or duplicates the rest of its source.

use std::collections::HashMap;
use std::time::Duration;

use lapin::ExchangeKind;
use lapin::options::ExchangeDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};

use crate::failures::parked;
use crate::support::broker::{Received, TestBroker};
use crate::support::db::TestDb;
use crate::support::relay::{Relay, SourceSpec, config, simple_config};
use crate::support::{AMQP_URL, eventually, unique};

const WAIT: Duration = Duration::from_secs(30);

/// Inserts `n` good rows, each of an aggregate of its own (`good-<i>`), in
/// one transaction; returns their dedup keys.
pub async fn good_rows(db: &TestDb, prefix: &str, n: i32) -> Vec<String> {
    db.client
        .query(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'good', $1 || g, 'Good', jsonb_build_object('seq', g) \
             FROM generate_series(1, $2::int) g ORDER BY g RETURNING dedup_key",
            &[&prefix, &n],
        )
        .await
        .expect("insert good rows")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Collects messages until every key in `keys` has arrived (or `WAIT`
/// passes); returns how many times each key arrived.
pub async fn receive_all(broker: &mut TestBroker, keys: &[String]) -> HashMap<String, usize> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let deadline = std::time::Instant::now() + WAIT;
    while keys.iter().any(|k| !seen.contains_key(k)) && std::time::Instant::now() < deadline {
        if let Some(m) = broker.next(Duration::from_millis(500)).await {
            *seen.entry(m.message_id.unwrap_or_default()).or_default() += 1;
        }
    }
    // Whatever else was already on its way (duplicates) arrives too.
    while let Some(m) = broker.next(Duration::from_millis(300)).await {
        *seen.entry(m.message_id.unwrap_or_default()).or_default() += 1;
    }
    let missing = keys.iter().filter(|k| !seen.contains_key(*k)).count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} good rows never arrived",
        keys.len()
    );
    seen
}

pub fn duplicates(seen: &HashMap<String, usize>) -> usize {
    seen.values().map(|n| n - 1).sum()
}

pub fn outbox_id(m: &Received) -> Option<i64> {
    match m.headers.get("x-outbox-id") {
        Some(AMQPValue::LongLongInt(id)) => Some(*id),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_aggregates_never_hold_back_unrelated_aggregates() {
    let db = TestDb::migrated("obx_parked_many").await;
    let mut broker = TestBroker::new("#").await;
    let relay = Relay::start(&simple_config(&db.url, &broker.exchange)).await;

    // The reported reproduction: 200 aggregates whose first row is bad
    // (parked at once, holding its aggregate), then two more rows each.
    db.client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers) \
               SELECT 'bad', 'b' || g, 'E', '{}', '[1]' FROM generate_series(1, 200) g; \
             INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
               SELECT 'bad', 'b' || (g % 200 + 1), 'E', '{}' FROM generate_series(1, 400) g;",
        )
        .await
        .unwrap();
    eventually("200 parked rows", WAIT, || async {
        let n = db.dead_count().await;
        (n == 200).then_some(())
    })
    .await;
    // Fresh aggregates in every partition: each arrives.
    let fresh = good_rows(&db, "fresh", 300).await;
    let seen = receive_all(&mut broker, &fresh).await;
    assert!(
        seen.keys().all(|k| fresh.contains(k)),
        "only fresh rows were sent, never a row behind a parked one"
    );
    // The rows behind parked rows are held, counted, and out of the way.
    eventually("every row behind a parked row held", WAIT, || async {
        let n: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM outbox WHERE aggregate_type = 'bad' AND NOT held",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n == 0).then_some(())
    })
    .await;
    relay
        .wait_metric(
            "outboxd_held_by_dead_letters{source=\"orders\"}",
            400.0,
            WAIT,
        )
        .await;
    relay
        .wait_metric(
            "outboxd_oldest_sendable_age_seconds{source=\"orders\"}",
            0.0,
            WAIT,
        )
        .await;
    let (code, body) = relay.readyz().await;
    assert_eq!(code, 200, "{body}");
    let source = &body["sources"][0];
    assert_eq!(source["dead_letters"], 200, "{body}");
    assert_eq!(source["held_by_dead_letters"], 400, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_over_the_brokers_frame_size_are_a_bad_row_not_a_reconnect() {
    let db = TestDb::migrated("obx_frame").await;
    let mut broker = TestBroker::new("#").await;
    let relay = Relay::start(&simple_config(&db.url, &broker.exchange)).await;
    let big = db
        .insert_one(
            "Big",
            "headers",
            "jsonb_build_object('k', repeat('v', 1000000))",
        )
        .await;
    let good = good_rows(&db, "after-big", 20).await;
    receive_all(&mut broker, &good).await;
    let (reason, error, attempts) = parked(&db, big).await;
    assert_eq!((reason.as_str(), attempts), ("bad_row", 1), "{error}");
    assert!(error.contains("frame_max"), "{error}");
    assert_eq!(
        relay.metric("outboxd_broker_connections_total").await,
        Some(1.0),
        "the broker connection was never dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_lands_on_the_refused_row_alone_and_keeps_the_connection() {
    let db = TestDb::migrated("obx_refused").await;
    let mut broker = TestBroker::new("#").await;
    // An internal exchange: it exists (a passive declare finds it), but a
    // publish to it is refused with 403 and closes the channel.
    let internal = unique("obx.internal");
    broker
        .channel
        .exchange_declare(
            internal.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                internal: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare internal exchange");
    let cfg = config(
        AMQP_URL,
        &[SourceSpec::new("orders", &db.url, &broker.exchange)
            .set("max_attempts", "3")
            .set("ordering", "\"none\"")],
    );
    let relay = Relay::start(&cfg).await;
    // One transaction: the refused row sits in the middle of one batch.
    let mut client = db.connect().await;
    let tx = client.transaction().await.unwrap();
    let mut keys: Vec<String> = Vec::new();
    let mut refused = 0;
    for i in 0..60 {
        if i == 30 {
            refused = tx
                .query_one(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, exchange) \
                     VALUES ('x', 'refused', 'R', '{}', $1) RETURNING id",
                    &[&internal],
                )
                .await
                .unwrap()
                .get(0);
        } else {
            let row = tx
                .query_one(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                     VALUES ('good', $1, 'Good', '{}') RETURNING dedup_key",
                    &[&format!("g{i}")],
                )
                .await
                .unwrap();
            keys.push(row.get(0));
        }
    }
    tx.commit().await.unwrap();

    let seen = receive_all(&mut broker, &keys).await;
    let (reason, error, attempts) = parked(&db, refused).await;
    assert_eq!((reason.as_str(), attempts), ("refused", 3), "{error}");
    assert!(
        error.contains("ACCESS_REFUSED") || error.contains("403"),
        "{error}"
    );
    assert!(
        duplicates(&seen) <= keys.len(),
        "each good row sent at most twice: {} duplicates",
        duplicates(&seen)
    );
    assert_eq!(
        relay.metric("outboxd_broker_connections_total").await,
        Some(1.0),
        "a refused publish does not reconnect the broker connection"
    );
    relay
        .wait_metric(
            "outboxd_parked_total{reason=\"refused\",source=\"orders\"}",
            1.0,
            WAIT,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_own_tables_never_fail_a_producer() {
    let db = TestDb::migrated("obx_nowakeup").await;
    let mut broker = TestBroker::new("#").await;
    // A producer role without any right on the flag table.
    let producer = unique("obx_producer");
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {producer} LOGIN NOSUPERUSER; GRANT USAGE ON SCHEMA public TO {producer}; \
             GRANT INSERT ON outbox TO {producer}; GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {producer}; \
             REVOKE ALL ON outbox_wakeup FROM PUBLIC;"
        ))
        .await
        .unwrap();
    let url = format!("postgres://{producer}@127.0.0.1:5432/{}", db.name);
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let insert = "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                  VALUES ('p', 'p1', 'E', '{}')";
    let unreadable = client.batch_execute(insert).await;
    db.client
        .batch_execute("DROP TABLE outbox_wakeup CASCADE")
        .await
        .unwrap();
    let dropped = client.batch_execute(insert).await;
    drop(client);
    db.client
        .batch_execute(&format!("DROP OWNED BY {producer}; DROP ROLE {producer};"))
        .await
        .unwrap();
    assert!(unreadable.is_ok(), "flag table unreadable: {unreadable:?}");
    assert!(dropped.is_ok(), "flag table dropped: {dropped:?}");
    // The relay finds both rows by polling.
    let relay = Relay::start(&simple_config(&db.url, &broker.exchange)).await;
    assert_eq!(broker.collect(2, WAIT).await.len(), 2);
    eventually("the flag table reported missing", WAIT, || async {
        (!relay
            .log_lines_with("wake-up flag table is missing")
            .is_empty())
        .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_marked_published_by_someone_else_are_counted_and_warned_about() {
    let db = TestDb::migrated("obx_foreignmark").await;
    let broker = TestBroker::new("#").await;
    let relay = Relay::start(&simple_config(&db.url, &broker.exchange)).await;
    db.insert_one("E", "published_at", "now()").await;
    relay
        .wait_metric("outboxd_unclaimable_rows{source=\"orders\"}", 1.0, WAIT)
        .await;
    eventually("a warning about the row", WAIT, || async {
        (!relay.log_lines_with("published_at set").is_empty()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_row_is_parked_once_and_every_good_row_arrives() {
    let db = TestDb::migrated("obx_mixed").await;
    let mut broker = TestBroker::new("good.#").await;
    let internal = unique("obx.internal");
    broker
        .channel
        .exchange_declare(
            internal.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                internal: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    db.client
        .batch_execute("ALTER TABLE outbox ALTER COLUMN created_at DROP NOT NULL")
        .await
        .unwrap();
    let cfg = config(
        AMQP_URL,
        &[SourceSpec::new("orders", &db.url, &broker.exchange).set("max_attempts", "2")],
    );
    let relay = Relay::start(&cfg).await;
    let mut keys = good_rows(&db, "before", 200).await;
    // (what, extra columns, values, the reason it must be parked with)
    let bad: [(&str, &str, String, &str); 7] = [
        (
            "headers not an object",
            "headers",
            "'[1]'".into(),
            "bad_row",
        ),
        (
            "a 300-byte dedup key",
            "dedup_key",
            "repeat('k', 300)".into(),
            "bad_row",
        ),
        (
            "headers over frame_max",
            "headers",
            "jsonb_build_object('k', repeat('v', 1000000))".into(),
            "bad_row",
        ),
        ("a NULL created_at", "created_at", "NULL".into(), "bad_row"),
        (
            "attempts at the integer limit",
            "headers, attempts",
            "'[2]', 2147483647".into(),
            "bad_row",
        ),
        (
            "an internal exchange",
            "exchange",
            format!("'{internal}'"),
            "refused",
        ),
        ("no route", "routing_key", "'nowhere'".into(), "returned"),
    ];
    let mut bad_ids = Vec::new();
    for (what, cols, vals, reason) in &bad {
        let id = db.insert_one(what, cols, vals).await;
        bad_ids.push((id, *what, *reason));
        keys.extend(good_rows(&db, &format!("between-{id}"), 20).await);
    }
    // A later row of each bad row's aggregate waits; no other aggregate does.
    keys.extend(good_rows(&db, "after", 200).await);
    let seen = receive_all(&mut broker, &keys).await;
    for (id, what, reason) in &bad_ids {
        let (got, error, _) = parked(&db, *id).await;
        assert_eq!(got, *reason, "{what}: {error}");
    }
    let dead = db.dead_count().await;
    assert_eq!(dead, bad.len() as i64, "each bad row parked once");
    // The README's bound: at most max_in_flight × batch_size per failure;
    // here nothing failed but the refused channel, whose neighbours may be
    // sent twice: at most one batch (batch_size, its default here).
    assert!(
        duplicates(&seen) <= outboxd::config::DEFAULT_BATCH_SIZE as usize,
        "{} duplicates",
        duplicates(&seen)
    );
    assert_eq!(
        seen.keys().filter(|k| !keys.contains(k)).count(),
        0,
        "no bad row was ever sent"
    );
    let mut parked_total = 0.0;
    for reason in ["bad_row", "refused", "returned"] {
        parked_total += relay
            .metric(&format!(
                "outboxd_parked_total{{reason=\"{reason}\",source=\"orders\"}}"
            ))
            .await
            .unwrap_or(0.0);
    }
    assert_eq!(parked_total, bad.len() as f64, "each park counted once");
}
