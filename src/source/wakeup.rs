//! Step 1: wake-ups. A dedicated connection LISTENs on the source's channel
//! and turns each notification into a wake-up of the relay loop; the relay
//! also polls every `poll_interval`, because a notification sent while this
//! connection is down is lost for good (and the wake-up flag, see
//! `flag.rs`, lets producers skip NOTIFY while the relay is busy).
//!
//! deadpool drives pooled connections with `connection.await`, which throws
//! notifications away, so this connection is opened with tokio-postgres
//! directly and driven with `poll_message`. It also runs the backlog query
//! behind `outboxd_pending_messages` and reads the operator's pause flag
//! (`pause.rs`; a pause or resume also arrives as a notification), and it
//! holds the relay's membership lock of the table, so an idle source
//! holds two connections: this one and one pooled connection for its polls.

use crate::metrics::SourceError;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, NoTls, Socket};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Source, backlog, liveness, order, pause};
use crate::backoff::Backoff;
use crate::ident::quote_ident;
use crate::telemetry::ErrorChain;
use std::collections::BTreeSet;

const RECONNECT: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));

/// Keeps the LISTEN connection up until `stop` fires, refreshing the
/// backlog gauges on it every `backlog_interval`.
pub async fn run(source: Arc<Source>, backlog_interval: Duration, stop: CancellationToken) {
    let name = source.config.name.clone();
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        let error = tokio::select! {
            _ = stop.cancelled() => break,
            e = listen(&source, backlog_interval) => e,
        };
        source.health.set_listening(false);
        // The partition locks went with the connection.
        drop_partitions(&source);
        failures += 1;
        source.metrics.error(SourceError::Listener).inc();
        let delay = RECONNECT.jittered(failures.min(20));
        warn!(source = %name, error = %ErrorChain(&error), retry_in = ?delay, "notification listener lost; polling every poll_interval until it is back");
        // Whatever was notified while we were away is found by the next claim.
        source.wake.notify_one();
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    source.health.set_listening(false);
    drop_partitions(&source);
}

fn drop_partitions(source: &Source) {
    source.health.set_ownership(Vec::new(), 0);
    if !source.partitions.borrow().is_empty() {
        source.partitions.send_replace(Arc::new(Vec::new()));
        source.metrics.partitions_owned.set(0);
        source.metrics.rebalances.inc();
    }
}

/// A query on the listener, bounded by [`super::DB_TIMEOUT`]: one that
/// gets no answer in time (`Err(Elapsed)`) means a dead link that
/// keepalives have not caught (yet), and the partitions must not be
/// trusted any longer.
type Bounded<'a, T> = Pin<
    Box<
        dyn Future<Output = Result<Result<T, tokio_postgres::Error>, tokio::time::error::Elapsed>>
            + Send
            + 'a,
    >,
>;

type Rebalance<'a> = Bounded<'a, (BTreeSet<i32>, i32)>;

type Query<'a> = Bounded<'a, tokio_postgres::Row>;

type PauseRead<'a> = Bounded<'a, Option<tokio_postgres::Row>>;

fn apply_pause(source: &Source, paused: bool) {
    pause::apply(
        &source.config.name,
        &source.health,
        &source.metrics.paused,
        paused,
    );
}

