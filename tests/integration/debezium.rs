//! A table laid out for Debezium's outbox event router, created exactly as
//! its documentation shows, works unchanged for its producers: `migrate`
//! adds the forwarding trigger, producers insert only Debezium's columns
//! (and may delete the row at once, as Debezium's examples do), and every
//! row arrives with the row's uuid as its message_id, in aggregate order.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::types::AMQPValue;

use crate::support::broker::{Received, TestBroker};
use crate::support::db::TestDb;
use crate::support::relay::{Relay, SourceSpec, config, run_to_end};
use crate::support::{AMQP_URL, eventually};

const WAIT: Duration = Duration::from_secs(30);

/// Debezium's "Basic outbox table" (outbox-event-router.adoc), column for
/// column: uuid id, three varchar(255), a nullable jsonb payload.
const DEBEZIUM_TABLE: &str = "CREATE TABLE outboxevent (
    id            uuid                   NOT NULL,
    aggregatetype character varying(255) NOT NULL,
    aggregateid   character varying(255) NOT NULL,
    type          character varying(255) NOT NULL,
    payload       jsonb
)";

fn spec(db: &TestDb, exchange: &str) -> SourceSpec {
    // Named after the database: a wal source's slot must be unique.
    SourceSpec::new(&db.name, &db.url, exchange)
        .set("table", "\"outboxevent\"")
        .set("layout", "\"debezium\"")
}

async fn migrate(cfg: &str) {
    let (code, _, err) = run_to_end(&["migrate"], cfg);
    assert_eq!(code, Some(0), "migrate: {err}");
}

/// Inserts `per_aggregate` events for each of `aggregates`, interleaved, a
/// few per transaction, as a Debezium producer does: only its columns.
/// Every third transaction deletes its rows right after inserting them
/// (Debezium's examples do, since the log holds the insert). Returns the
/// uuids per aggregate in insert order.
async fn produce(
    db: &TestDb,
    aggregates: usize,
    per_aggregate: usize,
) -> BTreeMap<String, Vec<String>> {
    let mut client = db.connect().await;
    let mut sent: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut seq = 0;
    for round in 0..per_aggregate {
        let tx = client.transaction().await.expect("begin");
        let mut ids = Vec::new();
        for a in 0..aggregates {
            let aggregate = format!("o-{a}");
            let id: String = tx
                .query_one(
                    "INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload) \
                     VALUES (gen_random_uuid(), 'Order', $1, 'OrderUpdated', jsonb_build_object('seq', $2::int)) \
                     RETURNING id::text",
                    &[&aggregate, &seq],
                )
                .await
                .expect("a producer's insert")
                .get(0);
            seq += 1;
            sent.entry(aggregate).or_default().push(id.clone());
            ids.push(id);
        }
        if round % 3 == 0 {
            tx.execute("DELETE FROM outboxevent WHERE id::text = ANY($1)", &[&ids])
                .await
                .expect("a producer's delete");
        }
        tx.commit().await.expect("commit");
    }
    sent
}

/// message_ids per aggregate id, in arrival order.
fn by_aggregate(messages: &[Received]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in messages {
        let aggregate = m.header_str("x-aggregate-id").expect("aggregate header");
        out.entry(aggregate)
            .or_default()
            .push(m.message_id.clone().expect("message_id"));
    }
    out
}

async fn relay_table_count(db: &TestDb) -> i64 {
    db.client
        .query_one("SELECT count(*) FROM outboxevent_outboxd", &[])
        .await
        .expect("the relay's table exists")
        .get(0)
}

