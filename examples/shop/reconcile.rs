//! Reconciliation: reads each service's own database, read-only, and
//! reports every order whose state disagrees with what payments and
//! inventory recorded for it, and every account or product whose figures
//! do not add up.
//!
//! The orders database is read first. An order settles only after payments
//! and inventory committed what settles it, so everything a settled order
//! needs is already in the later reads: the check gives no false alarms on
//! a running shop. Orders still pending are in flight and not checked.

use std::collections::HashMap;
use std::fmt;

use tokio_postgres::IsolationLevel;

use crate::shop::db;
use crate::shop::error::Error;
use crate::shop::names::{Names, Service};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disagreement {
    /// What disagrees: `order o-000017`, `account c-03`, `product gizmo`.
    pub subject: String,
    pub problem: String,
}

#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Settled orders checked.
    pub checked: usize,
    /// Orders still pending, not checked.
    pub in_flight: usize,
    pub disagreements: Vec<Disagreement>,
}

/// What payments recorded for one order.
#[derive(Default)]
struct Money {
    charges: Vec<i64>,
    refunds: Vec<i64>,
    declines: usize,
}

/// What inventory recorded for one order.
#[derive(Default)]
struct Stock {
    reserved: Vec<(String, i32)>,
    out_of_stock: usize,
}

struct Order {
    id: String,
    sku: String,
    qty: i32,
    amount: i64,
    status: String,
    reason: Option<String>,
}

/// A connection whose every transaction is read-only: reconciliation
/// cannot change what it checks.
async fn read_only(names: &Names, service: Service) -> Result<tokio_postgres::Client, Error> {
    let client = db::connect(&names.database_url(service)).await?;
    client
        .batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        .await?;
    Ok(client)
}

/// One snapshot for all of a database's queries.
async fn snapshot(
    client: &mut tokio_postgres::Client,
) -> Result<tokio_postgres::Transaction<'_>, Error> {
    Ok(client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?)
}

pub async fn reconcile(names: &Names) -> Result<Report, Error> {
    let mut report = Report::default();
    let mut disagreements = Vec::new();
    let mut found =
        |subject: String, problem: String| disagreements.push(Disagreement { subject, problem });

    let orders_db = read_only(names, Service::Orders).await?;
    let orders: Vec<Order> = orders_db
        .query(
            "SELECT id, sku, qty, amount, status, reason FROM orders ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            Ok::<_, tokio_postgres::Error>(Order {
                id: r.try_get(0)?,
                sku: r.try_get(1)?,
                qty: r.try_get(2)?,
                amount: r.try_get(3)?,
                status: r.try_get(4)?,
                reason: r.try_get(5)?,
            })
        })
        .collect::<Result<_, _>>()?;

    let mut payments_db = read_only(names, Service::Payments).await?;
    let tx = snapshot(&mut payments_db).await?;
    let mut money: HashMap<String, Money> = HashMap::new();
    for r in tx
        .query("SELECT order_id, kind, amount FROM ledger", &[])
        .await?
    {
        let m = money.entry(r.try_get(0)?).or_default();
        match r.try_get::<_, &str>(1)? {
            "charge" => m.charges.push(r.try_get(2)?),
            "refund" => m.refunds.push(r.try_get(2)?),
            _ => m.declines += 1,
        }
    }
    // Each account: opening - charges + refunds = balance.
    for r in tx
        .query(
            "SELECT a.customer, a.opening, a.balance, \
                coalesce(sum(l.amount) FILTER (WHERE l.kind = 'charge'), 0)::bigint, \
                coalesce(sum(l.amount) FILTER (WHERE l.kind = 'refund'), 0)::bigint \
             FROM accounts a LEFT JOIN ledger l ON l.customer = a.customer \
             GROUP BY a.customer ORDER BY a.customer",
            &[],
        )
        .await?
    {
        let (customer, opening, balance, charged, refunded): (String, i64, i64, i64, i64) = (
            r.try_get(0)?,
            r.try_get(1)?,
            r.try_get(2)?,
            r.try_get(3)?,
            r.try_get(4)?,
        );
        if opening - charged + refunded != balance {
            found(
                format!("account {customer}"),
                format!(
                    "balance {balance}, but opening {opening} - charges {charged} + refunds {refunded} = {}",
                    opening - charged + refunded
                ),
            );
        }
    }

    let mut inventory_db = read_only(names, Service::Inventory).await?;
    let tx = snapshot(&mut inventory_db).await?;
    let mut stock: HashMap<String, Stock> = HashMap::new();
    for r in tx
        .query("SELECT order_id, outcome, sku, qty FROM reservations", &[])
        .await?
    {
        let s = stock.entry(r.try_get(0)?).or_default();
        match r.try_get::<_, &str>(1)? {
            "reserved" => s.reserved.push((r.try_get(2)?, r.try_get(3)?)),
            _ => s.out_of_stock += 1,
        }
    }
    // Each product: initial - reserved = available, never below zero.
    for r in tx
        .query(
            "SELECT s.sku, s.initial, s.available, \
                coalesce(sum(r.qty) FILTER (WHERE r.outcome = 'reserved'), 0)::bigint \
             FROM stock s LEFT JOIN reservations r ON r.sku = s.sku \
             GROUP BY s.sku ORDER BY s.sku",
            &[],
        )
        .await?
    {
        let (sku, initial, available, reserved): (String, i32, i32, i64) =
            (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?);
        if i64::from(initial) - reserved != i64::from(available) || available < 0 {
            found(
                format!("product {sku}"),
                format!(
                    "available {available}, but initial {initial} - reserved {reserved} = {}",
                    i64::from(initial) - reserved
                ),
            );
        }
    }

    let none_money = Money::default();
    let none_stock = Stock::default();
    for order in &orders {
        if order.status == "pending" {
            report.in_flight += 1;
            continue;
        }
        report.checked += 1;
        let m = money.get(&order.id).unwrap_or(&none_money);
        let s = stock.get(&order.id).unwrap_or(&none_stock);
        if let Some(problem) = compare(Expected::of(order), order, m, s) {
            found(format!("order {}", order.id), problem);
        }
    }
    // Records for orders the orders service never had.
    let known: std::collections::HashSet<&str> = orders.iter().map(|o| o.id.as_str()).collect();
    let mut orphans: Vec<&String> = money
        .keys()
        .chain(stock.keys())
        .filter(|id| !known.contains(id.as_str()))
        .collect();
    orphans.sort();
    orphans.dedup();
    for id in orphans {
        found(
            format!("order {id}"),
            "payments or inventory has records of it, orders does not know it".into(),
        );
    }
    report.disagreements = disagreements;
    Ok(report)
}