/// Why the listener's connection ended (it always ends in an error: the
/// listener runs until it is stopped). The tokio-postgres error is the
/// source; print with `ErrorChain`, which shows the server's message.
#[derive(Debug, thiserror::Error)]
enum Stopped {
    #[error("{0}")]
    Tls(#[source] crate::tls::TlsError),
    #[error("cannot connect: {0}")]
    Connect(#[source] tokio_postgres::Error),
    #[error("cannot connect: no answer within {:?}", super::DB_TIMEOUT)]
    ConnectTimedOut,
    #[error("connection failed: {0}")]
    Connection(#[source] tokio_postgres::Error),
    #[error("connection closed by the server")]
    Closed,
    #[error("LISTEN failed: {0}")]
    Listen(#[source] tokio_postgres::Error),
    #[error("rebalancing partitions failed: {0}")]
    Rebalance(#[source] tokio_postgres::Error),
    #[error("a query on the listener got no answer within {:?}", super::DB_TIMEOUT)]
    Stalled,
}

/// Connects (in the source's TLS mode), LISTENs, forwards notifications
/// and runs the backlog query; returns why it stopped.
async fn listen(source: &Source, backlog_interval: Duration) -> Stopped {
    match crate::tls::pg_connector(&source.config.tls) {
        Ok(None) => listen_with(source, backlog_interval, NoTls).await,
        Ok(Some(tls)) => listen_with(source, backlog_interval, tls).await,
        Err(e) => Stopped::Tls(e),
    }
}

async fn listen_with<T>(source: &Source, backlog_interval: Duration, tls: T) -> Stopped
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + Unpin,
{
    // This connection holds the partition locks (ordering = "aggregate"):
    // if the link dies silently, both ends should notice within seconds,
    // not the OS default of two hours: TCP keepalives on both ends, so the
    // server ends the session (and frees the locks for the other relays);
    // and, for a relay alive to TCP but not running, an idle limit
    // (`liveness`).
    let mut database = source.config.database.clone();
    liveness::keepalives(&mut database);
    let (client, mut connection) =
        match tokio::time::timeout(super::DB_TIMEOUT, database.connect(tls)).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return Stopped::Connect(e),
            Err(_) => return Stopped::ConnectTimedOut,
        };
    // idle_session_timeout exists from PostgreSQL 14 on; older servers
    // keep only the keepalives. Only an ordered source's listener holds
    // locks, and only it runs a query every poll interval.
    let idle_limit = if source.config.ordering.ordered() {
        format!(
            "SELECT set_config('idle_session_timeout', '{}', false) \
             WHERE current_setting('server_version_num')::int >= 140000; ",
            liveness::as_setting_ms(liveness::listener_idle_limit(source.config.poll_interval))
        )
    } else {
        String::new()
    };
    // Every relay joins the table's members on this connection (a shared
    // session lock), so `outboxd status` can list the relays on a table
    // from `pg_locks`; with `ordering = "aggregate"` the rebalance counts
    // them too.
    let listen_sql = format!(
        "{idle_limit}{}; LISTEN {}",
        order::join_sql(&source.queries.lock_keys),
        quote_ident(&source.config.notify_channel)
    );
    let mut listen = Box::pin(client.batch_execute(&listen_sql));
    let mut listening = false;
    let mut ticker = tokio::time::interval(backlog_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut query: Option<Query<'_>> = None;
    // ordering = "aggregate": this connection holds the relay's membership
    // and partition locks, and rebalances once per poll interval.
    let ordered = source.config.ordering.ordered();
    let mut rebalance_tick = tokio::time::interval(source.config.poll_interval);
    rebalance_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rebalancing: Option<Rebalance<'_>> = None;
    // The pause flag, read on this connection once per poll interval (and
    // as soon as listening starts).
    let mut pause_tick = tokio::time::interval(source.config.poll_interval);
    pause_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pause_read: Option<PauseRead<'_>> = None;
    let mut owned = BTreeSet::new();
    // Relays that start together reach for different partitions first.
    let offset = (std::process::id() as i32).rem_euclid(order::PARTITIONS);
    loop {
        tokio::select! {
            // The connection must be polled for any query on it to complete.
            message = poll_fn(|cx| connection.poll_message(cx)) => match message {
                Some(Ok(AsyncMessage::Notification(n))) => match pause::from_payload(n.payload()) {
                    Some(paused) => apply_pause(source, paused),
                    None => source.wake.notify_one(),
                },
                Some(Ok(AsyncMessage::Notice(notice))) => debug!(source = %source.config.name, %notice, "notice on the listener"),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Stopped::Connection(e),
                None => return Stopped::Closed,
            },
            result = &mut listen, if !listening => match result {
                Ok(()) => {
                    listening = true;
                    source.health.set_listening(true);
                    info!(source = %source.config.name, channel = %source.config.notify_channel, "listening for notifications");
                    // Rows committed before LISTEN took effect sent no wake-up we saw.
                    source.wake.notify_one();
                }
                Err(e) => return Stopped::Listen(e),
            },
            _ = ticker.tick(), if listening && query.is_none() => {
                query = Some(Box::pin(tokio::time::timeout(
                    super::DB_TIMEOUT,
                    client.query_one(&source.queries.backlog, &[]),
                )));
            }
            result = async { query.as_mut().expect("guarded by is_some").await }, if query.is_some() => {
                query = None;
                let Ok(result) = result else {
                    return Stopped::Stalled;
                };
                backlog::record(source, result);
            }
            _ = pause_tick.tick(), if listening && pause_read.is_none() => {
                pause_read = Some(Box::pin(tokio::time::timeout(
                    super::DB_TIMEOUT,
                    client.query_opt(&source.queries.paused, &[]),
                )));
            }
            result = async { pause_read.as_mut().expect("guarded by is_some").await }, if pause_read.is_some() => {
                pause_read = None;
                let Ok(result) = result else {
                    return Stopped::Stalled;
                };
                match pause::decode(result) {
                    Ok(paused) => apply_pause(source, paused),
                    Err(error) => {
                        source.metrics.error(SourceError::BacklogQuery).inc();
                        debug!(source = %source.config.name, %error, "reading the pause flag failed; keeping the last state");
                    }
                }
            }
            _ = rebalance_tick.tick(), if ordered && listening && rebalancing.is_none() => {
                let (client, sql, keys, mine) = (&client, &source.queries.order, &source.queries.lock_keys, owned.clone());
                rebalancing = Some(Box::pin(tokio::time::timeout(
                    super::DB_TIMEOUT,
                    order::rebalance(client, sql, keys, mine, offset),
                )));
            }
            result = async { rebalancing.as_mut().expect("guarded by is_some").await }, if rebalancing.is_some() => {
                rebalancing = None;
                let Ok(result) = result else {
                    return Stopped::Stalled;
                };
                match result {
                    Ok((now_owned, relays)) => {
                        source.metrics.relays.set(i64::from(relays));
                        source.health.set_ownership(now_owned.iter().copied().collect(), relays);
                        if now_owned != owned {
                            info!(
                                source = %source.config.name,
                                relays,
                                owned = now_owned.len(),
                                was = owned.len(),
                                "partitions rebalanced"
                            );
                            owned = now_owned;
                            source.metrics.partitions_owned.set(owned.len() as i64);
                            source.metrics.rebalances.inc();
                            source.partitions.send_replace(Arc::new(owned.iter().copied().collect()));
                        }
                    }
                    Err(e) => return Stopped::Rebalance(e),
                }
            }
        }
    }
}
