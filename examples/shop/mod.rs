//! The shop: three services (orders, payments, inventory), each with its
//! own database, joined only by events that outboxd relays from their
//! outbox tables to RabbitMQ. Each service writes its change and the event
//! it causes in one transaction (`outbox.rs`), and consumes the events it
//! needs through an inbox (`inbox.rs`), so the duplicates of at-least-once
//! delivery change nothing.
//!
//! The saga, and who does what:
//!
//! ```text
//! orders.rs     place: order row + OrderPlaced ────────────┐
//! payments.rs   OrderPlaced: charge ─▶ PaymentCaptured / PaymentDeclined
//! inventory.rs  PaymentCaptured: reserve ─▶ StockReserved / OutOfStock
//! payments.rs   OutOfStock: refund ─▶ PaymentRefunded       (compensation)
//! orders.rs     StockReserved: confirm; PaymentDeclined, PaymentRefunded: cancel
//! ```
//!
//! The parts: `names.rs` (databases, exchange, queues), `events.rs` (the
//! messages and their routes), `setup.rs` + `sql/` (tables, opening state),
//! `topology.rs` (exchange and queues), `service.rs` (one transaction per
//! message) and `consumer.rs` (manual acks after commit, prefetch,
//! reconnects), `summary.rs` (the figures of a run) and `reconcile.rs`
//! (the cross-service check). `main.rs` is the command line; the shop test
//! (`tests/shop/`) includes this module and runs the same code.

// The command line and the test each use their own part of the module.
#![allow(dead_code)]

pub mod consumer;
pub mod db;
pub mod error;
pub mod events;
pub mod inbox;
pub mod inventory;
pub mod names;
pub mod orders;
pub mod outbox;
pub mod payments;
pub mod reconcile;
pub mod service;
pub mod setup;
pub mod summary;
pub mod topology;
