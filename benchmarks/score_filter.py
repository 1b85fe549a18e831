"""`edje-search score` speed: pairs scored from an index's stored tokens (`--index`) against pairs
scored from image files (decode + vision tower + joint encoder), in one run, on generated scenes.

    python -m benchmarks.score_filter --arch b16-256     # the paper's ViT-B/16-256 shapes, random weights
    python -m benchmarks.score_filter --arch tiny        # the tests' tiny model
    python -m benchmarks.score_filter --model DIR        # any saved model

Each path runs with and without the first-stage cosine (``score --no-cosine``: no text-tower
pass). Both paths run the library's own scorers (scoring.FileScorer, scoring.RowScorer) through the
resumable writer the command uses, so what is timed is what `score` does, minus process start
and model loading. Speed does not depend on the weights. Figures are medians over repeats after
a warm-up; results are merged into benchmarks/results/score_filter.json under the model's key.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .timing import machine, median_seconds

RESULTS = Path(__file__).parent / "results" / "score_filter.json"
ARCHITECTURES = {"b16-256": ("edje-siglip2-b16-256", 256), "l16-384": ("edje-siglip2-l16-384", 384)}


def saved_model(arch: str, directory: Path) -> Path:
    """A model directory of ``arch`` (tiny, b16-256, l16-384) with random weights."""
    if arch == "tiny":
        from edje_search.models.registry import build_tiny_model

        build_tiny_model(seed=0).save_pretrained(directory)
        return directory
    from .paper_model import paper_model

    name, side = ARCHITECTURES[arch]
    paper_model("cpu", f"{name}-random", architecture=name, image_size=side).save_pretrained(directory)
    return directory


def measure(model_dir: Path, *, images: int, image_side: int, repeats: int, batch_size: int, workers: int,
            work: Path) -> dict:
    from edje_search import Engine, load_model
    from edje_search.data.synthetic import make_dataset
    from edje_search.score_run import ResumableOutput, run_scoring
    from edje_search.scoring import FileScorer, read_pairs

    data = make_dataset(work / "data", n_train=0, n_val=0, n_test=images, image_size=image_side, progress=False)
    pairs = data["test"]  # BLIP-style: two captions per image
    model = load_model(model_dir)
    t = time.perf_counter()
    engine = Engine.create(work / "idx", model)
    engine.sync(work / "data" / "test", batch_size=batch_size, num_workers=workers, progress=False)
    build_s = time.perf_counter() - t

    def scoring(scorer, out: Path):
        return lambda: run_scoring(read_pairs(pairs), scorer, ResumableOutput(out, {}, overwrite=True),
                                   progress=False)

    n_pairs = sum(1 for _ in read_pairs(pairs))
    seconds = {}
    for cosine in (True, False):
        suffix = "" if cosine else "_no_cosine"
        files = FileScorer(model, batch_size=batch_size, num_workers=workers, cosine=cosine)
        try:
            seconds["files" + suffix] = median_seconds(scoring(files, work / f"files{suffix}.jsonl"), warmup=1,
                                                       repeats=repeats)
        finally:
            files.close()
        index = engine.scorer(batch_size=64, cosine=cosine)
        seconds["index" + suffix] = median_seconds(scoring(index, work / f"index{suffix}.jsonl"), warmup=1,
                                                   repeats=repeats)
    by_file = [json.loads(x) for x in (work / "files.jsonl").read_text().splitlines()]
    by_index = [json.loads(x) for x in (work / "index.jsonl").read_text().splitlines()]
    assert len(by_file) == len(by_index) == n_pairs
    info = engine.info()
    gap = float(np.max(np.abs(np.array([r["logit"] for r in by_file]) - [r["logit"] for r in by_index])))
    return {"pairs": n_pairs, "images": images, "image_side": image_side, "repeats": repeats,
            "batch_size": batch_size, "workers": workers,
            "pairs_per_s": {k: n_pairs / v for k, v in seconds.items()},
            "speedup_index_over_files": seconds["files"] / seconds["index"],
            "speedup_index_over_files_no_cosine": seconds["files_no_cosine"] / seconds["index_no_cosine"],
            "median_s": seconds, "max_logit_gap_fp16_tokens": gap, "index_build_s": build_s,
            "tokens_per_image": info["tokens_per_image"], "token_dtype": info["token_dtype"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["tiny", *ARCHITECTURES], default="b16-256")
    ap.add_argument("--model", default=None, help="a saved model directory instead of --arch")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--image-side", type=int, default=256, help="side of the generated scenes in pixels")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = Path(args.model) if args.model else saved_model(args.arch, work / "model")
        key = Path(args.model).name if args.model else f"{args.arch} (random weights)"
        res = measure(model_dir, images=args.images, image_side=args.image_side, repeats=args.repeats,
                      batch_size=args.batch_size, workers=args.workers, work=work)
    res["machine"] = machine()
    res["device"] = "cpu"
    res["command"] = "python -m benchmarks.score_filter " + " ".join(argv if argv is not None else
                                                                      __import__("sys").argv[1:])
    all_results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    all_results[key] = res
    args.out.write_text(json.dumps(all_results, indent=2) + "\n")
    print(json.dumps({key: res}, indent=2))
    return res


if __name__ == "__main__":
    main()
