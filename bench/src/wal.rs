//! `capture = "wal"`: how fast the stream carries a flow to the broker, as
//! a share of the classic ceiling measured in the same run.
//!
//! Unlike the polling drains, the rows are not pre-filled: rows in the
//! table when the relay starts go out by a read of the table, not through
//! the stream. So the relay starts on an empty outbox and its slot, one
//! producer commits `rows` rows (or `outbox_emit()` messages) in
//! transactions of 1,000 as fast as it can (several times the broker's
//! rate), and the figure is rows / time from the first commit to the last
//! confirm.

use std::time::{Duration, Instant};

use crate::Options;
use crate::env::{CpuMark, Env, PAYLOAD_BYTES, QueueType, pg};
use crate::report::{Report, median};

const PER_TRANSACTION: i64 = 1000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Rows,
    Messages,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Rows => "table rows",
            Kind::Messages => "outbox_emit messages",
        }
    }
}

/// Producer single-row insert transactions per second (4 connections) with
/// a `capture = "wal"` relay streaming and publishing them, against the
/// same table with no relay and no slot, runs interleaved.
pub async fn overhead(env: &Env, o: &Options, report: &mut Report) -> Result<(), String> {
    let (plain_db, plain_url) = env.create_db("bench_wal_plain").await?;
    env.migrate(&plain_url).await?;
    let plain = pg(&plain_url).await?;
    // Without the NOTIFY trigger, as migrate leaves a wal source's table.
    plain
        .batch_execute("DROP TRIGGER outbox_notify ON outbox")
        .await
        .map_err(|e| e.to_string())?;
    let (db, url) = env.create_db("bench_wal_overhead").await?;
    let (ch, exchange) = env.declare(QueueType::Classic).await?;
    let (config, slot) = env.wal_config(&url, &exchange, "").await?;
    let relay = env.spawn_relay(&config).await?;
    let admin = pg(&url).await?;
    // The same slot and publication read by PostgreSQL's own client, which
    // decodes nothing and deletes nothing, with no broker: what logical
    // decoding alone costs the producers (the walsender's CPU), apart from
    // what the relay, its deletes and the broker take.
    let (recv_db, recv_url) = env.create_db("bench_wal_recv").await?;
    let (_, recv_slot) = env.wal_config(&recv_url, &exchange, "").await?;
    let recv = pg(&recv_url).await?;
    let mut recvlogical = std::process::Command::new("pg_recvlogical")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "root",
            "-d",
            &recv_db,
            "-S",
            &recv_slot,
        ])
        .args([
            "--start",
            "-f",
            "/dev/null",
            "-F",
            "1",
            "-o",
            "proto_version=1",
        ])
        .arg("-o")
        .arg(format!("publication_names={recv_slot}"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start pg_recvlogical: {e}"))?;
    let (mut none, mut decoding, mut with) = (Vec::new(), Vec::new(), Vec::new());
    let mut fed = Vec::new();
    for _ in 0..o.repeats {
        for table in [&plain, &recv] {
            table
                .batch_execute("TRUNCATE outbox")
                .await
                .map_err(|e| e.to_string())?;
        }
        let cpu = CpuMark::now(Some(&relay));
        none.push(crate::overhead::insert_rate(&plain_url).await?);
        cpu.report("producers, no relay, no slot CPU", Some(&relay));
        let cpu = CpuMark::now(Some(&relay));
        decoding.push(crate::overhead::insert_rate(&recv_url).await?);
        cpu.report("producers, slot read by pg_recvlogical CPU", Some(&relay));
        let cpu = CpuMark::now(Some(&relay));
        with.push(crate::overhead::insert_rate(&url).await?);
        cpu.report("producers, wal relay streaming CPU", Some(&relay));
        // Let the relay catch up before the next pair.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left: i64 = admin
                .query_one("SELECT count(*) FROM outbox", &[])
                .await
                .map_err(|e| e.to_string())?
                .get(0);
            if left == 0 || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Logical decoding as before, and the broker taking what the relay
        // published just now (the producers' rate with it), from the bench
        // instead of the relay: the producers' loss that is neither
        // decoding nor the broker is the relay's own (its CPU, its deletes).
        let rate = with.last().copied().unwrap_or_default();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let cpu = CpuMark::now(Some(&relay));
        let (published, produced) =
            tokio::join!(feed_broker(env, &exchange, rate, stopped), async {
                let produced = crate::overhead::insert_rate(&recv_url).await;
                let _ = stop.send(());
                produced
            });
        cpu.report(
            "producers, slot read by pg_recvlogical, broker fed by the bench CPU",
            Some(&relay),
        );
        let published = published?;
        fed.push(produced?);
        println!(
            "{{\"probe\":\"broker fed beside pg_recvlogical\",\"rate\":{rate:.0},\"published\":{published}}}"
        );
    }
    let base = median(&none);
    report.add(
        "producer inserts/s, no relay, no slot",
        "rows/s",
        none,
        format!(
            "{} connections, single-row transactions",
            crate::overhead::PRODUCERS
        ),
    );
    let d = median(&decoding);
    report.add(
        "producer inserts/s with the slot read by pg_recvlogical (no relay, no broker)",
        "rows/s",
        decoding,
        format!("{:.3} of no relay: logical decoding alone", d / base),
    );
    let f = median(&fed);
    report.add(
        "producer inserts/s with the slot read by pg_recvlogical and the broker fed the relay's rate by the bench (no relay)",
        "rows/s",
        fed,
        format!(
            "{:.3} of no relay, {:.3} of pg_recvlogical: decoding and the broker's work, without the relay",
            f / base,
            f / d
        ),
    );
    let m = median(&with);
    report.add(
        "producer inserts/s with a capture = \"wal\" relay streaming",
        "rows/s",
        with,
        format!(
            "{:.3} of no relay, {:.3} of pg_recvlogical, {:.3} of pg_recvlogical with the broker fed",
            m / base,
            m / d,
            m / f
        ),
    );
    let _ = recvlogical.kill();
    let _ = recvlogical.wait();
    drop(recv);
    env.drop_wal_db(&recv_db, &recv_url, &recv_slot).await;
    relay.stop().await;
    env.undeclare(&ch, &exchange).await;
    drop(admin);
    drop(plain);
    env.drop_wal_db(&db, &url, &slot).await;
    env.drop_db(&plain_db).await;
    Ok(())
}

/// Publishes small persistent messages to `exchange` (routed to its
/// queue) on one channel with confirms, `rate` a second, until `stop`:
/// the broker's work when a wal relay publishes the producers' rows, with
/// no relay. Returns how many it published, each acked.
async fn feed_broker(
    env: &Env,
    exchange: &str,
    rate: f64,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<u64, String> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let ch = env.amqp.create_channel().await.map_err(|e| e.to_string())?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    // The producers' payload, as the relay sends it.
    let body = br#"{"k":1}"#;
    let start = Instant::now();
    let mut sent = 0u64;
    let mut waits = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        let due = (start.elapsed().as_secs_f64() * rate) as u64;
        let mut confirms = Vec::new();
        while sent < due {
            let props = lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(format!("feed-{sent}").into());
            let opts = BasicPublishOptions {
                mandatory: true,
                immediate: false,
            };
            let confirm = ch
                .basic_publish(
                    exchange.into(),
                    "order.OrderCreated".into(),
                    opts,
                    body,
                    props,
                )
                .await
                .map_err(|e| e.to_string())?;
            confirms.push(confirm);
            sent += 1;
        }
        if !confirms.is_empty() {
            waits.spawn(async move {
                for confirm in confirms {
                    let c = confirm.await.map_err(|e| e.to_string())?;
                    if !matches!(c, lapin::Confirmation::Ack(None)) {
                        return Err(format!("a fed message was not acked: {c:?}"));
                    }
                }
                Ok(())
            });
        }
        while let Some(done) = waits.try_join_next() {
            done.map_err(|e| e.to_string())??;
        }
    }
    while let Some(done) = waits.join_next().await {
        done.map_err(|e| e.to_string())??;
    }
    let _ = ch.close(200, "OK".into()).await;
    Ok(sent)
}