/// Both capture modes: every row arrives once, message_id = the uuid,
/// each aggregate in insert order, the producers' rows left as they are.
async fn every_row_arrives_in_aggregate_order(capture: &str, prefix: &str) {
    let db = TestDb::empty(prefix).await;
    db.client
        .batch_execute(DEBEZIUM_TABLE)
        .await
        .expect("create Debezium's table");
    let mut broker = TestBroker::new("#").await;
    let cfg = config(
        AMQP_URL,
        &[spec(&db, &broker.exchange).set("capture", &format!("{capture:?}"))],
    );
    migrate(&cfg).await;
    let sent = produce(&db, 5, 30).await;
    let relay = Relay::start(&cfg).await;

    let messages = broker.collect(150, WAIT).await;
    assert_eq!(messages.len(), 150, "every row arrives");
    assert_eq!(by_aggregate(&messages), sent, "message_id = id, in order");
    let m = &messages[0];
    assert_eq!(m.routing_key, "Order.OrderUpdated");
    assert_eq!(m.kind.as_deref(), Some("OrderUpdated"));
    assert_eq!(m.header_str("x-aggregate-type").as_deref(), Some("Order"));
    assert_eq!(m.json()["seq"], 0, "the jsonb payload is the body");
    assert!(
        broker.next(Duration::from_millis(500)).await.is_none(),
        "no duplicates"
    );
    eventually("the relay's table to empty", WAIT, || async {
        (relay_table_count(&db).await == 0).then_some(())
    })
    .await;
    // outboxd never touches the producers' rows: 2 of 3 transactions kept theirs.
    let kept: i64 = db
        .client
        .query_one("SELECT count(*) FROM outboxevent", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 100);
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debezium_table_is_relayed_unchanged_with_its_uuid_as_message_id() {
    every_row_arrives_in_aggregate_order("poll", "obxdbz_poll").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debezium_table_is_relayed_from_the_log_with_capture_wal() {
    every_row_arrives_in_aggregate_order("wal", "obxdbz_wal").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_columns_become_headers_and_a_text_payload_is_json_or_a_string() {
    let db = TestDb::empty("obxdbz_text").await;
    db.client
        .batch_execute(
            "CREATE TABLE outboxevent (
                id            uuid                   NOT NULL,
                aggregatetype character varying(255) NOT NULL,
                aggregateid   character varying(255) NOT NULL,
                type          character varying(255) NOT NULL,
                payload       text,
                tenant        text,
                priority      integer
            )",
        )
        .await
        .expect("create the table");
    let mut broker = TestBroker::new("#").await;
    let cfg = config(
        AMQP_URL,
        &[spec(&db, &broker.exchange)
            .set("columns", "{ header_columns = [\"tenant\", \"priority\"] }")],
    );
    migrate(&cfg).await;
    let relay = Relay::start(&cfg).await;
    let cases = [
        // JSON text is sent as that JSON
        (
            Some(r#"{"total": 42}"#),
            Some("acme"),
            Some(3),
            &br#"{"total":42}"#[..],
        ),
        // other text is sent as a JSON string, never refused
        (
            Some("plain words"),
            Some("acme"),
            None,
            &br#""plain words""#[..],
        ),
        // a NULL payload (Debezium's is nullable) is JSON null
        (None, None, None, &b"null"[..]),
    ];
    for (i, (payload, tenant, priority, body)) in cases.into_iter().enumerate() {
        let id: String = db
            .client
            .query_one(
                "INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload, tenant, priority) \
                 VALUES (gen_random_uuid(), 'Order', 'o-1', 'Noted', $1, $2, $3) RETURNING id::text",
                &[&payload, &tenant, &priority],
            )
            .await
            .expect("insert")
            .get(0);
        let m = broker.next(WAIT).await.expect("the message arrives");
        assert_eq!(m.message_id.as_deref(), Some(id.as_str()), "case {i}");
        assert_eq!(
            m.body,
            body,
            "case {i}: {}",
            String::from_utf8_lossy(&m.body)
        );
        assert_eq!(m.content_type.as_deref(), Some("application/json"));
        assert_eq!(m.header_str("tenant").as_deref(), tenant, "case {i}");
        assert_eq!(
            m.headers.get("priority"),
            priority.map(|p| AMQPValue::LongLongInt(p.into())).as_ref(),
            "case {i}: a NULL column sends no header"
        );
    }
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapping_naming_a_missing_column_is_refused_naming_the_key_and_source() {
    let db = TestDb::empty("obxdbz_bad").await;
    db.client
        .batch_execute(DEBEZIUM_TABLE)
        .await
        .expect("create Debezium's table");
    let cfg = config(
        AMQP_URL,
        &[spec(&db, "").set("columns", "{ payload = \"body\" }")],
    );
    let want = "columns.payload = \"body\": public.outboxevent has no such column";

    let (code, out, _) = run_to_end(&["check"], &cfg);
    assert_eq!(code, Some(1), "{out}");
    let line = out
        .lines()
        .find(|l| l.contains(want))
        .unwrap_or_else(|| panic!("no line names the key: {out}"));
    assert!(
        line.starts_with(&format!("FAIL source {} columns:", db.name)),
        "{line}"
    );

    let (code, _, err) = run_to_end(&["migrate"], &cfg);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(want), "{err}");
    assert!(err.contains(&format!("source {:?}", db.name)), "{err}");
    // Nothing was made: producers' inserts go on as before.
    let triggers: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'outboxevent'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(triggers, 0, "no trigger that would fail their inserts");
    db.client
        .execute(
            "INSERT INTO outboxevent VALUES (gen_random_uuid(), 'Order', 'o-1', 'Created', '{}')",
            &[],
        )
        .await
        .expect("producers are not affected");
}

/// A mapping changed in the config without running `migrate` again: the
/// old trigger keeps forwarding under the old mapping, and `run` says so
/// at start (it said the trigger was in place before the change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_warns_when_the_trigger_was_made_for_another_mapping() {
    let db = TestDb::empty("obxdbz_stale").await;
    db.client
        .batch_execute(&format!(
            "{DEBEZIUM_TABLE}; ALTER TABLE outboxevent ADD COLUMN tenant text"
        ))
        .await
        .expect("create Debezium's table with a tenant column");
    let mut broker = TestBroker::new("#").await;
    let migrated = config(AMQP_URL, &[spec(&db, &broker.exchange)]);
    migrate(&migrated).await;
    let in_place = |relay: &Relay| {
        !relay
            .log_lines_with("forwarding trigger in place")
            .is_empty()
    };
    let relay = Relay::start(&migrated).await;
    eventually("the start-up look at the trigger", WAIT, || async {
        in_place(&relay).then_some(())
    })
    .await;
    drop(relay);

    // Now tenant should become a header, but migrate is not run again.
    let changed = config(
        AMQP_URL,
        &[spec(&db, &broker.exchange).set("columns", "{ header_columns = [\"tenant\"] }")],
    );
    let relay = Relay::start(&changed).await;
    let warning = eventually("a warning about the stale trigger", WAIT, || async {
        relay
            .log_lines_with("was made for another column mapping")
            .into_iter()
            .next()
    })
    .await;
    assert_eq!(warning["level"], "WARN", "{warning}");
    assert!(!in_place(&relay), "no all-clear with a stale trigger");
    // The old trigger still forwards, under the old mapping: no tenant header.
    db.client
        .execute(
            "INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload, tenant) \
             VALUES (gen_random_uuid(), 'Order', 'o-1', 'OrderPlaced', '{}', 't-1')",
            &[],
        )
        .await
        .expect("a producer's insert");
    let m = broker.next(WAIT).await.expect("the row arrives");
    assert_eq!(m.header_str("tenant"), None);
}
