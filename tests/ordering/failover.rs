//! Three relays, one killed with kill -9 halfway and another started: the
//! survivors take the dead relay's partitions within a poll interval, and
//! every aggregate still arrives complete and in order.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::eventually;
use crate::support::relay::Relay;
use crate::{aggregates, balanced, check_order, ordered_config, ownership, produce, receive};

const EVENTS: usize = 50_000;
const AGGREGATES: usize = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relay_s_partitions_flow_again_in_order() {
    let db = TestDb::migrated("obx_failover").await;
    aggregates(&db, AGGREGATES).await;
    // Each aggregate's partition, as the relays compute it.
    let partition_of: HashMap<String, i64> = db
        .client
        .query(
            "SELECT id, (hashtextextended('order' || '/' || id, 0) & 63)::bigint FROM aggregates",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut broker = TestBroker::new("#").await;
    // The default poll interval: it is also how often relays rebalance.
    let cfg = ordered_config(&db, &broker.exchange, "1s");
    let mut relays = vec![
        Relay::start(&cfg).await,
        Relay::start(&cfg).await,
        Relay::start(&cfg).await,
    ];
    balanced(&relays.iter().collect::<Vec<_>>(), Duration::from_secs(20)).await;
    let mut producers = produce(&db, 4, AGGREGATES, EVENTS);

    // Halfway: kill -9 the first relay, start a fourth.
    let first = receive(
        &mut broker,
        EVENTS / 2,
        false,
        Duration::from_secs(300),
        |_| {},
    )
    .await;
    let own = ownership(&[&relays[0]]).await;
    let dead_partitions: HashSet<i64> = own[0].1.iter().copied().collect();
    assert!(
        !dead_partitions.is_empty(),
        "the relay to kill owns partitions"
    );
    let marker_aggregate = partition_of
        .iter()
        .find(|(_, p)| dead_partitions.contains(p))
        .map(|(a, _)| a.clone())
        .expect("an aggregate in the killed relay's partitions");
    relays[0].kill9();
    let killed_at = Instant::now();
    // A row committed after the kill, in one of the dead relay's partitions
    // (numbered like the producers number theirs): how long until a
    // survivor has published and removed it?
    let marker_id: i64 = {
        let mut client = db.connect().await;
        let tx = client.transaction().await.unwrap();
        let seq: i64 = tx
            .query_one(
                "UPDATE aggregates SET seq = seq + 1 WHERE id = $1 RETURNING seq",
                &[&marker_aggregate],
            )
            .await
            .unwrap()
            .get(0);
        let id = tx
            .query_one(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                 VALUES ('order', $1, 'Step', jsonb_build_object('agg', $1::text, 'seq', $2::bigint)) RETURNING id",
                &[&marker_aggregate, &seq],
            )
            .await
            .unwrap()
            .get(0);
        tx.commit().await.unwrap();
        id
    };
    let flowing_again = eventually(
        "the killed relay's partition to flow again",
        Duration::from_secs(60),
        || async {
            let left: i64 = db
                .client
                .query_one("SELECT count(*) FROM outbox WHERE id = $1", &[&marker_id])
                .await
                .unwrap()
                .get(0);
            (left == 0).then(|| killed_at.elapsed())
        },
    )
    .await;
    relays.push(Relay::start(&cfg).await);
    let rest = receive(
        &mut broker,
        // the distinct events still to come, at least
        EVENTS + 1 - first.len(),
        true,
        Duration::from_secs(300),
        |_| {},
    )
    .await;
    let events: Vec<_> = first.into_iter().chain(rest).collect();
    while let Some(done) = producers.join_next().await {
        done.expect("producer finished");
    }
    let survivors: Vec<&Relay> = relays[1..].iter().collect();
    let counts = balanced(&survivors, Duration::from_secs(20)).await;
    let duplicates = check_order(&db, &events).await.duplicates;
    println!(
        "kill -9 of 1 of 3 relays after {} events arrived (it owned {} partitions): a row committed \
         after the kill in one of its partitions was published and removed {flowing_again:?} after the kill \
         (poll_interval 1s); then a 4th relay started; {} events complete and in order, \
         {duplicates} duplicates; partitions now {counts:?}",
        EVENTS / 2,
        dead_partitions.len(),
        EVENTS + 1,
    );
    assert_eq!(db.count().await, 0, "the outbox is empty");
}
