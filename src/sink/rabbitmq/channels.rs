//! A publisher's channels and the exchanges its rows name: a pool of
//! confirm-mode channels (one per batch in flight), and a cache of the
//! exchanges a passive declare found, so a row naming a missing exchange
//! fails on its own instead of closing the channel under its neighbours.

use std::collections::HashSet;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use lapin::options::{ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ErrorKind, ExchangeKind};

use super::publish::RabbitPublisher;
use crate::message::Outbound;
use crate::sink::{Failure, Unavailable};
use crate::telemetry::ErrorChain;

/// How long an exchange found by a passive declare is trusted to exist.
const EXCHANGE_TTL: Duration = Duration::from_secs(60);

impl RabbitPublisher {
    pub(super) fn forget_exchanges(&self) {
        self.exchanges
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// A confirm-mode channel: a pooled one if it is still open, else a new one.
    pub(super) async fn channel(&self, conn: &Connection) -> Result<Channel, Unavailable> {
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
            Unavailable(format!("{what}: {}", ErrorChain(&err)))
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
    pub(super) async fn missing_exchanges(
        &self,
        conn: &Connection,
        messages: &[Result<Outbound, Failure>],
    ) -> Result<HashSet<ShortString>, Unavailable> {
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
) -> Result<bool, Unavailable> {
    let probe = conn
        .create_channel()
        .await
        .map_err(|e| Unavailable(format!("cannot open a channel: {}", ErrorChain(&e))))?;
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
        Ok(()) => {
            // Close it ourselves rather than on drop, so a connection closed
            // right after (as `check` does) does not race the channel close.
            let _ = probe.close(200, "OK".into()).await;
            Ok(true)
        }
        Err(err) if is_not_found(&err) => Ok(false),
        Err(err) => Err(Unavailable(format!(
            "cannot check exchange {:?}: {}",
            exchange.as_str(),
            ErrorChain(&err)
        ))),
    }
}

fn is_not_found(err: &lapin::Error) -> bool {
    matches!(err.kind(), ErrorKind::ProtocolError(e) if *e.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
}
