//! The broker side: one topic exchange for every event, and one queue per
//! consuming service, bound to the events it handles (`events::ROUTES`).
//! outboxd never declares anything; this is the shop's own setup.

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use crate::shop::error::Error;
use crate::shop::events;
use crate::shop::names::{Names, Service};

/// How long-lived the topology is.
#[derive(Clone, Copy, Debug)]
pub enum Lifetime {
    /// Durable exchange and queues, for the demo: they survive a broker restart.
    Durable,
    /// For a test: not durable, and each queue deletes itself after this
    /// many milliseconds unused, should the test die before its cleanup.
    Expiring(u32),
}

/// Declares the exchange and the three queues with their bindings, and
/// purges the queues (`purge`), so a rerun of the demo starts clean.
pub async fn declare(
    channel: &Channel,
    names: &Names,
    lifetime: Lifetime,
    purge: bool,
) -> Result<(), Error> {
    let durable = matches!(lifetime, Lifetime::Durable);
    channel
        .exchange_declare(
            names.exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let mut args = FieldTable::default();
    if let Lifetime::Expiring(ms) = lifetime {
        args.insert("x-expires".into(), AMQPValue::LongUInt(ms));
    }
    for service in Service::ALL {
        let queue = names.queue(service);
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable,
                    ..Default::default()
                },
                args.clone(),
            )
            .await?;
        for key in events::bindings(service) {
            channel
                .queue_bind(
                    queue.as_str().into(),
                    names.exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        if purge {
            channel
                .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
                .await?;
        }
    }
    Ok(())
}

/// Messages ready in each service's queue (not counting those delivered
/// and not yet acked).
pub async fn ready(channel: &Channel, names: &Names) -> Result<Vec<(Service, u32)>, Error> {
    let mut out = Vec::new();
    for service in Service::ALL {
        let queue = channel
            .queue_declare(
                names.queue(service).as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        out.push((service, queue.message_count()));
    }
    Ok(out)
}

/// Deletes the queues and the exchange.
pub async fn delete(channel: &Channel, names: &Names) -> Result<(), Error> {
    for service in Service::ALL {
        channel
            .queue_delete(
                names.queue(service).as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await?;
    }
    channel
        .exchange_delete(
            names.exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await?;
    Ok(())
}
