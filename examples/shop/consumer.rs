//! One consumer: a broker connection and channel with manual acks and a
//! prefetch limit, and the rules that make it safe.
//!
//! - A delivery is acked only after its transaction committed. A crash (or
//!   a lost connection) between the commit and the ack brings the message
//!   back, and the inbox drops it.
//! - A database error rolls the transaction back, and the same delivery is
//!   tried again with backoff; it is never acked unhandled.
//! - A lost connection ends the session: the broker puts every unacked
//!   delivery back in the queue, and the consumer reconnects with backoff.
//! - A message that can never be handled (no message id, a body that is
//!   not the event it claims to be) is rejected without requeue, and
//!   logged; with a dead-letter exchange on the queue it would land there.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::shop::error::Error;
use crate::shop::events::Event;
use crate::shop::service::{Applied, Ctx, Stats};

/// Heartbeat asked for unless the URL sets one: a silent broker is noticed
/// within about twice this.
const HEARTBEAT_SECS: u16 = 10;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a waiting consumer double-checks its connection.
const STATUS_CHECK: Duration = Duration::from_secs(1);
/// Bound of one step on the channel (open, qos, consume, ack). Once, in the
/// shop test, a consumer cut off while inside a transaction never came
/// back after its commit: most likely its ack waited forever on the dead
/// connection (lapin 4.12; not reproduced since). With a bound, such a
/// hang ends the session and the consumer reconnects.
const BROKER_STEP: Duration = Duration::from_secs(5);

/// Runs a step on the channel within [`BROKER_STEP`].
async fn bounded<T>(
    step: &str,
    fut: impl std::future::Future<Output = Result<T, lapin::Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(BROKER_STEP, fut).await {
        Ok(done) => done.map_err(Error::from),
        Err(_) => Err(Error::Other(format!(
            "{step}: no answer within {BROKER_STEP:?}"
        ))),
    }
}

/// Capped doubling delays with jitter, for reconnects and retries.
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            next: first,
        }
    }

    /// The next delay: somewhere in [½, 1] of the current step.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        step.mul_f64(0.5 + fastrand::f64() / 2.0)
    }

    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// Consumes until `stop` is cancelled, reconnecting whenever the session ends.
