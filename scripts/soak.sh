#!/usr/bin/env bash
# Soak test (not in CI): `nudge run` SIGKILLed and restarted N times (default
# 100) under a steady load of loan events on the tansu broker, against a
# recording HTTP endpoint; then prints lost / doubled / late counts and exits
# 1 if anything was lost or doubled. See benches/soak.rs.
#
#   scripts/soak.sh            # 100 cycles, 50 loans/s
#   scripts/soak.sh 20 --rate 100 --late 30
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cycles=${1:-100}
shift || true
scripts/ci-deps.sh
export KAFKA_BROKERS=127.0.0.1:19092
# cargo bench builds the nudge binary the soak starts (with the features the
# tests use, so nothing is built twice).
exec cargo bench --bench soak -- --cycles "$cycles" "$@"
