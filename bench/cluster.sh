#!/usr/bin/env bash
# Same-node against cross-node 1:1 traffic on a three-node cluster with its
# own etcd, all on this machine (three nodes on two cores: compare the two
# runs, not the absolute figures). Needs etcd (tools/dev deps) and a
# release build:
#   cargo build --release -p pipit -p pipit-bench
# Traffic stays on 127.0.0.0/8; every run is bounded in count and time.
# Prints both pipit-load reports and the node-link bytes per message.
set -euo pipefail
cd "$(dirname "$0")/.."
# PROFILE=debug measures a debug build (ratios only: the server crate is
# unoptimised there).
bin="${BIN:-${CARGO_TARGET_DIR:-target}/${PROFILE:-release}}"
pairs=${PAIRS:-8}
messages=${MESSAGES:-4000}
work=$(mktemp -d)
pids=()
cleanup() {
    rc=$?
    [ "$rc" = 0 ] || tail -n 5 "$work"/*.err >&2 2>/dev/null || true
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

etcd --name bench --data-dir "$work/etcd" \
    --listen-client-urls http://127.0.0.1:5439 --advertise-client-urls http://127.0.0.1:5439 \
    --listen-peer-urls http://127.0.0.1:5438 --initial-advertise-peer-urls http://127.0.0.1:5438 \
    --initial-cluster bench=http://127.0.0.1:5438 --log-level error > /dev/null 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -s http://127.0.0.1:5439/health | grep -q true && break; sleep 0.1; done

declare -A key
for i in 1 2 3; do
    cat > "$work/n$i.toml" <<TOML
listen = "127.0.0.1:541$i"
data_dir = "$work/n$i"
shards = 1
metrics_listen = "127.0.0.1:942$i"
[net]
handshake_rate_per_source = 0
max_handshakes_per_source = 4096
[cluster]
node_id = "n$i"
advertise = "127.0.0.1:541$i"
link_listen = "127.0.0.1:543$i"
etcd_endpoints = ["http://127.0.0.1:5439"]
TOML
    "$bin/pipit" serve --config "$work/n$i.toml" > "$work/n$i.out" 2> "$work/n$i.err" &
    pids+=($!)
    for _ in $(seq 100); do grep -q "server key" "$work/n$i.out" 2>/dev/null && break; sleep 0.1; done
    key[$i]=$(grep -o 'server key [0-9a-f]*' "$work/n$i.out" | awk '{print $3}')
done
for _ in $(seq 100); do
    [ "$("$bin/pipit" admin --data-dir "$work/n1" cluster | grep -c 'link up')" = 2 ] && break
    sleep 0.1
done
"$bin/pipit" admin --data-dir "$work/n1" cluster

link_bytes() { # NODE DIRECTION(transmitted|received) PEER
    curl -s "127.0.0.1:942$1/metrics" | awk -v m="pipit_node_link_$2_bytes_total{peer=\"$3\"}" '$1 == m {print $2}' | head -1
}

echo "== same node: senders and receivers on n1"
"$bin/pipit-load" --addr 127.0.0.1:5411 --server-key "${key[1]}" \
    --pairs "$pairs" --messages "$messages" --rate "${RATE:-0}" --window 256 --seconds 60

echo "== cross node: senders on n1, receivers on n2"
out0=$(link_bytes 1 transmitted n2); in0=$(link_bytes 1 received n2)
"$bin/pipit-load" --addr 127.0.0.1:5411 --server-key "${key[1]}" \
    --peer-addr 127.0.0.1:5412 --peer-key "${key[2]}" \
    --pairs "$pairs" --messages "$messages" --rate "${RATE:-0}" --window 256 --seconds 60
sleep 1
out1=$(link_bytes 1 transmitted n2); in1=$(link_bytes 1 received n2)
total=$((pairs * messages))
python3 - "$out0" "$out1" "$in0" "$in1" "$total" <<'PY'
import sys
o0, o1, i0, i1, n = (float(x or 0) for x in sys.argv[1:])
print(f"node link n1->n2: {(o1 - o0) / n:.1f} B/message (forwards), "
      f"n2->n1: {(i1 - i0) / n:.1f} B/message (acks and delivered receipts), "
      f"over {int(n)} messages with 100-byte payloads")
PY
