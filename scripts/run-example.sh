#!/usr/bin/env bash
# Quick start: run outboxd on config/outboxd.toml against local PostgreSQL
# and RabbitMQ (installed and started if needed). Creates the "orders"
# database, the outbox table, and the example exchange "orders.events"
# with a queue "orders.events.demo" bound to it, then runs the relay in
# the foreground (Ctrl-C drains and stops it).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
psql -h 127.0.0.1 -U root -d postgres -Atc "SELECT 1 FROM pg_database WHERE datname = 'orders'" | grep -q 1 \
  || psql -h 127.0.0.1 -U root -d postgres -qc 'CREATE DATABASE orders'

echo "building outboxd (release; the first build takes several minutes)" >&2
cargo build --release --bin outboxd --example demo
target/release/examples/demo declare orders.events orders.events.demo
target/release/outboxd migrate -c config/outboxd.toml
target/release/outboxd check -c config/outboxd.toml
exec target/release/outboxd run -c config/outboxd.toml
