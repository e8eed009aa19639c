#!/usr/bin/env bash
# The benchmark: builds outboxd and outboxd-bench in release mode and runs
# the bench against the local PostgreSQL and RabbitMQ (started if needed).
# Arguments go to outboxd-bench (--quick, --repeats N, --rows N, --only ...).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
# Both packages of the workspace: the bench (bench/) runs the outboxd next
# to it in target/release (or $CARGO_TARGET_DIR/release).
cargo build --release --locked -p outboxd -p outboxd-bench
exec "${CARGO_TARGET_DIR:-target}/release/outboxd-bench" "$@"
