//! A rolling restart under load, as a deployment does it: three relays on
//! one table, each stopped with SIGTERM and replaced, one at a time, while
//! producers write. Partitions move twice per restart (to the survivors,
//! then back to the new relay); the batch locks must keep every row on one
//! sender, so nothing is sent twice, and every aggregate arrives complete
//! and in order.

use std::time::{Duration, Instant};

use crate::support::aggregates::{Load, produce_with, written};
use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::relay::Relay;
use crate::{aggregates, balanced, check_order, ordered_config, receive};

const EVENTS: usize = 30_000;
const AGGREGATES: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_three_relays_sends_nothing_twice() {
    let db = TestDb::migrated("obx_rolling").await;
    aggregates(&db, AGGREGATES).await;
    let mut broker = TestBroker::new("#").await;
    let cfg = ordered_config(&db, &broker.exchange, "1s");
    let mut relays = [
        Relay::start(&cfg).await,
        Relay::start(&cfg).await,
        Relay::start(&cfg).await,
    ];
    balanced(&relays.iter().collect::<Vec<_>>(), Duration::from_secs(20)).await;
    // Paced, so the load lasts through all three restarts.
    let mut producers = produce_with(
        &db,
        Load {
            producers: 4,
            events: EVENTS,
            pick: std::sync::Arc::new(|rng| rng.usize(1..=AGGREGATES)),
            pause: Duration::from_millis(4),
        },
    );
    let consumer = tokio::spawn(async move {
        let events = receive(&mut broker, EVENTS, true, Duration::from_secs(300), |_| {}).await;
        (broker, events)
    });

    let started = Instant::now();
    let mut steps = Vec::new();
    for i in 0..relays.len() {
        // Restart i once a (i+1)/4 of the events are written.
        let at = (i + 1) * EVENTS / 4;
        let before = crate::support::eventually(
            "the producers to write on",
            Duration::from_secs(120),
            || async {
                let n = written(&db).await;
                (n as usize >= at).then_some(n)
            },
        )
        .await;
        assert!(
            (before as usize) < EVENTS,
            "the producers finished before restart {i}: the restart is not under load"
        );
        relays[i].signal("-TERM");
        let status = relays[i]
            .wait_exit(Duration::from_secs(60))
            .await
            .expect("the relay stops within its drain timeout");
        assert!(status.success(), "relay {i} stopped with {status:?}");
        relays[i] = Relay::start(&cfg).await;
        let counts = balanced(&relays.iter().collect::<Vec<_>>(), Duration::from_secs(30)).await;
        steps.push(format!(
            "relay {i} replaced at {:.1} s with {before} events written, partitions {counts:?}",
            started.elapsed().as_secs_f64()
        ));
    }
    let (_broker, events) = consumer.await.expect("consumer");
    while let Some(done) = producers.join_next().await {
        done.expect("producer finished");
    }
    let seen = check_order(&db, &events).await;
    println!(
        "rolling restart of 3 relays under load: {}; {EVENTS} events over {AGGREGATES} aggregates \
         complete and in order, {} duplicates",
        steps.join("; "),
        seen.duplicates
    );
    assert_eq!(
        seen.duplicates, 0,
        "a graceful restart sent rows twice: partitions moved while a batch still held them"
    );
    assert_eq!(db.count().await, 0, "the outbox is empty");
}
