"""Render benchmarks/results/bench.json as the Markdown table kept in the README.

    python -m benchmarks.report
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "bench.json"


def render(res: dict) -> str:
    m = res["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {res['mode']} mode, {res['time']}.", "",
             "| measurement | value |", "|---|---|"]
    for name, v in res["throughput_pairs_per_s"].items():
        lines.append(f"| rerank throughput, {name} | {v:.1f} pairs/s |")
    lines.append(f"| ViT-L/16-384 vision encoder, fp32 | {res['vision_encoder_s_per_image']:.2f} s/image |")
    for p, v in res["hardware"]["matmul_peak_gflops"].items():
        frac = res["hardware"]["L12 m=64 fraction_of_peak"][p]
        ach = res["hardware"]["L12 m=64 achieved_gflops"][p]
        share = f"{100 * frac:.0f}%" if frac <= 1 else "peak not measurable: slow bf16 matmul path"
        lines.append(f"| {p} matmul peak / L12 m=64 achieved | {v:.1f} / {ach:.1f} GFLOP/s ({share}) |")
    for name, v in res["ratios"].items():
        lines.append(f"| ratio {name} | {v:.1f}x |")
    for name, v in res["bytes_per_image"].items():
        lines.append(f"| bytes per image, {name} | {v:,} |")
    for n, ks in res["gather_ms"].items():
        for k, v in ks.items():
            lines.append(f"| Zarr gather {k} rows at {n} | {v:.1f} ms |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(json.loads(RESULTS.read_text())))
