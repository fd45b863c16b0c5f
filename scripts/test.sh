#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs and starts what the
# tests need (kcat, the tansu Kafka-protocol broker, PostgreSQL), then runs
# `cargo test --release` against them. Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/ci-deps.sh
export KAFKA_BROKERS=127.0.0.1:19092
cargo test --release "$@"
