//! The three services and where each one lives: its database, the queue it
//! consumes, and the exchange they all publish to through outboxd.

use std::fmt;

/// One of the shop's services.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    Orders,
    Payments,
    Inventory,
}

impl Service {
    pub const ALL: [Service; 3] = [Service::Orders, Service::Payments, Service::Inventory];

    pub fn name(self) -> &'static str {
        match self {
            Service::Orders => "orders",
            Service::Payments => "payments",
            Service::Inventory => "inventory",
        }
    }

    pub fn parse(name: &str) -> Option<Service> {
        Service::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Addresses and names of one shop. The demo derives them from a prefix
/// (`shop`: databases `shop_orders`, ..., exchange `shop.events`, queues
/// `shop.orders`, ...); a test passes its own, so that it runs beside others.
#[derive(Clone, Debug)]
pub struct Names {
    /// PostgreSQL server URL without a database, e.g. `postgres://root@127.0.0.1:5432`.
    pub pg: String,
    /// AMQP URL, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub amqp: String,
    pub orders_db: String,
    pub payments_db: String,
    pub inventory_db: String,
    /// The topic exchange outboxd publishes every event to.
    pub exchange: String,
    /// Queue names are `<queue_prefix>.<service>`.
    pub queue_prefix: String,
}

impl Names {
    pub fn with_prefix(pg: &str, amqp: &str, prefix: &str) -> Names {
        Names {
            pg: pg.trim_end_matches('/').to_owned(),
            amqp: amqp.to_owned(),
            orders_db: format!("{prefix}_orders"),
            payments_db: format!("{prefix}_payments"),
            inventory_db: format!("{prefix}_inventory"),
            exchange: format!("{prefix}.events"),
            queue_prefix: prefix.to_owned(),
        }
    }

    pub fn database(&self, service: Service) -> &str {
        match service {
            Service::Orders => &self.orders_db,
            Service::Payments => &self.payments_db,
            Service::Inventory => &self.inventory_db,
        }
    }

    pub fn database_url(&self, service: Service) -> String {
        format!("{}/{}", self.pg, self.database(service))
    }

    pub fn queue(&self, service: Service) -> String {
        format!("{}.{}", self.queue_prefix, service.name())
    }
}
