#!/usr/bin/env bash
# pipit against Debian's Mosquitto, back to back, under one load shape:
# PAIRS sender/receiver pairs (default 200), 100-byte payloads, QoS 1 /
# durable sends with WINDOWS messages in flight per sender (default "10
# 100"), the server pinned to CPU 0 and the load tool to CPU 1. Reports
# each run's rate (PUBACKs/s for Mosquitto, "sent"/s for pipit, which
# answers only after its WAL sync; Mosquitto's QoS 1 is not durable), the
# ratio, and the medians over ROUNDS rounds (default 3).
#
#   cargo build --release -p pipit -p pipit-bench
#   bench/mosquitto.sh                       # the build in $CARGO_TARGET_DIR
#   PIPITS="old=/tmp/a/pipit new=/tmp/b/pipit" bench/mosquitto.sh
#
# PIPITS names several server binaries, run in turn in every round (an
# A/B on a shared machine). Installs `mosquitto` with apt when missing.
# Only loopback; every run is bounded by MESSAGES per sender (default
# 3000) and SECONDS (default 60). Lines go to stdout and to OUT (default
# bench/results/mosquitto.tsv).
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${BIN:-${CARGO_TARGET_DIR:-target}/release}"
pipits=${PIPITS:-"pipit=$bin/pipit"}
rounds=${ROUNDS:-3}
pairs=${PAIRS:-200}
messages=${MESSAGES:-3000}
seconds=${SECONDS_MAX:-60}
windows=${WINDOWS:-"10 100"}
out=${OUT:-bench/results/mosquitto.tsv}
port=${PORT:-5460}

if ! command -v mosquitto > /dev/null && [ ! -x /usr/sbin/mosquitto ]; then
    echo "== installing mosquitto (apt)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto > /dev/null
fi
mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)
# Debian starts a broker on 1883 when the package is installed; ours
# listens on its own port, so that one is left alone.

work=$(mktemp -d)
server_pid=""
cleanup() {
    [ -n "$server_pid" ] && kill "$server_pid" 2> /dev/null
    wait 2> /dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# The broker's settings: no persistence (its default; it would only save
# periodically anyway), a delivery window per client as pipit's default
# (64), and a queue deep enough that nothing is dropped.
cat > "$work/mosquitto.conf" << EOF
listener $port 127.0.0.1
allow_anonymous true
persistence false
max_inflight_messages 64
max_queued_messages 1000000
log_dest stderr
log_type error
EOF
# Hundreds of registrations from a few loopback addresses: the per-source
# handshake limit would refuse most of them.
printf '[net]\nhandshake_rate_per_source = 0\nmax_handshakes_per_source = 4096\n' > "$work/pipit.toml"

wait_port() {
    for _ in $(seq 100); do
        (exec 3<> "/dev/tcp/127.0.0.1/$port") 2> /dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on $port" >&2
    return 1
}

stop_server() {
    kill "$server_pid" 2> /dev/null || true
    wait "$server_pid" 2> /dev/null || true
    server_pid=""
}

json_field() { python3 -c "import json,sys; print(json.loads(sys.stdin.readlines()[-1])['$1'])"; }

run_mosquitto() {
    local w=$1
    taskset -c 0 "$mosquitto" -c "$work/mosquitto.conf" 2> "$work/mosquitto.err" &
    server_pid=$!
    wait_port
    taskset -c 1 "$bin/pipit-mqtt-load" --addr "127.0.0.1:$port" --pairs "$pairs" --window "$w" \
        --messages "$messages" --seconds "$seconds" 2> "$work/load.err" | json_field acked_per_sec
    stop_server
}

run_pipit() {
    local server=$1 w=$2
    rm -rf "$work/data"
    taskset -c 0 "$server" serve --listen "127.0.0.1:$port" --data-dir "$work/data" --shards 1 \
        --config "$work/pipit.toml" > "$work/pipit.out" 2> "$work/pipit.err" &
    server_pid=$!
    for _ in $(seq 100); do
        grep -q "server key" "$work/pipit.out" 2> /dev/null && break
        sleep 0.1
    done
    local key
    key=$(grep -o 'server key [0-9a-f]*' "$work/pipit.out" | awk '{print $3}')
    taskset -c 1 "$bin/pipit-load" --addr "127.0.0.1:$port" --server-key "$key" --pairs "$pairs" \
        --window "$w" --payload 100 --messages "$messages" --seconds "$seconds" 2> "$work/load.err" |
        json_field sent_per_sec
    stop_server
}

mkdir -p "$(dirname "$out")"
header="round\twindow\tload_avg\tmosquitto"
for p in $pipits; do header="$header\t${p%%=*}\t${p%%=*}/mosquitto"; done
printf "%b\n" "$header" | tee "$out"
for round in $(seq "$rounds"); do
    for w in $windows; do
        load=$(cut -d' ' -f1 /proc/loadavg)
        m=$(run_mosquitto "$w")
        line="$round\t$w\t$load\t$m"
        for p in $pipits; do
            r=$(run_pipit "${p#*=}" "$w")
            line="$line\t$r\t$(python3 -c "print(f'{$r / $m:.2f}')")"
        done
        printf "%b\n" "$line" | tee -a "$out"
    done
done

# Medians per window and server.
python3 - "$out" << 'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
cols = [c for c in rows[0] if c not in ("round", "window", "load_avg")]
for w in sorted({r["window"] for r in rows}, key=int):
    sel = [r for r in rows if r["window"] == w]
    meds = ", ".join(f"{c} {statistics.median(float(r[c]) for r in sel):,.2f}" for c in cols)
    print(f"median, window {w}: {meds}")
EOF
