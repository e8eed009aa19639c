//! `ordering = "aggregate"` sends several rows of an aggregate at once, in
//! order. A refused row stops its aggregate there: the later rows the
//! broker took anyway are order breaks (counted, logged with both ids),
//! they stay in the outbox, held, and go again after the refused row, in
//! order. `ordering = "aggregate_strict"` has one row of an aggregate in
//! flight at a time, so the same refusal breaks nothing.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::failures::parked;
use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::proxy::Proxy;
use crate::support::relay::{Relay, SourceSpec, config, run_to_end};
use crate::support::{AMQP_HOST, AMQP_URL, eventually};

const WAIT: Duration = Duration::from_secs(20);

/// Aggregate a: A1 A2 A3 A4 A5, A3 unroutable; aggregate b: B1 B2. All
/// committed in one transaction, before the relay starts, so each
/// aggregate's rows are claimed together. Returns A3's id.
async fn fill(db: &TestDb) -> i64 {
    let rows = db
        .client
        .query(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, routing_key) \
             SELECT 'order', a, e, '{}', CASE WHEN e = 'A3' THEN 'nowhere.a' END \
             FROM (VALUES (1, 'a', 'A1'), (2, 'a', 'A2'), (3, 'b', 'B1'), (4, 'a', 'A3'), \
                          (5, 'a', 'A4'), (6, 'b', 'B2'), (7, 'a', 'A5')) v(n, a, e) \
             ORDER BY n RETURNING id, event_type",
            &[],
        )
        .await
        .expect("insert");
    rows.iter()
        .find(|r| r.get::<_, &str>(1) == "A3")
        .map(|r| r.get(0))
        .expect("A3 inserted")
}

fn kinds(messages: &[crate::support::broker::Received], prefix: char) -> Vec<String> {
    messages
        .iter()
        .filter_map(|m| m.kind.clone())
        .filter(|k| k.starts_with(prefix))
        .collect()
}

