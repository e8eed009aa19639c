//! Integration tests: the real `outboxd` binary against the real PostgreSQL
//! and RabbitMQ. Each test has its own database, exchange and queue, so
//! they run in parallel. One file per promised behaviour.

mod support;

mod admin;
mod broker_nodes;
mod cli;
mod config_errors;
mod crash;
mod dead_letters;
mod debezium;
mod delivery;
mod failures;
mod formats;
mod held;
mod hostile;
mod idle_batch;
mod monitoring;
mod outage;
mod partition_locks;
mod pause;
mod pipelined;
mod returns;
mod rollback;
mod settle;
mod shutdown;
mod sources;
mod status;
mod stuck;
mod tls_peers;
mod wakeup;
mod wal;
