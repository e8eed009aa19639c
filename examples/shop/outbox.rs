//! The producer side: an event is a row in the service's own outbox table,
//! inserted in the same transaction as the change it reports. outboxd
//! relays it once that transaction commits, and never if it rolls back.

use deadpool_postgres::Transaction;

use crate::shop::error::Error;
use crate::shop::events::Event;

/// Inserts `event` into the outbox in the caller's transaction.
///
/// The dedup key (the AMQP `message_id`) is the event type and the order:
/// each order has at most one event of each type, so the key names the
/// fact, and a consumer's inbox drops any second copy of it.
pub async fn emit(tx: &Transaction<'_>, event: &Event) -> Result<(), Error> {
    let dedup_key = format!("{}:{}", event.kind(), event.order_id());
    tx.execute(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, dedup_key) \
         VALUES ($1, $2, $3, $4, $5)",
        &[
            &event.aggregate_type(),
            &event.order_id(),
            &event.kind(),
            &event.payload(),
            &dedup_key,
        ],
    )
    .await?;
    Ok(())
}