async fn held_rows(db: &TestDb) -> Vec<String> {
    db.client
        .query("SELECT event_type FROM outbox WHERE held ORDER BY id", &[])
        .await
        .expect("held rows")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_row_stops_its_aggregate_and_the_rest_goes_again_in_order() {
    let db = TestDb::migrated("obx_pipe").await;
    let a3 = fill(&db).await;
    let mut broker = TestBroker::new("order.#").await;
    let cfg = config(
        AMQP_URL,
        &[SourceSpec::new("orders", &db.url, &broker.exchange).set("max_attempts", "1")],
    );
    let relay = Relay::start(&cfg).await;

    // A4 and A5 went out in A3's batch, behind it on the same channel, and
    // the broker took them: consumers see them before A3.
    let first = broker.collect(6, Duration::from_secs(2)).await;
    assert_eq!(kinds(&first, 'A'), ["A1", "A2", "A4", "A5"]);
    assert_eq!(kinds(&first, 'B'), ["B1", "B2"], "b is not held back");
    if tokio::time::timeout(WAIT, parked(&db, a3)).await.is_err() {
        panic!("A3 not parked; relay log:\n{}", relay.logs().join("\n"));
    }
    relay
        .wait_metric("outboxd_order_breaks_total{source=\"orders\"}", 2.0, WAIT)
        .await;
    let breaks = relay.log_lines_with("order break");
    assert_eq!(breaks.len(), 2, "one line per break: {breaks:?}");
    assert_eq!(breaks[0]["refused_row_id"], a3, "{breaks:?}");
    // They were not counted as published and stay, held behind A3.
    assert_eq!(held_rows(&db).await, ["A4", "A5"]);

    // Route A3 and replay it: A3, then A4 and A5 again, in order.
    broker.bind("nowhere.#").await;
    let (code, _, err) = run_to_end(
        &[
            "dead-letters",
            "replay",
            "--source",
            "orders",
            "--id",
            &a3.to_string(),
        ],
        &cfg,
    );
    assert_eq!(code, Some(0), "{err}");
    let again = broker.collect(3, WAIT).await;
    assert_eq!(kinds(&again, 'A'), ["A3", "A4", "A5"]);
    eventually("an empty outbox", WAIT, || async {
        (db.count().await == 0).then_some(())
    })
    .await;
    assert_eq!(
        relay
            .metric("outboxd_order_breaks_total{source=\"orders\"}")
            .await,
        Some(2.0),
        "the replay broke nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_ordering_sends_nothing_behind_a_refused_row() {
    let db = TestDb::migrated("obx_strict").await;
    let a3 = fill(&db).await;
    let mut broker = TestBroker::new("order.#").await;
    let cfg = config(
        AMQP_URL,
        &[SourceSpec::new("orders", &db.url, &broker.exchange)
            .set("max_attempts", "1")
            .set("ordering", "\"aggregate_strict\"")],
    );
    let relay = Relay::start(&cfg).await;
    parked(&db, a3).await;
    let first = broker.collect(4, Duration::from_secs(2)).await;
    assert_eq!(kinds(&first, 'A'), ["A1", "A2"]);
    assert_eq!(kinds(&first, 'B'), ["B1", "B2"]);
    relay
        .wait_metric("outboxd_held_by_dead_letters{source=\"orders\"}", 2.0, WAIT)
        .await;
    assert_eq!(
        relay
            .metric("outboxd_order_breaks_total{source=\"orders\"}")
            .await,
        Some(0.0)
    );
}

/// Connections cut while two aggregates stream: what was in flight goes
/// again from each aggregate's first unconfirmed row, so after dropping
/// duplicates by message_id each aggregate still arrives complete and in
/// order, and nothing counts as an order break.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_repeat_each_aggregate_in_order() {
    const ROWS: i64 = 6_000;
    let db = TestDb::migrated("obx_pipecut").await;
    db.client
        .batch_execute(&format!(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'order', CASE WHEN g % 3 = 0 THEN 'b' ELSE 'a' END, 'E', \
                    jsonb_build_object('seq', g) \
             FROM generate_series(1, {ROWS}) g ORDER BY g"
        ))
        .await
        .expect("fill");
    let mut broker = TestBroker::new("#").await;
    let proxy = Proxy::start(AMQP_HOST).await;
    let url = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let relay = Relay::start(&config(
        &url,
        &[SourceSpec::new("orders", &db.url, &broker.exchange)],
    ))
    .await;
    // Cut while a batch is in flight. Where the consumer has got to says
    // nothing about the relay (it can be thousands of rows ahead of the
    // queue's reader), so the table drives the cuts: at each step the
    // proxy first blackholes the connection, so nothing the relay publishes
    // from then on can be confirmed, and waits for the relay to claim a
    // batch (it then publishes into the blackhole) or, if its pipeline is
    // already full of unconfirmed batches, for a moment to pass. The cut
    // then fails those rows (the first unconfirmed row of an aggregate
    // counts a failure; the rows held behind it do not).
    let failed_in_flight = || async {
        let mut failed = 0.0;
        for reason in ["connection", "timeout"] {
            let series =
                format!("outboxd_publish_failures_total{{reason=\"{reason}\",source=\"orders\"}}");
            failed += relay.metric(&series).await.unwrap_or(0.0);
        }
        failed
    };
    let claims = || async {
        relay
            .metric("outboxd_batch_size_count{source=\"orders\"}")
            .await
            .unwrap_or(0.0)
    };
    let mut cuts = 0;
    for left in (1..=10).map(|k| ROWS - 500 * k) {
        eventually("the relay to work the table down", WAIT, || async {
            (db.count().await <= left).then_some(())
        })
        .await;
        let before = claims().await;
        proxy.blackhole();
        let claimed = tokio::time::timeout(Duration::from_secs(2), async {
            while claims().await <= before {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .is_ok();
        let remaining = db.count().await;
        assert!(
            remaining > 0,
            "rows left at cut {} (at {left} rows; claimed one: {claimed})",
            cuts + 1
        );
        proxy.cut();
        relay.wait_metric("outboxd_broker_up", 0.0, WAIT).await;
        proxy.restore();
        // Back on the broker before the next cut: blackholed again before
        // it reconnects, the relay has nothing in flight for the cut to hit
        // (a relay that had worked the table down past the next steps went
        // from cut to cut so, and no cut hit a batch).
        relay.wait_metric("outboxd_broker_up", 1.0, WAIT).await;
        cuts += 1;
        if cuts >= 3 && failed_in_flight().await > 0.0 {
            break;
        }
    }
    eventually("an empty table", Duration::from_secs(60), || async {
        (db.count().await == 0).then_some(())
    })
    .await;
    let got = broker
        .collect(ROWS as usize * 2, Duration::from_secs(3))
        .await;
    let mut seen = HashSet::new();
    let mut last: HashMap<String, i64> = HashMap::new();
    for m in &got {
        let Some(id) = m.message_id.clone() else {
            continue;
        };
        if !seen.insert(id) {
            continue; // a duplicate, dropped by message_id
        }
        let seq = m.json()["seq"].as_i64().expect("seq in the payload");
        let aggregate = m.header_str("x-aggregate-id").expect("aggregate header");
        let previous = last.insert(aggregate.clone(), seq).unwrap_or(0);
        assert!(
            seq > previous,
            "aggregate {aggregate}: {seq} arrived after {previous}"
        );
    }
    assert_eq!(seen.len() as i64, ROWS, "every row arrived");
    let failed = failed_in_flight().await;
    let held_again = relay.log_lines_with("order break").len();
    assert!(failed > 0.0, "one of {cuts} cuts hit a batch in flight");
    assert_eq!(held_again, 0, "a cut breaks no order");
    assert_eq!(
        relay
            .metric("outboxd_order_breaks_total{source=\"orders\"}")
            .await,
        Some(0.0)
    );
    println!(
        "{ROWS} rows, {cuts} cuts: {failed} rows failed in flight, {} deliveries, {} duplicates",
        got.len(),
        got.len() - seen.len()
    );
}
