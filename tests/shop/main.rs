//! The shop example (`examples/shop`) against the real PostgreSQL,
//! RabbitMQ and `outboxd` binary, under faults. The services are the
//! example's own code, included below and run as tasks of the test; the
//! relay is a child process, so it can be killed with SIGKILL.
//!
//! Every shop here has its own three databases, exchange and queues, and
//! removes them when it is dropped. The test kills only the relays it
//! started, but it has a few hundred orders in flight, so
//! `scripts/test.sh` runs it on its own: `cargo test --test shop --
//! --test-threads=1`.

#[path = "../integration/support/mod.rs"]
mod support;

#[path = "../../examples/shop/mod.rs"]
mod shop;

mod faults;

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use shop::error::Error;
use shop::names::{Names, Service};
use shop::service::{ServiceOptions, Stats};
use shop::topology::{self, Lifetime};
use support::db::TestDb;
use support::relay::{SourceSpec, config};
use support::{AMQP_URL, PG_URL, unique};

/// The services' logs (shown for a failing test, or with --nocapture);
/// RUST_LOG overrides the filter.
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,lapin=error,tokio_postgres=warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A shop of its own: three databases with tables, inboxes, outboxes and
/// the opening state, an exchange and three queues, and the config of one
/// relay with three sources.
pub struct TestShop {
    pub names: Names,
    pub orders: TestDb,
    pub payments: TestDb,
    pub inventory: TestDb,
    pub relay_config: String,
    _topology: TopologyGuard,
}

impl TestShop {
    pub async fn new() -> TestShop {
        let orders = TestDb::empty("shop_orders").await;
        let payments = TestDb::empty("shop_payments").await;
        let inventory = TestDb::empty("shop_inventory").await;
        for (db, service) in [
            (&orders, Service::Orders),
            (&payments, Service::Payments),
            (&inventory, Service::Inventory),
        ] {
            shop::setup::prepare(&db.client, service)
                .await
                .expect("shop tables and opening state");
            db.migrate("outbox").await;
        }
        let prefix = unique("shop");
        let names = Names {
            pg: PG_URL.to_owned(),
            amqp: AMQP_URL.to_owned(),
            orders_db: orders.name.clone(),
            payments_db: payments.name.clone(),
            inventory_db: inventory.name.clone(),
            exchange: format!("{prefix}.events"),
            queue_prefix: prefix,
        };
        let topology = TopologyGuard::declare(&names).await;
        let relay_config = config(
            AMQP_URL,
            &[
                SourceSpec::new("orders", &orders.url, &names.exchange),
                SourceSpec::new("payments", &payments.url, &names.exchange),
                SourceSpec::new("inventory", &inventory.url, &names.exchange),
            ],
        );
        TestShop {
            names,
            orders,
            payments,
            inventory,
            relay_config,
            _topology: topology,
        }
    }

    pub fn db(&self, service: Service) -> &TestDb {
        match service {
            Service::Orders => &self.orders,
            Service::Payments => &self.payments,
            Service::Inventory => &self.inventory,
        }
    }

    /// Starts `service` (two consumers, prefetch 20) on the broker at `amqp_url`.
    pub fn spawn(&self, service: Service, amqp_url: &str) -> RunningService {
        let options = ServiceOptions {
            service,
            database_url: self.names.database_url(service),
            amqp_url: amqp_url.to_owned(),
            queue: self.names.queue(service),
            consumers: 2,
            prefetch: 20,
            lose_ack_every: None,
        };
        let stats = Arc::new(Stats::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(shop::service::run(options, stats.clone(), stop.clone()));
        RunningService {
            stats,
            stop,
            task: Some(task),
        }
    }

    /// One number from a query in `service`'s database.
    pub async fn count(&self, service: Service, sql: &str) -> i64 {
        self.db(service)
            .client
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }
}

/// A service running as a task of the test; stopped when dropped.
pub struct RunningService {
    pub stats: Arc<Stats>,
    stop: CancellationToken,
    task: Option<JoinHandle<Result<(), Error>>>,
}

impl RunningService {
    /// Stops the service at its next safe point and waits for it.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("the service stops within 15s")
                .expect("the service task does not panic")
                .expect("the service ends without an error");
        }
    }
}

impl Drop for RunningService {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The shop's exchange and queues, deleted when the test ends. The queues
/// also expire on their own after 10 minutes unused, should the test die
/// before its cleanup runs.
struct TopologyGuard {
    names: Names,
}

impl TopologyGuard {
    async fn declare(names: &Names) -> TopologyGuard {
        let conn = support::broker::TestBroker::connect().await;
        let channel = conn.create_channel().await.expect("channel");
        topology::declare(&channel, names, Lifetime::Expiring(600_000), false)
            .await
            .expect("declare the shop's exchange and queues");
        let _ = conn.close(200, "declared".into()).await;
        TopologyGuard {
            names: names.clone(),
        }
    }
}

impl Drop for TopologyGuard {
    fn drop(&mut self) {
        // Drop cannot be async; a short-lived thread with its own runtime does it.
        let names = self.names.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    let props = lapin::ConnectionProperties::default();
                    if let Ok(conn) = lapin::Connection::connect(&names.amqp, props).await
                        && let Ok(channel) = conn.create_channel().await
                    {
                        let _ = topology::delete(&channel, &names).await;
                        let _ = conn.close(200, "cleaned up".into()).await;
                    }
                });
            }
        })
        .join();
    }
}
