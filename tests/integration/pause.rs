//! `outboxd pause` / `resume`: recorded in the database, honoured by every
//! relay on the table (polling and `capture = "wal"`); while paused, rows
//! accumulate in the outbox and nothing is lost; resume delivers them all.

use std::time::Duration;

use crate::status::{source, status_json};
use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::relay::{Relay, SourceSpec, config, run_to_end};
use crate::support::{AMQP_URL, eventually};

const WAIT: Duration = Duration::from_secs(30);
const PAUSED: &str = "outboxd_source_paused{source=\"orders\"}";
/// How long a paused source is watched for a message that must not come.
const QUIET: Duration = Duration::from_secs(2);

fn pause(cfg: &str, what: &str) -> String {
    let (code, out, err) = run_to_end(&[what, "--source", "orders"], cfg);
    assert_eq!(code, Some(0), "{what}: {out} {err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_rows_back_from_every_relay_even_one_started_while_paused_and_resume_delivers_them_all()
 {
    let db = TestDb::migrated("obx_pause").await;
    let mut broker = TestBroker::new("order.#").await;
    let cfg = config(
        AMQP_URL,
        &[SourceSpec::new("orders", &db.url, &broker.exchange)],
    );
    let first = Relay::start(&cfg).await;
    let second = Relay::start(&cfg).await;
    db.insert_rows(1, 10).await;
    assert!(
        broker.next(WAIT).await.is_some(),
        "running before the pause"
    );

    let out = pause(&cfg, "pause");
    assert!(out.starts_with("paused source \"orders\""), "{out}");
    for relay in [&first, &second] {
        relay.wait_metric(PAUSED, 1.0, WAIT).await;
        let (code, ready) = relay.readyz().await;
        assert_eq!(code, 200, "a paused source stays ready: {ready}");
        assert_eq!(ready["sources"][0]["paused"], true, "{ready}");
    }
    db.insert_rows(20, 10).await;
    // A relay that starts while the source is paused claims nothing either.
    let third = Relay::start(&cfg).await;
    third.wait_metric(PAUSED, 1.0, WAIT).await;
    assert!(
        broker.next(QUIET).await.is_none(),
        "nothing is published while paused"
    );
    assert_eq!(db.count().await, 20, "the rows wait in the outbox");

    // Status sees the pause, the backlog, and the three relays with every
    // partition between them (once the third has taken its share).
    let s = eventually("three relays sharing 64 partitions", WAIT, || async {
        let (code, json, err) = status_json(&cfg);
        assert_eq!(code, Some(0), "{err}");
        let s = source(&json, "orders").clone();
        let relays = s["relays"].as_array().expect("relays").clone();
        let owned: Vec<usize> = relays
            .iter()
            .map(|r| r["partitions"].as_array().map_or(0, Vec::len))
            .collect();
        (relays.len() == 3 && owned.iter().sum::<usize>() == 64 && owned.iter().all(|n| *n > 0))
            .then_some(s)
    })
    .await;
    assert_eq!(s["paused"], true, "{s}");
    assert!(s["paused_since"].is_string(), "{s}");
    assert_eq!(s["backlog"], 20, "{s}");

    // Idempotent: a second pause changes nothing and says so.
    let out = pause(&cfg, "pause");
    assert!(out.contains("already paused"), "{out}");

    let out = pause(&cfg, "resume");
    assert!(out.starts_with("resumed source \"orders\""), "{out}");
    let got = broker.collect(20, WAIT).await;
    assert_eq!(got.len(), 20, "every row that waited is delivered");
    eventually("the outbox to empty", WAIT, || async {
        (db.count().await == 0).then_some(())
    })
    .await;
    for relay in [&first, &second, &third] {
        relay.wait_metric(PAUSED, 0.0, WAIT).await;
    }
    let out = pause(&cfg, "resume");
    assert!(out.contains("was not paused"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_names_a_source_it_cannot_pause_and_says_to_migrate_an_older_table() {
    let db = TestDb::migrated("obx_pause_old").await;
    let cfg = config(
        AMQP_URL,
        &[
            SourceSpec::new("orders", &db.url, "ex"),
            SourceSpec::new("gone", "postgres://root@127.0.0.1:1/nowhere", "ex"),
        ],
    );
    for (source, needle) in [("nope", "\"nope\""), ("gone", "\"gone\"")] {
        let (code, _, err) = run_to_end(&["pause", "--source", source], &cfg);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains(needle), "{err}");
    }
    // A flag table made before pause existed.
    db.client
        .batch_execute("ALTER TABLE outbox_wakeup DROP COLUMN paused")
        .await
        .expect("drop the column");
    let (code, _, err) = run_to_end(&["pause", "--source", "orders"], &cfg);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("\"orders\"") && err.contains("outboxd migrate"),
        "{err}"
    );
    let (code, json, err) = status_json(&cfg);
    assert_eq!(code, Some(1), "gone is unreadable: {err}");
    assert_eq!(source(&json, "orders")["paused"], serde_json::Value::Null);
    // migrate adds the column back; pause works again.
    let (code, _, err) = run_to_end(
        &["migrate"],
        &config(AMQP_URL, &[SourceSpec::new("orders", &db.url, "ex")]),
    );
    assert_eq!(code, Some(0), "{err}");
    pause(&cfg, "pause");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_wal_source_closes_its_stream_and_resume_sends_what_accumulated() {
    let db = TestDb::empty("obxw_pause").await;
    let mut broker = TestBroker::new("order.#").await;
    // The source is named "orders"; the slot is named after the database.
    let slot = format!("outboxd_{}", db.name);
    let cfg = config(
        AMQP_URL,
        &[SourceSpec::new("orders", &db.url, &broker.exchange)
            .set("capture", "\"wal\"")
            .set("slot", &format!("{slot:?}"))],
    );
    let (code, _, err) = run_to_end(&["migrate"], &cfg);
    assert_eq!(code, Some(0), "migrate: {err}");
    let relay = Relay::start(&cfg).await;
    db.insert_rows(1, 10).await;
    assert!(
        broker.next(WAIT).await.is_some(),
        "streaming before the pause"
    );

    pause(&cfg, "pause");
    relay.wait_metric(PAUSED, 1.0, WAIT).await;
    eventually("the replication connection to close", WAIT, || async {
        let active: bool = db
            .client
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("the slot exists")
            .get(0);
        (!active).then_some(())
    })
    .await;
    let (code, ready) = relay.readyz().await;
    assert_eq!(code, 200, "{ready}");
    assert_eq!(ready["sources"][0]["paused"], true, "{ready}");
    db.insert_rows(5, 10).await;
    assert!(
        broker.next(QUIET).await.is_none(),
        "nothing is published while paused"
    );
    let (code, json, err) = status_json(&cfg);
    assert_eq!(code, Some(0), "{err}");
    let s = source(&json, "orders");
    assert_eq!(
        (s["capture"].as_str(), s["paused"].as_bool()),
        (Some("wal"), Some(true)),
        "{s}"
    );
    assert_eq!(s["slot"]["exists"], true, "{s}");
    assert_eq!(s["slot"]["active"], false, "{s}");
    assert!(s["slot"]["retained_bytes"].as_i64().is_some(), "{s}");

    pause(&cfg, "resume");
    let got = broker.collect(5, WAIT).await;
    assert_eq!(got.len(), 5, "every row that waited is delivered");
    eventually("the outbox to empty", WAIT, || async {
        (db.count().await == 0).then_some(())
    })
    .await;
    let (_, json, _) = status_json(&cfg);
    let s = source(&json, "orders");
    assert_eq!(s["slot"]["active"], true, "streaming again: {s}");
    assert_eq!(s["relays"].as_array().map(Vec::len), Some(1), "{s}");
}
