//! RabbitMQ over AMQP 0-9-1 with publisher confirms (lapin).
//!
//! `connection.rs` keeps one connection up for the whole process (to one
//! node of a cluster, `nodes.rs` picks which),
//! `publish.rs` sends a batch on a channel of its own (from the pool in
//! `channels.rs`, which also checks the exchanges rows name), `ordered.rs` and
//! `lane.rs` pipeline batches on one channel kept for them, `confirm.rs` turns
//! the broker's answers into [`super::Outcome`]s, `tls.rs` does the TLS
//! handshake of amqps:// itself.

mod channels;
mod confirm;
mod connection;
mod frame;
mod isolate;
mod lane;
mod nodes;
mod ordered;
mod publish;
mod tls;

pub use channels::exchange_exists;
pub use connection::Broker;
pub use publish::RabbitPublisher;
