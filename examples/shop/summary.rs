//! The figures of a run, read from the three databases: how orders ended,
//! where the money and the stock went, and what the inboxes dropped.

use std::fmt;

use tokio_postgres::GenericClient;

use crate::shop::db;
use crate::shop::error::Error;
use crate::shop::names::{Names, Service};

#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub placed: i64,
    pub pending: i64,
    pub confirmed: i64,
    /// Cancelled because the payment was declined.
    pub declined: i64,
    /// Cancelled because the stock ran out (and refunded).
    pub out_of_stock: i64,
    /// Sum of the confirmed orders' amounts, in cents.
    pub confirmed_amount: i64,
    /// Units the confirmed orders bought.
    pub confirmed_qty: i64,

    /// Cents: balances at setup, and now.
    pub opening: i64,
    pub balances: i64,
    pub charges: i64,
    pub charged: i64,
    pub refunds: i64,
    pub refunded: i64,
    pub declines: i64,
    /// Orders with more than one charge (must be 0).
    pub charged_twice: i64,

    /// Units: at setup, and now.
    pub initial_stock: i64,
    pub available: i64,
    /// The lowest `available` of any product.
    pub min_available: i64,
    pub reserved_qty: i64,
    pub stockouts: i64,
    /// Orders with more than one reservation decision (must be 0).
    pub reserved_twice: i64,

    /// Per service: (messages handled, duplicates dropped, outbox rows not yet relayed).
    pub inboxes: Vec<(Service, i64, i64, i64)>,
}

impl Snapshot {
    pub fn duplicates(&self) -> i64 {
        self.inboxes.iter().map(|(_, _, d, _)| d).sum()
    }

    pub fn outbox_backlog(&self) -> i64 {
        self.inboxes.iter().map(|(_, _, _, o)| o).sum()
    }

    /// Balances plus what was kept equals what customers started with.
    pub fn money_conserved(&self) -> bool {
        self.balances + self.charged - self.refunded == self.opening
    }

    /// Stock left plus stock reserved equals what there was.
    pub fn stock_conserved(&self) -> bool {
        self.available + self.reserved_qty == self.initial_stock
    }
}

async fn one<C: GenericClient>(client: &C, sql: &str) -> Result<Vec<i64>, Error> {
    let row = client.query_one(sql, &[]).await?;
    Ok((0..row.len())
        .map(|i| row.try_get::<_, i64>(i))
        .collect::<Result<_, _>>()?)
}

async fn inbox_and_outbox<C: GenericClient>(client: &C) -> Result<(i64, i64, i64), Error> {
    let v = one(
        client,
        "SELECT (SELECT count(*) FROM inbox), \
                (SELECT coalesce(sum(duplicates), 0)::bigint FROM inbox), \
                (SELECT count(*) FROM outbox)",
    )
    .await?;
    Ok((v[0], v[1], v[2]))
}

