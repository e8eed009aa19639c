//! The randomized fault test: three relays on one table, producers that
//! lock their aggregate's row, over one hot aggregate, ten warm ones and a
//! thousand cold ones, while faults come at random moments, one at a time,
//! each for a bounded time:
//! - kill -9 of a relay, restarted after a moment;
//! - a relay's database or broker connections cut (closed) through its proxy;
//! - a relay's database or broker connections blackholed: the proxy stops
//!   forwarding without closing, as a silent network partition does;
//! - RabbitMQ itself stopped and started.
//!
//! At the end nothing committed may be missing, and every aggregate must be
//! in order once duplicates are dropped by `message_id`. It runs for
//! OUTBOXD_CHAOS_SECS (default 120) with the seed OUTBOXD_CHAOS_SEED
//! (default: from the clock; printed, so a failure can be replayed).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::aggregates::{Event, Load, aggregates, check_order, produce_with, written};
use crate::support::db::TestDb;
use crate::support::eventually;
use crate::support::proxy::Proxy;
use crate::support::relay::{Relay, SourceSpec, config};
use crate::{DurableQueue, LONG, RabbitGuard, service};

/// a-1 is hot, a-2..=a-11 warm, a-12..=a-1011 cold; each group gets a
/// third of the transactions.
const AGGREGATES: usize = 1 + 10 + 1000;

/// One relay and the proxies its connections go through.
struct Node {
    pg: Proxy,
    amqp: Proxy,
    config: String,
    relay: Relay,
}

fn env_u64(key: &str) -> Option<u64> {
    std::env::var(key).ok().and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_faults_lose_nothing_and_keep_every_aggregate_in_order() {
    let secs = env_u64("OUTBOXD_CHAOS_SECS").unwrap_or(120);
    let seed = env_u64("OUTBOXD_CHAOS_SEED").unwrap_or_else(|| fastrand::u64(..));
    println!("chaos: {secs} s, OUTBOXD_CHAOS_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);

    let db = TestDb::migrated("obx_chaos").await;
    aggregates(&db, AGGREGATES).await;
    let q = DurableQueue::new().await;
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let pg = Proxy::start(crate::support::PG_HOST).await;
        let amqp = Proxy::start(crate::support::AMQP_HOST).await;
        let url = format!("postgres://root@{}/{}", pg.addr, db.name);
        let config = config(
            &format!("amqp://guest:guest@{}/%2f", amqp.addr),
            &[SourceSpec::new("orders", &url, &q.exchange).set("poll_interval", "\"1s\"")],
        );
        let relay = Relay::start(&config).await;
        relay.wait_ready(200, LONG).await;
        nodes.push(Node {
            pg,
            amqp,
            config,
            relay,
        });
    }

    let mut producers = produce_with(
        &db,
        Load {
            producers: 3,
            events: usize::MAX,
            pick: Arc::new(|rng| match rng.u8(0..3) {
                0 => 1,
                1 => rng.usize(2..=11),
                _ => rng.usize(12..=AGGREGATES),
            }),
            pause: Duration::from_millis(20),
        },
    );

    let _rabbit = RabbitGuard;
    let started = Instant::now();
    let ages = sample_oldest_age(&db, started);
    let mut faults: Vec<(f64, String)> = Vec::new();
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(rng.u64(500..4000))).await;
        let n = rng.usize(0..nodes.len());
        let node = &mut nodes[n];
        let at = started.elapsed().as_secs_f64();
        let hold = match rng.u8(0..6) {
            0 => {
                node.relay.kill9();
                let pause = Duration::from_millis(rng.u64(0..3000));
                tokio::time::sleep(pause).await;
                node.relay = Relay::start(&node.config).await;
                faults.push((at, format!("kill -9 relay {n}, restarted after {pause:?}")));
                continue;
            }
            1 => {
                node.pg.cut();
                ("database cut", Duration::from_millis(rng.u64(200..3000)))
            }
            2 => {
                node.amqp.cut();
                ("broker cut", Duration::from_millis(rng.u64(200..3000)))
            }
            3 => {
                node.pg.blackhole();
                ("database blackholed", blackhole_time(&mut rng))
            }
            4 => {
                node.amqp.blackhole();
                ("broker blackholed", blackhole_time(&mut rng))
            }
            _ => {
                service("rabbitmqctl", &["stop_app"]);
                let down = Duration::from_millis(rng.u64(1000..6000));
                tokio::time::sleep(down).await;
                service("rabbitmqctl", &["start_app"]);
                faults.push((at, format!("RabbitMQ stopped for {down:?}")));
                continue;
            }
        };
        tokio::time::sleep(hold.1).await;
        node.pg.restore();
        node.amqp.restore();
        faults.push((at, format!("relay {n}: {} for {:?}", hold.0, hold.1)));
    }
    producers.abort_all();
    while producers.join_next().await.is_some() {}
    let faults_done = Instant::now();
    let faults_end = started.elapsed().as_secs_f64();
    let committed = written(&db).await;

    // Every relay is back and serving; the backlog drains.
    let drained = eventually("the outbox to drain after the faults", LONG, || async {
        (db.count().await == 0).then(|| faults_done.elapsed())
    })
    .await;
    let mut breaks = 0.0;
    for node in &nodes {
        breaks += node
            .relay
            .metric("outboxd_order_breaks_total{source=\"orders\"}")
            .await
            .unwrap_or(0.0);
    }
    let events: Vec<Event> = q
        .drain_bodies()
        .await
        .iter()
        .map(Event::from_payload)
        .collect();
    let ages = ages.stop();
    // Each fault with the oldest pending row's age at worst from its start
    // to the next fault's: how long it held rows back.
    let mut report = Vec::new();
    for (i, (at, what)) in faults.iter().enumerate() {
        let until = faults.get(i + 1).map(|f| f.0).unwrap_or(faults_end);
        let worst = ages
            .iter()
            .filter(|(t, _)| *t >= *at && *t < until)
            .map(|(_, a)| *a)
            .fold(0.0, f64::max);
        report.push(format!(
            "{at:6.1}s {what}; oldest pending row at worst {worst:.1}s old"
        ));
    }
    println!(
        "chaos faults ({}):\n  {}",
        faults.len(),
        report.join("\n  ")
    );
    let seen = check_order(&db, &events).await;
    println!(
        "chaos: {committed} events committed over {secs} s, all arrived and every aggregate in order \
         after dropping duplicates; {} messages, {} duplicates, {} rewinds (a run sent again); \
         backlog gone {drained:?} after the last fault; order breaks counted by the relays still \
         running: {breaks}",
        events.len(),
        seen.duplicates,
        seen.rewinds
    );
}

