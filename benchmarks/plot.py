"""bench.png: reranking throughput per configuration and query latency split by stage."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(res: dict, out: Path) -> Path:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    thr = res.get("throughput_pairs_per_s", {})
    names = sorted(thr, key=thr.get)
    ax1.barh(names, [thr[n] for n in names], color="tab:blue")
    ax1.set_xscale("log")
    ax1.set_xlabel("pairs / s (log scale)")
    ax1.set_title("joint-encoder reranking throughput")
    for i, n in enumerate(names):
        ax1.text(thr[n], i, f" {thr[n]:.1f}", va="center", fontsize=8)

    lat = res.get("query_latency_ms", {})
    labels, stacks = [], {}
    for setup, per_k in lat.items():
        for rk, stages in per_k.items():
            labels.append(f"{setup} {rk}")
            for stage, v in stages.items():
                if stage != "total":
                    stacks.setdefault(stage, []).append(v["p50"])
    left = [0.0] * len(labels)
    for stage, values in stacks.items():
        values = values + [0.0] * (len(labels) - len(values))
        ax2.barh(labels, values, left=left, label=stage)
        left = [a + b for a, b in zip(left, values)]
    ax2.set_xlabel("p50 ms per query")
    ax2.set_title("end-to-end query latency by stage (k=10)")
    if labels:
        ax2.legend(fontsize=8)
    m = res.get("machine", {})
    fig.suptitle(f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')}, "
                 f"{res.get('mode', '?')} mode, {res.get('time', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
