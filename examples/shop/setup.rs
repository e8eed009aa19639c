//! Creates a shop from nothing: the three databases, each service's tables
//! and inbox, and the opening state (prices, balances, stock). The outbox
//! tables come from `outboxd migrate`, as they would in production.

use tokio_postgres::Client;

use crate::shop::db;
use crate::shop::error::Error;
use crate::shop::inbox;
use crate::shop::names::{Names, Service};

/// What the shop sells: (sku, price in cents, units in stock at setup).
/// The gizmo is scarce, so its orders run out of stock and are refunded.
pub const PRODUCTS: [(&str, i64, i32); 4] = [
    ("widget", 1200, 300),
    ("gadget", 2500, 150),
    ("gizmo", 4000, 12),
    ("doohickey", 800, 400),
];

/// Customers `c-01` to `c-40`.
pub const CUSTOMERS: usize = 40;

/// Opening balance in cents of customer `n` (1-based). The last four hold
/// 5.00, less than anything costs, so their orders are declined; the others
/// hold 200.00 to 650.00, and some spend it all before the run ends.
pub fn opening_balance(n: usize) -> i64 {
    if n > CUSTOMERS - 4 {
        500
    } else {
        20_000 + ((n * 7) % 10) as i64 * 5_000
    }
}

pub fn customer(n: usize) -> String {
    format!("c-{n:02}")
}

/// The service's tables, without its outbox.
pub fn schema(service: Service) -> &'static str {
    match service {
        Service::Orders => include_str!("sql/orders.sql"),
        Service::Payments => include_str!("sql/payments.sql"),
        Service::Inventory => include_str!("sql/inventory.sql"),
    }
}

/// Drops (if they exist) and creates the three databases of `names`.
pub async fn create_databases(names: &Names) -> Result<(), Error> {
    let admin = db::connect(&format!("{}/postgres", names.pg)).await?;
    for service in Service::ALL {
        let name = names.database(service);
        // Two calls: several statements in one would run in one transaction.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await?;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await?;
    }
    Ok(())
}

/// Creates `service`'s tables and inbox in its (existing) database and
/// fills in the opening state.
pub async fn prepare(client: &Client, service: Service) -> Result<(), Error> {
    client.batch_execute(schema(service)).await?;
    client.batch_execute(inbox::SQL).await?;
    match service {
        Service::Orders => {
            for (sku, price, _) in PRODUCTS {
                client
                    .execute(
                        "INSERT INTO products (sku, price) VALUES ($1, $2) \
                         ON CONFLICT (sku) DO NOTHING",
                        &[&sku, &price],
                    )
                    .await?;
            }
        }
        Service::Payments => {
            for n in 1..=CUSTOMERS {
                open_account(client, &customer(n), opening_balance(n)).await?;
            }
        }
        Service::Inventory => {
            for (sku, _, units) in PRODUCTS {
                client
                    .execute(
                        "INSERT INTO stock (sku, initial, available) VALUES ($1, $2, $2) \
                         ON CONFLICT (sku) DO NOTHING",
                        &[&sku, &units],
                    )
                    .await?;
            }
        }
    }
    Ok(())
}

/// Opens an account with `balance` cents (a test adds customers of its own).
pub async fn open_account(client: &Client, customer: &str, balance: i64) -> Result<(), Error> {
    client
        .execute(
            "INSERT INTO accounts (customer, opening, balance) VALUES ($1, $2, $2) \
             ON CONFLICT (customer) DO NOTHING",
            &[&customer, &balance],
        )
        .await?;
    Ok(())
}
