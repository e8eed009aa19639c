#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the integration
# tests against the real PostgreSQL and RabbitMQ (started if needed).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
