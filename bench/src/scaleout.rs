//! Scale-out: the same pre-filled table (1,000 aggregates) drained by 1, 2
//! and 3 relays at once, with `ordering = "aggregate"` (partitions shared
//! through advisory locks) and `"none"` (any relay, any row). Prints the
//! rate and each relay's share, so an idle relay shows.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::Options;
use crate::drain::AGGREGATES;
use crate::env::{Env, QueueType, Relay, pg, relay_config, sample};
use crate::report::{Report, median};

const SERIES: &str = "outboxd_messages_published_total{source=\"bench\"}";

/// The median rate, and the lowest and highest share of one relay over
/// every repeat.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    pub rate: f64,
    pub share_lo: f64,
    pub share_hi: f64,
}

/// Each (ordering, relays) is measured once per run; the goals reuse them.
#[derive(Default)]
pub struct Runs {
    done: HashMap<(&'static str, usize), Outcome>,
    ratios: HashMap<&'static str, f64>,
}

impl Runs {
    pub async fn measure(
        &mut self,
        env: &Env,
        ordering: &'static str,
        relays: usize,
        o: &Options,
        ceiling: f64,
        report: &mut Report,
    ) -> Result<Outcome, String> {
        if let Some(d) = self.done.get(&(ordering, relays)) {
            return Ok(*d);
        }
        let d = measure(env, ordering, relays, o, ceiling, report).await?;
        self.done.insert((ordering, relays), d);
        Ok(d)
    }

    /// The rate of 3 relays over that of 1, reported once per ordering.
    pub async fn ratio(
        &mut self,
        env: &Env,
        ordering: &'static str,
        o: &Options,
        ceiling: f64,
        report: &mut Report,
    ) -> Result<f64, String> {
        if let Some(r) = self.ratios.get(ordering) {
            return Ok(*r);
        }
        let one = self.measure(env, ordering, 1, o, ceiling, report).await?;
        let three = self.measure(env, ordering, 3, o, ceiling, report).await?;
        let ratio = three.rate / one.rate;
        report.add(
            format!("scale-out 3 relays / 1 relay ordering={ordering}"),
            "×",
            vec![ratio],
            format!("{:.0} / {:.0} msg/s (medians)", three.rate, one.rate),
        );
        self.ratios.insert(ordering, ratio);
        Ok(ratio)
    }
}

pub async fn run(
    runs: &mut Runs,
    env: &Env,
    o: &Options,
    ceiling: f64,
    report: &mut Report,
) -> Result<(), String> {
    for ordering in ["aggregate", "none"] {
        for relays in 1..=3usize {
            runs.measure(env, ordering, relays, o, ceiling, report)
                .await?;
        }
        runs.ratio(env, ordering, o, ceiling, report).await?;
    }
    Ok(())
}

async fn measure(
    env: &Env,
    ordering: &str,
    relays: usize,
    o: &Options,
    ceiling: f64,
    report: &mut Report,
) -> Result<Outcome, String> {
    let mut rates = Vec::new();
    let mut shares = Vec::new();
    for _ in 0..o.repeats {
        let (rate, share) = once(env, ordering, relays, o).await?;
        rates.push(rate);
        shares.extend(share);
    }
    let rate = median(&rates);
    let (share_lo, share_hi) = shares
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), s| (lo.min(*s), hi.max(*s)));
    report.add(
        format!("scale-out {relays} relay(s) ordering={ordering}"),
        "msg/s",
        rates,
        format!(
            "{:.2} of classic ceiling; each relay's share {:.0}-{:.0}%",
            rate / ceiling,
            share_lo * 100.0,
            share_hi * 100.0
        ),
    );
    Ok(Outcome {
        rate,
        share_lo,
        share_hi,
    })
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
    env.insert_rows(&url, rows, AGGREGATES).await?;
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
