//! The inventory service: it reserves stock for a paid order
//! (`StockReserved`), or reports `OutOfStock` when too little is left, which
//! makes payments refund the charge.

use deadpool_postgres::Transaction;

use crate::shop::error::Error;
use crate::shop::events::{Event, OutOfStock, PaymentCaptured, StockReserved};
use crate::shop::outbox;

pub async fn handle(tx: &Transaction<'_>, event: &Event, message_id: &str) -> Result<(), Error> {
    match event {
        Event::PaymentCaptured(paid) => reserve(tx, paid, message_id).await,
        other => Err(Error::Other(format!(
            "inventory does not handle {}",
            other.kind()
        ))),
    }
}

async fn reserve(
    tx: &Transaction<'_>,
    paid: &PaymentCaptured,
    message_id: &str,
) -> Result<(), Error> {
    // One statement checks and takes the stock, under the product's row lock.
    let reserved = tx
        .query_opt(
            "UPDATE stock SET available = available - $2 \
             WHERE sku = $1 AND available >= $2 RETURNING available",
            &[&paid.sku, &paid.qty],
        )
        .await?;
    let outcome = if reserved.is_some() {
        "reserved"
    } else {
        "out_of_stock"
    };
    tx.execute(
        "INSERT INTO reservations (order_id, sku, qty, outcome, message_id) \
         VALUES ($1, $2, $3, $4, $5)",
        &[&paid.order_id, &paid.sku, &paid.qty, &outcome, &message_id],
    )
    .await?;
    let event = if reserved.is_some() {
        Event::StockReserved(StockReserved {
            order_id: paid.order_id.clone(),
            sku: paid.sku.clone(),
            qty: paid.qty,
        })
    } else {
        let available = match tx
            .query_opt("SELECT available FROM stock WHERE sku = $1", &[&paid.sku])
            .await?
        {
            Some(row) => row.try_get(0)?,
            None => 0,
        };
        Event::OutOfStock(OutOfStock {
            order_id: paid.order_id.clone(),
            sku: paid.sku.clone(),
            qty: paid.qty,
            available,
        })
    };
    outbox::emit(tx, &event).await
}
