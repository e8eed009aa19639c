//! A running service: a database pool and a few consumers on its queue.
//! Each message is handled in one transaction that records it in the inbox
//! and makes the change (with any outbox rows the change causes); the
//! consumer acks only after that transaction has committed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use deadpool_postgres::Pool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::shop::error::Error;
use crate::shop::events::Event;
use crate::shop::names::Service;
use crate::shop::{consumer, db, inbox, inventory, orders, payments};

#[derive(Clone, Debug)]
pub struct ServiceOptions {
    pub service: Service,
    pub database_url: String,
    pub amqp_url: String,
    pub queue: String,
    /// Consumers, each on its own connection and channel.
    pub consumers: usize,
    /// Unacked deliveries the broker may push to one consumer.
    pub prefetch: u16,
    /// Demo only: every n-th handled message is not acked but handed back
    /// to the broker after its commit, as if the consumer had died between
    /// commit and ack. The broker redelivers it and the inbox drops it.
    pub lose_ack_every: Option<u64>,
}

/// What a service did, for logs and tests. The inbox table keeps the same
/// counts durably.
#[derive(Debug, Default)]
pub struct Stats {
    /// First deliveries handled and committed.
    pub handled: AtomicU64,
    /// Redeliveries the inbox dropped.
    pub duplicates: AtomicU64,
    /// Messages that can never be handled, rejected without requeue.
    pub rejected: AtomicU64,
    /// Broker sessions started (the first one, then one per reconnect).
    pub sessions: AtomicU64,
    /// Demo faults: acks deliberately not sent.
    pub lost_acks: AtomicU64,
}

impl Stats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub(crate) fn add(counter: &AtomicU64) -> u64 {
        counter.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// How a message was applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The first delivery: the change is committed.
    Handled,
    /// A redelivery: the inbox already had it; nothing changed.
    Duplicate,
}

pub struct Ctx {
    pub options: ServiceOptions,
    pub pool: Pool,
    pub stats: Arc<Stats>,
}

impl Ctx {
    pub fn service(&self) -> Service {
        self.options.service
    }

    /// Records the message in the inbox and, if it is new, makes its
    /// change, all in one transaction. Any error rolls all of it back.
    pub async fn apply(&self, message_id: &str, event: &Event) -> Result<Applied, Error> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let fresh = inbox::record(&tx, message_id, event.kind()).await?;
        if fresh {
            match self.service() {
                Service::Orders => orders::handle(&tx, event).await?,
                Service::Payments => payments::handle(&tx, event, message_id).await?,
                Service::Inventory => inventory::handle(&tx, event, message_id).await?,
            }
        }
        tx.commit().await?;
        Ok(if fresh {
            Applied::Handled
        } else {
            Applied::Duplicate
        })
    }
}

/// Runs the service until `stop` is cancelled. Consumers stop at safe
/// points: between messages, or between retries of one.
pub async fn run(
    options: ServiceOptions,
    stats: Arc<Stats>,
    stop: CancellationToken,
) -> Result<(), Error> {
    let pool = db::pool(
        &options.database_url,
        options.consumers + 1,
        &format!("shop-{}", options.service),
    )?;
    let service = options.service;
    let ctx = Arc::new(Ctx {
        options,
        pool,
        stats,
    });
    info!(%service, queue = %ctx.options.queue, consumers = ctx.options.consumers, "service starting");
    let mut tasks = JoinSet::new();
    for worker in 0..ctx.options.consumers.max(1) {
        tasks.spawn(consumer::run(ctx.clone(), worker, stop.clone()));
    }
    while let Some(done) = tasks.join_next().await {
        if let Err(err) = done {
            error!(%service, error = %err, "consumer task failed");
        }
    }
    let s = &ctx.stats;
    info!(
        %service,
        handled = Stats::get(&s.handled),
        duplicates = Stats::get(&s.duplicates),
        rejected = Stats::get(&s.rejected),
        sessions = Stats::get(&s.sessions),
        "service stopped"
    );
    Ok(())
}
