//! Recovery: a producer commits 2,000 rows/s onto one aggregate for 20 s
//! while the relay (default config) publishes through a proxy; 5 s in, the
//! proxy cuts the relay's broker connections and refuses new ones for 5 s,
//! leaving the shared RabbitMQ alone. Measured: how long after the broker's
//! return the backlog is gone, and, from the queue read back, rows lost,
//! duplicates and order breaks.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use crate::Options;
use crate::env::{AMQP_ADDR, Env, QueueType, insert_seqs, pg, relay_config_at};
use crate::order::{Tally, read_back};
use crate::proxy::Proxy;
use crate::report::{Report, median};

/// 20 rows per commit every 10 ms: 2,000 rows/s on one connection, so ids,
/// seqs and commits come in one order.
const ROWS_PER_COMMIT: i64 = 20;
const TICK: Duration = Duration::from_millis(10);
const PRODUCE_FOR: Duration = Duration::from_secs(20);
const STOP_AT: Duration = Duration::from_secs(5);
const STOP_FOR: Duration = Duration::from_secs(5);
/// How often the backlog is looked at.
const POLL: Duration = Duration::from_millis(50);
/// Past this after the return, the backlog counts as not gone (twice the
/// goal: a longer wait tells nothing more) and the run ends.
const GIVE_UP: Duration = Duration::from_secs(60);

/// Over the repeats: the median time to clear the backlog, the most rows
/// lost and left.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    pub backlog_gone_s: f64,
    pub lost: i64,
    pub left: i64,
}

struct Run {
    backlog_gone_s: f64,
    committed: i64,
    rate: f64,
    /// unpublished rows when the broker came back
    backlog: i64,
    /// committed, neither read back nor still in the outbox
    lost: i64,
    /// still unpublished when the run gave up
    left: i64,
    tally: Tally,
}

pub async fn run(env: &Env, o: &Options, report: &mut Report) -> Result<Outcome, String> {
    let mut runs = Vec::new();
    for _ in 0..o.repeats {
        runs.push(once(env, o).await?);
    }
    let col = |f: fn(&Run) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    let what = "recovery, 2,000 rows/s on one aggregate, broker cut 5 s";
    let backlog_gone_s = report.add(
        format!("{what}: backlog gone after the broker's return"),
        "s",
        col(|r| r.backlog_gone_s),
        format!(
            "{:.0} rows committed at {:.0} rows/s, {:.0} waiting at the return (medians)",
            median(&col(|r| r.committed as f64)),
            median(&col(|r| r.rate)),
            median(&col(|r| r.backlog as f64))
        ),
    );
    report.add(
        format!("{what}: rows lost"),
        "rows",
        col(|r| r.lost as f64),
        "committed - distinct seqs read back - rows left; must be 0",
    );
    report.add(
        format!("{what}: rows left"),
        "rows",
        col(|r| r.left as f64),
        format!("still unpublished {GIVE_UP:?} after the return; 0 if the backlog went"),
    );
    let tallies: Vec<Tally> = runs.iter().map(|r| r.tally).collect();
    crate::order::report(report, what, &tallies);
    Ok(Outcome {
        backlog_gone_s,
        lost: runs.iter().map(|r| r.lost).max().unwrap_or(0),
        left: runs.iter().map(|r| r.left).max().unwrap_or(0),
    })
}

async fn once(env: &Env, o: &Options) -> Result<Run, String> {
    let (db, url) = env.create_db("bench_recovery").await?;
    env.migrate(&url).await?;
    let (ch, exchange) = env.declare(QueueType::Classic).await?;
    let proxy = Proxy::start(AMQP_ADDR).await?;
    let relay = env
        .spawn_relay(&relay_config_at(
            &proxy.amqp_url(),
            &url,
            &exchange,
            &o.source_extra,
        ))
        .await?;
    let top_id = Arc::new(AtomicI64::new(0));
    let producer = tokio::spawn(produce(pg(&url).await?, top_id.clone()));
    let start = Instant::now();
    tokio::time::sleep_until((start + STOP_AT).into()).await;
    proxy.stop();
    tokio::time::sleep_until((start + STOP_AT + STOP_FOR).into()).await;
    proxy.resume();
    let back = Instant::now();
    let deadline = back + GIVE_UP;
    let watch = pg(&url).await?;
    let backlog = unpublished(&watch).await?;

    // Gone: the lowest unpublished id is above the highest id committed
    // one poll earlier, so nothing that waited a poll is still waiting.
    let mut committed_before = top_id.load(Ordering::SeqCst);
    let backlog_gone_s = loop {
        tokio::time::sleep(POLL).await;
        let low: Option<i64> = watch
            .query_one("SELECT min(id) FROM outbox WHERE published_at IS NULL", &[])
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        if low.is_none_or(|l| l > committed_before) {
            break back.elapsed().as_secs_f64();
        }
        if Instant::now() > deadline {
            eprintln!("recovery: the backlog was not gone {GIVE_UP:?} after the broker's return");
            break GIVE_UP.as_secs_f64();
        }
        committed_before = top_id.load(Ordering::SeqCst);
    };
    let (committed, rate) = producer.await.map_err(|e| e.to_string())??;

    // Everything committed published (or the deadline passed), then read back.
    let left = loop {
        let left = unpublished(&watch).await?;
        if left == 0 || Instant::now() > deadline {
            break left;
        }
        tokio::time::sleep(POLL).await;
    };
    relay.stop().await;
    drop(proxy);
    let tally = Tally::of(&read_back(env, QueueType::Classic, &exchange).await?);
    println!(
        "{{\"probe\":\"recovery\",\"committed\":{committed},\"rows_per_s\":{rate:.0},\"backlog_at_return\":{backlog},\"backlog_gone_s\":{backlog_gone_s:.2},\"left\":{left},\"distinct\":{},\"duplicates\":{},\"order_breaks\":{}}}",
        tally.distinct, tally.duplicates, tally.breaks
    );
    env.undeclare(&ch, &exchange).await;
    drop(watch);
    env.drop_db(&db).await;
    Ok(Run {
        backlog_gone_s,
        committed,
        rate,
        backlog,
        lost: committed - tally.distinct as i64 - left,
        left,
        tally,
    })
}

async fn unpublished(client: &tokio_postgres::Client) -> Result<i64, String> {
    client
        .query_one(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .map_err(|e| e.to_string())
}

/// Commits `ROWS_PER_COMMIT` rows every `TICK` for `PRODUCE_FOR`, keeping
/// the highest id committed in `top_id`; returns (rows, rows per second).
async fn produce(
    client: tokio_postgres::Client,
    top_id: Arc<AtomicI64>,
) -> Result<(i64, f64), String> {
    let start = Instant::now();
    let ticks = PRODUCE_FOR.as_millis() / TICK.as_millis();
    let mut rows = 0;
    for k in 0..ticks as u32 {
        // A late commit is caught up at once: the load stays 2,000 rows/s on average.
        tokio::time::sleep_until((start + TICK * k).into()).await;
        let top = insert_seqs(&client, rows + 1, ROWS_PER_COMMIT, 1).await?;
        top_id.fetch_max(top, Ordering::SeqCst);
        rows += ROWS_PER_COMMIT;
    }
    Ok((rows, rows as f64 / start.elapsed().as_secs_f64()))
}
