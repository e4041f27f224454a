#!/usr/bin/env bash
# A legitimate pair beside hostile loads (issue 10), against one server
# binary: the pair's delivery latency and login time, and the server's
# peak RSS, for three runs on a fresh server each:
#
#   quiet   the pair alone (1,000 msgs/s, 100-byte payloads, 10 s)
#   large   the pair while 128 accounts flood 60 KB sends (window 256 each)
#   xx      the pair while 300 connections send random XX first messages
#   partial 2,000 logged-in connections each holding all but one byte of
#           a 64 KiB frame, for 45 s (the server's RSS, and how many it
#           closed)
#
# Usage: [SERVER_ARGS="--config f.toml"] bench/hostile.sh SERVER_BINARY OUT_DIR
# The server runs on CPU 0 with one shard, the tools on CPU 1 (taskset).
# Tools come from $CARGO_TARGET_DIR/release (cargo build --release -p
# pipit-bench). Everything is bounded in time; disk use is at most
# 128 x 400 x 60 KB = 3 GB per large run, deleted afterwards.
set -euo pipefail
BIN=${1:?usage: bench/hostile.sh SERVER_BINARY OUT_DIR}
OUT=${2:?usage: bench/hostile.sh SERVER_BINARY OUT_DIR}
TOOLS=${CARGO_TARGET_DIR:-target}/release
PORT=${PORT:-7411}
mkdir -p "$OUT"

start_server() {
    DIR=$(mktemp -d /tmp/pipit-hostile.XXXXXX)
    # shellcheck disable=SC2086
    taskset -c 0 "$BIN" serve --listen "127.0.0.1:$PORT" --data-dir "$DIR" --shards 1 ${SERVER_ARGS:-} \
        >"$DIR/stdout" 2>"$DIR/stderr" &
    SPID=$!
    for _ in $(seq 100); do
        if grep -q "server key" "$DIR/stdout" 2>/dev/null; then break; fi
        sleep 0.1
    done
    KEY=$(awk '/server key/ {print $NF}' "$DIR/stdout")
    [ -n "$KEY" ] || { echo "server did not start" >&2; cat "$DIR/stderr" >&2; exit 1; }
}

stop_server() {
    kill -INT "$SPID" 2>/dev/null || true
    wait "$SPID" 2>/dev/null || true
    # Keep what the server logged at warn and above, for the report.
    grep -E "WARN|ERROR" "$DIR/stderr" | head -50 >"$OUT/$1.server-log.txt" || true
    rm -rf "$DIR"
}

rss_mib() {
    awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$SPID/status"
}

legit() {
    taskset -c 1 "$TOOLS/pipit-load" --addr "127.0.0.1:$PORT" --server-key "$KEY" \
        --pairs 1 --rate 1000 --messages 10000 --sources 1 --seconds 30 --json "$OUT/$1.json" \
        2>/dev/null >/dev/null
}

echo "== quiet"
start_server
legit quiet
echo "{\"server_rss_mib\":$(rss_mib)}" >"$OUT/quiet.server.json"
stop_server quiet

echo "== large: 128 accounts flooding 60 KB sends"
start_server
taskset -c 1 "$TOOLS/pipit-flood" large-sends --addr "127.0.0.1:$PORT" --server-key "$KEY" \
    --accounts 128 --payload 60000 --window 256 --messages 400 --seconds 40 --server-pid "$SPID" \
    >"$OUT/large.flood.json" 2>"$OUT/large.flood.err" &
FPID=$!
for _ in $(seq 600); do
    if grep -q "flooding" "$OUT/large.flood.err" 2>/dev/null; then break; fi
    sleep 0.1
done
sleep 2
legit large
wait "$FPID" || true
stop_server large

echo "== xx: 300 connections sending random XX first messages"
start_server
taskset -c 1 "$TOOLS/pipit-flood" xx-handshakes --addr "127.0.0.1:$PORT" \
    --connections 300 --seconds 25 --server-pid "$SPID" \
    >"$OUT/xx.flood.json" 2>"$OUT/xx.flood.err" &
FPID=$!
sleep 3
legit xx
wait "$FPID" || true
stop_server xx

echo "== partial: 2,000 connections holding a partial 64 KiB frame"
start_server
taskset -c 1 "$TOOLS/pipit-flood" partial-frames --addr "127.0.0.1:$PORT" --server-key "$KEY" \
    --connections 2000 --seconds 45 --server-pid "$SPID" \
    >"$OUT/partial.flood.json" 2>"$OUT/partial.flood.err" || true
stop_server partial

for run in quiet large xx; do
    echo "$run: pair $(cat "$OUT/$run.json")"
done
for run in large xx partial; do
    echo "$run: flood $(cat "$OUT/$run.flood.json")"
done
