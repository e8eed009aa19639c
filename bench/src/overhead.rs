//! Producer overhead of the NOTIFY trigger: single-row insert transactions
//! as fast as 4 connections go, without the trigger, with the trigger while
//! the wake-up flag is disarmed (the relay is busy: the steady state under
//! load), and with it armed (every commit notifies: the worst case, which
//! the relay only allows while it is idle). Runs are interleaved, so drift
//! on a shared machine hits each mode alike.

use std::time::{Duration, Instant};

use crate::Options;
use crate::env::{Env, pg};
use crate::report::{Report, median};

pub const PRODUCERS: usize = 4;
const SECONDS: u64 = 5;

pub async fn run(env: &Env, o: &Options, report: &mut Report) -> Result<(), String> {
    let (db, url) = env.create_db("bench_overhead").await?;
    env.migrate(&url).await?;
    let admin = pg(&url).await?;
    // A listener, as the relay keeps one (NOTIFY costs more with one).
    let listener = pg(&url).await?;
    listener
        .batch_execute("LISTEN \"outboxd.public.outbox\"")
        .await
        .map_err(|e| e.to_string())?;
    let modes = [
        (
            "without trigger",
            "ALTER TABLE outbox DISABLE TRIGGER outbox_notify",
        ),
        (
            "with trigger, flag disarmed (relay busy)",
            "ALTER TABLE outbox ENABLE TRIGGER outbox_notify; UPDATE outbox_wakeup SET armed = false",
        ),
        (
            "with trigger, flag armed (every commit notifies)",
            "ALTER TABLE outbox ENABLE TRIGGER outbox_notify; UPDATE outbox_wakeup SET armed = true",
        ),
    ];
    let mut rates = vec![Vec::new(); modes.len()];
    for _ in 0..o.repeats {
        for (i, (_, setup)) in modes.iter().enumerate() {
            admin
                .batch_execute(setup)
                .await
                .map_err(|e| e.to_string())?;
            admin
                .batch_execute("TRUNCATE outbox")
                .await
                .map_err(|e| e.to_string())?;
            rates[i].push(insert_rate(&url).await?);
        }
    }
    let base = median(&rates[0]);
    for ((name, _), samples) in modes.iter().zip(rates) {
        let m = median(&samples);
        report.add(
            format!("producer inserts/s {name}"),
            "rows/s",
            samples,
            format!(
                "{:.1}% below no trigger; {PRODUCERS} connections, single-row transactions",
                (1.0 - m / base) * 100.0
            ),
        );
    }
    drop(listener);
    drop(admin);
    env.drop_db(&db).await;
    Ok(())
}

pub async fn insert_rate(url: &str) -> Result<f64, String> {
    let mut tasks = tokio::task::JoinSet::new();
    let until = Instant::now() + Duration::from_secs(SECONDS);
    for _ in 0..PRODUCERS {
        let client = pg(url).await?;
        tasks.spawn(async move {
            let stmt = client
                .prepare("INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', 'o-' || (random() * 10000)::int, 'OrderCreated', '{\"k\": 1}')")
                .await
                .map_err(|e| e.to_string())?;
            let mut n = 0u64;
            while Instant::now() < until {
                client.execute(&stmt, &[]).await.map_err(|e| e.to_string())?;
                n += 1;
            }
            Ok::<_, String>(n)
        });
    }
    let mut total = 0;
    while let Some(r) = tasks.join_next().await {
        total += r.map_err(|e| e.to_string())??;
    }
    Ok(total as f64 / SECONDS as f64)
}
