//! Latency: producers commit single-row transactions at a steady rate, over
//! 10,000 aggregates (one aggregate alone moves one message per round trip
//! under ordering = "aggregate", so a single one would measure that), and
//! for the goals on one aggregate and on 100; we measure commit to consumer
//! receipt (exactly, in this process) and commit to broker confirm (from
//! the relay's `outboxd_relay_lag_seconds` histogram, interpolated within
//! its buckets).

use std::collections::HashMap;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_core::Stream;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;

use crate::Options;
use crate::env::{CpuMark, Env, QueueType, pg, relay_config};
use crate::order::seq_of;
use crate::report::{Report, median, quantile};

/// A steady producer load.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Load {
    pub rate: u32,
    pub secs: u64,
    /// producer connections
    pub conns: usize,
    /// rows go to `'o-' || seq % aggregates`
    pub aggregates: u32,
}

const fn load(rate: u32, secs: u64, conns: usize, aggregates: u32) -> Load {
    Load {
        rate,
        secs,
        conns,
        aggregates,
    }
}

/// Spread wide, so the order of an aggregate does not set the pace.
const SPREAD: u32 = 10_000;

/// The loads of the latency figures.
pub const LOADS: [Load; 4] = [
    load(10, 5, 1, SPREAD),
    load(100, 10, 1, SPREAD),
    load(1000, 6, 4, SPREAD),
    load(5000, 4, 8, SPREAD),
];

/// The goals' loads: 100 rows/s on one aggregate, 1,000 rows/s over 100.
pub const GOAL_LOADS: [Load; 2] = [load(100, 10, 1, 1), load(1000, 6, 4, 100)];

/// Commit→consumer medians over the repeats of one load, in ms.
#[derive(Clone, Copy, Debug)]
pub struct Measured {
    pub load: Load,
    pub p50: f64,
    pub p99: f64,
}

/// The broker alone at one rate, no database: publish→consumer medians
/// over the repeats, in ms (the floor under commit→consumer).
#[derive(Clone, Copy, Debug)]
pub struct Floor {
    pub rate: u32,
    pub p50: f64,
    pub p99: f64,
}

type Receipts = Arc<Mutex<HashMap<i64, Instant>>>;

/// The broker-alone messages carry seqs from here up, so the consumer
/// tells them from the relay's rows (whose seqs start at 0).
const FLOOR_SEQS: i64 = 1 << 40;

/// Runs `loads` in turn against one relay, after the broker alone at each
/// of the `floors` rates.
pub async fn run(
    env: &Env,
    o: &Options,
    report: &mut Report,
    loads: &[Load],
    floors: &[u32],
) -> Result<(Vec<Measured>, Vec<Floor>), String> {
    run_with(env, o, report, loads, floors, false).await
}

/// The same with `capture = "wal"` (its own slot), figures named "wal …".
pub async fn run_wal(
    env: &Env,
    o: &Options,
    report: &mut Report,
    loads: &[Load],
) -> Result<Vec<Measured>, String> {
    Ok(run_with(env, o, report, loads, &[], true).await?.0)
}

