#!/usr/bin/env bash
# Reproduces bench/README.md's figures on this machine (about 5 minutes
# after the build). Needs a release build first:
#   cargo build --release -p pipit -p pipit-bench
# Traffic stays on 127.0.0.0/8; every tool is bounded in count and time.
# Results land in bench/results/ (JSON, latency samples, ramp CSV, SVG).
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${CARGO_TARGET_DIR:-target}/release"
out="bench/results"
mkdir -p "$out"
work=$(mktemp -d)
server_pid=""
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

# start_server NAME PORT [extra args]: one shard pinned to CPU 0.
start_server() {
    local name=$1 port=$2; shift 2
    taskset -c 0 "$bin/pipit" serve --listen "127.0.0.1:$port" --data-dir "$work/$name" --shards 1 "$@" \
        > "$work/$name.out" 2> "$work/$name.err" &
    server_pid=$!
    for _ in $(seq 100); do
        grep -q "server key" "$work/$name.out" 2>/dev/null && break
        sleep 0.1
    done
    key=$(grep -o 'server key [0-9a-f]*' "$work/$name.out" | awk '{print $3}')
}
stop_server() { kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=""; }

echo "== durable 1:1 throughput, server on CPU 0, load on CPU 1"
start_server tput 5400 --metrics-listen 127.0.0.1:9400
taskset -c 1 "$bin/pipit-load" --addr 127.0.0.1:5400 --server-key "$key" \
    --pairs 16 --messages 40000 --window 512 --seconds 30 --json "$out/throughput.json"
curl -s 127.0.0.1:9400/metrics | grep -E '^pipit_group_commit_(ops|seconds)' > "$out/group-commit.txt" || true
stop_server

echo "== latency at 15,000 messages/s"
start_server lat 5401
taskset -c 1 "$bin/pipit-load" --addr 127.0.0.1:5401 --server-key "$key" \
    --pairs 16 --rate 15000 --messages 18750 --window 4096 --seconds 40 \
    --json "$out/latency-15k.json" --latencies "$work/latency-15k.txt"
stop_server
python3 bench/plot.py latency "$work/latency-15k.txt" "$out/latency-15k.svg" "1:1 delivery latency at 15,000 msgs/s" || true

echo "== 2G: 200 kbit/s, 500 ms RTT"
start_server twog 5402
"$bin/pipit-2g" --addr 127.0.0.1:5402 --server-key "$key" --runs 7 --json "$out/2g.json"
stop_server

echo "== idle connections and reconnect storm"
conns=${CONNECTIONS:-19000}
# Thousands of devices from eight loopback addresses: measure the server's
# capacity, not its per-address admission limit (systemd/pipit.toml).
printf '[net]\nhandshake_rate_per_source = 0\nmax_handshakes_per_source = 4096\n' > "$work/scale.toml"
start_server scale 5403 --config "$work/scale.toml"
"$bin/pipit-scale" --addr 127.0.0.1:5403 --server-key "$key" --connections "$conns" --probe 10 \
    --hold-secs 1 --devices "$work/devices.txt" > /dev/null
stop_server
# A fresh process on the same data: its memory growth is the connections'.
start_server scale 5403 --config "$work/scale.toml"
sleep 1
"$bin/pipit-scale" --addr 127.0.0.1:5403 --server-key "$key" --connections "$conns" --probe 1000 \
    --hold-secs 5 --devices "$work/devices.txt" --server-pid "$server_pid" \
    --json "$out/scale.json" --ramp-csv "$out/ramp.csv"
stop_server
python3 bench/plot.py ramp "$out/ramp.csv" "$out/ramp.svg" || true

echo "== a 1,024-member group: latency, receipts, storage"
# A thousand registrations from one address, as above.
start_server group 5404 --config "$work/scale.toml"
taskset -c 1 "$bin/pipit-group" --addr 127.0.0.1:5404 --server-key "$key" --data-dir "$work/group" \
    --members 1024 --online 100 --sends 20 --gap-ms 100 --storage-sends 100 --json "$out/group.json"
stop_server

echo "== results in $out"
cat "$out"/*.json
