//! The broker's ceiling: raw lapin publishing of the same messages (512-byte
//! persistent bodies, mandatory, confirms, the relay's properties), with no
//! database in the loop. Several pipelining shapes are tried; the best is
//! the ceiling the drain is compared with.

use std::future::{Future, poll_fn};
use std::task::Poll;
use std::time::Instant;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Confirmation};

use crate::Options;
use crate::env::{Env, PAYLOAD_BYTES, QueueType};
use crate::report::{Report, median};

/// The routing key the relay gives the bench's rows (its default
/// `{aggregate_type}.{event_type}`), so the topic exchange routes the same
/// words in both.
const ROUTING_KEY: &str = "order.OrderCreated";

/// (channels, messages per chunk): each channel publishes a chunk, waits for
/// its confirms, and starts the next; `channels` chunks are in flight.
const SHAPES: [(usize, usize); 4] = [(1, 1000), (4, 250), (4, 500), (4, 1000)];

pub async fn run(
    env: &Env,
    queue: QueueType,
    o: &Options,
    report: &mut Report,
) -> Result<f64, String> {
    let ((channels, chunk), samples) = best_shape(env, queue, o).await?;
    Ok(report.add(
        format!(
            "ceiling {} (raw lapin, {channels} ch x {chunk})",
            queue.name()
        ),
        "msg/s",
        samples,
        format!("{} msgs, {PAYLOAD_BYTES} B, persistent, confirms", o.rows),
    ))
}

/// The ceiling again, while threads of this process keep `cores` of the
/// machine busy: what the broker takes when the CPU that the relay and
/// PostgreSQL use in a drain is not its to use. On a machine with few
/// cores this, not the ceiling alone, is the most a relay beside the
/// broker can reach with that much CPU of its own and the database's.
pub async fn beside(
    env: &Env,
    queue: QueueType,
    o: &Options,
    cores: f64,
    what: &str,
    report: &mut Report,
) -> Result<f64, String> {
    let busy = crate::env::Neighbour::burn(cores);
    let best = best_shape(env, queue, o).await;
    drop(busy);
    let ((channels, chunk), samples) = best?;
    Ok(report.add(
        format!(
            "ceiling {} beside {cores:.2} busy cores ({what}; {channels} ch x {chunk})",
            queue.name()
        ),
        "msg/s",
        samples,
        "the same probe, with threads of the bench spinning that much CPU",
    ))
}

/// Tries every shape; returns the best with its samples.
async fn best_shape(
    env: &Env,
    queue: QueueType,
    o: &Options,
) -> Result<((usize, usize), Vec<f64>), String> {
    let (ch, name) = env.declare(queue).await?;
    let n = o.rows;
    let mut best: Option<((usize, usize), Vec<f64>)> = None;
    for shape in SHAPES {
        let mut samples = Vec::new();
        for _ in 0..o.repeats {
            let mark = crate::env::CpuMark::now(None);
            let rate = publish(env, &name, n, shape).await?;
            mark.report(
                &format!("ceiling {} {}ch x {} CPU", queue.name(), shape.0, shape.1),
                None,
            );
            ch.queue_purge(name.as_str().into(), QueuePurgeOptions::default())
                .await
                .map_err(|e| e.to_string())?;
            samples.push(rate);
        }
        println!(
            "{{\"probe\":\"ceiling {} {}ch x {}\",\"median_msgs_per_s\":{:.0}}}",
            queue.name(),
            shape.0,
            shape.1,
            median(&samples)
        );
        if best
            .as_ref()
            .is_none_or(|(_, b)| median(&samples) > median(b))
        {
            best = Some((shape, samples));
        }
    }
    env.undeclare(&ch, &name).await;
    best.ok_or_else(|| "no ceiling measured".to_owned())
}

fn properties(i: usize) -> BasicProperties {
    let mut headers = FieldTable::default();
    let s = |v: &str| AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()));
    headers.insert("x-outbox-source".into(), s("bench"));
    headers.insert("x-outbox-id".into(), AMQPValue::LongLongInt(i as i64));
    headers.insert("x-aggregate-type".into(), s("order"));
    headers.insert("x-aggregate-id".into(), s("o-1"));
    BasicProperties::default()
        .with_message_id(format!("ceiling-{i}").into())
        .with_type("OrderCreated".into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp(1)
        .with_app_id("outboxd".into())
        .with_headers(headers)
}

