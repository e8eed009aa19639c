//! A few hundred orders through the shop while outboxd is killed with
//! SIGKILL twice and the payments service's broker connection is cut:
//! every order ends confirmed or cancelled, each effect happens once, and
//! the inboxes drop the duplicates those faults bring.

use std::time::{Duration, Instant};

use crate::TestShop;
use crate::shop::names::Service;
use crate::shop::orders::{self, NewOrder};
use crate::shop::service::Stats;
use crate::shop::{db, reconcile, setup, summary, topology};
use crate::support::broker::TestBroker;
use crate::support::proxy::Proxy;
use crate::support::relay::Relay;
use crate::support::{AMQP_HOST, AMQP_URL, eventually};

/// Bound of every wait on the shop's progress.
const WAIT: Duration = Duration::from_secs(60);
/// A customer of the test's own, whose account the test holds locked.
const PROBE: &str = "c-probe";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_twice_and_a_cut_consumer_connection_settle_every_order_once() {
    let started = Instant::now();
    crate::init_logs();
    let shop = TestShop::new().await;
    setup::open_account(&shop.payments.client, PROBE, 1_000_000)
        .await
        .expect("open the probe's account");
    let proxy = Proxy::start(AMQP_HOST).await;
    let through_proxy = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let orders_service = shop.spawn(Service::Orders, AMQP_URL);
    let payments = shop.spawn(Service::Payments, &through_proxy);
    let inventory = shop.spawn(Service::Inventory, AMQP_URL);
    let mut relay = Relay::start(&shop.relay_config).await;
    let pool = db::pool(&shop.orders.url, 4, "shop-test").expect("orders pool");

    // Fault 1: kill -9 after the broker confirmed a batch and before the
    // relay removed its rows, the window that sends rows twice. A trigger
    // holds the relay's DELETE on a lock, so the kill lands in it for sure.
    let hold = SettleHold::arm(&shop).await;
    let first = orders::place_all(&pool, orders::mix(100, 1), 4)
        .await
        .expect("place the first 100 orders");
    let charged_in_window = eventually(
        "payments to charge orders whose outbox rows the relay cannot remove",
        WAIT,
        || async {
            let charged = shop
                .count(
                    Service::Payments,
                    "SELECT count(*) FROM inbox WHERE message_type = 'OrderPlaced'",
                )
                .await;
            let left = shop
                .count(Service::Orders, "SELECT count(*) FROM outbox")
                .await;
            let held = shop
                .count(
                    Service::Orders,
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'outboxd' \
                     AND wait_event_type = 'Lock' AND wait_event = 'advisory'",
                )
                .await;
            (charged > 0 && left == 100 && held > 0).then_some(charged)
        },
    )
    .await;
    relay.kill9();
    hold.release(&shop).await;
    println!(
        "kill -9 #1: payments had charged {charged_in_window} orders whose rows stayed in the outbox"
    );
    relay = Relay::start(&shop.relay_config).await;

    // Fault 2: kill -9 as soon as the next hundred are flowing (placed one
    // at a time, so placing usually outlasts the kill; the rows placed
    // meanwhile wait for the restarted relay).
    let placing = tokio::spawn({
        let pool = pool.clone();
        async move { orders::place_all(&pool, orders::mix(100, 2), 1).await }
    });
    let after_first = format!("OrderPlaced:{}", first.last().expect("100 ids"));
    eventually(
        "orders of the second hundred to reach payments",
        WAIT,
        || {
            let sql = format!(
                "SELECT count(*) FROM inbox WHERE message_id > '{after_first}' \
             AND message_type = 'OrderPlaced'"
            );
            let shop = &shop;
            async move { (shop.count(Service::Payments, &sql).await >= 1).then_some(()) }
        },
    )
    .await;
    relay.kill9();
    let still_placing = !placing.is_finished();
    relay = Relay::start(&shop.relay_config).await;
    let left = shop
        .count(Service::Orders, "SELECT count(*) FROM outbox")
        .await;
    println!(
        "kill -9 #2: orders still being placed: {still_placing}; {left} rows waited in the orders outbox for the restart"
    );
    let second = placing
        .await
        .expect("placing task")
        .expect("place the second 100 orders");
    assert_eq!(second.len(), 100);

    // Fault 3: the payments service commits a charge and loses its broker
    // connection before the ack. The test holds the probe customer's
    // account, places the probe's order, cuts the connection while the
    // charge waits for the account, then lets the charge commit.
    let mut locker = shop.payments.connect().await;
    let locker_pid: i32 = locker
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("the locker's pid")
        .get(0);
    let lock = locker.transaction().await.expect("begin");
    lock.execute(
        "SELECT 1 FROM accounts WHERE customer = $1 FOR UPDATE",
        &[&PROBE],
    )
    .await
    .expect("lock the probe's account");
    let probe = orders::place(
        &pool,
        &NewOrder {
            customer: PROBE.into(),
            sku: "widget".into(),
            qty: 1,
        },
    )
    .await
    .expect("place the probe's order");
    // Waiting on the test's lock, not on another payments transaction.
    let blocked = format!(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE application_name = 'shop-payments' AND {locker_pid} = ANY(pg_blocking_pids(pid))"
    );
    eventually("payments to wait for the probe's account", WAIT, || async {
        (shop.count(Service::Payments, &blocked).await > 0).then_some(())
    })
    .await;
    let sessions = Stats::get(&payments.stats.sessions);
    proxy.cut();
    lock.commit().await.expect("release the probe's account");
    let probe_charges =
        format!("SELECT count(*) FROM ledger WHERE order_id = '{probe}' AND kind = 'charge'");
    eventually(
        "the probe's charge to commit after its connection is gone",
        WAIT,
        || async { (shop.count(Service::Payments, &probe_charges).await == 1).then_some(()) },
    )
    .await;
    // More orders while payments is cut off: they wait in its queue.
    let third = orders::place_all(&pool, orders::mix(100, 3), 4)
        .await
        .expect("place the last 100 orders");
    let broker = TestBroker::connect().await;
    let channel = broker.create_channel().await.expect("channel");
    eventually(
        "orders to wait in the payments queue while it is cut off",
        WAIT,
        || async {
            let ready = topology::ready(&channel, &shop.names)
                .await
                .expect("queue depths");
            let payments_ready = ready
                .iter()
                .find(|(s, _)| *s == Service::Payments)
                .map_or(0, |(_, n)| *n);
            (payments_ready > 0).then_some(())
        },
    )
    .await;
    proxy.restore();
    eventually("payments to reconnect", WAIT, || async {
        (Stats::get(&payments.stats.sessions) > sessions).then_some(())
    })
    .await;

    // Every order settles.
    let placed = (first.len() + second.len() + 1 + third.len()) as i64;
    eventually("every order to be confirmed or cancelled", WAIT, || async {
        let s = summary::snapshot(&shop.names).await.ok()?;
        (s.placed == placed && s.pending == 0).then_some(())
    })
    .await;
    // The copies the faults sent again reach the inboxes, which drop them.
    eventually(
        "the payments inbox to drop what the first kill sent again",
        WAIT,
        || async {
            let dropped = shop
                .count(
                    Service::Payments,
                    "SELECT coalesce(sum(duplicates), 0)::bigint FROM inbox \
                     WHERE message_type = 'OrderPlaced'",
                )
                .await;
            (dropped >= charged_in_window).then_some(())
        },
    )
    .await;
    let probe_copies = format!(
        "SELECT coalesce(sum(duplicates), 0)::bigint FROM inbox WHERE message_id = 'OrderPlaced:{probe}'"
    );
    eventually(
        "the payments inbox to drop the probe's redelivery",
        WAIT,
        || async { (shop.count(Service::Payments, &probe_copies).await >= 1).then_some(()) },
    )
    .await;

    let s = summary::snapshot(&shop.names).await.expect("summary");
    println!("{s}");
    assert_eq!(s.placed, 301);
    assert_eq!(s.pending, 0, "every order is confirmed or cancelled");
    assert_eq!(s.confirmed + s.declined + s.out_of_stock, s.placed);
    assert!(
        s.confirmed > 0 && s.declined > 0 && s.out_of_stock > 0,
        "the mix reaches every branch of the saga"
    );
    assert_eq!(s.charged_twice, 0, "no order is charged twice");
    assert_eq!(s.reserved_twice, 0, "no order reserves stock twice");
    assert_eq!(s.charges, s.confirmed + s.out_of_stock);
    assert_eq!(s.declines, s.declined);
    assert_eq!(s.refunds, s.out_of_stock, "every stock-out is refunded");
    assert!(
        s.money_conserved(),
        "balances + captured - refunded = opening balances"
    );
    assert_eq!(s.charged - s.refunded, s.confirmed_amount);
    assert!(s.min_available >= 0, "stock never goes negative");
    assert_eq!(
        s.reserved_qty, s.confirmed_qty,
        "stock matches confirmed orders"
    );
    assert!(s.stock_conserved());
    assert!(s.duplicates() > 0, "the inboxes dropped duplicates");
    assert_eq!(shop.count(Service::Payments, &probe_charges).await, 1);

    let report = reconcile::reconcile(&shop.names).await.expect("reconcile");
    println!("{report}");
    assert!(report.disagreements.is_empty(), "{report}");
    assert_eq!((report.checked, report.in_flight), (301, 0));

    // Broken by hand, reconciliation names what was broken, and only that.
    let victim: String = shop
        .orders
        .client
        .query_one(
            "SELECT id FROM orders WHERE reason = 'out_of_stock' ORDER BY id LIMIT 1",
            &[],
        )
        .await
        .expect("an out-of-stock order")
        .get(0);
    shop.orders
        .client
        .execute(
            "UPDATE orders SET status = 'confirmed', reason = NULL WHERE id = $1",
            &[&victim],
        )
        .await
        .expect("break an order");
    let report = reconcile::reconcile(&shop.names).await.expect("reconcile");
    println!("{report}");
    let subjects: Vec<&str> = report
        .disagreements
        .iter()
        .map(|d| d.subject.as_str())
        .collect();
    assert_eq!(subjects, [format!("order {victim}")]);
    shop.orders
        .client
        .execute(
            "UPDATE orders SET status = 'cancelled', reason = 'out_of_stock' WHERE id = $1",
            &[&victim],
        )
        .await
        .expect("put the order back");
    shop.payments
        .client
        .execute(
            "UPDATE accounts SET balance = balance + 1 WHERE customer = 'c-01'",
            &[],
        )
        .await
        .expect("break an account");
    let report = reconcile::reconcile(&shop.names).await.expect("reconcile");
    println!("{report}");
    let subjects: Vec<&str> = report
        .disagreements
        .iter()
        .map(|d| d.subject.as_str())
        .collect();
    assert_eq!(subjects, ["account c-01"]);

    for service in [orders_service, payments, inventory] {
        service.stop().await;
    }
    drop(relay);
    println!(
        "shop test: {placed} orders, 2 kill -9, 1 cut connection, {} duplicates dropped, {:.1}s",
        s.duplicates(),
        started.elapsed().as_secs_f64()
    );
}

