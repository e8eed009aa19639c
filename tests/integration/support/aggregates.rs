//! Producers that number their events per aggregate, and the checker that
//! says whether every aggregate arrived complete and in order: the ordering
//! tests and the fault test share them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::db::TestDb;

/// One received message: its aggregate, its per-aggregate sequence number,
/// and when it arrived.
#[derive(Debug, Clone)]
pub struct Event {
    pub aggregate: String,
    pub seq: i64,
    pub at: Instant,
}

impl Event {
    /// Reads the `agg` and `seq` the producers put in the payload.
    pub fn from_payload(v: &serde_json::Value) -> Event {
        Event {
            aggregate: v["agg"].as_str().expect("agg").to_owned(),
            seq: v["seq"].as_i64().expect("seq"),
            at: Instant::now(),
        }
    }
}

/// Creates the producers' own aggregate table: one row per aggregate
/// (`a-1` to `a-n`) with the last sequence number handed out.
pub async fn aggregates(db: &TestDb, n: usize) {
    db.client
        .batch_execute(&format!(
            "CREATE TABLE aggregates (id text PRIMARY KEY, seq bigint NOT NULL DEFAULT 0); \
             INSERT INTO aggregates (id) SELECT 'a-' || g FROM generate_series(1, {n}) g;"
        ))
        .await
        .expect("create aggregates");
}

/// Which aggregate a transaction writes to: n for `a-n`.
pub type Pick = Arc<dyn Fn(&mut fastrand::Rng) -> usize + Send + Sync>;

/// How producers write: how many connections, how many events in all (at
/// most), which aggregate each transaction picks (a number n for `a-n`),
/// and the pause after each commit.
pub struct Load {
    pub producers: usize,
    pub events: usize,
    pub pick: Pick,
    pub pause: Duration,
}

/// `producers` connections write `events` events over the aggregates of
/// [`aggregates`], picked uniformly, 1 to 5 per transaction, as fast as
/// they can.
pub fn produce(db: &TestDb, producers: usize, aggregates: usize, events: usize) -> JoinSet<()> {
    produce_with(
        db,
        Load {
            producers,
            events,
            pick: Arc::new(move |rng| rng.usize(1..=aggregates)),
            pause: Duration::ZERO,
        },
    )
}

/// Producers per `load`; abort the set to stop them early (the truth is
/// the `aggregates` table, which a cut-off transaction leaves consistent).
pub fn produce_with(db: &TestDb, load: Load) -> JoinSet<()> {
    let written = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for p in 0..load.producers {
        set.spawn(producer(
            db.url.clone(),
            p,
            written.clone(),
            load.events,
            load.pause,
            load.pick.clone(),
        ));
    }
    set
}

/// One producer: each transaction locks its aggregate's row (as the README
/// recommends) and numbers its events from the aggregate's counter.
async fn producer(
    url: String,
    p: usize,
    written: Arc<AtomicUsize>,
    events: usize,
    pause: Duration,
    pick: Pick,
) {
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
        let aggregate = format!("a-{}", pick(&mut rng));
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
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

/// Events committed so far, over every aggregate.
pub async fn written(db: &TestDb) -> i64 {
    db.client
        .query_one("SELECT sum(seq)::bigint FROM aggregates", &[])
        .await
        .expect("read aggregates")
        .get(0)
}

/// What [`check_order`] saw besides the events it requires.
#[derive(Debug, Default)]
pub struct Seen {
    /// Events that arrived again (a consumer drops them by `message_id`).
    pub duplicates: usize,
    /// Times an aggregate went back to an earlier event: a run of rows in
    /// flight repeated after a crash or a lost connection.
    pub rewinds: usize,
}

/// Checks that every aggregate's events arrived in strictly increasing
/// order once duplicates are dropped, as a consumer drops them by
/// `message_id` (a crash or a lost connection repeats the rows that were in
/// flight, in order, so an event seen before is skipped wherever it
/// comes), and that none is missing (1..=last).
pub async fn check_order(db: &TestDb, events: &[Event]) -> Seen {
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
    let mut seen_all = Seen::default();
    for (aggregate, want) in &last {
        let got = by_aggregate.remove(aggregate.as_str()).unwrap_or_default();
        let mut seen = HashSet::new();
        let deduped: Vec<i64> = got.iter().copied().filter(|s| seen.insert(*s)).collect();
        seen_all.duplicates += got.len() - deduped.len();
        seen_all.rewinds += got.windows(2).filter(|w| w[1] <= w[0]).count();
        let expected: Vec<i64> = (1..=*want).collect();
        if deduped != expected {
            let missing: Vec<i64> = expected
                .iter()
                .copied()
                .filter(|s| !seen.contains(s))
                .collect();
            let breaks: Vec<(i64, i64)> = deduped
                .windows(2)
                .filter(|w| w[1] != w[0] + 1)
                .map(|w| (w[0], w[1]))
                .take(10)
                .collect();
            panic!(
                "aggregate {aggregate}: {} events arrived for 1..={want}; missing {} (first {:?}); \
                 order breaks after dropping duplicates (first 10) {breaks:?}",
                got.len(),
                missing.len(),
                &missing[..missing.len().min(10)]
            );
        }
    }
    assert!(
        by_aggregate.is_empty(),
        "events of unknown aggregates: {:?}",
        by_aggregate.keys().collect::<Vec<_>>()
    );
    seen_all
}
