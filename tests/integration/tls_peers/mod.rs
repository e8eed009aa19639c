//! TLS against peers that do not play along: `amqps://` pointed at a plain
//! AMQP port, a TLS broker whose certificate comes from the right or the
//! wrong CA, and a PostgreSQL that refuses TLS. The shared services are
//! never reconfigured: a TLS-terminating proxy written here stands in for
//! a broker with a TLS listener, and a fake PostgreSQL answers the
//! SSLRequest itself. Certificates come from the `openssl` CLI
//! (`support::certs`). A real RabbitMQ node with a TLS listener is tested
//! in tests/outages/amqps_node.rs.

mod amqps;
mod postgres;

use std::time::Duration;

pub use crate::support::certs::{Certs, s};
use crate::support::relay::run_to_end;

const LONG: Duration = Duration::from_secs(30);

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

pub fn check_blocking(cfg: String) -> tokio::task::JoinHandle<(Option<i32>, String, String)> {
    tokio::task::spawn_blocking(move || run_to_end(&["check"], &cfg))
}
