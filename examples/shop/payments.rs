//! The payments service: it charges an order to the customer's balance
//! (`PaymentCaptured`, or `PaymentDeclined` when the balance is short) and
//! refunds the charge when inventory reports `OutOfStock`
//! (`PaymentRefunded`): the saga's compensation.

use deadpool_postgres::Transaction;
use tracing::warn;

use crate::shop::error::Error;
use crate::shop::events::{
    Event, OrderPlaced, OutOfStock, PaymentCaptured, PaymentDeclined, PaymentRefunded,
};
use crate::shop::outbox;

pub async fn handle(tx: &Transaction<'_>, event: &Event, message_id: &str) -> Result<(), Error> {
    match event {
        Event::OrderPlaced(order) => charge(tx, order, message_id).await,
        Event::OutOfStock(out) => refund(tx, out, message_id).await,
        other => Err(Error::Other(format!(
            "payments does not handle {}",
            other.kind()
        ))),
    }
}

async fn charge(tx: &Transaction<'_>, order: &OrderPlaced, message_id: &str) -> Result<(), Error> {
    // One statement checks and takes the money, under the account's row lock.
    let charged = tx
        .query_opt(
            "UPDATE accounts SET balance = balance - $2 \
             WHERE customer = $1 AND balance >= $2 RETURNING balance",
            &[&order.customer, &order.amount],
        )
        .await?;
    let kind = if charged.is_some() {
        "charge"
    } else {
        "decline"
    };
    tx.execute(
        "INSERT INTO ledger (order_id, customer, kind, amount, message_id) \
         VALUES ($1, $2, $3, $4, $5)",
        &[
            &order.order_id,
            &order.customer,
            &kind,
            &order.amount,
            &message_id,
        ],
    )
    .await?;
    let event = if charged.is_some() {
        Event::PaymentCaptured(PaymentCaptured {
            order_id: order.order_id.clone(),
            customer: order.customer.clone(),
            sku: order.sku.clone(),
            qty: order.qty,
            amount: order.amount,
        })
    } else {
        let balance = match tx
            .query_opt(
                "SELECT balance FROM accounts WHERE customer = $1",
                &[&order.customer],
            )
            .await?
        {
            Some(row) => row.try_get(0)?,
            None => 0,
        };
        Event::PaymentDeclined(PaymentDeclined {
            order_id: order.order_id.clone(),
            amount: order.amount,
            balance,
        })
    };
    outbox::emit(tx, &event).await
}

async fn refund(tx: &Transaction<'_>, out: &OutOfStock, message_id: &str) -> Result<(), Error> {
    // Refund what was charged, as the ledger says, not what a message says.
    let charge = tx
        .query_opt(
            "SELECT customer, amount FROM ledger \
             WHERE order_id = $1 AND kind = 'charge' ORDER BY id LIMIT 1",
            &[&out.order_id],
        )
        .await?;
    let Some(charge) = charge else {
        warn!(
            order = %out.order_id,
            "out of stock for an order that was never charged; nothing to refund"
        );
        return Ok(());
    };
    let (customer, amount): (String, i64) = (charge.try_get(0)?, charge.try_get(1)?);
    tx.execute(
        "UPDATE accounts SET balance = balance + $2 WHERE customer = $1",
        &[&customer, &amount],
    )
    .await?;
    tx.execute(
        "INSERT INTO ledger (order_id, customer, kind, amount, message_id) \
         VALUES ($1, $2, 'refund', $3, $4)",
        &[&out.order_id, &customer, &amount, &message_id],
    )
    .await?;
    let refunded = Event::PaymentRefunded(PaymentRefunded {
        order_id: out.order_id.clone(),
        amount,
    });
    outbox::emit(tx, &refunded).await
}
