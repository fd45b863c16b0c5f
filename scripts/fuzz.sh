#!/usr/bin/env bash
# Fuzz smoke run: each cargo-fuzz target under fuzz/ (the event decoder in
# structured mode and on whole records with headers, the
# config loader, the journey-definition loader) for SECONDS (default 20),
# seeded from examples/, rules/ and deploy/, with bounded memory; fails on a
# panic, a leak past the RSS limit or an input slower than 10 s (libFuzzer
# writes the input to fuzz/artifacts/TARGET/). Installs cargo-fuzz and the
# nightly toolchain when missing.
#
#   scripts/fuzz.sh            # every target, 20 s each
#   scripts/fuzz.sh 600 event  # one target, 10 minutes
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds=${1:-20}
shift || true
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(event event_binary config rules)

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2

# Seeds, fresh each run: every example event on its own, the example
# configs, the shipped and example journeys. New inputs go to a scratch
# corpus, so the repository is never written.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work"/seeds/{event,event_binary,config,rules}
split -l 1 examples/events.jsonl "$work/seeds/event/example-"
# The same events in the binary content mode, in the target's input layout.
python3 - "$work/seeds/event_binary" <<'PY'
import json, struct, sys
for i, line in enumerate(open("examples/events.jsonl")):
    e = json.loads(line)
    headers = [(b"ce_" + k.encode(), str(e[k]).encode()) for k in
               ("specversion", "id", "type", "source", "subject", "time") if k in e]
    headers.append((b"content-type", b"application/json"))
    out = bytes([len(headers)])
    for name, value in headers:
        out += bytes([len(name)]) + name + bytes([len(value)]) + value
    out += struct.pack("<q", 1_780_000_000_001)
    out += json.dumps(e.get("data", {})).encode()
    open(f"{sys.argv[1]}/example-{i}", "wb").write(out)
PY
cp deploy/nudge.example.toml "$work/seeds/config/"
find deploy -name '*.toml' -exec cp {} "$work/seeds/config/" \;
cp rules/*.rhai examples/journeys/*.rhai "$work/seeds/rules/"

cargo +nightly fuzz build
for t in "${targets[@]}"; do
    mkdir -p "$work/corpus/$t"
    echo "== fuzz $t for ${seconds}s" >&2
    if ! cargo +nightly fuzz run "$t" "$work/corpus/$t" "$work/seeds/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 \
        -print_final_stats=1 >"$work/$t.log" 2>&1; then
        tail -n 60 "$work/$t.log" >&2
        echo "fuzz target $t failed (input kept in fuzz/artifacts/$t/)" >&2
        exit 1
    fi
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|Done)' "$work/$t.log" >&2 || true
done
