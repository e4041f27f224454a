#!/usr/bin/env bash
# Power cuts under load, many of them (issue 31): the real server on the
# power-loss file system (tools/powerloss), cut at hundreds of chosen
# moments (group commit, RocksDB recovery, flush, compaction, MANIFEST and
# CURRENT, group fan-out, key rotation, random), restarted each time; at
# the end every message answered "sent" must have reached every recipient,
# once per server lifetime and in order. CI runs the same test with 6 cuts.
#
# Usage: bench/powerloss.sh [CUTS] [MODEL...]
#   CUTS    power cuts per model (default 300)
#   MODEL   strict (POSIX: names durable only after a directory fsync),
#           ext4-ordered, passthrough (LazyFS); default: strict ext4-ordered
# SEED=N repeats a run's choices of cut kinds and points (the timing of the
# load is not repeatable). Needs FUSE and root (or fusermount3). Output:
# bench/results/powerloss-MODEL.txt, the summary line of each run printed.
set -euo pipefail
cd "$(dirname "$0")/.."
CUTS=${1:-300}
shift || true
MODELS=("$@")
if [ "${#MODELS[@]}" -eq 0 ]; then MODELS=(strict ext4-ordered); fi
mkdir -p bench/results
for model in "${MODELS[@]}"; do
    out="bench/results/powerloss-$model.txt"
    start=$(date +%s)
    PIPIT_POWERLOSS_CUTS=$CUTS PIPIT_POWERLOSS_MODEL=$model ${SEED:+PIPIT_POWERLOSS_SEED=$SEED} \
        cargo test --locked -q -p pipit --test power_loss acknowledged_messages_survive_power_cuts \
        -- --exact --nocapture >"$out" 2>&1 || { tail -60 "$out"; echo "FAILED: see $out" >&2; exit 1; }
    echo "$model: $(grep '^power-loss run: seed' "$out" | tail -1) [wall $(( $(date +%s) - start )) s]"
done