pub async fn run(ctx: Arc<Ctx>, worker: usize, stop: CancellationToken) {
    let service = ctx.service();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    while !stop.is_cancelled() {
        match session(&ctx, worker, &stop, &mut backoff).await {
            Ok(()) => return,
            Err(err) => {
                let delay = backoff.next_delay();
                warn!(%service, worker, error = %err, retry_in_ms = delay.as_millis() as u64, "broker session ended; reconnecting");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

async fn connect(url: &str, name: String) -> Result<Connection, Error> {
    let mut uri: AMQPUri = url
        .parse()
        .map_err(|e| Error::Other(format!("bad AMQP URL: {e}")))?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(HEARTBEAT_SECS);
    }
    let props = ConnectionProperties::default().with_connection_name(name.into());
    tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect_uri(uri, props))
        .await
        .map_err(|_| Error::Other(format!("no connection within {CONNECT_TIMEOUT:?}")))?
        .map_err(Error::from)
}

/// One connection's life. Ok when stopped, an error when the connection
/// or channel went away.
async fn session(
    ctx: &Ctx,
    worker: usize,
    stop: &CancellationToken,
    backoff: &mut Backoff,
) -> Result<(), Error> {
    let name = format!("shop-{}-{worker}", ctx.service());
    let conn = connect(&ctx.options.amqp_url, name).await?;
    let result = consume(ctx, &conn, worker, stop, backoff).await;
    // Closing hands the unacked deliveries back to the queue at once.
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(200, "bye".into())).await;
    result
}

async fn consume(
    ctx: &Ctx,
    conn: &Connection,
    worker: usize,
    stop: &CancellationToken,
    backoff: &mut Backoff,
) -> Result<(), Error> {
    let service = ctx.service();
    let channel = bounded("open a channel", conn.create_channel()).await?;
    bounded(
        "set the prefetch",
        channel.basic_qos(ctx.options.prefetch, BasicQosOptions::default()),
    )
    .await?;
    let consumer = bounded(
        "start consuming",
        channel.basic_consume(
            ctx.options.queue.as_str().into(),
            format!("shop-{service}-{worker}").into(),
            // no_ack: false, the default: every delivery waits for our ack.
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    let mut consumer = Box::pin(consumer);
    let sessions = Stats::add(&ctx.stats.sessions);
    info!(%service, worker, queue = %ctx.options.queue, session = sessions, "consuming");
    backoff.reset();
    let mut check = tokio::time::interval(STATUS_CHECK);
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(()),
            _ = check.tick() => {
                if !conn.status().connected() || !channel.status().connected() {
                    return Err(Error::Other("connection lost".into()));
                }
                continue;
            }
            next = poll_fn(|cx| consumer.as_mut().poll_next(cx)) => next,
        };
        let delivery = match next {
            Some(delivery) => delivery?,
            None => return Err(Error::Other("the broker cancelled the consumer".into())),
        };
        if !handle(ctx, &channel, delivery, stop).await? {
            return Ok(());
        }
    }
}

/// Handles one delivery to its ack. False when `stop` came first (the
/// delivery is then left unacked, and goes back to the queue).
async fn handle(
    ctx: &Ctx,
    channel: &Channel,
    delivery: Delivery,
    stop: &CancellationToken,
) -> Result<bool, Error> {
    let service = ctx.service();
    let props = &delivery.properties;
    let message_id = props.message_id().as_ref().map(|s| s.to_string());
    let kind = props.kind().as_ref().map(|s| s.to_string());
    let event = Event::parse(kind.as_deref(), &delivery.data);
    let (message_id, event) = match (message_id, event) {
        (Some(id), Ok(event)) if event.consumer() == Some(service) => (id, event),
        (id, event) => {
            let reason = match (&id, event) {
                (None, _) => "no message id, so no way to drop its duplicates".to_owned(),
                (_, Err(bad)) => bad.to_string(),
                (_, Ok(event)) => format!("{} is not for {service}", event.kind()),
            };
            Stats::add(&ctx.stats.rejected);
            error!(%service, message_id = ?id, %reason, "message can never be handled; rejected");
            acked(
                bounded(
                    "reject",
                    delivery.reject(BasicRejectOptions { requeue: false }),
                )
                .await,
            )?;
            return Ok(true);
        }
    };

    let mut retry = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    let applied = loop {
        match ctx.apply(&message_id, &event).await {
            Ok(applied) => break applied,
            Err(err) => {
                let delay = retry.next_delay();
                warn!(%service, %message_id, error = %err, retry_in_ms = delay.as_millis() as u64, "handling failed; rolled back, retrying");
                if !channel.status().connected() {
                    // The broker has put the delivery back already.
                    return Err(Error::Other("channel lost while retrying a message".into()));
                }
                tokio::select! {
                    _ = stop.cancelled() => return Ok(false),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    };

    // Committed. Only now may the broker forget the message.
    match applied {
        Applied::Handled => {
            let handled = Stats::add(&ctx.stats.handled);
            debug!(%service, %message_id, event = event.kind(), "handled");
            if ctx
                .options
                .lose_ack_every
                .is_some_and(|every| every > 0 && handled.is_multiple_of(every))
            {
                Stats::add(&ctx.stats.lost_acks);
                info!(%service, %message_id, "demo fault: committed, but handed back instead of acked; the broker will redeliver it");
                let requeue = BasicNackOptions {
                    requeue: true,
                    multiple: false,
                };
                acked(bounded("nack", delivery.nack(requeue)).await)?;
                return Ok(true);
            }
        }
        Applied::Duplicate => {
            Stats::add(&ctx.stats.duplicates);
            info!(%service, %message_id, event = event.kind(), redelivered = delivery.redelivered, "duplicate dropped by the inbox");
        }
    }
    acked(bounded("ack", delivery.ack(BasicAckOptions::default())).await)?;
    Ok(true)
}

/// An ack (or reject) that did not reach the channel ends the session; the
/// broker redelivers the message, and the inbox drops it.
fn acked(sent: Result<bool, Error>) -> Result<(), Error> {
    match sent {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::Other(
            "channel closed before the ack; the message will come again".into(),
        )),
        Err(err) => Err(Error::Other(format!(
            "ack failed ({err}); the message will come again"
        ))),
    }
}
