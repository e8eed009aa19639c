//! Publishing one batch: take a channel, check exchanges, publish every
//! message with `mandatory`, then collect the confirms.
//!
//! Each batch in flight uses a channel of its own from a small per-source
//! pool, so a channel closed by the broker (404 on a deleted exchange, say)
//! only fails the batch that was using it. Exchanges named by rows are
//! checked with a passive declare on a throw-away channel before anything
//! is published to them, and the answer is cached: a row that names a
//! missing exchange fails on its own instead of closing the channel under
//! its neighbours.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ErrorKind, ExchangeKind};

use super::confirm;
use super::connection::Broker;
use crate::message::Outbound;
use crate::sink::{Failure, FailureReason, Outcome};
use crate::telemetry::ErrorChain;

/// How long an exchange found by a passive declare is trusted to exist.
const EXCHANGE_TTL: Duration = Duration::from_secs(60);

/// The broker could not be used at all; no message of the batch was sent.
#[derive(Debug, thiserror::Error)]
#[error("rabbitmq is unavailable: {0}")]
pub struct BrokerUnavailable(pub String);

/// A source's publisher: its channel pool and its exchange cache.
pub struct Publisher {
    broker: Arc<Broker>,
    idle: Mutex<Vec<Channel>>,
    exchanges: Mutex<HashMap<ShortString, Instant>>,
    confirm_timeout: Duration,
}

impl Publisher {
    pub fn new(broker: Arc<Broker>, confirm_timeout: Duration) -> Self {
        Self {
            broker,
            idle: Mutex::new(Vec::new()),
            exchanges: Mutex::new(HashMap::new()),
            confirm_timeout,
        }
    }

    /// Sends a batch. `messages[i]` is either a message or the reason the
    /// row could not become one; the result has one outcome per entry, in
    /// order. `Err` means nothing was sent (no connection, no channel).
    pub async fn send(
        &self,
        messages: Vec<Result<Outbound, Failure>>,
    ) -> Result<Vec<Outcome>, BrokerUnavailable> {
        let conn = self
            .broker
            .connection()
            .ok_or_else(|| BrokerUnavailable("not connected".to_owned()))?;
        let missing = self.missing_exchanges(&conn, &messages).await?;
        let channel = self.channel(&conn).await?;

        let mut outcomes = Vec::with_capacity(messages.len());
        let mut pending = Vec::with_capacity(messages.len());
        let mut broken: Option<String> = None;
        for (index, message) in messages.into_iter().enumerate() {
            let message = match message {
                Ok(m) => m,
                Err(failure) => {
                    outcomes.push(Outcome::Failed(failure));
                    continue;
                }
            };
            if missing.contains(&message.exchange) {
                outcomes.push(Outcome::Failed(Failure::new(
                    FailureReason::ExchangeNotFound,
                    format!("exchange {:?} does not exist", message.exchange.as_str()),
                )));
                continue;
            }
            if let Some(err) = &broken {
                outcomes.push(Outcome::Failed(Failure::new(
                    FailureReason::Connection,
                    err.clone(),
                )));
                continue;
            }
            // Until its confirm arrives, a message counts as not confirmed.
            outcomes.push(Outcome::Failed(Failure::new(
                FailureReason::Timeout,
                "not confirmed",
            )));
            let options = BasicPublishOptions {
                mandatory: true,
                immediate: false,
            };
            match channel
                .basic_publish(
                    message.exchange,
                    message.routing_key,
                    options,
                    &message.body,
                    message.properties,
                )
                .await
            {
                Ok(confirm) => pending.push((index, confirm)),
                Err(err) => {
                    let detail = format!("publish failed: {}", ErrorChain(&err));
                    outcomes[index] =
                        Outcome::Failed(Failure::new(FailureReason::Connection, detail.clone()));
                    broken = Some(detail);
                }
            }
        }
        let healthy = confirm::collect(pending, self.confirm_timeout, &mut outcomes).await;
        if broken.is_none() && healthy && channel.status().connected() {
            self.idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(channel);
        } else {
            // The channel is dropped (and so closed). Whatever closed it may
            // have been a deleted exchange: forget what we knew about exchanges.
            self.exchanges
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
            self.broker.report_failure();
        }
        Ok(outcomes)
    }

    /// A confirm-mode channel: a pooled one if it is still open, else a new one.
    async fn channel(&self, conn: &Connection) -> Result<Channel, BrokerUnavailable> {
        loop {
            let pooled = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            match pooled {
                Some(ch) if ch.status().connected() => return Ok(ch),
                Some(_) => continue,
                None => break,
            }
        }
        let unavailable = |what: &str, err: lapin::Error| {
            self.broker.report_failure();
            BrokerUnavailable(format!("{what}: {}", ErrorChain(&err)))
        };
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| unavailable("cannot open a channel", e))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| unavailable("cannot enable publisher confirms", e))?;
        Ok(ch)
    }

    /// Exchanges named in `messages` that do not exist on the broker.
    async fn missing_exchanges(
        &self,
        conn: &Connection,
        messages: &[Result<Outbound, Failure>],
    ) -> Result<HashSet<ShortString>, BrokerUnavailable> {
        let mut to_check: Vec<&ShortString> = Vec::new();
        {
            let known = self
                .exchanges
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for m in messages.iter().flatten() {
                // The default exchange always exists.
                if m.exchange.as_str().is_empty() || to_check.contains(&&m.exchange) {
                    continue;
                }
                let fresh = known
                    .get(&m.exchange)
                    .is_some_and(|seen| seen.elapsed() < EXCHANGE_TTL);
                if !fresh {
                    to_check.push(&m.exchange);
                }
            }
        }
        let mut missing = HashSet::new();
        for exchange in to_check {
            if exchange_exists(conn, exchange).await? {
                self.exchanges
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(exchange.clone(), Instant::now());
            } else {
                missing.insert(exchange.clone());
            }
        }
        Ok(missing)
    }
}

/// Passive declare on a channel of its own (a 404 closes the channel).
pub async fn exchange_exists(
    conn: &Connection,
    exchange: &ShortString,
) -> Result<bool, BrokerUnavailable> {
    let probe = conn
        .create_channel()
        .await
        .map_err(|e| BrokerUnavailable(format!("cannot open a channel: {}", ErrorChain(&e))))?;
    let options = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    match probe
        .exchange_declare(
            exchange.clone(),
            ExchangeKind::Direct,
            options,
            FieldTable::default(),
        )
        .await
    {
        Ok(()) => Ok(true),
        Err(err) if is_not_found(&err) => Ok(false),
        Err(err) => Err(BrokerUnavailable(format!(
            "cannot check exchange {:?}: {}",
            exchange.as_str(),
            ErrorChain(&err)
        ))),
    }
}

fn is_not_found(err: &lapin::Error) -> bool {
    matches!(err.kind(), ErrorKind::ProtocolError(e) if *e.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
}