/// What payments and inventory must show for a settled order.
struct Expected {
    charged: bool,
    declined: bool,
    refunded: bool,
    reserved: bool,
    out_of_stock: bool,
}

impl Expected {
    fn of(order: &Order) -> Option<Expected> {
        let (charged, declined, refunded, reserved, out_of_stock) =
            match (order.status.as_str(), order.reason.as_deref()) {
                ("confirmed", None) => (true, false, false, true, false),
                ("cancelled", Some("payment_declined")) => (false, true, false, false, false),
                ("cancelled", Some("out_of_stock")) => (true, false, true, false, true),
                _ => return None,
            };
        Some(Expected {
            charged,
            declined,
            refunded,
            reserved,
            out_of_stock,
        })
    }
}

/// What is wrong with one settled order, as one sentence (None: nothing).
fn compare(expected: Option<Expected>, order: &Order, m: &Money, s: &Stock) -> Option<String> {
    let state = match &order.reason {
        Some(reason) => format!("{} ({reason})", order.status),
        None => order.status.clone(),
    };
    let Some(e) = expected else {
        return Some(format!("{state} is not a state the saga ends in"));
    };
    let mut problems = Vec::new();
    let mut expect = |what: &str, want: bool, got: usize| {
        if usize::from(want) != got {
            problems.push(format!("{got} {what} (expected {})", usize::from(want)));
        }
    };
    expect("charges", e.charged, m.charges.len());
    expect("declines", e.declined, m.declines);
    expect("refunds", e.refunded, m.refunds.len());
    expect("reservations", e.reserved, s.reserved.len());
    expect("out-of-stock reports", e.out_of_stock, s.out_of_stock);
    if m.charges
        .iter()
        .chain(&m.refunds)
        .any(|a| *a != order.amount)
    {
        problems.push(format!(
            "charges {:?} and refunds {:?} for an order of {}",
            m.charges, m.refunds, order.amount
        ));
    }
    if s.reserved
        .iter()
        .any(|(sku, qty)| *sku != order.sku || *qty != order.qty)
    {
        problems.push(format!(
            "reserved {:?} for {} x {}",
            s.reserved, order.qty, order.sku
        ));
    }
    (!problems.is_empty()).then(|| {
        format!(
            "{state}, but payments and inventory show {}",
            problems.join(", ")
        )
    })
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "reconciliation: {} settled orders checked, {} in flight (not checked), {} disagreement{}",
            self.checked,
            self.in_flight,
            self.disagreements.len(),
            if self.disagreements.len() == 1 {
                ""
            } else {
                "s"
            }
        )?;
        for d in &self.disagreements {
            write!(f, "\n  {}: {}", d.subject, d.problem)?;
        }
        Ok(())
    }
}
