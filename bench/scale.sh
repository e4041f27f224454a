#!/usr/bin/env bash
# Idle connections and the reconnect storm (issue 16), server binaries side
# by side: for each run, a fresh server process on a copy of the same
# registered data (so every run starts from the same state), one shard on
# CPU 0; `pipit-scale` on CPU 1 logs CONNECTIONS devices in over IK, holds
# them idle, then drops them all and brings them back while PROBE of them
# have a message waiting. Runs alternate between the binaries, RUNS rounds.
#
# Usage: [CONNECTIONS=19000] [RUNS=3] [PROBE=1000] \
#        bench/scale.sh OUT_DIR SERVER_BINARY [SERVER_BINARY ...]
# One pipit-scale for every run: $SCALE, or $CARGO_TARGET_DIR/release's.
# Writes OUT_DIR/<binary-label>-<round>.json (label: the binary's parent
# directory name). Loopback only; the fd limit (ulimit -n) bounds
# CONNECTIONS at about 19,900 here.
set -euo pipefail
OUT=${1:?usage: bench/scale.sh OUT_DIR SERVER_BINARY [SERVER_BINARY ...]}
shift
[ $# -ge 1 ] || { echo "usage: bench/scale.sh OUT_DIR SERVER_BINARY [...]" >&2; exit 2; }
SCALE=${SCALE:-${CARGO_TARGET_DIR:-target}/release/pipit-scale}
CONNECTIONS=${CONNECTIONS:-19000}
RUNS=${RUNS:-3}
PROBE=${PROBE:-1000}
PORT=${PORT:-7412}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/pipit-scale.XXXXXX)
SPID=""
cleanup() { [ -n "$SPID" ] && kill "$SPID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
# Thousands of devices from eight loopback addresses: measure the
# server's capacity, not its per-address admission limits (the rate, and
# the share of handshake slots one address may hold).
printf '[net]\nhandshake_rate_per_source = 0\nmax_handshakes_per_source = 4096\n' >"$WORK/scale.toml"

start_server() { # BINARY DATA_DIR
    taskset -c 0 "$1" serve --listen "127.0.0.1:$PORT" --data-dir "$2" --shards 1 --config "$WORK/scale.toml" \
        >"$2.out" 2>"$2.err" &
    SPID=$!
    for _ in $(seq 100); do
        grep -q "server key" "$2.out" 2>/dev/null && break
        sleep 0.1
    done
    KEY=$(grep -o 'server key [0-9a-f]*' "$2.out" | awk '{print $3}')
    [ -n "$KEY" ] || { echo "server did not start" >&2; cat "$2.err" >&2; exit 1; }
}
stop_server() { kill -TERM "$SPID" 2>/dev/null || true; wait "$SPID" 2>/dev/null || true; SPID=""; }

echo "== registering $CONNECTIONS devices (first binary)"
start_server "$1" "$WORK/seed"
taskset -c 1 "$SCALE" --addr "127.0.0.1:$PORT" --server-key "$KEY" --connections "$CONNECTIONS" --probe 0 \
    --hold-secs 1 --devices "$WORK/devices.txt" >/dev/null
stop_server

for round in $(seq "$RUNS"); do
    for bin in "$@"; do
        label=$(basename "$(dirname "$bin")")
        rm -rf "$WORK/run" "$WORK/run.out" "$WORK/run.err"
        cp -a "$WORK/seed" "$WORK/run"
        start_server "$bin" "$WORK/run"
        sleep 1
        echo "== $label round $round"
        taskset -c 1 "$SCALE" --addr "127.0.0.1:$PORT" --server-key "$KEY" --connections "$CONNECTIONS" \
            --probe "$PROBE" --hold-secs 5 --devices "$WORK/devices.txt" --server-pid "$SPID" \
            --json "$OUT/$label-$round.json" --ramp-csv "$OUT/$label-$round.csv"
        stop_server
    done
done
