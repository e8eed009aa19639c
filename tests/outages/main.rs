//! Failures of the real services: RabbitMQ stopped, PostgreSQL restarted,
//! a broker memory alarm, repeated kill -9, random faults of every kind
//! against three relays (`chaos.rs`), and (behind OUTBOXD_SOAK=1) a
//! soak with random connection cuts; and on RabbitMQ nodes of their own
//! (`private_rabbit.rs`): a cluster losing a node (`failover.rs`) and a
//! TLS listener (`amqps_node.rs`).
//! These restart or reconfigure the
//! shared services, so they run on their own, one at a time, after the
//! normal suite: `cargo test --test outages -- --test-threads=1`.

#[path = "../integration/support/mod.rs"]
mod support;

mod alarm;
mod amqps_node;
mod chaos;
mod failover;
mod kill9;
mod leak;
mod private_rabbit;
mod restart;
mod soak;
mod tls;
mod wal;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ExchangeKind};

use support::broker::TestBroker;
use support::unique;

/// Runs a service command, failing the test with its output if it fails.
pub fn service(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the RabbitMQ app again even if the test fails half-way.
pub struct RabbitGuard;
impl Drop for RabbitGuard {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").output();
    }
}

/// Starts PostgreSQL again even if the test fails half-way.
pub struct PgGuard;
impl Drop for PgGuard {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .args(["-c", "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | sort -V | tail -n 1) main start"])
            .output();
    }
}

/// A durable exchange and queue that survive a broker restart (the test's
/// own connection does not), deleted when dropped.
pub struct DurableQueue {
    pub exchange: String,
    pub queue: String,
}

impl DurableQueue {
    pub async fn new() -> Self {
        let conn = TestBroker::connect().await;
        let ch = conn.create_channel().await.unwrap();
        let name = unique("obx.outage");
        let durable = lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.exchange_declare(
            name.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .unwrap();
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(name.as_str().into(), durable, FieldTable::default())
            .await
            .unwrap();
        ch.queue_bind(
            name.as_str().into(),
            name.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let _ = conn.close(200, "OK".into()).await;
        Self {
            exchange: name.clone(),
            queue: name,
        }
    }

    /// Drains the queue: how often each message id arrived.
    pub async fn drain(&self) -> HashMap<String, usize> {
        let conn: Connection = TestBroker::connect().await;
        let ch = conn.create_channel().await.unwrap();
        let mut seen = HashMap::new();
        while let Some(m) = ch
            .basic_get(self.queue.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            let id = m
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default();
            *seen.entry(id).or_insert(0) += 1;
            m.delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        let _ = conn.close(200, "OK".into()).await;
        seen
    }

    /// Consumes every message in the queue, in queue order, as JSON
    /// bodies (the queue must be still: nothing more is published).
    pub async fn drain_bodies(&self) -> Vec<serde_json::Value> {
        use futures_core::Stream;
        let conn: Connection = TestBroker::connect().await;
        let ch = conn.create_channel().await.unwrap();
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let waiting = ch
            .queue_declare(self.queue.as_str().into(), passive, FieldTable::default())
            .await
            .unwrap()
            .message_count() as usize;
        ch.basic_qos(1000, Default::default()).await.unwrap();
        let consumer = ch
            .basic_consume(
                self.queue.as_str().into(),
                "drain".into(),
                lapin::options::BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut consumer = Box::pin(consumer);
        let mut bodies = Vec::with_capacity(waiting);
        while bodies.len() < waiting {
            let delivery = tokio::time::timeout(
                Duration::from_secs(30),
                std::future::poll_fn(|cx| consumer.as_mut().poll_next(cx)),
            )
            .await
            .unwrap_or_else(|_| panic!("{} of {waiting} queued messages came", bodies.len()))
            .expect("the consumer is open")
            .expect("a delivery");
            bodies.push(serde_json::from_slice(&delivery.data).expect("a JSON body"));
        }
        let _ = conn.close(200, "OK".into()).await;
        bodies
    }
}

impl Drop for DurableQueue {
    fn drop(&mut self) {
        let queue = self.queue.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(conn) = Connection::connect(support::AMQP_URL, Default::default()).await
                    && let Ok(ch) = conn.create_channel().await
                {
                    let _ = ch
                        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                        .await;
                    let _ = ch
                        .exchange_delete(queue.as_str().into(), Default::default())
                        .await;
                }
            });
        })
        .join();
    }
}

/// Every key arrived at least once; returns the number of duplicates.
pub fn all_arrived(keys: &[String], seen: &HashMap<String, usize>) -> usize {
    let missing: Vec<&String> = keys.iter().filter(|k| !seen.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} rows never arrived, e.g. {:?}",
        missing.len(),
        keys.len(),
        missing.first()
    );
    seen.values().map(|n| n - 1).sum()
}

pub const LONG: Duration = Duration::from_secs(180);

/// A relay that reaches PostgreSQL and RabbitMQ only through TCP proxies
/// the test can cut, on its own database and durable queue; ready.
pub struct Proxied {
    pub db: support::db::TestDb,
    pub q: DurableQueue,
    pub pg: support::proxy::Proxy,
    pub amqp: support::proxy::Proxy,
    pub relay: support::relay::Relay,
}

pub async fn proxied(prefix: &str) -> Proxied {
    use support::relay::{Relay, SourceSpec, config};
    let db = support::db::TestDb::migrated(prefix).await;
    let q = DurableQueue::new().await;
    let pg = support::proxy::Proxy::start(support::PG_HOST).await;
    let amqp = support::proxy::Proxy::start(support::AMQP_HOST).await;
    let url = format!("postgres://root@{}/{}", pg.addr, db.name);
    let cfg = config(
        &format!("amqp://guest:guest@{}/%2f", amqp.addr),
        &[SourceSpec::new("orders", &url, &q.exchange)],
    );
    let relay = Relay::start(&cfg).await;
    relay.wait_ready(200, LONG).await;
    Proxied {
        db,
        q,
        pg,
        amqp,
        relay,
    }
}
