"""Render benchmarks/results/bench.json (and fidelity.json) as the Markdown kept in docs/benchmarks.md.

    python -m benchmarks.report          # print
    python -m benchmarks.report --docs   # rewrite the block between the bench markers of docs/benchmarks.md

tests/unit/test_bench_report.py checks that the docs block equals what the results files render.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
DOC = Path(__file__).parent.parent / "docs" / "benchmarks.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _throughput(res: dict) -> list[str]:
    m = res["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {res['mode']} mode, {res['time']}.", "",
             "| reranking throughput (batch 32, 16-token caption) | pairs/s |", "|---|---|"]
    lines += [f"| {name} | {v:.1f} |" for name, v in res["throughput_pairs_per_s"].items()]
    lines += ["", f"ViT-L/16-384 vision encoder: {res['vision_encoder_s_per_image']:.2f} s/image. "
              f"Best backend: **{res['best_backend']}**.", "",
              "| ratio (same run) | value |", "|---|---|"]
    lines += [f"| {name} | {v:.2f}x |" for name, v in res["ratios"].items()]
    hw = res["hardware"]
    lines += ["", "| L12 m=64 achieved vs matmul peak of the same engine and precision | GOP/s | share |",
              "|---|---|---|"]
    for key, frac in hw["L12 m=64 fraction_of_peak"].items():
        backend, peak_name = key.split(" vs ")
        share = f"{100 * frac:.0f}%" if frac <= 1 else "not meaningful: this dense matmul takes a slow path"
        lines.append(f"| {backend} vs {peak_name} peak {hw['matmul_peak_gops'][peak_name]:.1f} | "
                     f"{hw['L12 m=64 achieved_gops'][backend]:.1f} | {share} |")
    return lines


def _storage(res: dict) -> list[str]:
    lines = ["", "| token storage per image (64 x 384 unless noted) | bytes |", "|---|---|"]
    lines += [f"| {name} | {v:,} |" for name, v in res["bytes_per_image"].items()]
    lines += ["", "| random gather from the on-disk token store | k=10 | k=50 | k=100 |", "|---|---|---|---|"]
    for setup, ks in res["gather_ms"].items():
        lines.append(f"| {setup} | " + " | ".join(f"{ks[k]:.1f} ms" for k in ("k=10", "k=50", "k=100")) + " |")
    return lines


def _latency(res: dict) -> list[str]:
    lines = ["", f"End-to-end `Engine.search` latency, p50 / p95 ms ({res['query_latency_setup']}):", "",
             "| setup | rerank_k | text embed | FAISS | gather | rerank | total |", "|---|---|---|---|---|---|---|"]
    for setup, per_k in res["query_latency_ms"].items():
        for rk, st in per_k.items():
            cells = [f"{st[s]['p50']:.0f} / {st[s]['p95']:.0f}" if s in st else "-"
                     for s in ("text_embed", "faiss", "gather", "rerank", "total")]
            lines.append(f"| {setup} | {rk.split('=')[1]} | " + " | ".join(cells) + " |")
    return lines


def _build(res: dict) -> list[str]:
    b = res["build_index"]
    return ["", f"build-index over {b['images']} JPEGs of {b['image_size'][0]}x{b['image_size'][1]} "
            f"(demo architecture, {b['workers']} decode workers): {b['build_index_images_per_s']:.0f} images/s "
            f"against {b['raw_encoder_images_per_s']:.0f} images/s for the encoder alone on ready tensors "
            f"(pipeline keeps {100 * b['build/raw']:.0f}%)."]


def _fidelity(fid: dict) -> list[str]:
    lines = ["", f"Fidelity against eager fp32 on `{fid['data']}` ({fid['n_images']} images, {fid['n_captions']} "
             f"captions, rerank top {fid['rerank_k']}) with `{fid['model']}`:", "",
             "| path | t2i R@1 | i2t R@1 | t2i top-1 agreement | i2t top-1 agreement | max logit error |",
             "|---|---|---|---|---|---|"]
    for r in fid["rows"]:
        err = max(r["t2i max_abs_logit_error"], r["i2t max_abs_logit_error"])
        lines.append(f"| {r['name']} | {r['t2i']['R@1']:.2f} ({r['t2i R@1 delta']:+.2f}) | "
                     f"{r['i2t']['R@1']:.2f} ({r['i2t R@1 delta']:+.2f}) | {100 * r['t2i top1_agreement']:.1f}% | "
                     f"{100 * r['i2t top1_agreement']:.1f}% | {err:.3f} |")
    return lines


def render(res: dict, fid: dict | None = None) -> str:
    lines = _throughput(res) + _storage(res) + _latency(res) + _build(res)
    if fid:
        lines += _fidelity(fid)
    return "\n".join(lines)


def load() -> tuple[dict, dict | None]:
    res = json.loads((RESULTS / "bench.json").read_text())
    fid_file = RESULTS / "fidelity.json"
    return res, json.loads(fid_file.read_text()) if fid_file.is_file() else None


def doc_block(text: str) -> str:
    return text[text.index(START) + len(START):text.index(END)].strip("\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", action="store_true", help="rewrite the benchmark block of docs/benchmarks.md")
    args = ap.parse_args()
    table = render(*load())
    if args.docs:
        text = DOC.read_text()
        text = text[:text.index(START) + len(START)] + "\n" + table + "\n" + text[text.index(END):]
        DOC.write_text(text)
        print(f"updated {DOC}")
    else:
        print(table)


if __name__ == "__main__":
    main()
