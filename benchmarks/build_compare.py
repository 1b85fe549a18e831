"""Single-process build against the Ray build on the same generated images, plus the GPU estimate.

    python -m benchmarks.build_compare                 # 2,000 images -> benchmarks/results/build.json
    python -m benchmarks.build_compare --images 200    # a quick look

Both builds index the same 640x480 JPEGs (benchmarks.build.write_photos) with the demo-shaped
model (48 px ViT first stage, 12 stored tokens, random weights: speed does not depend on them),
on the CPU. The Ray build runs on a local Ray instance started here (``ray.init``, 2 logical
CPUs, 2 embedding actors of 0.5 CPU and 1 torch thread each, decode tasks on the rest); its
start-up is timed apart from the build. The GPU section is arithmetic, not a measurement: the
FLOPs of one image through the paper's vision tower and adapter (counted by torch's
FlopCounterMode on a randomly initialised SigLIP2 ViT-L/16-384 + the m=64 adapter) against
published dense bf16 peaks, at an assumed model FLOP utilisation.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edje_search.engine import Engine
from edje_search.models.bundle import EdjeModel

from .build import demo_shaped_model, write_photos
from .timing import machine

RESULTS = Path(__file__).parent / "results" / "build.json"

# dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, no sparsity)
GPU_PEAKS_TFLOPS = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "A100": 312.0, "L4": 121.0}
ASSUMED_MFU = 0.4  # typical utilisation of a ViT-L forward at batch 64-256 in bf16; an assumption


def single_process_build(photos: Path, model_dir: Path, index_dir: Path, batch_size: int, workers: int) -> dict:
    engine = Engine.create(index_dir, EdjeModel.from_pretrained(model_dir), device="cpu")
    t = time.perf_counter()
    report = engine.sync(photos, batch_size=batch_size, num_workers=workers, progress=False)
    seconds = time.perf_counter() - t
    return {"images": report.added, "seconds": seconds, "images_per_s": report.added / seconds,
            "decode_workers": workers, "batch_size": batch_size}


def ray_build(photos: Path, model_dir: Path, index_dir: Path, batch_size: int, actors: int) -> dict:
    import ray

    from edje_search.distributed import ray_build_index

    t = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    start = time.perf_counter() - t
    try:
        engine = Engine.create(index_dir, EdjeModel.from_pretrained(model_dir), device="cpu")
        t = time.perf_counter()
        report = ray_build_index(engine, photos, actors=actors, actor_cpus=0.5, batch_size=batch_size,
                                 commit_every=1024, progress=False)
        seconds = time.perf_counter() - t
    finally:
        ray.shutdown()
    return {"images": report.added, "seconds": seconds, "images_per_s": report.added / seconds,
            "ray_start_seconds": start, "actors": actors, "actor_cpus": 0.5, "batch_size": batch_size,
            "ray_version": ray.__version__}


def same_rows(a: Path, b: Path) -> dict:
    """Largest differences between the two indexes' rows of the same paths."""
    ea, eb = Engine.from_pretrained(a, device="cpu"), Engine.from_pretrained(b, device="cpu")
    rows_a = {e.path: e.row for e in ea.store.iter_entries()}
    rows_b = {e.path: e.row for e in eb.store.iter_entries()}
    paths = sorted(rows_a)
    ra, rb = [rows_a[p] for p in paths], [rows_b[p] for p in paths]
    return {"same_paths": sorted(rows_b) == paths,
            "max_vector_diff": float(np.abs(ea.store.vectors(ra) - eb.store.vectors(rb)).max()),
            "max_token_diff": float(np.abs(ea.store.tokens.get(ra).astype(np.float32)
                                           - eb.store.tokens.get(rb).astype(np.float32)).max())}


def paper_flops_per_image() -> float:
    """FLOPs of one 384 px image through SigLIP2 ViT-L/16-384 (+ pooled head) and the m=64 adapter."""
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    from edje_search.models.adapter import TokenCompressor

    vit = timm.create_model("vit_large_patch16_siglip_384", pretrained=False, num_classes=0).eval()
    adapter = TokenCompressor(1024, 384, 64, 16, 8192).eval()
    with FlopCounterMode(display=False) as counter:  # needs autograd on; one image is cheap enough
        feats = vit.forward_features(torch.zeros(1, 3, 384, 384))  # (1, 576, 1024)
        vit.forward_head(feats)
        adapter(feats)  # (1, 64, 384)
    return float(counter.get_total_flops())


def decode_rate(photos: Path, n: int = 200, image_size: int = 384) -> float:
    """Images per CPU-second that one core reads, decodes and preprocesses to the paper's 384 px input
    (process CPU time, so other jobs sharing the cores do not inflate it)."""
    import open_clip

    from edje_search.distributed.workers import DecodeSpec, decode_files

    spec = DecodeSpec(open_clip.image_transform(image_size, is_train=False), image_size, "shortest")
    paths = np.array(sorted(str(p) for p in photos.glob("*.jpg"))[:n], dtype=object)
    torch.set_num_threads(1)
    t = time.process_time()
    out = decode_files({"path": paths}, spec)
    assert not any(out["error"])
    return len(paths) / (time.process_time() - t)


def gpu_estimate(flops: float, decode_per_core: float) -> dict:
    per_gpu = {name: {"peak_tflops_bf16": peak, "images_per_s_at_peak": peak * 1e12 / flops,
                      f"images_per_s_at_{int(ASSUMED_MFU * 100)}pct": ASSUMED_MFU * peak * 1e12 / flops,
                      "decode_cores_needed": ASSUMED_MFU * peak * 1e12 / flops / decode_per_core}
               for name, peak in GPU_PEAKS_TFLOPS.items()}
    return {"estimate": True, "model": "SigLIP2 ViT-L/16-384 + adapter m=64 (paper shapes)",
            "gflops_per_image": flops / 1e9, "assumed_mfu": ASSUMED_MFU, "per_gpu": per_gpu,
            "decode_images_per_s_per_core_384px": decode_per_core}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="edje-build-") as tmp:
        tmp = Path(tmp)
        photos = write_photos(tmp / "photos", args.images)
        demo_shaped_model().save_pretrained(tmp / "model")
        single = single_process_build(photos, tmp / "model", tmp / "single", args.batch_size, workers=2)
        print(f"single process: {single['images_per_s']:.1f} images/s", flush=True)
        distributed = ray_build(photos, tmp / "model", tmp / "ray", args.batch_size, args.actors)
        print(f"ray ({args.actors} CPU actors): {distributed['images_per_s']:.1f} images/s "
              f"(+{distributed['ray_start_seconds']:.1f} s to start Ray)", flush=True)
        agreement = same_rows(tmp / "single", tmp / "ray")
        decode = decode_rate(photos)
    flops = paper_flops_per_image()
    result = {
        "machine": machine(), "device": "cpu", "torch_threads": torch.get_num_threads(),
        # the cores are shared with other jobs: the 1-minute load average before and after the builds
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "images": {"count": args.images, "kind": "generated 640x480 JPEGs (benchmarks.build.write_photos)"},
        "model": "demo-shaped (48 px ViT first stage, MiniLM-L6-shaped reranker, 12 tokens), random weights",
        "single_process": single, "ray": distributed,
        "ray/single": distributed["images_per_s"] / single["images_per_s"],
        "agreement": agreement, "gpu_estimate": gpu_estimate(flops, decode),
        "command": "python -m benchmarks.build_compare" + (f" --images {args.images}" if args.images != 2000 else ""),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ray/single", "agreement")}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()
