//! The broker or a database going away and coming back (connections cut by
//! a proxy, the shared services untouched): the relay logs it, flips its
//! gauges and /readyz, reconnects, loses nothing and never exits.

use std::collections::HashSet;
use std::time::Duration;

use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::proxy::Proxy;
use crate::support::relay::{Relay, SourceSpec, config};
use crate::support::{AMQP_HOST, AMQP_URL, PG_HOST, eventually};

const WAIT: Duration = Duration::from_secs(30);

async fn all_arrive(broker: &mut TestBroker, keys: &[String]) {
    let got = broker.collect(keys.len() * 2, Duration::from_secs(3)).await;
    let ids: HashSet<String> = got.iter().filter_map(|m| m.message_id.clone()).collect();
    let missing = keys.iter().filter(|k| !ids.contains(*k)).count();
    assert_eq!(missing, 0, "{missing} of {} rows never arrived", keys.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_flips_gauges_and_readiness_and_loses_nothing() {
    let db = TestDb::migrated("obx_brokerdown").await;
    let mut broker = TestBroker::new("#").await;
    let proxy = Proxy::start(AMQP_HOST).await;
    let url = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let cfg = config(
        &url,
        &[SourceSpec::new("orders", &db.url, &broker.exchange)],
    );
    let mut relay = Relay::start(&cfg).await;
    relay.wait_ready(200, WAIT).await;
    let mut keys = db.insert_rows(500, 100).await;
    eventually("the first rows to go out", WAIT, || async {
        (db.count().await < 500).then_some(())
    })
    .await;

    proxy.cut();
    relay.wait_metric("outboxd_broker_up", 0.0, WAIT).await;
    relay.wait_ready(503, WAIT).await;
    let (_, body) = relay.readyz().await;
    assert_eq!(body["broker_up"], false, "{body}");
    keys.extend(db.insert_rows(500, 100).await);

    proxy.restore();
    relay.wait_metric("outboxd_broker_up", 1.0, WAIT).await;
    relay.wait_ready(200, WAIT).await;
    // Twice failed in full suite runs on 2026-12-06 (an empty table not
    // reached in 30 s, cause unknown): a longer bound, and on failure what
    // the relay and the table were doing, for whoever looks next.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while db.count().await != 0 {
        if std::time::Instant::now() > deadline {
            let rows = db
                .client
                .query(
                    "SELECT id, attempts, held, (available_at - now())::text, coalesce(last_error, '') \
                     FROM outbox ORDER BY id LIMIT 5",
                    &[],
                )
                .await
                .unwrap_or_default();
            for r in rows {
                let (id, attempts, held, wait, err): (i64, i32, bool, String, String) =
                    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
                eprintln!(
                    "left: id {id} attempts {attempts} held {held} available in {wait} last_error {err}"
                );
            }
            let metrics = relay.metrics().await;
            for line in metrics
                .lines()
                .filter(|l| l.starts_with("outboxd_") && !l.ends_with(" 0"))
            {
                eprintln!("metric: {line}");
            }
            let logs = relay.logs();
            for line in logs.iter().skip(logs.len().saturating_sub(60)) {
                eprintln!("log: {line}");
            }
            panic!(
                "{} rows still in the table 90 s after the broker came back",
                db.count().await
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    all_arrive(&mut broker, &keys).await;
    assert!(
        relay.wait_exit(Duration::ZERO).await.is_none(),
        "the relay never exits"
    );
    let connects = relay
        .metric("outboxd_broker_connections_total")
        .await
        .unwrap_or(0.0);
    assert!(connects >= 2.0, "it reconnected ({connects} connections)");
    assert!(!relay.log_lines_with("rabbitmq").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_flips_gauges_and_readiness_and_loses_nothing() {
    let db = TestDb::migrated("obx_dbdown").await;
    let other = TestDb::migrated("obx_dbdown_other").await;
    let mut broker = TestBroker::new("#").await;
    let proxy = Proxy::start(PG_HOST).await;
    let via_proxy = format!("postgres://root@{}/{}", proxy.addr, db.name);
    let cfg = config(
        AMQP_URL,
        &[
            SourceSpec::new("orders", &via_proxy, &broker.exchange),
            // Its database stays reachable: it must keep flowing meanwhile.
            SourceSpec::new("other", &other.url, &broker.exchange),
        ],
    );
    let mut relay = Relay::start(&cfg).await;
    relay.wait_ready(200, WAIT).await;
    let mut keys = db.insert_rows(500, 100).await;
    eventually("the first rows to go out", WAIT, || async {
        (db.count().await < 500).then_some(())
    })
    .await;

    proxy.cut();
    relay
        .wait_metric("outboxd_source_up{source=\"orders\"}", 0.0, WAIT)
        .await;
    relay.wait_ready(503, WAIT).await;
    let (_, body) = relay.readyz().await;
    assert_eq!(body["sources"][0]["database_up"], false, "{body}");
    assert!(body["sources"][0]["last_error"].is_string(), "{body}");
    // Producers write to the database directly; only the relay's path is cut.
    keys.extend(db.insert_rows(500, 100).await);
    // The other source is unaffected: its rows go out during the outage.
    other.insert_rows(200, 10).await;
    eventually(
        "the other source to drain during the outage",
        WAIT,
        || async { (other.count().await == 0).then_some(()) },
    )
    .await;
    relay
        .wait_metric("outboxd_source_up{source=\"other\"}", 1.0, WAIT)
        .await;

    proxy.restore();
    relay
        .wait_metric("outboxd_source_up{source=\"orders\"}", 1.0, WAIT)
        .await;
    relay.wait_ready(200, WAIT).await;
    let (_, body) = relay.readyz().await;
    assert!(
        body["sources"][0]["last_error"].is_null(),
        "a recovered source shows no last_error: {body}"
    );
    eventually("an empty table", WAIT, || async {
        (db.count().await == 0).then_some(())
    })
    .await;
    all_arrive(&mut broker, &keys).await;
    assert!(
        relay.wait_exit(Duration::ZERO).await.is_none(),
        "the relay never exits"
    );
    // The listener came back too: an idle insert is found by NOTIFY again.
    eventually("the listener to reconnect", WAIT, || async {
        (relay.readyz().await.1["sources"][0]["listening"] == true).then_some(())
    })
    .await;
}
