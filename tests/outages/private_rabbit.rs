//! RabbitMQ nodes of the test's own (`scripts/rabbit-cluster.sh`), never
//! the shared broker: started when made, stopped when dropped, also when
//! the test fails. A test killed before its drop leaves them running;
//! the script's `start` finds and removes them on the next run (the
//! directory and the node names follow from the base port).

use std::collections::HashMap;
use std::future::poll_fn;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use futures_core::Stream;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rabbit-cluster.sh");

pub struct PrivateRabbit {
    dir: PathBuf,
    base: u16,
}

impl PrivateRabbit {
    /// Starts the nodes (`extra`: `--nodes N`, `--tls DIR`) with ports
    /// from `base`; prints what the script did and how long it took.
    pub fn start(base: u16, extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("outboxd-rabbit-{base}"));
        // The guard exists before the start, so a start that fails half-way
        // is cleaned up too.
        let me = Self { dir, base };
        let began = Instant::now();
        let out = me.script("start", extra);
        print!("{}", String::from_utf8_lossy(&out.stdout));
        assert!(
            out.status.success(),
            "rabbit-cluster.sh start failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("rabbit-cluster.sh start took {:.1?}", began.elapsed());
        me
    }

    fn script(&self, cmd: &str, extra: &[&str]) -> Output {
        Command::new("sh")
            .arg(SCRIPT)
            // So that another test run on this machine cannot take over,
            // wipe or stop this run's cluster (the script refuses).
            .env("OBX_CLUSTER_OWNER", std::process::id().to_string())
            .arg(cmd)
            .arg(&self.dir)
            .arg(self.base.to_string())
            .args(extra)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {SCRIPT}: {e}"))
    }

    /// Node `i` (from 1): its AMQP URL as guest.
    pub fn url(&self, i: u16) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.base + i - 1)
    }

    /// Node `i`'s TLS listener (started with `--tls`).
    pub fn amqps_port(&self, i: u16) -> u16 {
        self.base + 10 + i - 1
    }

    pub fn node_name(&self, i: u16) -> String {
        format!("obx-{}-{i}@localhost", self.base)
    }

    /// Node `i`'s own log file.
    pub fn log_file(&self, i: u16) -> PathBuf {
        self.dir.join(format!("n{i}/log/{}.log", self.node_name(i)))
    }

    /// The Erlang VM's pid of node `i`.
    pub fn pid(&self, i: u16) -> u32 {
        let path = self.dir.join(format!("n{i}/pid"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        text.trim().parse().expect("a pid")
    }

    /// Stops node `i` the way `rabbitmqctl stop` does (RabbitMQ handles
    /// SIGTERM as a clean stop), without waiting for the CLI to start;
    /// returns the pid of its VM.
    pub fn sigterm(&self, i: u16) -> u32 {
        let pid = self.pid(i);
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid} failed");
        pid
    }

    /// `rabbitmqctl -n <node i> args...`, with the cluster's cookie; its stdout.
    pub fn ctl(&self, i: u16, args: &[&str]) -> String {
        let out = Command::new("/usr/lib/rabbitmq/bin/rabbitmqctl")
            .env("HOME", self.dir.join("home"))
            .args(["-q", "-n", &self.node_name(i)])
            .args(args)
            .output()
            .expect("run rabbitmqctl");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?} on node {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        let out = self.script("stop", &[]);
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            eprintln!(
                "rabbit-cluster.sh stop failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

pub async fn connect(url: &str) -> Connection {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// A durable topic exchange `name` and a queue `name` bound to it with `#`;
/// `quorum` makes it a quorum queue (replicated on every node).
pub async fn declare(url: &str, name: &str, quorum: bool) {
    let conn = connect(url).await;
    let ch = conn.create_channel().await.expect("channel");
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        name.into(),
        ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    )
    .await
    .expect("declare the exchange");
    let mut args = FieldTable::default();
    if quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(name.into(), durable, args)
        .await
        .expect("declare the queue");
    ch.queue_bind(
        name.into(),
        name.into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    let _ = conn.close(200, "OK".into()).await;
}

/// Consumes every message in queue `name` (nothing more is published):
/// how often each message id arrived.
pub async fn drain_ids(url: &str, name: &str) -> HashMap<String, usize> {
    let conn = connect(url).await;
    let ch = conn.create_channel().await.expect("channel");
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let waiting = ch
        .queue_declare(name.into(), passive, FieldTable::default())
        .await
        .expect("the queue exists")
        .message_count() as usize;
    ch.basic_qos(2000, Default::default()).await.expect("qos");
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let consumer = ch
        .basic_consume(name.into(), "drain".into(), no_ack, FieldTable::default())
        .await
        .expect("consume");
    let mut consumer = Box::pin(consumer);
    let mut seen = HashMap::new();
    for got in 0..waiting {
        let delivery = tokio::time::timeout(
            Duration::from_secs(30),
            poll_fn(|cx| consumer.as_mut().poll_next(cx)),
        )
        .await
        .unwrap_or_else(|_| panic!("{got} of {waiting} queued messages came"))
        .expect("the consumer is open")
        .expect("a delivery");
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        *seen.entry(id).or_insert(0) += 1;
    }
    let _ = conn.close(200, "OK".into()).await;
    seen
}

/// The process `pid` has exited.
pub fn process_gone(pid: u32) -> bool {
    !Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
