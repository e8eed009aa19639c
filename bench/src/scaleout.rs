//! Scale-out: the same pre-filled table (1,000 aggregates) drained by 1, 2
//! and 3 relays at once, with `ordering = "aggregate"` (partitions shared
//! through advisory locks) and `"none"` (any relay, any row). Prints the
//! rate and each relay's share, so an idle relay shows.

use std::time::{Duration, Instant};

use crate::Options;
use crate::env::{Env, QueueType, Relay, pg, relay_config, sample};
use crate::report::Report;

const SERIES: &str = "outboxd_messages_published_total{source=\"bench\"}";

pub async fn run(env: &Env, o: &Options, ceiling: f64, report: &mut Report) -> Result<(), String> {
    for ordering in ["aggregate", "none"] {
        for relays in 1..=3usize {
            let mut rates = Vec::new();
            let mut shares = Vec::new();
            for _ in 0..o.repeats {
                let (rate, share) = once(env, ordering, relays, o).await?;
                rates.push(rate);
                shares.extend(share);
            }
            let median = crate::report::median(&rates);
            let (lo, hi) = shares
                .iter()
                .fold((f64::MAX, 0.0f64), |(lo, hi), s| (lo.min(*s), hi.max(*s)));
            report.add(
                format!("scale-out {relays} relay(s) ordering={ordering}"),
                "msg/s",
                rates,
                format!(
                    "{:.2} of classic ceiling; each relay's share {:.0}-{:.0}%",
                    median / ceiling,
                    lo * 100.0,
                    hi * 100.0
                ),
            );
        }
    }
    Ok(())
}

/// One drain by `relays` relays; returns (msg/s, each relay's share).
async fn once(
    env: &Env,
    ordering: &str,
    relays: usize,
    o: &Options,
) -> Result<(f64, Vec<f64>), String> {
    let rows = o.rows;
    let (db, url) = env.create_db("bench_scale").await?;
    env.migrate(&url).await?;
    let (ch, exchange) = env.declare(QueueType::Classic).await?;
    let config = relay_config(
        &url,
        &exchange,
        &format!("ordering = \"{ordering}\"\n{}", o.source_extra),
    );
    let mut running: Vec<Relay> = Vec::new();
    for _ in 0..relays {
        running.push(env.spawn_relay(&config).await?);
    }
    // With ordering, wait until the relays have split the partitions (they
    // rebalance once per poll interval), then commit the rows: the figure
    // is the steady state, not the first relay draining alone.
    if ordering == "aggregate" {
        balanced(&running).await?;
    }
    env.insert_rows(&url, rows).await?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    let mut published = vec![0.0; relays];
    loop {
        for (i, r) in running.iter().enumerate() {
            published[i] = sample(&r.metrics().await, SERIES).unwrap_or(published[i]);
        }
        if published.iter().sum::<f64>() as usize >= rows {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "scale-out drain did not finish in 10 minutes ({published:?} published)"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let left: i64 = pg(&url)
        .await?
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    if left != 0 {
        return Err(format!("scale-out drain ended with {left} rows left"));
    }
    let total: f64 = published.iter().sum();
    println!(
        "{{\"probe\":\"scale-out {relays} relay(s) ordering={ordering}\",\"seconds\":{elapsed:.2},\"published_per_relay\":{published:?}}}"
    );
    for r in running {
        r.stop().await;
    }
    env.undeclare(&ch, &exchange).await;
    env.drop_db(&db).await;
    Ok((
        rows as f64 / elapsed,
        published.iter().map(|p| p / total).collect(),
    ))
}

/// Waits until every relay counts them all and they own the 64 partitions
/// between them, none more than its fair share.
async fn balanced(relays: &[Relay]) -> Result<(), String> {
    let n = relays.len();
    let share = 64usize.div_ceil(n) as f64;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut owned = Vec::new();
        let mut counted = Vec::new();
        for r in relays {
            let m = r.metrics().await;
            owned.push(sample(&m, "outboxd_partitions_owned{source=\"bench\"}").unwrap_or(0.0));
            counted.push(sample(&m, "outboxd_relays{source=\"bench\"}").unwrap_or(0.0));
        }
        if owned.iter().sum::<f64>() == 64.0
            && owned.iter().all(|o| *o <= share)
            && counted.iter().all(|c| *c == n as f64)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("relays did not balance in 30 s: owned {owned:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