/// Reads the figures (each database in one read-only transaction).
pub async fn snapshot(names: &Names) -> Result<Snapshot, Error> {
    let mut s = Snapshot::default();
    for service in Service::ALL {
        let mut client = db::connect(&names.database_url(service)).await?;
        let tx = client.build_transaction().read_only(true).start().await?;
        match service {
            Service::Orders => {
                let v = one(
                    &tx,
                    "SELECT count(*), \
                        count(*) FILTER (WHERE status = 'pending'), \
                        count(*) FILTER (WHERE status = 'confirmed'), \
                        count(*) FILTER (WHERE reason = 'payment_declined'), \
                        count(*) FILTER (WHERE reason = 'out_of_stock'), \
                        coalesce(sum(amount) FILTER (WHERE status = 'confirmed'), 0)::bigint, \
                        coalesce(sum(qty) FILTER (WHERE status = 'confirmed'), 0)::bigint \
                     FROM orders",
                )
                .await?;
                (s.placed, s.pending, s.confirmed, s.declined) = (v[0], v[1], v[2], v[3]);
                (s.out_of_stock, s.confirmed_amount, s.confirmed_qty) = (v[4], v[5], v[6]);
            }
            Service::Payments => {
                let v = one(
                    &tx,
                    "SELECT (SELECT coalesce(sum(opening), 0)::bigint FROM accounts), \
                        (SELECT coalesce(sum(balance), 0)::bigint FROM accounts), \
                        count(*) FILTER (WHERE kind = 'charge'), \
                        coalesce(sum(amount) FILTER (WHERE kind = 'charge'), 0)::bigint, \
                        count(*) FILTER (WHERE kind = 'refund'), \
                        coalesce(sum(amount) FILTER (WHERE kind = 'refund'), 0)::bigint, \
                        count(*) FILTER (WHERE kind = 'decline'), \
                        (SELECT count(*) FROM (SELECT order_id FROM ledger WHERE kind = 'charge' \
                            GROUP BY order_id HAVING count(*) > 1) twice) \
                     FROM ledger",
                )
                .await?;
                (s.opening, s.balances, s.charges, s.charged) = (v[0], v[1], v[2], v[3]);
                (s.refunds, s.refunded, s.declines, s.charged_twice) = (v[4], v[5], v[6], v[7]);
            }
            Service::Inventory => {
                let v = one(
                    &tx,
                    "SELECT (SELECT coalesce(sum(initial), 0)::bigint FROM stock), \
                        (SELECT coalesce(sum(available), 0)::bigint FROM stock), \
                        (SELECT coalesce(min(available), 0)::bigint FROM stock), \
                        coalesce(sum(qty) FILTER (WHERE outcome = 'reserved'), 0)::bigint, \
                        count(*) FILTER (WHERE outcome = 'out_of_stock'), \
                        (SELECT count(*) FROM (SELECT order_id FROM reservations \
                            GROUP BY order_id HAVING count(*) > 1) twice) \
                     FROM reservations",
                )
                .await?;
                (s.initial_stock, s.available, s.min_available) = (v[0], v[1], v[2]);
                (s.reserved_qty, s.stockouts, s.reserved_twice) = (v[3], v[4], v[5]);
            }
        }
        let (handled, duplicates, outbox) = inbox_and_outbox(&tx).await?;
        s.inboxes.push((service, handled, duplicates, outbox));
        tx.commit().await?;
    }
    Ok(s)
}

fn money(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    format!("{sign}{}.{:02}", cents.abs() / 100, cents.abs() % 100)
}

fn check(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISMATCH" }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "orders placed        {}", self.placed)?;
        writeln!(f, "  confirmed          {}", self.confirmed)?;
        writeln!(
            f,
            "  cancelled          {} ({} payment declined, {} out of stock and refunded)",
            self.declined + self.out_of_stock,
            self.declined,
            self.out_of_stock
        )?;
        if self.pending > 0 {
            writeln!(f, "  still pending      {}", self.pending)?;
        }
        writeln!(
            f,
            "payments             {} charges ({}), {} declines, {} refunds ({}); orders charged twice: {}",
            self.charges,
            money(self.charged),
            self.declines,
            self.refunds,
            money(self.refunded),
            self.charged_twice
        )?;
        writeln!(
            f,
            "money                balances before {}, after {}; after + charged - refunded = {} [{}]",
            money(self.opening),
            money(self.balances),
            money(self.balances + self.charged - self.refunded),
            check(self.money_conserved())
        )?;
        writeln!(
            f,
            "                     kept by the shop {} = confirmed orders {} [{}]",
            money(self.charged - self.refunded),
            money(self.confirmed_amount),
            check(self.charged - self.refunded == self.confirmed_amount)
        )?;
        writeln!(
            f,
            "stock                units before {}, after {} (lowest product: {}); reserved {} = confirmed orders' {} [{}]",
            self.initial_stock,
            self.available,
            self.min_available,
            self.reserved_qty,
            self.confirmed_qty,
            check(self.stock_conserved() && self.reserved_qty == self.confirmed_qty)
        )?;
        write!(f, "inboxes              ")?;
        for (i, (service, handled, duplicates, _)) in self.inboxes.iter().enumerate() {
            let sep = if i == 0 { "" } else { "; " };
            write!(
                f,
                "{sep}{service}: {handled} handled, {duplicates} duplicates dropped"
            )?;
        }
        writeln!(f)?;
        write!(
            f,
            "outbox rows left     {} (duplicates dropped in all: {})",
            self.outbox_backlog(),
            self.duplicates()
        )
    }
}