pub async fn run(env: &Env, o: &Options, ceiling: f64, report: &mut Report) -> Result<(), String> {
    // What one channel can take, the order of a wal relay, for comparison.
    let (ch, name) = env.declare(QueueType::Classic).await?;
    for depth in [1usize, 2, 4] {
        let rates = one_channel(env, o, &ch, &name, depth).await?;
        let rate = median(&rates);
        report.add(
            format!("broker alone, one channel, {depth} chunk(s) of 1000 in flight"),
            "msg/s",
            rates,
            format!("{:.2} of ceiling ({ceiling:.0} msg/s)", rate / ceiling),
        );
    }
    env.undeclare(&ch, &name).await;
    // The cores the relay and PostgreSQL used in each flow, and each
    // flow's median rate.
    let mut side_cores = Vec::new();
    let mut flows = Vec::new();
    for kind in [Kind::Rows, Kind::Messages] {
        for aggregates in [1usize, 1000] {
            let mut rates = Vec::new();
            let mut pg_us = Vec::new();
            for _ in 0..o.repeats {
                let flow = once(env, o, kind, aggregates, o.rows).await?;
                rates.push(flow.rate);
                pg_us.push(flow.pg_us);
                side_cores.push(flow.side_cores);
            }
            let what = format!(
                "wal {}, {aggregates} aggregate(s), {} rows",
                kind.name(),
                o.rows
            );
            let rate = median(&rates);
            flows.push((what.clone(), rate));
            report.add(
                format!("flow {what}"),
                "msg/s",
                rates,
                format!("{:.2} of ceiling ({ceiling:.0} msg/s)", rate / ceiling),
            );
            report.add(
                format!("PostgreSQL CPU per message, flow {what}"),
                "µs",
                pg_us,
                "user+system of every postgres process (producer's inserts included)",
            );
        }
    }
    // One channel again, while threads of the bench spin the CPU the relay
    // and PostgreSQL used in the flows: what the broker's one channel (the
    // commit order) can take on this machine beside them.
    let cores = median(&side_cores);
    let (ch, name) = env.declare(QueueType::Classic).await?;
    let mut beside = 0f64;
    for depth in [2usize, 4] {
        let busy = crate::env::Neighbour::burn(cores);
        let rates = one_channel(env, o, &ch, &name, depth).await;
        drop(busy);
        let rates = rates?;
        beside = beside.max(median(&rates));
        report.add(
            format!(
                "broker alone, one channel, {depth} chunk(s) of 1000 in flight, beside {cores:.2} busy cores"
            ),
            "msg/s",
            rates,
            "the cores the relay and PostgreSQL used in the flows (median), spun by threads of the bench",
        );
    }
    env.undeclare(&ch, &name).await;
    for (what, rate) in flows {
        report.add(
            format!("flow {what}, of one channel beside the relay and PostgreSQL"),
            "×",
            vec![rate / beside],
            format!("the flow's median over the better of the two rates above ({beside:.0} msg/s)"),
        );
    }
    Ok(())
}