/// Makes the relay wait, inside its DELETE of delivered rows, until
/// released: a statement trigger on the orders outbox takes a shared
/// advisory lock that the test holds exclusively.
struct SettleHold {
    client: tokio_postgres::Client,
}

const HOLD_KEY: i64 = 4242;

impl SettleHold {
    async fn arm(shop: &TestShop) -> SettleHold {
        shop.orders
            .client
            .batch_execute(&format!(
                "CREATE FUNCTION hold_settle() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN PERFORM pg_advisory_xact_lock_shared({HOLD_KEY}); RETURN NULL; END $$; \
                 CREATE TRIGGER hold_settle BEFORE DELETE ON outbox \
                 FOR EACH STATEMENT EXECUTE FUNCTION hold_settle();"
            ))
            .await
            .expect("create the hold trigger");
        let client = shop.orders.connect().await;
        client
            .batch_execute(&format!("SELECT pg_advisory_lock({HOLD_KEY})"))
            .await
            .expect("take the hold lock");
        SettleHold { client }
    }

    /// Ends the killed relay's sessions first (one of them waits inside its
    /// DELETE, which must never run), then lets deletes through again.
    async fn release(self, shop: &TestShop) {
        let gone = "SELECT count(*) FROM pg_stat_activity \
                    WHERE datname = current_database() AND application_name = 'outboxd'";
        self.client
            .batch_execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name = 'outboxd'",
            )
            .await
            .expect("end the killed relay's sessions");
        eventually("the killed relay's sessions to end", WAIT, || async {
            (shop.count(Service::Orders, gone).await == 0).then_some(())
        })
        .await;
        self.client
            .batch_execute(&format!(
                "SELECT pg_advisory_unlock({HOLD_KEY}); \
                 DROP TRIGGER hold_settle ON outbox; DROP FUNCTION hold_settle();"
            ))
            .await
            .expect("release the hold");
    }
}