async fn run_with(
    env: &Env,
    o: &Options,
    report: &mut Report,
    loads: &[Load],
    floors: &[u32],
    wal: bool,
) -> Result<(Vec<Measured>, Vec<Floor>), String> {
    let (db, url) = env.create_db("bench_latency").await?;
    let (ch, exchange) = env.declare(QueueType::Classic).await?;
    let (config, slot) = if wal {
        env.wal_config(&url, &exchange, &o.source_extra).await?
    } else {
        env.migrate(&url).await?;
        (
            relay_config(&url, &exchange, &o.source_extra),
            String::new(),
        )
    };
    let prefix = if wal { "wal " } else { "" };
    let relay = env.spawn_relay(&config).await?;

    let receipts: Receipts = Arc::default();
    let consumer_ch = env.amqp.create_channel().await.map_err(|e| e.to_string())?;
    let consumer = consumer_ch
        .basic_consume(
            exchange.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let sink = receipts.clone();
    let consumer_task = tokio::spawn(async move {
        let mut consumer = Box::pin(consumer);
        while let Some(Ok(d)) = poll_fn(|cx| Pin::new(&mut consumer).poll_next(cx)).await {
            let now = Instant::now();
            if let Some(seq) = seq_of(&d.data) {
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(seq, now);
            }
            let _ = d.ack(BasicAckOptions::default()).await;
        }
    });

    let mut floor_seq = FLOOR_SEQS;
    let mut measured_floors = Vec::new();
    for &rate in floors {
        let secs = LOADS.iter().find(|l| l.rate == rate).map_or(6, |l| l.secs);
        let (mut p50, mut p99, mut c50, mut c99) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..o.repeats {
            let (confirm, consumer) =
                broker_alone(env, &exchange, rate, secs, &receipts, &mut floor_seq).await?;
            p50.push(quantile(&confirm, 0.5));
            p99.push(quantile(&confirm, 0.99));
            c50.push(quantile(&consumer, 0.5));
            c99.push(quantile(&consumer, 0.99));
        }
        report.add(
            format!("broker alone {rate} msgs/s: publish→confirm p50"),
            "ms",
            p50,
            "raw lapin, no database: the floor under commit→confirm",
        );
        report.add(
            format!("broker alone {rate} msgs/s: publish→confirm p99"),
            "ms",
            p99,
            "",
        );
        measured_floors.push(Floor {
            rate,
            p50: median(&c50),
            p99: median(&c99),
        });
        report.add(
            format!("broker alone {rate} msgs/s: publish→consumer p50"),
            "ms",
            c50,
            "the same messages, to the bench's consumer: the floor under commit→consumer",
        );
        report.add(
            format!("broker alone {rate} msgs/s: publish→consumer p99"),
            "ms",
            c99,
            "",
        );
    }
    // The broker-alone messages went to the same queue; drop them.
    let _ = ch
        .queue_purge(
            exchange.as_str().into(),
            lapin::options::QueuePurgeOptions::default(),
        )
        .await;
    receipts.lock().unwrap_or_else(|e| e.into_inner()).clear();

    let mut next_seq = 0i64;
    let mut measured = Vec::new();
    for &load in loads {
        let mut p50s = Vec::new();
        let mut p99s = Vec::new();
        let mut maxes = Vec::new();
        let mut confirm_p50 = Vec::new();
        let mut confirm_p99 = Vec::new();
        let mut achieved = Vec::new();
        let (mut pg_us, mut relay_us) = (Vec::new(), Vec::new());
        for _ in 0..o.repeats {
            let before = histogram(&relay.metrics().await);
            let cpu = CpuMark::now(Some(&relay));
            let (commits, real_rate) = produce(&url, load, &mut next_seq).await?;
            let (lat, got) = arrivals(&receipts, &commits).await;
            let used = cpu.report(
                &format!("latency {prefix}{} CPU", label(load)),
                Some(&relay),
            );
            let per_row = |cores: f64| cores * used.seconds / commits.len().max(1) as f64 * 1e6;
            pg_us.push(per_row(used.postgres));
            relay_us.push(per_row(used.relay));
            print_stalls(&format!("{prefix}{}", label(load)), &commits, &got);
            if lat.len() < commits.len() {
                return Err(format!(
                    "{} of {} rows did not arrive within 30 s",
                    commits.len() - lat.len(),
                    commits.len()
                ));
            }
            let after = histogram(&relay.metrics().await);
            let delta: Vec<(f64, f64)> = after
                .iter()
                .zip(&before)
                .map(|((le, a), (_, b))| (*le, a - b))
                .collect();
            p50s.push(quantile(&lat, 0.5));
            p99s.push(quantile(&lat, 0.99));
            maxes.push(lat.last().copied().unwrap_or(f64::NAN));
            confirm_p50.push(hist_quantile(&delta, 0.5) * 1e3);
            confirm_p99.push(hist_quantile(&delta, 0.99) * 1e3);
            achieved.push(real_rate);
        }
        let label = format!("{prefix}{}", label(load));
        measured.push(Measured {
            load,
            p50: median(&p50s),
            p99: median(&p99s),
        });
        let note = format!("producers reached {:.0} rows/s", median(&achieved));
        report.add(
            format!("latency {label}: commit→confirm p50"),
            "ms",
            confirm_p50,
            note.clone(),
        );
        report.add(
            format!("latency {label}: commit→confirm p99"),
            "ms",
            confirm_p99,
            "from the relay's histogram",
        );
        report.add(
            format!("latency {label}: commit→consumer p50"),
            "ms",
            p50s,
            note,
        );
        report.add(
            format!("latency {label}: commit→consumer p99"),
            "ms",
            p99s,
            "",
        );
        report.add(
            format!("latency {label}: commit→consumer max"),
            "ms",
            maxes,
            "",
        );
        report.add(
            format!("latency {label}: PostgreSQL CPU per row"),
            "µs",
            pg_us,
            "every postgres process, the producers' inserts included, until the last row arrived",
        );
        report.add(
            format!("latency {label}: relay CPU per row"),
            "µs",
            relay_us,
            "user+system of the outboxd process",
        );
    }
    report.add(
        format!("{prefix}relay RSS, one source, after latency runs"),
        "MB",
        vec![relay.rss_mb()],
        "steady state",
    );
    consumer_task.abort();
    relay.stop().await;
    env.undeclare(&ch, &exchange).await;
    if wal {
        env.drop_wal_db(&db, &url, &slot).await;
    } else {
        env.drop_db(&db).await;
    }
    Ok((measured, measured_floors))
}

/// Waits (at most 30 s) until the consumer has received every seq of
/// `sent` (seq → when it was committed or published). Returns the
/// latencies in ms of those received, sorted (fewer than `sent` if some
/// never came), and the receipts as they were then.
async fn arrivals(
    receipts: &Receipts,
    sent: &HashMap<i64, Instant>,
) -> (Vec<f64>, HashMap<i64, Instant>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = receipts.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if sent.keys().all(|s| got.contains_key(s)) || Instant::now() > deadline {
            let mut lat: Vec<f64> = sent
                .iter()
                .filter_map(|(s, t)| {
                    got.get(s)
                        .map(|r| r.saturating_duration_since(*t).as_secs_f64() * 1e3)
                })
                .collect();
            lat.sort_by(f64::total_cmp);
            return (lat, got);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Above this, a row's commit→consumer counts as slow for [`print_stalls`].
const SLOW_MS: f64 = 5.0;

/// The slow rows of a run, grouped into stalls (slow rows committed
/// within 50 ms of the one before), printed as a JSON line: a few long
/// stalls point at a pause somewhere (a lock, a flush, a scheduler),
/// many short ones at queueing in the relay.
fn print_stalls(what: &str, commits: &HashMap<i64, Instant>, got: &HashMap<i64, Instant>) {
    let Some(first) = commits.values().min().copied() else {
        return;
    };
    let mut slow: Vec<(f64, f64)> = commits
        .iter()
        .filter_map(|(s, c)| {
            let ms = got.get(s)?.saturating_duration_since(*c).as_secs_f64() * 1e3;
            (ms > SLOW_MS).then(|| (c.saturating_duration_since(first).as_secs_f64() * 1e3, ms))
        })
        .collect();
    slow.sort_by(|a, b| a.0.total_cmp(&b.0));
    // (start ms into the run, rows, worst ms)
    let mut stalls: Vec<(f64, usize, f64)> = Vec::new();
    let mut last_at = f64::NEG_INFINITY;
    for (at, ms) in slow {
        match stalls.last_mut() {
            Some(s) if at - last_at <= 50.0 => {
                s.1 += 1;
                s.2 = s.2.max(ms);
            }
            _ => stalls.push((at, 1, ms)),
        }
        last_at = at;
    }
    let list: Vec<String> = stalls
        .iter()
        .map(|(at, n, worst)| format!("[{at:.0},{n},{worst:.1}]"))
        .collect();
    println!(
        "{{\"probe\":\"latency {what}: rows over {SLOW_MS} ms, as stalls [start ms, rows, worst ms]\",\"rows\":{},\"stalls\":[{}]}}",
        commits.len(),
        list.join(",")
    );
}

/// The figures' names of the spread loads are those of earlier runs.
fn label(load: Load) -> String {
    let rate = match load.rate {
        r if r <= 10 => format!("idle ({r} rows/s)"),
        r => format!("{r} rows/s"),
    };
    match load.aggregates {
        SPREAD => rate,
        1 => format!("{rate} on one aggregate"),
        n => format!("{rate} over {n} aggregates"),
    }
}

/// Publishes single persistent messages at `rate` per second, each with
/// its own confirm awaited; returns publish→confirm and publish→consumer
/// latencies in ms (the bench's consumer finds each by its seq, taken
/// from `next_seq` on).
async fn broker_alone(
    env: &Env,
    exchange: &str,
    rate: u32,
    secs: u64,
    receipts: &Receipts,
    next_seq: &mut i64,
) -> Result<(Vec<f64>, Vec<f64>), String> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let ch = env.amqp.create_channel().await.map_err(|e| e.to_string())?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let total = u64::from(rate) * secs;
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let start = Instant::now();
    let mut waits = tokio::task::JoinSet::new();
    let mut sent_at = HashMap::new();
    for i in 0..total {
        tokio::time::sleep_until((start + interval * i as u32).into()).await;
        let seq = *next_seq;
        *next_seq += 1;
        let body = format!("{{\"seq\":{seq}}}");
        let sent = Instant::now();
        sent_at.insert(seq, sent);
        let opts = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let props = lapin::BasicProperties::default().with_delivery_mode(2);
        let confirm = ch
            .basic_publish(
                exchange.into(),
                "baseline".into(),
                opts,
                body.as_bytes(),
                props,
            )
            .await
            .map_err(|e| e.to_string())?;
        waits.spawn(async move {
            let c = confirm.await.map_err(|e| e.to_string())?;
            if !matches!(c, lapin::Confirmation::Ack(None)) {
                return Err(format!("baseline publish not acked: {c:?}"));
            }
            Ok(sent.elapsed().as_secs_f64() * 1e3)
        });
    }
    let mut confirmed = Vec::new();
    while let Some(r) = waits.join_next().await {
        confirmed.push(r.map_err(|e| e.to_string())??);
    }
    confirmed.sort_by(f64::total_cmp);
    let _ = ch.close(200, "OK".into()).await;
    // Every one was confirmed, so each reaches the consumer.
    let (consumed, _) = arrivals(receipts, &sent_at).await;
    if consumed.len() < sent_at.len() {
        return Err(format!(
            "{} of {} broker-alone messages did not reach the consumer within 30 s",
            sent_at.len() - consumed.len(),
            sent_at.len()
        ));
    }
    Ok((confirmed, consumed))
}

/// Commits `rate` single-row transactions per second for `secs` seconds over
/// `conns` connections; returns each row's commit instant by seq, and the rate reached.
async fn produce(
    url: &str,
    Load {
        rate,
        secs,
        conns,
        aggregates,
    }: Load,
    next_seq: &mut i64,
) -> Result<(HashMap<i64, Instant>, f64), String> {
    let total = i64::from(rate) * secs as i64;
    let first = *next_seq;
    *next_seq += total;
    let start = Instant::now() + Duration::from_millis(50);
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..conns {
        let client = pg(url).await?;
        workers.spawn(async move {
            let stmt = client
                .prepare("INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', 'o-' || ($1::bigint % $2::bigint), 'OrderCreated', jsonb_build_object('seq', $1::bigint))")
                .await
                .map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            let mut i = w as i64;
            while i < total {
                tokio::time::sleep_until((start + interval * i as u32).into()).await;
                client.execute(&stmt, &[&(first + i), &i64::from(aggregates)]).await.map_err(|e| e.to_string())?;
                out.push((first + i, Instant::now()));
                i += conns as i64;
            }
            Ok::<_, String>(out)
        });
    }
    let mut commits = HashMap::new();
    while let Some(r) = workers.join_next().await {
        commits.extend(r.map_err(|e| e.to_string())??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok((commits, total as f64 / elapsed))
}

/// Cumulative (le, count) pairs of the lag histogram of source "bench".
fn histogram(metrics: &str) -> Vec<(f64, f64)> {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("outboxd_relay_lag_seconds_bucket{") && l.contains("source=\"bench\"")
        })
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let v = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, v))
        })
        .collect()
}

/// Quantile from cumulative buckets, linear within the bucket (Prometheus' method).
fn hist_quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    if total <= 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return prev.0;
            }
            let width = count - prev.1;
            let frac = if width > 0.0 {
                (rank - prev.1) / width
            } else {
                0.0
            };
            return prev.0 + (le - prev.0) * frac;
        }
        prev = (le, count);
    }
    prev.0
}
