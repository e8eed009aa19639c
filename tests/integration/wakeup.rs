//! LISTEN/NOTIFY wakes an idle relay at once; the poll still finds rows
//! when no notification comes.

use std::time::{Duration, Instant};

use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::relay::{Relay, SourceSpec, config};
use crate::support::{AMQP_URL, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_relay_publishes_a_new_row_long_before_its_poll_interval() {
    let db = TestDb::migrated("obx_notify").await;
    let mut broker = TestBroker::new("#").await;
    let cfg = config(
        AMQP_URL,
        &[SourceSpec::new("orders", &db.url, &broker.exchange).set("poll_interval", "\"60s\"")],
    );
    let relay = Relay::start(&cfg).await;
    // Idle: connected, listening, first (empty) claim done.
    eventually(
        "the relay to be ready and listening",
        Duration::from_secs(20),
        || async {
            let (code, body) = relay.readyz().await;
            (code == 200 && body["sources"][0]["listening"] == true).then_some(())
        },
    )
    .await;

    let mut latencies = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        db.insert_one("OrderCreated", "", "").await;
        broker
            .next(Duration::from_secs(20))
            .await
            .expect("message arrives");
        latencies.push(start.elapsed());
    }
    println!("insert to consumer, idle relay, debug build: {latencies:?}");
    let worst = latencies.iter().max().copied().unwrap_or_default();
    // The poll would take 60 s; only the notification explains faster delivery.
    assert!(
        worst < Duration::from_secs(10),
        "woken by NOTIFY, not by the poll: {latencies:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_trigger_the_fallback_poll_still_delivers() {
    let db = TestDb::migrated("obx_poll").await;
    db.client
        .batch_execute("DROP TRIGGER outbox_notify ON outbox")
        .await
        .unwrap();
    let mut broker = TestBroker::new("#").await;
    let cfg = config(
        AMQP_URL,
        &[SourceSpec::new("orders", &db.url, &broker.exchange).set("poll_interval", "\"300ms\"")],
    );
    let _relay = Relay::start(&cfg).await;
    db.insert_one("OrderCreated", "", "").await;
    broker
        .next(Duration::from_secs(20))
        .await
        .expect("the poll finds the row");
}
