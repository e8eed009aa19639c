//! SIGTERM: drain what is committed, then exit 0 within the drain timeout.

use std::collections::HashSet;
use std::time::Duration;

use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::relay::{Relay, SourceSpec, config, simple_config};
use crate::support::{AMQP_URL, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_an_idle_relay_exits_zero() {
    let db = TestDb::migrated("obx_term_idle").await;
    let broker = TestBroker::new("#").await;
    let mut relay = Relay::start(&simple_config(&db.url, &broker.exchange)).await;
    relay.wait_ready(200, Duration::from_secs(20)).await;
    relay.signal("-TERM");
    let status = relay
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits within the drain timeout");
    assert_eq!(status.code(), Some(0));
    assert!(!relay.log_lines_with("outboxd stopped").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_zero_and_loses_nothing() {
    const ROWS: usize = 20_000;
    let db = TestDb::migrated("obx_term_load").await;
    let keys = db.insert_rows(ROWS, 100).await;
    let mut broker = TestBroker::new("#").await;
    // The drain publishes everything committed: 20k rows. The test
    // config's 5 s drain timeout is too tight for that on a loaded machine
    // (it failed when the whole suite ran at once); what this test asks is
    // a clean exit and no loss, not a speed.
    let cfg = simple_config(&db.url, &broker.exchange)
        .replace("drain_timeout = \"5s\"", "drain_timeout = \"60s\"");
    assert!(
        cfg.contains("drain_timeout = \"60s\""),
        "the drain timeout is set"
    );
    let mut relay = Relay::start(&cfg).await;
    eventually("rows to flow", Duration::from_secs(30), || async {
        (db.count().await < ROWS as i64).then_some(())
    })
    .await;
    relay.signal("-TERM");
    let status = relay
        .wait_exit(Duration::from_secs(70))
        .await
        .expect("exits in bounded time");
    assert_eq!(status.code(), Some(0));

    // Nothing lost: every row was either delivered or is still in the table.
    let left: HashSet<String> = db
        .client
        .query("SELECT dedup_key FROM outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let got = broker.collect(ROWS * 2, Duration::from_secs(2)).await;
    let sent: HashSet<String> = got.iter().filter_map(|m| m.message_id.clone()).collect();
    let lost = keys
        .iter()
        .filter(|k| !left.contains(*k) && !sent.contains(*k))
        .count();
    assert_eq!(lost, 0, "rows neither delivered nor left in the table");
    println!(
        "SIGTERM under load: {} delivered, {} left for the next start",
        sent.len(),
        left.len()
    );
}

/// No reload on SIGHUP: it drains like SIGTERM and says why it stops, so a
/// supervisor restarts outboxd with the new config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_drains_like_sigterm_says_reload_is_not_supported_and_exits_zero() {
    const ROWS: usize = 1_000;
    let db = TestDb::migrated("obx_hup").await;
    let mut keys = db.insert_rows(ROWS, 100).await;
    let mut broker = TestBroker::new("#").await;
    // Unordered: there a short claim means the table is caught up. (With
    // ordering = "aggregate" a claim covers only a share of the partitions,
    // so the drain can stop at a short claim with rows left, for SIGTERM too.)
    let cfg = config(
        AMQP_URL,
        &[SourceSpec::new("orders", &db.url, &broker.exchange).set("ordering", "\"none\"")],
    );
    let mut relay = Relay::start(&cfg).await;
    eventually("rows to flow", Duration::from_secs(30), || async {
        (db.count().await < ROWS as i64).then_some(())
    })
    .await;
    // Committed just before the signal: the drain sends these too.
    keys.extend(db.insert_rows(200, 100).await);
    let signalled = std::time::Instant::now();
    relay.signal("-HUP");
    // drain_timeout is 5 s in the test config, plus a few seconds to wind down.
    let status = relay
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("exits in bounded time");
    println!("SIGHUP: exited {:?} after the signal", signalled.elapsed());
    assert_eq!(status.code(), Some(0), "a drained exit");

    let said = relay.log_lines_with("configuration reload is not supported");
    assert_eq!(said.len(), 1, "one line says why it stops: {said:?}");
    assert_eq!(said[0]["signal"], "SIGHUP", "{}", said[0]);
    assert!(!relay.log_lines_with("outboxd stopped").is_empty());
    assert_eq!(db.count().await, 0, "drained: no committed row is left");
    let got = broker.collect(keys.len() * 2, Duration::from_secs(2)).await;
    let sent: HashSet<String> = got.iter().filter_map(|m| m.message_id.clone()).collect();
    let missing = keys.iter().filter(|k| !sent.contains(*k)).count();
    assert_eq!(missing, 0, "rows committed before the signal never arrived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_of_any_kind_during_the_drain_exits_at_once_with_130() {
    const ROWS: usize = 20_000;
    let db = TestDb::migrated("obx_term_twice").await;
    db.insert_rows(ROWS, 100).await;
    let broker = TestBroker::new("#").await;
    let mut relay = Relay::start(&simple_config(&db.url, &broker.exchange)).await;
    eventually("rows to flow", Duration::from_secs(30), || async {
        (db.count().await < ROWS as i64).then_some(())
    })
    .await;
    relay.signal("-TERM");
    eventually("the drain to start", Duration::from_secs(10), || async {
        (!relay.log_lines_with("shutdown requested").is_empty()).then_some(())
    })
    .await;
    // A backlog this size takes seconds to drain; this comes well before.
    relay.signal("-HUP");
    let status = relay
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("exits at once");
    assert_eq!(status.code(), Some(130));
    let said = relay.log_lines_with("second signal");
    assert_eq!(said.len(), 1, "{said:?}");
    assert_eq!(said[0]["signal"], "SIGHUP", "{}", said[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_cut_short_by_its_timeout_counts_the_rows_left_and_exits_3() {
    let db = TestDb::migrated("obx_term_stuck").await;
    let broker = TestBroker::new("#").await;
    let mut relay = Relay::start(&simple_config(&db.url, &broker.exchange)).await;
    // A batch stuck settling: parking its bad row waits for a lock the
    // test holds on the dead-letter table (reads still pass).
    let mut locker = db.connect().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE outbox_dead IN SHARE MODE")
        .await
        .unwrap();
    let bad = db.insert_one("E", "headers", "'[1]'").await;
    eventually("the park to wait for the lock", Duration::from_secs(20), || async {
        let waiting: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'outbox_dead'::regclass",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (waiting > 0).then_some(())
    })
    .await;
    relay.signal("-TERM");
    // drain_timeout is 5 s in the test config, plus a few seconds to wind down.
    let status = relay
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("exits in bounded time");
    lock.rollback().await.unwrap();
    assert_eq!(
        status.code(),
        Some(3),
        "a distinct code for rows left behind"
    );
    let lines = relay.log_lines_with("drain time is up");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["rows"], 1, "{}", lines[0]);
    assert!(
        db.row_state(bad).await.is_some(),
        "the row stays in the outbox"
    );
}

/// The default ordering claims a share of the partitions at a time: the
/// drain must not stop at the first short claim while other partitions,
/// or rows released by the last settled batches, still hold committed rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_in_aggregate_order_leaves_no_committed_row_behind() {
    let db = TestDb::migrated("obx_drain_agg").await;
    let mut broker = TestBroker::new("#").await;
    let mut relay = Relay::start(&simple_config(&db.url, &broker.exchange)).await;
    // A relay that owns no partition yet (signalled within its first
    // rebalance) has nothing it may claim: it exits and leaves the rows
    // to the next start. Here it has joined.
    relay
        .wait_metric(
            "outboxd_partitions_owned{source=\"orders\"}",
            64.0,
            Duration::from_secs(15),
        )
        .await;
    // Three rows per aggregate, so draining also needs released rows.
    let keys: Vec<String> = db
        .client
        .query(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'order', 'o-' || (g % 400), 'E', jsonb_build_object('seq', g) \
             FROM generate_series(1, 1200) g ORDER BY g RETURNING dedup_key",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    relay.signal("-TERM");
    let status = relay
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("exits in bounded time");
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        db.count().await,
        0,
        "every committed row was sent before exit"
    );
    let got = broker.collect(keys.len() * 2, Duration::from_secs(2)).await;
    let sent: HashSet<String> = got.iter().filter_map(|m| m.message_id.clone()).collect();
    assert!(keys.iter().all(|k| sent.contains(k)), "every row arrived");
}