/// Publishes `n` messages in the given shape; returns messages per second.
async fn publish(
    env: &Env,
    exchange: &str,
    n: usize,
    (channels, chunk): (usize, usize),
) -> Result<f64, String> {
    let body = format!(
        "{{\"seq\":0,\"pad\":\"{}\"}}",
        "x".repeat(PAYLOAD_BYTES - 20)
    )
    .into_bytes();
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for c in 0..channels {
        let ch = env.amqp.create_channel().await.map_err(|e| e.to_string())?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        let share = n / channels + usize::from(c < n % channels);
        let body = body.clone();
        let exchange = exchange.to_owned();
        tasks.spawn(async move {
            let mut sent = 0;
            while sent < share {
                let k = chunk.min(share - sent);
                let opts = BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                };
                let mut futs: Vec<_> = (0..k)
                    .map(|i| {
                        Box::pin(ch.basic_publish(
                            exchange.as_str().into(),
                            ROUTING_KEY.into(),
                            opts,
                            &body,
                            properties(sent + i),
                        ))
                    })
                    .collect();
                let mut done: Vec<Option<lapin::Result<lapin::PublisherConfirm>>> =
                    (0..k).map(|_| None).collect();
                poll_fn(|cx| {
                    let mut pending = false;
                    for (f, d) in futs.iter_mut().zip(done.iter_mut()) {
                        if d.is_none() {
                            match f.as_mut().poll(cx) {
                                Poll::Ready(r) => *d = Some(r),
                                Poll::Pending => pending = true,
                            }
                        }
                    }
                    if pending {
                        Poll::Pending
                    } else {
                        Poll::Ready(())
                    }
                })
                .await;
                drop(futs);
                for d in done.into_iter().flatten() {
                    let confirm = d.map_err(|e| e.to_string())?;
                    match confirm.await.map_err(|e| e.to_string())? {
                        Confirmation::Ack(None) => {}
                        other => return Err(format!("ceiling publish not acked: {other:?}")),
                    }
                }
                sent += k;
            }
            Ok::<_, String>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// The broker alone on **one** channel (the order a `capture = "wal"`
/// relay needs), pipelined: a chunk's confirms are awaited while the next
/// `depth - 1` chunks are published. Messages per second.
pub async fn one_channel_pipelined(
    env: &Env,
    exchange: &str,
    n: usize,
    chunk: usize,
    depth: usize,
) -> Result<f64, String> {
    let body = format!(
        "{{\"seq\":0,\"pad\":\"{}\"}}",
        "x".repeat(PAYLOAD_BYTES - 20)
    )
    .into_bytes();
    let ch = env.amqp.create_channel().await.map_err(|e| e.to_string())?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let opts = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    let mut waiting = std::collections::VecDeque::new();
    let started = Instant::now();
    let mut sent = 0;
    while sent < n {
        let k = chunk.min(n - sent);
        let mut confirms = Vec::with_capacity(k);
        for i in 0..k {
            let c = ch
                .basic_publish(
                    exchange.into(),
                    ROUTING_KEY.into(),
                    opts,
                    &body,
                    properties(sent + i),
                )
                .await
                .map_err(|e| e.to_string())?;
            confirms.push(c);
        }
        waiting.push_back(tokio::spawn(async move {
            for c in confirms {
                match c.await.map_err(|e| e.to_string())? {
                    Confirmation::Ack(None) => {}
                    other => return Err(format!("publish not acked: {other:?}")),
                }
            }
            Ok::<_, String>(())
        }));
        while waiting.len() >= depth {
            if let Some(front) = waiting.pop_front() {
                front.await.map_err(|e| e.to_string())??;
            }
        }
        sent += k;
    }
    for w in waiting {
        w.await.map_err(|e| e.to_string())??;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let _ = ch.close(200, "OK".into()).await;
    Ok(rate)
}
