//! A relay frozen (SIGSTOP: a VM paused, a process stuck in the kernel, a
//! debugger) while it owns partitions and is mid-batch. Its kernel still
//! answers TCP, so no keepalive ends its sessions: only limits the server
//! enforces on them can. The other relay must take every partition within
//! a bound and drain the table while the frozen one sleeps; after SIGCONT
//! the thawed relay must not reorder anything (it may send its stale batch
//! again: duplicates, in order).

use std::time::{Duration, Instant};

use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::eventually;
use crate::support::relay::Relay;
use crate::{aggregates, balanced, check_order, ordered_config, ownership, produce, receive};

const EVENTS: usize = 20_000;
const AGGREGATES: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_relay_s_partitions_move_within_a_bound() {
    let db = TestDb::migrated("obx_frozen").await;
    aggregates(&db, AGGREGATES).await;
    let mut broker = TestBroker::new("#").await;
    let cfg = ordered_config(&db, &broker.exchange, "1s");
    let relays = [Relay::start(&cfg).await, Relay::start(&cfg).await];
    balanced(&relays.iter().collect::<Vec<_>>(), Duration::from_secs(20)).await;
    // Flat out, so a backlog builds and relay 0 is busy when frozen,
    // most likely with a batch open.
    let mut producers = produce(&db, 2, AGGREGATES, EVENTS);
    let consumer = tokio::spawn(async move {
        let events = receive(&mut broker, EVENTS, true, Duration::from_secs(300), |_| {}).await;
        (broker, events)
    });
    // Freeze relay 0 once rows flow.
    eventually("rows to flow", Duration::from_secs(60), || async {
        let published = relays[0]
            .metric("outboxd_messages_published_total{source=\"orders\"}")
            .await
            .unwrap_or(0.0);
        (published > 500.0).then_some(())
    })
    .await;
    relays[0].signal("-STOP");
    let frozen_at = Instant::now();
    let took_over = eventually(
        "the other relay to own every partition",
        Duration::from_secs(90),
        || async {
            let own = ownership(&[&relays[1]]).await;
            (own.first().map(|(_, p, _)| p.len()) == Some(64)).then(|| frozen_at.elapsed())
        },
    )
    .await;
    // Everything written so far goes out while relay 0 is still frozen: no
    // lock of its (partition or batch) holds a row back.
    while let Some(done) = producers.join_next().await {
        done.expect("producer finished");
    }
    let drained = eventually(
        "the table to drain while relay 0 is frozen",
        Duration::from_secs(90),
        || async { (db.count().await == 0).then(|| frozen_at.elapsed()) },
    )
    .await;
    relays[0].signal("-CONT");
    let (_broker, events) = consumer.await.expect("consumer");
    let counts = balanced(&relays.iter().collect::<Vec<_>>(), Duration::from_secs(60)).await;
    let seen = check_order(&db, &events).await;
    println!(
        "relay 0 of 2 frozen with SIGSTOP mid-flow: relay 1 owned all 64 partitions {took_over:?} \
         after the freeze, the table was empty {drained:?} after it; thawed, the relays share \
         {counts:?}; {EVENTS} events complete and in order, {} duplicates",
        seen.duplicates
    );
}
