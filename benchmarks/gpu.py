"""The paper-shaped model on an accelerator: indexing, reranking and a GPU build-index, measured.

    python -m benchmarks.gpu                       # -> benchmarks/results/gpu.json (needs CUDA)
    python -m benchmarks.gpu --device cpu --quick  # the same code on the CPU (small sizes)

Sections, all through the library's own paths on ``--device`` (default CUDA):

- ``embed``: images/s of :func:`edje_search.pipeline.embed_pixels` (host batch -> pinned copy ->
  SigLIP2 ViT-L/16-384 + m=64 adapter under the device's autocast -> vectors and fp16 tokens back
  on the host) per batch size, bf16 and fp32, with the model FLOP utilisation from the FLOPs of
  one image counted by torch's FlopCounterMode;
- ``rerank``: pairs/s of :meth:`Reranker.score_pairs` (MiniLM-L12 and L6, m=64 stored tokens,
  and the 576-token local variant) under autocast, one query against many stored images, as a
  query's rerank pool is scored;
- ``build``: ``Engine.sync`` on generated 640x480 JPEGs with the full-size model on the device
  (decode workers, pinned memory, autocast, commits on the writer thread), against the raw
  encoder rate of the same batch size;
- ``query``: ``Engine.search`` p50 over that index, split by stage (text tower, FAISS on the
  CPU, token gather, rerank).

Random weights: speed does not depend on them (no pretrained SigLIP2 weights exist offline).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from edje_search.devices import precision_autocast
from edje_search.models.reranker import TOKENS_ON_DEVICE_BYTES

from .build import write_photos
from .paper_model import paper_model
from .timing import machine, median_seconds

RESULTS = Path(__file__).parent / "results" / "gpu.json"
CAPTION = "a small red circle left of a large blue square on a grey table"
QUERIES = ["a dog running in the snow", "two people on a red boat", "a bowl of fruit on a wooden table",
           "a city street at night with neon signs", "a cat asleep on a laptop keyboard"]


def timed(fn, device: torch.device, *, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn``, the device synchronised around each call."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    return median_seconds(fn, warmup=warmup, repeats=repeats, sync=sync)


def peak_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    """Measured dense matmul rate on ``device`` in ``dtype`` (the ceiling the utilisation is against)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, warmup=3, repeats=10)
    return 2 * n ** 3 / seconds / 1e12


def embed_section(model, device: torch.device, batches: list[int], repeats: int) -> dict:
    from edje_search.pipeline import embed_pixels

    from .build_compare import paper_flops_per_image

    flops = paper_flops_per_image()
    out = {"gflops_per_image": flops / 1e9, "runs": []}
    for precision in ("bf16", "fp32"):
        for b in batches if precision == "bf16" else batches[:2]:
            pixels = torch.randn(b, 3, 384, 384)
            s = timed(partial(embed_pixels, model, pixels, precision=precision), device, warmup=2, repeats=repeats)
            row = {"precision": precision, "batch": b, "images_per_s": b / s, "tflops": b * flops / s / 1e12}
            out["runs"].append(row)
            print(f"embed {precision} batch {b}: {row['images_per_s']:.0f} images/s ({row['tflops']:.0f} TFLOP/s)",
                  flush=True)
    return out


def _score(reranker, stored: torch.Tensor, device: torch.device) -> None:
    """One query's pool: CAPTION against every stored image, in one batch, as search scores it
    (tokenising, host gather and copy included)."""
    n = len(stored)
    with torch.inference_mode(), precision_autocast(device):
        reranker.score_pairs([CAPTION], stored, np.zeros(n, np.int64), np.arange(n), batch_size=n)


def _joint_only(reranker, batch, stored: torch.Tensor) -> None:
    """The joint encoder and score head alone on an already tokenized, already uploaded batch."""
    with torch.inference_mode(), precision_autocast(stored.device):
        hidden = reranker.joint(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], stored)
        reranker.joint.score_hidden(hidden, batch["attention_mask"])


