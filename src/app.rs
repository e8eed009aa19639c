//! `outboxd run`: wire the parts together, run until the drain token fires,
//! then drain within `shutdown.drain_timeout` and stop in order.
//!
//! Order of stopping: relays drain first (they need the broker and the
//! pools), then the listeners, backlog and retention tasks stop, then the
//! broker connection closes, and the HTTP server goes last so `/metrics`
//! and a 503 `/readyz` stay visible for the whole drain.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::admin::{self, AdminState};
use crate::config::{AfterPublish, Config};
use crate::metrics::Metrics;
use crate::relay::Relay;
use crate::sink::rabbitmq::{Broker, RabbitPublisher};
use crate::source::{self, Source, SourceHealth};
use crate::wal::relay::WalRelay;

/// Time given to aborted batches and helper tasks to wind down after the drain.
const WIND_DOWN: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot listen on {addr} for metrics and health: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(#[from] source::pool::PoolError),
    /// The drain timeout ended a drain with claimed rows still in flight:
    /// they stay in the outbox and go out after the next start.
    #[error(
        "drain timeout reached: {rows} claimed row(s) were not published and stay in the outbox"
    )]
    Abandoned { rows: usize },
}

/// Runs the relay until `drain` is cancelled (by a signal, or by a test).
pub async fn run(config: Config, drain: CancellationToken) -> Result<(), AppError> {
    let metrics = Arc::new(Metrics::new());
    let listener = TcpListener::bind(config.metrics.listen)
        .await
        .map_err(|source| AppError::Bind {
            addr: config.metrics.listen,
            source,
        })?;
    let admin_addr = listener.local_addr().unwrap_or(config.metrics.listen);

    let broker = Broker::new(config.rabbitmq.clone(), metrics.broker());
    let broker_stop = CancellationToken::new();
    let broker_task = tokio::spawn(broker.clone().run(broker_stop.clone()));

    let helpers_stop = CancellationToken::new();
    let abort = CancellationToken::new();
    let mut helpers = JoinSet::new();
    let mut relays = JoinSet::new();
    let mut health_list = Vec::new();
    for cfg in &config.sources {
        let pool = source::pool::build(cfg, config.rabbitmq.confirm_timeout)?;
        let health = Arc::new(SourceHealth::new(&cfg.name));
        let source_metrics = metrics.source(&cfg.name);
        let src = Arc::new(Source::new(
            cfg.clone(),
            pool,
            source_metrics.clone(),
            health.clone(),
        ));
        // A healthy loop turns at least once per poll interval. Saturating:
        // the config bounds poll_interval, this is the second line of defence.
        let stuck_after = cfg
            .poll_interval
            .saturating_mul(3)
            .saturating_add(Duration::from_secs(10));
        health_list.push((health.clone(), stuck_after));
        if cfg.capture.wal().is_none() && cfg.ordering != crate::config::Ordering::None {
            helpers.spawn(source::order::warn_if_unindexed(
                src.pool.clone(),
                cfg.clone(),
                helpers_stop.clone(),
            ));
        }
        if cfg.mapping.is_some() {
            helpers.spawn(crate::forward::state::at_start(
                src.pool.clone(),
                cfg.clone(),
                helpers_stop.clone(),
            ));
        }
        if let Some(wal) = cfg.capture.wal() {
            // The log wakes the relay and orders its rows: no listener, no
            // partitions. The slot's gauges and the table's backlog instead.
            let slot_metrics = metrics.slot(&cfg.name);
            // No listener to hear the pause: read it every poll interval.
            helpers.spawn(source::pause::watch(
                src.pool.clone(),
                cfg.table.clone(),
                cfg.name.clone(),
                health.clone(),
                source_metrics.paused.clone(),
                cfg.poll_interval,
                helpers_stop.clone(),
            ));
            helpers.spawn(crate::wal::upkeep::run(
                src.clone(),
                wal.clone(),
                slot_metrics.clone(),
                config.metrics.backlog_interval,
                helpers_stop.clone(),
            ));
            if let (AfterPublish::Mark, Some(retention)) = (cfg.after_publish, cfg.retention) {
                helpers.spawn(source::retention::run(
                    src.clone(),
                    retention,
                    helpers_stop.clone(),
                ));
            }
            let mut wal_relay = WalRelay::new(
                cfg.clone(),
                wal.clone(),
                source_metrics,
                health,
                src.pool.clone(),
                Arc::new(RabbitPublisher::new(
                    broker.clone(),
                    config.rabbitmq.confirm_timeout,
                )),
            );
            wal_relay.polling = Some(slot_metrics.polling);
            let (wal_relay, drain, abort) = (Arc::new(wal_relay), drain.clone(), abort.clone());
            relays.spawn(async move {
                let r = &wal_relay;
                source::pause::first_read(
                    &r.pool,
                    &r.config.table,
                    &r.config.name,
                    &r.health,
                    &r.metrics.paused,
                )
                .await;
                wal_relay.run(drain, abort).await
            });
            continue;
        }
        helpers.spawn(source::wakeup::run(
            src.clone(),
            config.metrics.backlog_interval,
            helpers_stop.clone(),
        ));
        if let (AfterPublish::Mark, Some(retention)) = (cfg.after_publish, cfg.retention) {
            helpers.spawn(source::retention::run(
                src.clone(),
                retention,
                helpers_stop.clone(),
            ));
        }
        let relay = Arc::new(Relay {
            config: cfg.clone(),
            metrics: source_metrics,
            health,
            capture: src,
            publisher: Arc::new(RabbitPublisher::new(
                broker.clone(),
                config.rabbitmq.confirm_timeout,
            )),
        });
        let (drain, abort) = (drain.clone(), abort.clone());
        relays.spawn(async move {
            let src = &relay.capture;
            source::pause::first_read(
                &src.pool,
                &src.config.table,
                &src.config.name,
                &src.health,
                &src.metrics.paused,
            )
            .await;
            relay.run(drain, abort).await
        });
    }

    let server_stop = CancellationToken::new();
    let state = Arc::new(AdminState {
        metrics: metrics.clone(),
        broker: broker.clone(),
        sources: health_list,
        draining: drain.clone(),
    });
    let server = tokio::spawn(admin::serve(listener, state, server_stop.clone()));
    info!(
        version = env!("CARGO_PKG_VERSION"),
        sources = config.sources.len(),
        broker = %config.rabbitmq.describe(),
        admin = %admin_addr,
        "outboxd running"
    );

    // Rows that claimed batches still held when the drain gave up.
    let mut abandoned = 0;
    // Wait for the drain to be asked for, or for every relay to end on its own.
    tokio::select! {
        _ = drain.cancelled() => {}
        _ = wait_all(&mut relays, |n| abandoned += n) => {}
    }
    let drained = tokio::time::timeout(
        config.drain_timeout,
        wait_all(&mut relays, |n| abandoned += n),
    )
    .await;
    if drained.is_err() {
        warn!(timeout = ?config.drain_timeout, "drain timeout reached; abandoning in-flight batches");
        abort.cancel();
        if tokio::time::timeout(WIND_DOWN, wait_all(&mut relays, |n| abandoned += n))
            .await
            .is_err()
        {
            error!("some relays did not stop; exiting anyway (their rows stay in the outbox)");
        }
    }
    helpers_stop.cancel();
    let _ = tokio::time::timeout(WIND_DOWN, wait_all(&mut helpers, |()| {})).await;
    broker_stop.cancel();
    let _ = tokio::time::timeout(WIND_DOWN, broker_task).await;
    server_stop.cancel();
    match tokio::time::timeout(WIND_DOWN, server).await {
        Ok(Ok(Err(err))) => warn!(error = %err, "metrics server ended with an error"),
        Ok(_) => {}
        Err(_) => warn!("metrics server did not stop in time"),
    }
    info!("outboxd stopped");
    if abandoned > 0 {
        return Err(AppError::Abandoned { rows: abandoned });
    }
    Ok(())
}

/// Waits for every task of `set`, handing what each returns to `done`.
async fn wait_all<T: 'static>(set: &mut JoinSet<T>, mut done: impl FnMut(T)) {
    while let Some(result) = set.join_next().await {
        match result {
            Ok(n) => done(n),
            Err(err) if err.is_panic() => error!(error = %err, "a task panicked"),
            Err(_) => {}
        }
    }
}
