//! One topic exchange and one queue per test, and a consumer that collects
//! what arrives.

use std::collections::BTreeMap;
use std::future::poll_fn;
use std::pin::Pin;
use std::time::Duration;

use futures_core::Stream;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};

use super::{AMQP_URL, unique};

/// A message as a consumer sees it.
#[derive(Debug, Clone)]
pub struct Received {
    pub exchange: String,
    pub routing_key: String,
    pub message_id: Option<String>,
    pub kind: Option<String>,
    pub content_type: Option<String>,
    pub delivery_mode: Option<u8>,
    pub timestamp: Option<u64>,
    pub app_id: Option<String>,
    pub headers: BTreeMap<String, AMQPValue>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header_str(&self, key: &str) -> Option<String> {
        match self.headers.get(key)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            other => Some(format!("{other:?}")),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("body is JSON")
    }
}

pub struct TestBroker {
    pub conn: Connection,
    pub channel: Channel,
    pub exchange: String,
    pub queue: String,
    consumer: Option<Pin<Box<Consumer>>>,
}

impl TestBroker {
    pub async fn connect() -> Connection {
        Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ (is it running?)")
    }

    /// A topic exchange and an exclusive queue bound to it with `binding`.
    /// Both disappear with the test's connection.
    pub async fn new(binding: &str) -> Self {
        Self::with_queue_args(binding, FieldTable::default()).await
    }

    pub async fn with_queue_args(binding: &str, args: FieldTable) -> Self {
        let conn = Self::connect().await;
        let channel = conn.create_channel().await.expect("channel");
        let exchange = unique("obx.ex");
        let queue = unique("obx.q");
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare exchange");
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .expect("declare queue");
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind queue");
        Self {
            conn,
            channel,
            exchange,
            queue,
            consumer: None,
        }
    }

    /// Binds the test's queue to its exchange with one more key.
    pub async fn bind(&self, key: &str) {
        self.channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
    }

    /// The next message, or None if none arrives within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Received> {
        if self.consumer.is_none() {
            let consumer = self
                .channel
                .basic_consume(
                    self.queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("consume");
            self.consumer = Some(Box::pin(consumer));
        }
        let consumer = self.consumer.as_mut()?;
        let delivery = tokio::time::timeout(timeout, poll_fn(|cx| consumer.as_mut().poll_next(cx)))
            .await
            .ok()??
            .expect("delivery");
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
        let p = &delivery.properties;
        Some(Received {
            exchange: delivery.exchange.to_string(),
            routing_key: delivery.routing_key.to_string(),
            message_id: p.message_id().as_ref().map(|s| s.to_string()),
            kind: p.kind().as_ref().map(|s| s.to_string()),
            content_type: p.content_type().as_ref().map(|s| s.to_string()),
            delivery_mode: *p.delivery_mode(),
            timestamp: *p.timestamp(),
            app_id: p.app_id().as_ref().map(|s| s.to_string()),
            headers: p
                .headers()
                .as_ref()
                .map(|h| {
                    h.inner()
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            body: delivery.data.clone(),
        })
    }

    /// Collects messages until `n` have arrived or none came for `idle`.
    pub async fn collect(&mut self, n: usize, idle: Duration) -> Vec<Received> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.next(idle).await {
                Some(m) => out.push(m),
                None => break,
            }
        }
        out
    }
}
