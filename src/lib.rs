//! outboxd: a transactional outbox relay from PostgreSQL to RabbitMQ.
//!
//! A service writes its business change and an outbox row in one
//! transaction; outboxd forwards each committed row to RabbitMQ and only
//! then removes it. Delivery is at-least-once, with the row's `dedup_key`
//! as the AMQP `message_id` so consumers can drop duplicates.
//!
//! # One row's way through the relay
//! | step | what happens | where |
//! |---|---|---|
//! | wake-up | NOTIFY from the table's trigger, or the fallback poll | [`source::wakeup`], [`relay::Relay::run`] |
//! | claim | `SELECT … FOR UPDATE SKIP LOCKED` in a transaction held open | [`source::claim`] (through [`source::Capture`]) |
//! | publish | row → AMQP message, `basic_publish` with `mandatory` | [`message`], `sink/rabbitmq/publish.rs` (through [`sink::Publisher`]) |
//! | confirm | only a plain ack counts as delivered | `sink/rabbitmq/confirm.rs` |
//! | decide | delivered, retry with backoff, or park | `relay/decide.rs` |
//! | settle | delete or mark delivered rows, reschedule or park failed ones, commit | [`source::complete`] |
//!
//! [`relay`] drives these steps for each source, between two seams: a
//! [`source::Capture`] says where rows come from (the polling claim on a
//! [`source::Source`]) and a [`sink::Publisher`] where they go
//! (`sink::rabbitmq::RabbitPublisher`); neither side imports the other,
//! and both have in-memory stand-ins for the loop's unit tests. [`app`]
//! wires one relay per configured source, the broker connection and the
//! HTTP endpoints in [`admin`]; [`commands`] runs each subcommand and
//! maps its error to the exit code. [`config`] loads and validates the
//! TOML file. [`forward`] is the trigger a mapped table (Debezium's
//! outbox layout, say) forwards its producers' rows through into the
//! relay's own table. [`health`] is the client side of `/healthz`, for `outboxd
//! health` (a container's health check).

pub mod admin;
pub mod app;
pub mod backoff;
pub mod check;
pub mod cli;
pub mod commands;
pub mod config;
pub mod dead_letters;
pub mod forward;
pub mod health;
pub mod ident;
pub mod message;
pub mod metrics;
pub mod migrate;
pub mod outcome;
pub mod pause;
pub mod relay;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod status;
pub mod telemetry;
pub mod template;
pub mod tls;
pub mod wal;
