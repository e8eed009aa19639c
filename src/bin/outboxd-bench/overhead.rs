//! Producer overhead of the NOTIFY trigger: single-row insert transactions
//! as fast as 4 connections go, with the trigger and without it, while a
//! connection LISTENs (as the relay does).

use std::time::{Duration, Instant};

use crate::Options;
use crate::env::{Env, pg};
use crate::report::Report;

const PRODUCERS: usize = 4;
const SECONDS: u64 = 5;

pub async fn run(env: &Env, o: &Options, report: &mut Report) -> Result<(), String> {
    let (db, url) = env.create_db("bench_overhead").await?;
    env.migrate(&url).await?;
    let listener = pg(&url).await?;
    listener
        .batch_execute("LISTEN \"outboxd.public.outbox\"")
        .await
        .map_err(|e| e.to_string())?;
    let admin = pg(&url).await?;
    let mut with = Vec::new();
    let mut without = Vec::new();
    for _ in 0..o.repeats {
        with.push(insert_rate(&url).await?);
        admin
            .batch_execute("ALTER TABLE outbox DISABLE TRIGGER outbox_notify; TRUNCATE outbox")
            .await
            .map_err(|e| e.to_string())?;
        without.push(insert_rate(&url).await?);
        admin
            .batch_execute("ALTER TABLE outbox ENABLE TRIGGER outbox_notify; TRUNCATE outbox")
            .await
            .map_err(|e| e.to_string())?;
    }
    let w = report.add(
        "producer inserts/s with NOTIFY trigger",
        "rows/s",
        with,
        format!("{PRODUCERS} connections, single-row transactions"),
    );
    let wo = report.add("producer inserts/s without trigger", "rows/s", without, "");
    report.add(
        "NOTIFY trigger overhead",
        "%",
        vec![(1.0 - w / wo) * 100.0],
        "of the producer insert rate (medians)",
    );
    drop(listener);
    drop(admin);
    env.drop_db(&db).await;
    Ok(())
}

async fn insert_rate(url: &str) -> Result<f64, String> {
    let mut tasks = tokio::task::JoinSet::new();
    let until = Instant::now() + Duration::from_secs(SECONDS);
    for _ in 0..PRODUCERS {
        let client = pg(url).await?;
        tasks.spawn(async move {
            let stmt = client
                .prepare("INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', 'o-1', 'OrderCreated', '{\"k\": 1}')")
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
