"""edje-search benchmarks: reranking throughput per backend, hardware fraction, storage, gathers,
end-to-end query latency by stage, build-index throughput.

    python -m benchmarks.run --quick      # CI-sized (make bench): N = 10k
    python -m benchmarks.run              # full sizes (make bench-full): N = 10k and 100k

Every figure is a median (or p50/p95) over repeats after warm-up, measured in one run so ratios
compare like with like. Results go to benchmarks/results/bench.json and bench.png.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from edje_search.storage.token_store import bytes_per_image

from .timing import machine

RESULTS = Path(__file__).parent / "results"
FAST_BACKENDS = ("dynamic-int8", "onnx", "onnx-int8")


def throughput_section(quick: bool, res: dict) -> None:
    from .throughput import (CAPTION_TOKENS, bert_flops_per_pair, joint_encoder, matmul_peak_gflops,
                             onnx_matmul_peak_gops, online_vision_seconds, pairs_per_second)

    reps = 3 if quick else 7
    batch = 32
    thr: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as cache:
        for layers in (12, 6):
            for tokens in (64, 32):
                r = joint_encoder(layers, tokens)
                thr[f"L{layers} m={tokens} eager"] = pairs_per_second(r, tokens, batch, reps)
                if layers == 12 and tokens == 64:
                    for backend in ("bf16",) + FAST_BACKENDS:
                        r.use_backend(backend, cache_dir=cache)
                        thr[f"L12 m=64 {backend}"] = pairs_per_second(r, tokens, batch, reps)
        local = joint_encoder(12, 576, variant="local")
        thr["L12 local 576 eager"] = pairs_per_second(local, 576, 8, max(2, reps // 2))
    vision_s = online_vision_seconds(max(1, reps // 3))
    thr["L12 online (ViT-L/16-384 + m=64) eager"] = 1 / (vision_s + 1 / thr["L12 m=64 eager"])
    res["throughput_pairs_per_s"] = thr
    res["vision_encoder_s_per_image"] = vision_s

    best = max(("eager",) + FAST_BACKENDS, key=lambda b: thr[f"L12 m=64 {b}"])
    peaks = {"torch fp32": matmul_peak_gflops("fp32"), "torch bf16": matmul_peak_gflops("bf16"),
             "onnxruntime fp32": onnx_matmul_peak_gops(False), "onnxruntime int8": onnx_matmul_peak_gops(True)}
    flops = bert_flops_per_pair(12, 64 + CAPTION_TOKENS)
    against = {"eager": "torch fp32", "bf16": "torch bf16", "onnx": "onnxruntime fp32",
               "onnx-int8": "onnxruntime int8"}
    res["hardware"] = {
        "matmul_peak_gops": peaks,
        "L12 m=64 achieved_gops": {b: thr[f"L12 m=64 {b}"] * flops / 1e9 for b in against},
        "L12 m=64 fraction_of_peak": {f"{b} vs {p}": thr[f"L12 m=64 {b}"] * flops / 1e9 / peaks[p]
                                      for b, p in against.items()},
    }
    res["best_backend"] = best
    res["ratios"] = {
        f"{best}/eager (L12 m=64)": thr[f"L12 m=64 {best}"] / thr["L12 m=64 eager"],
        "compressed/local (eager)": thr["L12 m=64 eager"] / thr["L12 local 576 eager"],
        "compressed/online (eager)": thr["L12 m=64 eager"] / thr["L12 online (ViT-L/16-384 + m=64) eager"],
        **{f"{b}/eager (L12 m=64)": thr[f"L12 m=64 {b}"] / thr["L12 m=64 eager"] for b in ("bf16",) + FAST_BACKENDS},
    }


def storage_section(sizes: tuple[int, ...], res: dict, workdir: Path) -> None:
    from .latency import gather_latency

    res["bytes_per_image"] = {"float32": bytes_per_image(64, 384, "float32"),
                              "float16": bytes_per_image(64, 384, "float16"),
                              "int8 + fp16 scale per token": bytes_per_image(64, 384, "int8"),
                              "local float16 (576 tokens)": bytes_per_image(576, 384, "float16")}
    res["gather_ms"] = {f"N={n} {dtype}": gather_latency(workdir, n, dtype)
                        for n in sizes for dtype in ("float16", "int8")}


def latency_section(quick: bool, sizes: tuple[int, ...], res: dict, workdir: Path, best: str) -> None:
    from .latency import paper_text_first_stage, query_latency, synthetic_index

    first = paper_text_first_stage()
    out = {}
    for n in sizes:
        store_dir = workdir / f"index-{n}"
        synthetic_index(store_dir, n, first.embed_dim, "float16")
        for backend in dict.fromkeys(("eager", best)):
            out[f"N={n} {backend}"] = query_latency(store_dir, first, backend, repeats=2 if quick else 5)
    res["query_latency_ms"] = out
    res["query_latency_setup"] = ("k=10; SigLIP2 ViT-L/16-384 text tower (random weights, 64 tokens); FAISS Flat IP "
                                  f"over {first.embed_dim}-d vectors; float16 Zarr tokens; MiniLM-L12 shape, m=64")


def build_section(quick: bool, res: dict, workdir: Path) -> None:
    from .build import build_throughput

    res["build_index"] = build_throughput(workdir / "build", 128 if quick else 512)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (CI)")
    ap.add_argument("--sizes", default=None,
                    help="collection sizes for gathers and query latency (default: 10000 quick, 10000,100000 full)")
    ap.add_argument("--sections", default="throughput,storage,latency,build",
                    help="comma-separated subset to run (others are kept from the previous results file)")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = RESULTS / "bench.json"
    wanted = args.sections.split(",")
    sizes = tuple(int(n) for n in args.sizes.split(",")) if args.sizes else (
        (10_000,) if args.quick else (10_000, 100_000))
    res: dict = json.loads(out.read_text()) if out.is_file() and len(wanted) < 4 else {}
    res.update({"machine": machine(), "mode": "quick" if args.quick else "full", "time": time.strftime("%F %T")})
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        if "throughput" in wanted:
            throughput_section(args.quick, res)
        if "storage" in wanted:
            storage_section(sizes, res, work)
        if "latency" in wanted:
            latency_section(args.quick, sizes, res, work, res.get("best_backend", "onnx-int8"))
        if "build" in wanted:
            build_section(args.quick, res, work)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    print(f"written {out}")
    try:
        from .plot import plot
        print(f"written {plot(res, RESULTS / 'bench.png')}")
    except ImportError as e:  # matplotlib is a dev extra
        print(f"no plot: {e}")


if __name__ == "__main__":
    main()
