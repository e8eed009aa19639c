#!/usr/bin/env bash
# The benchmark: builds outboxd and outboxd-bench in release mode and runs
# the bench against the local PostgreSQL and RabbitMQ (started if needed).
# Arguments go to outboxd-bench (--quick, --repeats N, --rows N, --only ...).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
cargo build --release --locked --bins
exec target/release/outboxd-bench "$@"
