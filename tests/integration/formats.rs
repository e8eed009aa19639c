//! What a consumer receives beyond the body: `message_format =
//! "cloudevents"` in both capture modes, and W3C trace context carried
//! from a row's headers unchanged.

use std::time::{Duration, UNIX_EPOCH};

use crate::support::AMQP_URL;
use crate::support::broker::{Received, TestBroker};
use crate::support::db::TestDb;
use crate::support::relay::{Relay, SourceSpec, config, run_to_end};

const WAIT: Duration = Duration::from_secs(30);
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const TRACESTATE: &str = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";
const CE_SOURCE: &str = "https://shop.example.com/orders";

/// Inserts one traced row; returns its dedup key and `created_at` in
/// microseconds since the Unix epoch.
async fn insert_traced(db: &TestDb, aggregate: &str) -> (String, i64) {
    let row = db
        .client
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers) \
             VALUES ('order', $1, 'OrderPlaced', '{\"total\": 5}', \
                     jsonb_build_object('traceparent', $2::text, 'tracestate', $3::text)) \
             RETURNING dedup_key, (extract(epoch FROM created_at) * 1000000)::bigint",
            &[&aggregate, &TRACEPARENT, &TRACESTATE],
        )
        .await
        .expect("insert");
    (row.get(0), row.get(1))
}

/// The trace headers arrived byte for byte.
fn assert_traced(m: &Received) {
    assert_eq!(m.header_str("traceparent").as_deref(), Some(TRACEPARENT));
    assert_eq!(m.header_str("tracestate").as_deref(), Some(TRACESTATE));
}

/// Checks a received message against the CloudEvents 1.0 attribute rules
/// and returns its `time` in microseconds since the Unix epoch.
fn assert_cloudevent(m: &Received, id: &str, subject: &str, kind: &str) -> i64 {
    let ce = |name: &str| m.header_str(&format!("cloudEvents_{name}"));
    assert_eq!(ce("specversion").as_deref(), Some("1.0"));
    assert_eq!(ce("id").as_deref(), Some(id));
    assert_eq!(m.message_id.as_deref(), Some(id), "id is the message_id");
    assert_eq!(ce("source").as_deref(), Some(CE_SOURCE));
    assert_eq!(ce("type").as_deref(), Some(kind));
    assert_eq!(ce("subject").as_deref(), Some(subject));
    assert_eq!(m.content_type.as_deref(), Some("application/json"));
    let time = ce("time").expect("time is set");
    let parsed = humantime::parse_rfc3339(&time).expect("time is RFC 3339");
    for name in m
        .headers
        .keys()
        .filter_map(|k| k.strip_prefix("cloudEvents_"))
    {
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
            "attribute name {name:?}"
        );
    }
    parsed
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_micros() as i64
}

fn cloudevents(spec: SourceSpec) -> SourceSpec {
    spec.set("message_format", "\"cloudevents\"")
        .set("cloudevents_source", &format!("{CE_SOURCE:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_in_a_rows_headers_reaches_the_message_unchanged() {
    let db = TestDb::migrated("obx_trace").await;
    let mut broker = TestBroker::new("#").await;
    let _relay = Relay::start(&config(
        AMQP_URL,
        &[SourceSpec::new("orders", &db.url, &broker.exchange)],
    ))
    .await;
    insert_traced(&db, "o-1").await;
    let m = broker.next(WAIT).await.expect("the message");
    assert_traced(&m);
    // the plain format adds no CloudEvents attributes
    assert!(
        m.headers.keys().all(|k| !k.starts_with("cloudEvents_")),
        "{:?}",
        m.headers.keys()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_attributes_follow_the_spec_when_polling() {
    let db = TestDb::migrated("obx_ce_poll").await;
    let mut broker = TestBroker::new("#").await;
    let _relay = Relay::start(&config(
        AMQP_URL,
        &[cloudevents(SourceSpec::new(
            "orders",
            &db.url,
            &broker.exchange,
        ))],
    ))
    .await;
    let (key, created) = insert_traced(&db, "o-7").await;
    let m = broker.next(WAIT).await.expect("the message");
    let time = assert_cloudevent(&m, &key, "o-7", "OrderPlaced");
    assert_eq!(time, created, "time is created_at to the microsecond");
    assert_traced(&m);
    assert_eq!(
        m.header_str("cloudEvents_traceparent").as_deref(),
        Some(TRACEPARENT),
        "the Distributed Tracing extension"
    );
    assert_eq!(m.json(), serde_json::json!({"total": 5}), "body unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_attributes_follow_the_spec_when_reading_the_log() {
    let db = TestDb::empty("obx_ce_wal").await;
    let mut broker = TestBroker::new("#").await;
    let spec =
        cloudevents(SourceSpec::new(&db.name, &db.url, &broker.exchange).set("capture", "\"wal\""));
    let cfg = config(AMQP_URL, &[spec]);
    let (code, _, err) = run_to_end(&["migrate"], &cfg);
    assert_eq!(code, Some(0), "migrate: {err}");
    let _relay = Relay::start(&cfg).await;
    let (key, created) = insert_traced(&db, "o-8").await;
    db.client
        .batch_execute("SELECT outbox_emit('order', 'o-9', 'Emitted', '{\"n\": 1}')")
        .await
        .expect("emit");
    let row = broker.next(WAIT).await.expect("the row's message");
    let time = assert_cloudevent(&row, &key, "o-8", "OrderPlaced");
    assert_eq!(time, created, "time is created_at to the microsecond");
    assert_traced(&row);
    // an emitted message has no dedup key: its derived message_id is the id
    let emitted = broker.next(WAIT).await.expect("the emitted message");
    let id = emitted.message_id.clone().expect("a derived message_id");
    assert_cloudevent(&emitted, &id, "o-9", "Emitted");
}
