//! Quick-start helper (not part of the relay): declare the example topology
//! and watch what the relay publishes.
//!
//!   cargo run --example demo -- declare orders.events orders.events.demo
//!   cargo run --example demo -- tail orders.events.demo
//!
//! The relay never declares exchanges or queues; in production your
//! platform's topology tooling does. AMQP_URL overrides the broker address.

use std::future::poll_fn;
use std::pin::pin;

use futures_core::Stream;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["declare", exchange, queue] => {
            let durable = ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            };
            channel
                .exchange_declare(
                    (*exchange).into(),
                    ExchangeKind::Topic,
                    durable,
                    FieldTable::default(),
                )
                .await?;
            let durable = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            channel
                .queue_declare((*queue).into(), durable, FieldTable::default())
                .await?;
            channel
                .queue_bind(
                    (*queue).into(),
                    (*exchange).into(),
                    "#".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            println!("topic exchange {exchange:?} -> queue {queue:?} (binding \"#\")");
        }
        ["tail", queue] => {
            let consumer = channel
                .basic_consume(
                    (*queue).into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let mut consumer = pin!(consumer);
            println!("waiting for messages on {queue:?} (Ctrl-C to stop)");
            while let Some(delivery) = poll_fn(|cx| consumer.as_mut().poll_next(cx)).await {
                let d = delivery?;
                let p = &d.properties;
                println!(
                    "{} type={} message_id={} body={}",
                    d.routing_key,
                    p.kind().as_ref().map(|s| s.as_str()).unwrap_or("-"),
                    p.message_id().as_ref().map(|s| s.as_str()).unwrap_or("-"),
                    String::from_utf8_lossy(&d.data)
                );
                d.ack(BasicAckOptions::default()).await?;
            }
        }
        _ => {
            eprintln!("usage: demo declare EXCHANGE QUEUE | demo tail QUEUE");
            std::process::exit(2);
        }
    }
    Ok(())
}