/// Mostly a few seconds; one in four outlasts the relay's own bounds (AMQP
/// heartbeat 10 s, confirm timeout 5 s here, database steps 30 s), so the
/// relay gives up on its connections and tries new ones (which hang too)
/// before the network comes back: the abandoned and the new connections
/// must not wedge it or reorder anything once they flow again.
fn blackhole_time(rng: &mut fastrand::Rng) -> Duration {
    if rng.u8(0..4) == 0 {
        Duration::from_millis(rng.u64(31_000..40_000))
    } else {
        Duration::from_millis(rng.u64(1000..8000))
    }
}

/// The age of the oldest pending row, sampled four times a second, as
/// (seconds since the start, age in seconds).
struct Ages {
    samples: Arc<Mutex<Vec<(f64, f64)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Ages {
    fn stop(self) -> Vec<(f64, f64)> {
        self.task.abort();
        std::mem::take(&mut *self.samples.lock().unwrap())
    }
}

fn sample_oldest_age(db: &TestDb, started: Instant) -> Ages {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let url = db.url.clone();
    let into = samples.clone();
    let task = tokio::spawn(async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("sampler connects");
        tokio::spawn(conn);
        loop {
            let age: f64 = client
                .query_one(
                    "SELECT coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8 \
                     FROM outbox WHERE published_at IS NULL",
                    &[],
                )
                .await
                .expect("sample the oldest row")
                .get(0);
            into.lock()
                .unwrap()
                .push((started.elapsed().as_secs_f64(), age));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    Ages { samples, task }
}
