//! Hostile rows through the real database and broker: arbitrary unicode,
//! JSON nulls, huge and deeply nested payloads and headers, over-long
//! fields. Each row is either published byte-exact (the body is
//! PostgreSQL's own jsonb text, compacted) or parked with a reason; never
//! dropped, never a crash.

use std::collections::HashMap;
use std::time::Duration;

use lapin::types::AMQPValue;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{Map, Number, Value};

use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::eventually;
use crate::support::relay::{Relay, simple_config};

/// Text PostgreSQL accepts (no NUL), anything else goes.
const TEXT: &str = "[^\u{0}]{0,40}";

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
        TEXT.prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::hash_map(TEXT, inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

/// Flat objects of scalars mostly (they go out), anything sometimes.
fn headers() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::collection::hash_map(
            "[^\u{0}]{1,20}",
            prop_oneof![
                TEXT.prop_map(Value::String),
                any::<i64>().prop_map(|n| Value::Number(n.into())),
                any::<bool>().prop_map(Value::Bool),
                Just(Value::Null),
            ],
            0..5,
        )
        .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>()).to_string()),
        1 => json().prop_map(|v| v.to_string()),
        1 => Just(format!("{{\"deep\": {}}}", nested(300))),
    ]
}

fn payload() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => json().prop_map(|v| v.to_string()),
        1 => Just(nested(400)),
        1 => Just(format!("{{\"big\": \"{}\"}}", "é".repeat(500_000))),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_rows_are_published_byte_exact_or_parked_with_a_reason() {
    const ROWS: usize = 60;
    let db = TestDb::migrated("obx_hostile").await;
    let mut broker = TestBroker::new("#").await;
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    // Mostly ordinary lengths; sometimes past AMQP's 255 bytes.
    let field = || prop_oneof![8 => TEXT, 1 => "[^\u{0}]{200,300}"];
    let row = (TEXT, field(), field(), payload(), headers());
    for _ in 0..ROWS {
        let (aggregate_id, event_type, dedup_key, payload, headers) =
            row.new_tree(&mut runner).expect("generate").current();
        db.client
            .execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers, dedup_key) \
                 VALUES ('order', $1, $2, $3::text::jsonb, $4::text::jsonb, $5)",
                &[&aggregate_id, &event_type, &payload, &headers, &dedup_key],
            )
            .await
            .expect("insert a hostile row");
    }
    // What PostgreSQL made of each payload; the message must carry exactly this.
    let expected: HashMap<i64, Vec<u8>> = db
        .client
        .query("SELECT id, payload::text FROM outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get(0),
                outboxd::message::compact_json(r.get::<_, &str>(1)),
            )
        })
        .collect();

    let _relay = Relay::start(&simple_config(&db.url, &broker.exchange)).await;
    eventually(
        "every row delivered or parked",
        Duration::from_secs(60),
        || async { (db.count().await == 0).then_some(()) },
    )
    .await;
    let parked: HashMap<i64, (String, String)> = db
        .client
        .query("SELECT id, reason, last_error FROM outbox_dead", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let got = broker
        .collect(ROWS - parked.len(), Duration::from_secs(10))
        .await;
    let mut delivered = HashMap::new();
    for m in got {
        let Some(AMQPValue::LongLongInt(id)) = m.headers.get("x-outbox-id") else {
            panic!("message without x-outbox-id");
        };
        delivered.insert(*id, m.body);
    }
    for (id, body) in &expected {
        match (delivered.get(id), parked.get(id)) {
            (Some(got), None) => assert!(
                got == body,
                "row {id}: body differs from PostgreSQL's payload"
            ),
            (None, Some((reason, error))) => {
                assert_eq!(reason, "bad_row", "row {id}: {error}");
                assert!(!error.is_empty(), "row {id} parked without a reason");
            }
            (Some(_), Some(_)) => panic!("row {id} both delivered and parked"),
            (None, None) => panic!("row {id} vanished"),
        }
    }
    println!(
        "{} hostile rows: {} published byte-exact, {} parked as bad rows",
        expected.len(),
        delivered.len(),
        parked.len()
    );
    assert!(
        !delivered.is_empty() && !parked.is_empty(),
        "the mix exercises both outcomes"
    );
}
