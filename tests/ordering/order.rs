//! Three relays on one table, four producers, 50k events over 500
//! aggregates: every aggregate arrives complete and in order.

use std::time::{Duration, Instant};

use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::relay::Relay;
use crate::{aggregates, balanced, check_order, ordered_config, produce, receive};

const EVENTS: usize = 50_000;
const AGGREGATES: usize = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_keep_every_aggregate_in_order() {
    let db = TestDb::migrated("obx_order").await;
    aggregates(&db, AGGREGATES).await;
    let mut broker = TestBroker::new("#").await;
    let cfg = ordered_config(&db, &broker.exchange, "200ms");
    let relays = [
        Relay::start(&cfg).await,
        Relay::start(&cfg).await,
        Relay::start(&cfg).await,
    ];
    let started = Instant::now();
    let mut producers = produce(&db, 4, AGGREGATES, EVENTS);
    let events = receive(&mut broker, EVENTS, true, Duration::from_secs(300), |_| {}).await;
    let elapsed = started.elapsed();
    while let Some(done) = producers.join_next().await {
        done.expect("producer finished");
    }
    let duplicates = check_order(&db, &events).await.duplicates;
    let counts = balanced(&relays.iter().collect::<Vec<_>>(), Duration::from_secs(10)).await;
    let published: Vec<f64> = {
        let mut v = Vec::new();
        for r in &relays {
            v.push(
                r.metric("outboxd_messages_published_total{source=\"orders\"}")
                    .await
                    .unwrap_or(0.0),
            );
        }
        v
    };
    println!(
        "3 relays, 4 producers: {EVENTS} events over {AGGREGATES} aggregates in order in {:.1} s \
         ({:.0} events/s), {duplicates} duplicates; partitions owned {counts:?}; published per relay {published:?}",
        elapsed.as_secs_f64(),
        EVENTS as f64 / elapsed.as_secs_f64()
    );
    // Every relay did part of the work: none sat idle.
    assert!(
        published.iter().all(|n| *n > 0.0),
        "a relay published nothing: {published:?}"
    );
    assert_eq!(db.count().await, 0, "the outbox is empty");
}
