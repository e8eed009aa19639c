//! Test support: a database per test, an exchange and queue per test, the
//! real `outboxd` binary in a child process, a TCP proxy that can cut
//! connections, a real Prometheus server, and a bounded wait in place of
//! sleeps.

#![allow(dead_code)] // each test file uses its own subset

pub mod aggregates;
pub mod broker;
pub mod certs;
pub mod db;
pub mod http;
pub mod prometheus;
pub mod proxy;
pub mod relay;

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const PG_URL: &str = "postgres://root@127.0.0.1:5432";
pub const PG_HOST: &str = "127.0.0.1:5432";
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const AMQP_HOST: &str = "127.0.0.1:5672";
/// The most messages a relay with the default config has in flight
/// (`max_in_flight` × `batch_size`): the bound on what one failure can
/// send twice.
pub const IN_FLIGHT: usize =
    outboxd::config::DEFAULT_MAX_IN_FLIGHT as usize * outboxd::config::DEFAULT_BATCH_SIZE as usize;

/// A name no other test (or test run) uses: lowercase, a valid identifier.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() % 1_000_000_000)
        .unwrap_or(0);
    format!("{prefix}_{}_{n}_{t}", std::process::id())
}

/// Polls `check` until it returns `Some`, failing the test with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
