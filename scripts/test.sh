#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the integration
# tests against the real PostgreSQL and RabbitMQ (started if needed) and a
# real Prometheus (tests/integration/monitoring.rs: promtool on the alert
# rules and their unit tests, on a real scrape, and a Prometheus server per
# test on a free loopback port; installed if needed), then
# the shop example's test (kill -9 of its relay, a cut consumer connection),
# the ordering tests (several relays and producers each) and the outage
# tests (which restart and reconfigure those services, and start RabbitMQ
# nodes of their own with scripts/rabbit-cluster.sh: a 3-node cluster and a
# TLS node, which need nothing beyond the installed RabbitMQ), each on
# their own, one at a time.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
scripts/prometheus.sh
# fmt and clippy cover every workspace member (outboxd and bench/); the
# tests below are the outboxd package's (the root, the default member).
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --locked --lib --bins --test integration
# The shop example under faults (kills its own relays; its own databases,
# exchange and queues).
cargo test --locked --test shop -- --test-threads=1
# --show-output: these tests print what they saw (duplicates after each
# kill or outage, order breaks, recovery times) even when they pass, so a
# CI log carries the figures the README quotes.
cargo test --locked --test ordering -- --test-threads=1 --show-output
cargo test --locked --test outages -- --test-threads=1 --show-output
# The outage tests may leave a service restarting; leave both up.
scripts/services.sh
