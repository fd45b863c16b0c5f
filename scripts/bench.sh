#!/usr/bin/env bash
# Runs every benchmark (BENCHMARKS.md) on this machine and appends the result
# tables to a markdown file. Installs and starts what they need first (the
# tansu broker, as for the tests). Arguments: the benchmarks to run (default
# all: rules e2e dispatch latency state).
#
#   scripts/bench.sh                      # all, into target/bench-results.md
#   NUDGE_BENCH_OUT=/tmp/r.md scripts/bench.sh rules dispatch
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/ci-deps.sh
export KAFKA_BROKERS=127.0.0.1:19092
export NUDGE_BENCH_OUT="${NUDGE_BENCH_OUT:-$PWD/target/bench-results.md}"
mkdir -p "$(dirname "$NUDGE_BENCH_OUT")"

benches=("$@")
[[ ${#benches[@]} -gt 0 ]] || benches=(rules e2e dispatch latency state)

cargo bench --no-run >/dev/null 2>&1 || cargo bench --no-run
{
    echo
    echo "## Run of $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
    echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
} >>"$NUDGE_BENCH_OUT"
for b in "${benches[@]}"; do
    echo "== cargo bench --bench $b" >&2
    cargo bench --bench "$b"
done
echo "results appended to $NUDGE_BENCH_OUT" >&2