def rerank_section(device: torch.device, batches: list[int], repeats: int) -> dict:
    from .throughput import joint_encoder

    out = {"runs": []}
    for layers, tokens, variant in ((12, 64, "compressed"), (6, 64, "compressed"), (12, 576, "local")):
        r = joint_encoder(layers, tokens, variant).to(device)
        for b in batches if variant == "compressed" else batches[:2]:
            s = timed(partial(_score, r, torch.randn(b, tokens, 384), device), device, warmup=2, repeats=repeats)
            batch = r.encode_text([CAPTION] * b, tokens).to(device)
            stored = torch.randn(b, tokens, 384, device=device)
            joint = timed(partial(_joint_only, r, batch, stored), device, warmup=2, repeats=repeats)
            row = {"layers": layers, "stored_tokens": tokens, "variant": variant, "batch": b, "pairs_per_s": b / s,
                   "joint_encoder_only_pairs_per_s": b / joint,
                   # score_pairs copies stored tokens to the GPU in one piece only up to TOKENS_ON_DEVICE_BYTES
                   "tokens_on_device": device.type != "cpu" and b * tokens * 384 * 4 <= TOKENS_ON_DEVICE_BYTES}
            out["runs"].append(row)
            print(f"rerank L{layers} m={tokens} batch {b}: {row['pairs_per_s']:.0f} pairs/s "
                  f"(joint encoder alone {b / joint:.0f})", flush=True)
        del r
    return out


def build_and_query_section(model, device: torch.device, workdir: Path, n_images: int, batch: int,
                            workers: int, repeats: int) -> dict:
    from edje_search.engine import Engine
    from edje_search.pipeline import embed_pixels

    photos = write_photos(workdir / "photos", n_images, workers=os.cpu_count() or 1)
    pixels = torch.randn(batch, 3, 384, 384)
    raw = batch / timed(lambda: embed_pixels(model, pixels), device, warmup=2, repeats=repeats)
    t = time.perf_counter()
    model.save_pretrained(workdir / "model")
    save_s = time.perf_counter() - t
    engine = Engine.create(workdir / "index", model, device=device)
    t = time.perf_counter()
    report = engine.sync(photos, batch_size=batch, num_workers=workers, progress=False)
    seconds = time.perf_counter() - t
    built = report.added / seconds
    print(f"build-index on {device}: {built:.0f} images/s ({report.added} images, {workers} decode workers; "
          f"raw encoder {raw:.0f} images/s)", flush=True)
    problems = engine.verify()
    timings = []
    for i in range(repeats + 2):
        engine.search(QUERIES[i % len(QUERIES)], k=10, rerank_k=50)
        if i >= 2:  # two warm-ups
            timings.append(engine.last_timings)
    p50 = {k: statistics.median(t[k] for t in timings) for k in timings[0]}
    print("query p50 ms: " + ", ".join(f"{k} {v:.1f}" for k, v in p50.items()), flush=True)
    return {"build": {"images": report.added, "seconds": seconds, "images_per_s": built, "batch": batch,
                      "decode_workers": workers, "raw_encoder_images_per_s": raw, "build/raw": built / raw,
                      "model_save_s": save_s, "verify_problems": problems,
                      "photos": "generated 640x480 JPEGs (quality 90)"},
            "query": {"k": 10, "rerank_k": 50, "index_rows": report.added, "p50_ms": p50,
                      "queries": len(timings)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes (a CPU check of the code)")
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--sections", default="embed,rerank,build")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    device = torch.device(args.device)
    quick = args.quick
    sections = set(args.sections.split(","))
    result = {"machine": machine(), "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "command": " ".join(["python -m benchmarks.gpu", *sys.argv[1:]])}
    if device.type == "cuda":
        result["measured_peak_tflops"] = {"bf16": peak_tflops(device, torch.bfloat16),
                                          "fp32": peak_tflops(device, torch.float32, 4096)}
        print(f"{result['device_name']}: matmul peak {result['measured_peak_tflops']}", flush=True)
    t = time.perf_counter()
    model = paper_model(device)
    result["model_build_s"] = time.perf_counter() - t
    repeats = 3 if quick else 6

    def save() -> None:  # after every section, so a run stopped part-way keeps what it measured
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if "embed" in sections:
        result["embed"] = embed_section(model, device, [2, 4] if quick else [32, 64, 128, 256], repeats)
        save()
    if "rerank" in sections:
        result["rerank"] = rerank_section(device, [8, 16] if quick else [256, 1024, 4096, 16384], repeats)
        save()
    if "build" in sections:
        with tempfile.TemporaryDirectory(prefix="edje-gpu-") as tmp:
            result.update(build_and_query_section(model, device, Path(tmp), 16 if quick else args.images,
                                                  4 if quick else 128, 2 if quick else args.workers, repeats))
        save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
