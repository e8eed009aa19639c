//! `capture = "wal"` under faults: kill -9 of the relay while producers
//! write, PostgreSQL restarted and RabbitMQ stopped while rows flow, and one
//! transaction of 100k rows (memory stays bounded).

use std::time::Duration;

use crate::support::AMQP_URL;
use crate::support::aggregates::{Event, aggregates, check_order, produce, written};
use crate::support::db::TestDb;
use crate::support::eventually;
use crate::support::relay::{Relay, SourceSpec, config, run_to_end};
use crate::{DurableQueue, LONG, PgGuard, RabbitGuard, all_arrived, service};

/// A database with the outbox, publication and slot, and the config of
/// one wal source on it (named after the database, so its slot is its own).
async fn wal_source(prefix: &str, exchange: &str) -> (TestDb, String) {
    let db = TestDb::empty(prefix).await;
    let cfg = config(
        AMQP_URL,
        &[SourceSpec::new(&db.name, &db.url, exchange).set("capture", "\"wal\"")],
    );
    let (code, _, err) = run_to_end(&["migrate"], &cfg);
    assert_eq!(code, Some(0), "migrate: {err}");
    (db, cfg)
}

/// Peak resident memory of a process, in KiB (VmHWM).
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_kill_9_while_producers_write_keeps_every_aggregate_complete_and_in_order() {
    const EVENTS: usize = 50_000;
    let q = DurableQueue::new().await;
    let (db, cfg) = wal_source("obxw_kill9", &q.exchange).await;
    aggregates(&db, 200).await;
    let mut relay = Relay::start(&cfg).await;
    let mut producers = produce(&db, 4, 200, EVENTS);
    for (kill, at) in [(1, EVENTS as i64 / 4), (2, EVENTS as i64 / 2)] {
        eventually("the producers to get on", LONG, || async {
            (written(&db).await >= at).then_some(())
        })
        .await;
        relay.kill9();
        println!("kill {kill}: {} events written", written(&db).await);
        relay = Relay::start(&cfg).await;
    }
    while let Some(done) = producers.join_next().await {
        done.expect("producer");
    }
    eventually("the table to empty", LONG, || async {
        (db.count().await == 0).then_some(())
    })
    .await;
    drop(relay);
    let bodies = q.drain_bodies().await;
    let events: Vec<Event> = bodies.iter().map(Event::from_payload).collect();
    let seen = check_order(&db, &events).await;
    println!(
        "wal: 2 kill -9 during {EVENTS} events over 200 aggregates: all in order, {} duplicates, {} rewinds",
        seen.duplicates, seen.rewinds
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_postgres_restart_and_rabbitmq_stop_while_rows_flow_lose_nothing() {
    const ROWS: usize = 20_000;
    let q = DurableQueue::new().await;
    let (db, cfg) = wal_source("obxw_outage", &q.exchange).await;
    let mut relay = Relay::start(&cfg).await;
    relay.wait_ready(200, LONG).await;
    // Committed while the relay streams: 20 transactions of 1,000 rows.
    let mut keys = Vec::new();
    for _ in 0..20 {
        keys.extend(db.insert_rows(ROWS / 20, 100).await);
    }
    eventually("rows to flow", LONG, || async {
        (db.count().await < ROWS as i64 - 1000).then_some(())
    })
    .await;

    let pg_guard = PgGuard;
    service(
        "sh",
        &[
            "-c",
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | sort -V | tail -n 1) main restart -m fast",
        ],
    );
    drop(pg_guard);
    eventually("the relay to see the stream go", LONG, || async {
        let n = relay
            .metric(&format!(
                "outboxd_source_errors_total{{reason=\"replication\",source=\"{}\"}}",
                db.name
            ))
            .await?;
        (n >= 1.0).then_some(())
    })
    .await;
    relay.wait_ready(200, LONG).await;

    let guard = RabbitGuard;
    service("rabbitmqctl", &["stop_app"]);
    relay.wait_metric("outboxd_broker_up", 0.0, LONG).await;
    // The outage itself: a few seconds with the broker away.
    tokio::time::sleep(Duration::from_secs(3)).await;
    service("rabbitmqctl", &["start_app"]);
    drop(guard);
    relay.wait_metric("outboxd_broker_up", 1.0, LONG).await;

    let db2 = db.connect().await;
    eventually("an empty table", LONG, || async {
        let n: i64 = db2
            .query_one("SELECT count(*) FROM outbox", &[])
            .await
            .ok()?
            .get(0);
        (n == 0).then_some(())
    })
    .await;
    let duplicates = all_arrived(&keys, &q.drain().await);
    println!(
        "wal: postgres restart -m fast and rabbitmq stop_app 3 s during {ROWS} rows: all arrived, {duplicates} duplicates"
    );
    assert!(
        relay.wait_exit(Duration::ZERO).await.is_none(),
        "the relay never exits"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_a_100k_row_transaction_goes_through_in_bounded_memory() {
    const ROWS: usize = 100_000;
    let q = DurableQueue::new().await;
    let (db, cfg) = wal_source("obxw_bigtx", &q.exchange).await;
    let relay = Relay::start(&cfg).await;
    relay.wait_ready(200, LONG).await;
    let before = peak_rss_kib(relay.pid());
    // One transaction: the log brings it only once it has committed.
    let keys = db.insert_rows(ROWS, 400).await;
    eventually("the table to empty", LONG, || async {
        (db.count().await == 0).then_some(())
    })
    .await;
    let peak = peak_rss_kib(relay.pid());
    let duplicates = all_arrived(&keys, &q.drain().await);
    println!(
        "wal: one transaction of {ROWS} rows (~500-byte payloads): all arrived, {duplicates} duplicates; relay peak RSS {before} KiB before, {peak} KiB after"
    );
    // 100k rows of ~500 bytes are ~50 MB; held all at once they would show.
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB");
}