/// The broker alone on one channel to the queue behind `exchange`,
/// `depth` chunks of 1,000 in flight: msg/s of each repeat, the queue
/// purged after each.
async fn one_channel(
    env: &Env,
    o: &Options,
    ch: &lapin::Channel,
    exchange: &str,
    depth: usize,
) -> Result<Vec<f64>, String> {
    let mut rates = Vec::new();
    for _ in 0..o.repeats {
        rates
            .push(crate::ceiling::one_channel_pipelined(env, exchange, o.rows, 1000, depth).await?);
        ch.queue_purge(exchange.into(), Default::default())
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(rates)
}

/// What one flow measured.
struct Flow {
    /// messages per second
    rate: f64,
    /// PostgreSQL CPU per message, µs
    pg_us: f64,
    /// cores the relay and PostgreSQL used meanwhile
    side_cores: f64,
}

/// One flow.
async fn once(
    env: &Env,
    o: &Options,
    kind: Kind,
    aggregates: usize,
    rows: usize,
) -> Result<Flow, String> {
    let (db, url) = env.create_db("bench_wal").await?;
    let (ch, exchange) = env.declare(QueueType::Classic).await?;
    let (config, slot) = env.wal_config(&url, &exchange, &o.source_extra).await?;
    let relay = env.spawn_relay(&config).await?;
    relay
        .wait_for(
            "outboxd_slot_active{source=\"bench\"}",
            1.0,
            Duration::from_secs(30),
            "the wal relay streaming",
        )
        .await?;
    let producer = pg(&url).await?;
    let pad = PAYLOAD_BYTES as i32 - 25;
    let (aggs, total) = (aggregates as i64, rows as i64);
    let mark = CpuMark::now(Some(&relay));
    let produce = tokio::spawn(async move {
        let mut first = 1i64;
        while first <= total {
            let last = (first + PER_TRANSACTION - 1).min(total);
            let sql = match kind {
                Kind::Rows => {
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                     SELECT 'order', 'o-' || (g % $3), 'OrderCreated', jsonb_build_object('seq', g, 'pad', repeat('x', $4)) \
                     FROM generate_series($1::bigint, $2::bigint) g"
                }
                Kind::Messages => {
                    "SELECT count(outbox_emit('order', 'o-' || (g % $3), 'OrderCreated', \
                         jsonb_build_object('seq', g, 'pad', repeat('x', $4)))) \
                     FROM generate_series($1::bigint, $2::bigint) g"
                }
            };
            producer
                .execute(sql, &[&first, &last, &aggs, &pad])
                .await
                .map_err(|e| e.to_string())?;
            first = last + 1;
        }
        Ok::<_, String>(())
    });
    relay.wait_published(rows, "the wal flow").await?;
    let used = mark.report(
        &format!("wal flow {} {aggregates} aggregate(s) CPU", kind.name()),
        Some(&relay),
    );
    let (elapsed, pg_cpu) = (used.seconds, used.postgres * used.seconds);
    let side_cores = used.postgres + used.relay;
    produce.await.map_err(|e| e.to_string())??;
    let queued = env.message_count(QueueType::Classic, &exchange).await? as usize;
    relay.stop().await;
    if queued < rows {
        return Err(format!(
            "wal flow ended with {queued} of {rows} messages queued"
        ));
    }
    env.undeclare(&ch, &exchange).await;
    env.drop_wal_db(&db, &url, &slot).await;
    Ok(Flow {
        rate: rows as f64 / elapsed,
        pg_us: pg_cpu * 1e6 / rows as f64,
        side_cores,
    })
}
