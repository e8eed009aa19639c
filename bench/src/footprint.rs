//! Footprint of many sources: 100 databases, mostly idle, in one relay.
//! Counts the relay's connections (pg_stat_activity, application_name
//! "outboxd") and its RSS once every source is up.

use std::time::{Duration, Instant};

use crate::Options;
use crate::env::{AMQP, Env};
use crate::report::Report;

const SOURCES: usize = 100;

pub async fn run(env: &Env, _o: &Options, report: &mut Report) -> Result<(), String> {
    let max: String = env
        .admin
        .query_one("SHOW max_connections", &[])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    let max: usize = max.parse().unwrap_or(0);
    if max < SOURCES * 2 + 20 {
        println!(
            "{{\"probe\":\"footprint {SOURCES} sources\",\"skipped\":\"max_connections is {max}; needs {} (ALTER SYSTEM SET max_connections = 300, then restart PostgreSQL)\"}}",
            SOURCES * 2 + 20
        );
        return Ok(());
    }
    let (_, exchange) = env.declare(crate::env::QueueType::Classic).await?;
    let mut dbs = Vec::new();
    let mut config = format!(
        "[log]\nlevel = \"warn,outboxd::app=info\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n[rabbitmq]\nurl = \"{AMQP}\"\n"
    );
    for i in 0..SOURCES {
        let (name, url) = env.create_db("bench_fp").await?;
        env.migrate(&url).await?;
        config.push_str(&format!(
            "[[source]]\nname = \"s{i}\"\ndatabase_url = \"{url}\"\nexchange = \"{exchange}\"\n"
        ));
        dbs.push(name);
    }
    let relay = env.spawn_relay(&config).await?;
    // Every source up, then a few poll intervals of idling.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = relay.metrics().await;
        let up = m
            .lines()
            .filter(|l| l.starts_with("outboxd_source_up{") && l.ends_with(" 1"))
            .count();
        if up == SOURCES {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("only {up} of {SOURCES} sources came up"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let conns: i64 = env
        .admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'outboxd'",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    report.add(
        format!("connections, {SOURCES} idle sources"),
        "conns",
        vec![conns as f64],
        format!("{:.2} per source", conns as f64 / SOURCES as f64),
    );
    report.add(
        format!("relay RSS, {SOURCES} idle sources"),
        "MB",
        vec![relay.rss_mb()],
        "",
    );
    relay.stop().await;
    for db in dbs {
        env.drop_db(&db).await;
    }
    Ok(())
}
