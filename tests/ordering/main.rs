//! Per-aggregate ordering with several relays on one table: order under
//! load, failover after kill -9, a hot aggregate beside quiet ones. They
//! start several relays and producers each, so they run on their own, one
//! at a time: `cargo test --test ordering -- --test-threads=1`.

#[path = "../integration/support/mod.rs"]
mod support;

mod failover;
mod hot;
mod order;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::broker::TestBroker;
use support::db::TestDb;
use support::relay::Relay;
use tokio::task::JoinSet;

/// One received message: its aggregate, its per-aggregate sequence number,
/// and when it arrived.
#[derive(Debug, Clone)]
pub struct Event {
    pub aggregate: String,
    pub seq: i64,
    pub at: Instant,
}

/// Creates the producers' own aggregate table: one row per aggregate with
/// the last sequence number handed out.
pub async fn aggregates(db: &TestDb, n: usize) {
    db.client
        .batch_execute(&format!(
            "CREATE TABLE aggregates (id text PRIMARY KEY, seq bigint NOT NULL DEFAULT 0); \
             INSERT INTO aggregates (id) SELECT 'a-' || g FROM generate_series(1, {n}) g;"
        ))
        .await
        .expect("create aggregates");
}

/// `producers` connections write `events` events over the aggregates of
/// [`aggregates`], 1 to 5 per transaction, each transaction locking its
/// aggregate's row (as the README recommends) and numbering its events
/// from the aggregate's counter.
pub fn produce(db: &TestDb, producers: usize, aggregates: usize, events: usize) -> JoinSet<()> {
    let written = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for p in 0..producers {
        let url = db.url.clone();
        let written = written.clone();
        set.spawn(async move {
            let (mut client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("producer connects");
            tokio::spawn(conn);
            let mut rng = fastrand::Rng::with_seed(p as u64 + 1);
            loop {
                let k = rng.usize(1..=5);
                let before = written.fetch_add(k, Ordering::SeqCst);
                if before >= events {
                    break;
                }
                let k = k.min(events - before) as i64;
                let aggregate = format!("a-{}", rng.usize(1..=aggregates));
                let tx = client.transaction().await.expect("begin");
                let last: i64 = tx
                    .query_one(
                        "UPDATE aggregates SET seq = seq + $2 WHERE id = $1 RETURNING seq",
                        &[&aggregate, &k],
                    )
                    .await
                    .expect("lock the aggregate")
                    .get(0);
                tx.execute(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                     SELECT 'order', $1, 'Step', jsonb_build_object('agg', $1::text, 'seq', s) \
                     FROM generate_series($2::bigint - $3 + 1, $2::bigint) s ORDER BY s",
                    &[&aggregate, &last, &k],
                )
                .await
                .expect("insert events");
                tx.commit().await.expect("commit");
            }
        });
    }
    set
}

/// Receives until `distinct` different events have arrived, and then
/// (with `linger`) until no message comes for a second, so late duplicates
/// are counted too; fails after `timeout`. Calls `during` with the events
/// so far after each message.
pub async fn receive(
    broker: &mut TestBroker,
    distinct: usize,
    linger: bool,
    timeout: Duration,
    mut during: impl FnMut(&[Event]),
) -> Vec<Event> {
    let deadline = Instant::now() + timeout;
    let mut events = Vec::with_capacity(distinct * 2);
    let mut seen = std::collections::HashSet::new();
    loop {
        let wait = if seen.len() >= distinct {
            if !linger {
                break;
            }
            Duration::from_secs(1)
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        let Some(m) = broker.next(wait).await else {
            break;
        };
        let v = m.json();
        let event = Event {
            aggregate: v["agg"].as_str().expect("agg").to_owned(),
            seq: v["seq"].as_i64().expect("seq"),
            at: Instant::now(),
        };
        seen.insert((event.aggregate.clone(), event.seq));
        events.push(event);
        during(&events);
    }
    assert!(
        seen.len() >= distinct,
        "only {} of {distinct} events arrived within {timeout:?}",
        seen.len()
    );
    events
}

/// Checks that every aggregate's events arrived in strictly increasing
/// order once duplicates are dropped, as a consumer drops them by
/// `message_id` (a crash or a lost connection repeats the rows that were in
/// flight, in order, so an event seen before is skipped wherever it
/// comes), and that none is missing (1..=last). Returns the number of
/// duplicates.
pub async fn check_order(db: &TestDb, events: &[Event]) -> usize {
    let last: HashMap<String, i64> = db
        .client
        .query("SELECT id, seq FROM aggregates", &[])
        .await
        .expect("read aggregates")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut by_aggregate: HashMap<&str, Vec<i64>> = HashMap::new();
    for e in events {
        by_aggregate.entry(&e.aggregate).or_default().push(e.seq);
    }
    let mut duplicates = 0;
    for (aggregate, want) in &last {
        let got = by_aggregate.remove(aggregate.as_str()).unwrap_or_default();
        let mut seen = std::collections::HashSet::new();
        let deduped: Vec<i64> = got.iter().copied().filter(|s| seen.insert(*s)).collect();
        duplicates += got.len() - deduped.len();
        let expected: Vec<i64> = (1..=*want).collect();
        assert_eq!(
            deduped, expected,
            "aggregate {aggregate}: arrived {got:?}, expected 1..={want} in order"
        );
    }
    assert!(
        by_aggregate.is_empty(),
        "events of unknown aggregates: {:?}",
        by_aggregate.keys().collect::<Vec<_>>()
    );
    duplicates
}

/// Each relay's `/status`: (pid, partitions owned, relays it counts).
pub async fn ownership(relays: &[&Relay]) -> Vec<(u64, Vec<i64>, i64)> {
    let mut out = Vec::new();
    for r in relays {
        let Some((_, body)) = support::http::get(r.admin, "/status").await else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&body).expect("status is JSON");
        let s = &v["sources"][0];
        out.push((
            v["pid"].as_u64().unwrap_or(0),
            s["partitions"]
                .as_array()
                .map(|a| a.iter().filter_map(|p| p.as_i64()).collect())
                .unwrap_or_default(),
            s["relays"].as_i64().unwrap_or(0),
        ));
    }
    out
}

/// Waits until the relays own every partition between them, none more
/// than its fair share ceil(64 / relays) (so none less than what the others
/// leave), and each counts them all.
pub async fn balanced(relays: &[&Relay], timeout: Duration) -> Vec<usize> {
    let n = relays.len();
    support::eventually("the partitions to be balanced", timeout, || async move {
        let own = ownership(relays).await;
        let counts: Vec<usize> = own.iter().map(|(_, p, _)| p.len()).collect();
        let mut all: Vec<i64> = own.iter().flat_map(|(_, p, _)| p.clone()).collect();
        all.sort_unstable();
        all.dedup();
        let share = 64usize.div_ceil(n);
        let ok = own.len() == n
            && all.len() == 64
            && counts.iter().sum::<usize>() == 64
            && counts
                .iter()
                .all(|c| *c <= share && *c + (n - 1) * share >= 64)
            && own.iter().all(|(_, _, r)| *r == n as i64);
        ok.then_some(counts)
    })
    .await
}

/// A relay config with ordering by aggregate (the default) and the poll
/// interval (which is also the rebalance interval) given.
pub fn ordered_config(db: &TestDb, exchange: &str, poll: &str) -> String {
    support::relay::config(
        support::AMQP_URL,
        &[support::relay::SourceSpec::new("orders", &db.url, exchange)
            .set("poll_interval", &format!("{poll:?}"))],
    )
}
