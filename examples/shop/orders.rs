//! The orders service. It takes orders (each one an order row and an
//! `OrderPlaced` in one transaction) and settles them from what payments
//! and inventory report: `StockReserved` confirms an order,
//! `PaymentDeclined` cancels it, and `PaymentRefunded` (the compensation
//! for `OutOfStock`) cancels it once the money is back.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use deadpool_postgres::{Pool, Transaction};
use tokio::task::JoinSet;
use tracing::warn;

use crate::shop::error::Error;
use crate::shop::events::{Event, OrderPlaced};
use crate::shop::outbox;
use crate::shop::setup::{self, CUSTOMERS, PRODUCTS};

/// An order as a customer asks for it; orders prices it.
#[derive(Clone, Debug)]
pub struct NewOrder {
    pub customer: String,
    pub sku: String,
    pub qty: i32,
}

/// `n` orders from a seeded random mix that reaches every branch of the
/// saga: customers too poor to pay (declined), the scarce gizmo (out of
/// stock, refunded), and the rest (confirmed).
pub fn mix(n: usize, seed: u64) -> Vec<NewOrder> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n)
        .map(|_| {
            // widget 35%, gadget 25%, gizmo 20%, doohickey 20%
            let sku = match rng.u32(0..100) {
                0..35 => PRODUCTS[0].0,
                35..60 => PRODUCTS[1].0,
                60..80 => PRODUCTS[2].0,
                _ => PRODUCTS[3].0,
            };
            NewOrder {
                customer: setup::customer(rng.usize(1..=CUSTOMERS)),
                sku: sku.to_owned(),
                qty: rng.i32(1..=3),
            }
        })
        .collect()
}

/// Places one order: the order row and its `OrderPlaced` commit together,
/// or neither does. Returns the order's id.
pub async fn place(pool: &Pool, order: &NewOrder) -> Result<String, Error> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            "INSERT INTO orders (id, customer, sku, qty, amount) \
             SELECT 'o-' || lpad(nextval('order_numbers')::text, 6, '0'), $1, p.sku, $3::int, p.price * $3::int \
             FROM products p WHERE p.sku = $2 \
             RETURNING id, amount",
            &[&order.customer, &order.sku, &order.qty],
        )
        .await?
        .ok_or_else(|| Error::Other(format!("no product {:?}", order.sku)))?;
    let order_id: String = row.try_get(0)?;
    let placed = Event::OrderPlaced(OrderPlaced {
        order_id: order_id.clone(),
        customer: order.customer.clone(),
        sku: order.sku.clone(),
        qty: order.qty,
        amount: row.try_get(1)?,
    });
    outbox::emit(&tx, &placed).await?;
    tx.commit().await?;
    Ok(order_id)
}

/// Places `orders` over `concurrency` connections; returns their ids.
pub async fn place_all(
    pool: &Pool,
    orders: Vec<NewOrder>,
    concurrency: usize,
) -> Result<Vec<String>, Error> {
    let orders = Arc::new(orders);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (pool, orders, next) = (pool.clone(), orders.clone(), next.clone());
        tasks.spawn(async move {
            let mut ids = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(order) = orders.get(i) else {
                    return Ok::<_, Error>(ids);
                };
                ids.push(place(&pool, order).await?);
            }
        });
    }
    let mut ids = Vec::new();
    while let Some(done) = tasks.join_next().await {
        ids.extend(done.map_err(|e| Error::Other(format!("placing task failed: {e}")))??);
    }
    ids.sort();
    Ok(ids)
}

/// Settles an order from the event, in the consumer's transaction.
pub async fn handle(tx: &Transaction<'_>, event: &Event) -> Result<(), Error> {
    let (status, reason) = match event {
        Event::StockReserved(_) => ("confirmed", None),
        Event::PaymentDeclined(_) => ("cancelled", Some("payment_declined")),
        Event::PaymentRefunded(_) => ("cancelled", Some("out_of_stock")),
        other => {
            return Err(Error::Other(format!(
                "orders does not handle {}",
                other.kind()
            )));
        }
    };
    let updated = tx
        .execute(
            "UPDATE orders SET status = $2, reason = $3, settled_at = now() \
             WHERE id = $1 AND status = 'pending'",
            &[&event.order_id(), &status, &reason],
        )
        .await?;
    if updated == 0 {
        // Each order gets one settling event; a second one (which the inbox
        // did not catch, since it has another id) must not flip the state.
        warn!(
            order = event.order_id(),
            event = event.kind(),
            "order is unknown or already settled; event ignored"
        );
    }
    Ok(())
}
