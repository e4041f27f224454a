#!/usr/bin/env python3
"""Plots for bench/README.md from the files the tools write.

    bench/plot.py latency LATENCIES.txt OUT.svg [TITLE]
        one latency sample (microseconds) per line, from `pipit-load --latencies`
    bench/plot.py ramp RAMP.csv OUT.svg
        phase,seconds,connections rows, from `pipit-scale --ramp-csv`

Needs matplotlib (pip install matplotlib).
"""
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def latency(path, out, title="Delivery latency"):
    xs = sorted(int(line) / 1000.0 for line in open(path) if line.strip())
    n = len(xs)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.hist(xs, bins=100, color="#3b7dd8")
    ax1.set_xlabel("latency (ms)")
    ax1.set_ylabel("messages")
    ax1.set_title(f"{title}: histogram ({n} messages)")
    # Percentile curve on a log "nines" axis.
    import math

    qs, ys = [], []
    for i, v in enumerate(xs):
        q = (i + 1) / n
        if q >= 1.0:
            break
        qs.append(-math.log10(1 - q))
        ys.append(v)
    ax2.plot(qs, ys, color="#d8543b")
    ticks = [0, 1, 2, 3]
    ax2.set_xticks(ticks)
    ax2.set_xticklabels(["p0", "p90", "p99", "p99.9"])
    ax2.set_xlim(0, max(3, qs[-1] if qs else 3))
    ax2.set_ylabel("latency (ms)")
    ax2.set_title("percentiles")
    for q, label in [(0.5, "p50"), (0.99, "p99"), (0.999, "p99.9")]:
        v = xs[min(n - 1, int(q * n))]
        ax2.annotate(f"{label} {v:.2f} ms", (-math.log10(1 - q), v), textcoords="offset points", xytext=(5, 5))
    fig.tight_layout()
    fig.savefig(out)


def ramp(path, out):
    rows = [line.strip().split(",") for line in open(path)][1:]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for phase, color in [("ramp", "#3b7dd8"), ("storm", "#d8543b")]:
        pts = [(float(t), int(c)) for p, t, c in rows if p == phase]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=phase, color=color)
    ax.set_xlabel("seconds")
    ax.set_ylabel("authenticated connections")
    ax.set_title("Connection ramp and reconnect storm")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "latency":
        latency(sys.argv[2], sys.argv[3], *(sys.argv[4:5]))
    elif kind == "ramp":
        ramp(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
