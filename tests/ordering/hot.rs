//! One aggregate with a backlog of 40k events beside 999 quiet ones: the
//! quiet aggregates in other partitions are not starved (they all arrive
//! while the hot one is still draining), those in the hot one's partition
//! wait their turn in id order (a partition is read first in, first out)
//! and still arrive, and the hot one arrives complete and in order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::broker::TestBroker;
use crate::support::db::TestDb;
use crate::support::relay::Relay;
use crate::{Event, aggregates, check_order, ordered_config, receive};

const HOT: i64 = 40_000;
const QUIET: usize = 999;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_aggregate_does_not_starve_the_quiet_ones() {
    let db = TestDb::migrated("obx_hot").await;
    aggregates(&db, QUIET + 1).await;
    // a-1 is hot: its 10k events are in the table before the relay starts.
    db.client
        .batch_execute(&format!(
            "UPDATE aggregates SET seq = {HOT} WHERE id = 'a-1'; \
             INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'order', 'a-1', 'Step', jsonb_build_object('agg', 'a-1', 'seq', s) \
             FROM generate_series(1, {HOT}) s ORDER BY s;"
        ))
        .await
        .unwrap();
    let mut broker = TestBroker::new("#").await;
    let relay = Relay::start(&ordered_config(&db, &broker.exchange, "200ms")).await;

    // The quiet ones write one event each while the hot one drains (and
    // while we receive, so receipt times are true).
    let producer = db.connect().await;
    let committed = Arc::new(Mutex::new(HashMap::new()));
    let started = Instant::now();
    let writer = {
        let committed = committed.clone();
        tokio::spawn(async move {
            for q in 2..=QUIET + 1 {
                let agg = format!("a-{q}");
                producer
                    .batch_execute(&format!(
                        "BEGIN; UPDATE aggregates SET seq = 1 WHERE id = '{agg}'; \
                         INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                         VALUES ('order', '{agg}', 'Step', jsonb_build_object('agg', '{agg}', 'seq', 1)); COMMIT;"
                    ))
                    .await
                    .expect("insert a quiet event");
                committed.lock().unwrap().insert(agg, Instant::now());
            }
        })
    };
    // The quiet aggregates that share the hot one's partition (as the
    // relay computes it) wait behind its backlog; the others must not.
    let beside: std::collections::HashSet<String> = db
        .client
        .query(
            "SELECT id FROM aggregates WHERE id <> 'a-1' AND \
               (hashtextextended('order' || '/' || id, 0) & 63) = \
               (hashtextextended('order/a-1', 0) & 63)",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let elsewhere = QUIET - beside.len();
    let mut hot_left_when_quiet_done: Option<i64> = None;
    let mut quiet_seen = 0usize;
    let mut hot_seen = 0i64;
    let events: Vec<Event> = receive(
        &mut broker,
        HOT as usize + QUIET,
        true,
        Duration::from_secs(600),
        |e| {
            let last = e.last().expect("called after a message");
            if last.aggregate == "a-1" {
                hot_seen = hot_seen.max(last.seq);
            } else if !beside.contains(&last.aggregate) {
                quiet_seen += 1;
                if quiet_seen == elsewhere {
                    hot_left_when_quiet_done = Some(HOT - hot_seen);
                }
            }
        },
    )
    .await;
    let hot_done = started.elapsed();
    writer.await.expect("quiet events written");
    let committed_at = committed.lock().unwrap().clone();
    let latency_of = |e: &Event| committed_at.get(&e.aggregate).map(|c| e.at - *c);
    let mut quiet_latency: Vec<Duration> = events
        .iter()
        .filter(|e| e.aggregate != "a-1" && !beside.contains(&e.aggregate))
        .filter_map(latency_of)
        .collect();
    let beside_latency = events
        .iter()
        .filter(|e| beside.contains(&e.aggregate))
        .filter_map(latency_of)
        .max();
    quiet_latency.sort();
    let pct = |p: f64| quiet_latency[((quiet_latency.len() - 1) as f64 * p) as usize];
    let duplicates = check_order(&db, &events).await.duplicates;
    println!(
        "hot aggregate of {HOT} events beside {QUIET} quiet ones: {elsewhere} in other partitions, commit->receipt p50 {:?} p99 {:?} max {:?}; \
         {} in its partition, max {beside_latency:?}; \
         hot events left when the last quiet one elsewhere arrived: {hot_left_when_quiet_done:?}; \
         everything in {:.1} s ({:.0} hot events/s); {duplicates} duplicates",
        pct(0.5),
        pct(0.99),
        quiet_latency.last(),
        beside.len(),
        hot_done.as_secs_f64(),
        HOT as f64 / hot_done.as_secs_f64(),
    );
    let left = hot_left_when_quiet_done.expect("every quiet event elsewhere arrived");
    assert!(
        left > 0,
        "the quiet aggregates in other partitions waited for the whole hot backlog"
    );
    drop(relay);
}
