//! Drain: pre-fill the outbox, start outboxd, time until the table is empty
//! (or, in mark mode, fully marked) and the queue holds every message.

use std::time::{Duration, Instant};

use crate::Options;
use crate::env::{Env, QueueType, cpu_of, pg, relay_config, sample};
use crate::report::Report;

pub async fn run(
    env: &Env,
    queue: QueueType,
    o: &Options,
    ceiling: f64,
    report: &mut Report,
) -> Result<(), String> {
    for ordering in ["aggregate", "none"] {
        for mode in ["delete", "mark"] {
            let mut rates = Vec::new();
            let mut cpu_us = Vec::new();
            let mut rss = Vec::new();
            for _ in 0..o.repeats {
                let (rate, cpu, mb) = once(env, queue, mode, ordering, o).await?;
                rates.push(rate);
                cpu_us.push(cpu);
                rss.push(mb);
            }
            let median = crate::report::median(&rates);
            let what = format!("{} {mode} ordering={ordering}", queue.name());
            report.add(
                format!("drain {what}"),
                "msg/s",
                rates,
                format!("{:.2} of ceiling ({:.0} msg/s)", median / ceiling, ceiling),
            );
            report.add(
                format!("relay CPU per message, drain {what}"),
                "µs",
                cpu_us,
                "user+system of the outboxd process",
            );
            report.add(format!("relay RSS after drain {what}"), "MB", rss, "");
        }
    }
    Ok(())
}

/// One drain; returns (msg/s, relay CPU µs per message, relay RSS MB).
async fn once(
    env: &Env,
    queue: QueueType,
    mode: &str,
    ordering: &str,
    o: &Options,
) -> Result<(f64, f64, f64), String> {
    let rows = o.rows;
    let (db, url) = env.create_db("bench_drain").await?;
    env.migrate(&url).await?;
    env.fill(&url, rows).await?;
    let (ch, exchange) = env.declare(queue).await?;
    let client = pg(&url).await?;
    let count_sql = if mode == "mark" {
        "SELECT count(*) FROM outbox WHERE published_at IS NULL"
    } else {
        "SELECT count(*) FROM outbox"
    };
    let config = relay_config(
        &url,
        &exchange,
        &format!(
            "after_publish = \"{mode}\"\nordering = \"{ordering}\"\n{}",
            o.source_extra
        ),
    );
    let relay = env.spawn_relay(&config).await?;
    let (broker0, pg0) = (cpu_of("beam.smp"), cpu_of("postgres"));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    // Watch the relay's own counter: polling count(*) on the table would
    // cost the database more than the relay does.
    loop {
        let published = sample(
            &relay.metrics().await,
            "outboxd_messages_published_total{source=\"bench\"}",
        )
        .unwrap_or(0.0);
        if published as usize >= rows {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "drain did not finish in 10 minutes ({published} published)"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (broker_cpu, pg_cpu) = (cpu_of("beam.smp") - broker0, cpu_of("postgres") - pg0);
    println!(
        "{{\"probe\":\"drain {} {mode} ordering={ordering} CPU\",\"seconds\":{elapsed:.2},\"broker_cores\":{:.2},\"postgres_cores\":{:.2},\"relay_cores\":{:.2}}}",
        queue.name(),
        broker_cpu / elapsed,
        pg_cpu / elapsed,
        relay.cpu_seconds() / elapsed
    );
    let left: i64 = client
        .query_one(count_sql, &[])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    let queued = env.message_count(queue, &exchange).await? as usize;
    if left != 0 || queued != rows {
        return Err(format!(
            "drain ended with {left} rows left and {queued} of {rows} messages queued"
        ));
    }
    let cpu = relay.cpu_seconds();
    let rss = relay.rss_mb();
    relay.stop().await;
    env.undeclare(&ch, &exchange).await;
    drop(client);
    env.drop_db(&db).await;
    Ok((rows as f64 / elapsed, cpu * 1e6 / rows as f64, rss))
}
