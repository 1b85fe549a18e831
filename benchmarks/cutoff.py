"""The relevance cutoff on a trained model: does the match probability tell "the right image is
here" from "nothing in the index matches"?

An index of the test images is built with the model (calibrate it on the validation split
first: `edje-search calibrate --data val.json --model MODEL --fit probability`). Every test
caption is searched twice, through Engine.search_batch as `query` runs it:

* present: its image is in the index (all test images);
* absent: its image was removed from the index. The images are split into folds; for each fold
  a copy of the index has that fold's images removed (Engine.remove) and the fold's captions are
  searched there, so no image in it is the caption's own.

Reported: precision and recall of ``--min-prob P`` (a returned hit is right when it is the
caption's own image; recall = present captions whose image is returned), the share of absent
captions answered with no hit, and the AUROC of the top hit's match probability against the
top first-stage cosine for the question "is the right image in the top 10?" (absent captions
are all "no"), and their difference with a 95% interval from a paired bootstrap; for all
captions, and again for the captions whose text describes no other test image (a generated
caption such as "a large red circle" can describe several images, which then still match when
one is removed).

    python -m benchmarks.cutoff --model runs/model-cal --data DATA/test.json --out benchmarks/results/cutoff_demo.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edje_search import Engine, load_model
from edje_search.calibration import sigmoid
from edje_search.config import DEFAULT_RERANK_K
from edje_search.evaluation import load_eval_set


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (the Mann-Whitney statistic; ties count half)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based ranks, averaged over ties
    n_pos, n_neg = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc_difference(a: np.ndarray, b: np.ndarray, labels: np.ndarray, resamples: int = 1000,
                     seed: int = 0) -> dict:
    """AUROC(a) - AUROC(b) on the same searches, with a 95% interval from a paired bootstrap
    (the searches resampled with replacement, both scores recomputed on each resample)."""
    a, b, labels = np.asarray(a), np.asarray(b), np.asarray(labels, bool)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        i = rng.integers(0, len(labels), len(labels))
        if labels[i].all() or not labels[i].any():
            continue
        diffs.append(auroc(a[i], labels[i]) - auroc(b[i], labels[i]))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"difference": auroc(a, labels) - auroc(b, labels), "ci95": [float(low), float(high)],
            "resamples": len(diffs)}


def run_queries(engine: Engine, captions: list[str], rerank_k: int, batch: int = 64) -> list:
    """Each caption's whole reranked pool, in rank order."""
    hits = []
    for s in range(0, len(captions), batch):
        hits += engine.search_batch(captions[s:s + batch], k=rerank_k, rerank_k=rerank_k)
    return hits


def summarise(hits, targets, present: bool, k: int) -> dict:
    """Per caption, from its whole reranked pool (search with k = rerank_k): the top hit's prob,
    the pool's best prob and best first-stage cosine, whether the right image is in the top k,
    and (right?, prob, logit) of every reranked hit in rank order."""
    out = {"top_prob": [], "max_prob": [], "top_cosine": [], "in_top_k": [], "reranked": []}
    for hs, t in zip(hits, targets):
        out["top_prob"].append(hs[0].prob)
        out["max_prob"].append(max(h.prob for h in hs if h.prob is not None))
        out["top_cosine"].append(max(h.first_stage_score for h in hs))
        out["in_top_k"].append(present and any(h.path == t for h in hs[:k]))
        out["reranked"].append([(h.path == t, h.prob, h.rerank_score) for h in hs if h.prob is not None])
    return out


def cutoff_metrics(present: dict, absent: dict, p: float, k: int, uncalibrated: bool = False) -> dict:
    """What ``query -k K --min-prob P`` returns: the first k reranked hits with prob >= P
    (``uncalibrated``: with sigmoid(logit) as the probability instead)."""
    def returned(pool):
        return [[ok for ok, pr, lg in r if (sigmoid(lg) if uncalibrated else pr) >= p][:k] for r in pool["reranked"]]

    got, empty = returned(present), returned(absent)
    right = sum(sum(r) for r in got)
    kept = sum(len(r) for r in got) + sum(len(r) for r in empty)
    return {"min_prob": p, "hits_returned": kept, "right_hits": right,
            "precision": right / kept if kept else None, "recall": right / len(got),
            "present_answered": float(np.mean([bool(r) for r in got])),
            "absent_empty": float(np.mean([not r for r in empty])),
            "wrong_hits_per_absent_query": sum(len(r) for r in empty) / len(empty)}


def subset(summary: dict, keep: list[bool]) -> dict:
    return {name: [v for v, ok in zip(values, keep) if ok] for name, values in summary.items()}


def report(present: dict, absent: dict, k: int, min_prob: float) -> dict:
    labels = np.array(present["in_top_k"] + absent["in_top_k"])

    def area(name: str) -> float:
        return auroc(np.array(present[name] + absent[name]), labels)

    return {"captions": len(present["in_top_k"]), "present_right_in_top_k": float(np.mean(present["in_top_k"])),
            "auroc_right_image_in_top_k": {"match_probability": area("top_prob"),
                                           "match_probability_pool_max": area("max_prob"),
                                           "first_stage_cosine": area("top_cosine")},
            "auroc_match_probability_minus_cosine": auroc_difference(
                np.array(present["top_prob"] + absent["top_prob"]),
                np.array(present["top_cosine"] + absent["top_cosine"]), labels),
            "cutoff": cutoff_metrics(present, absent, min_prob, k),
            "cutoff_uncalibrated_sigmoid": cutoff_metrics(present, absent, min_prob, k, uncalibrated=True),
            "sweep": [cutoff_metrics(present, absent, p, k) for p in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)],
            "mean_top_prob": {"present": float(np.mean(present["top_prob"])),
                              "absent": float(np.mean(absent["top_prob"]))}}


def publish(result: dict, out: str | None, scratch: Path | None) -> None:
    """Print the result as JSON, write it to ``out`` when given, remove the ``scratch`` folder."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model directory (calibrated on the validation split)")
    ap.add_argument("--data", required=True, help="test annotations (BLIP-style JSON)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rerank-k", type=int, default=DEFAULT_RERANK_K)
    ap.add_argument("--min-prob", type=float, default=0.5)
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--work", default=None, help="folder for the indexes (default: a temporary one)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    data = load_eval_set(a.data)
    model = load_model(a.model).eval()
    paths = [str(Path(p).resolve()) for p in data.images]
    captions, targets = list(data.captions), [paths[i] for i in data.caption_image]
    work = Path(a.work or tempfile.mkdtemp(prefix="cutoff-")).resolve()
    shutil.rmtree(work / "full", ignore_errors=True)
    t0 = time.perf_counter()
    engine = Engine.create(work / "full", model, device="cpu")
    engine.add(paths, progress=False, num_workers=1)
    build_s = time.perf_counter() - t0
    if set(engine.paths(range(len(paths) + 16)).values()) != set(paths):
        raise SystemExit("the index does not hold the test images under the paths the annotations give")
    t0 = time.perf_counter()
    present = summarise(run_queries(engine, captions, a.rerank_k), targets, True, a.k)
    present_s = time.perf_counter() - t0
    fold_of = np.arange(len(paths)) % a.folds
    absent_hits: list = [None] * len(captions)
    t0 = time.perf_counter()
    for f in range(a.folds):
        d = work / f"fold{f}"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(work / "full", d)
        fold = Engine.from_pretrained(d, model=model, writable=True, device="cpu")
        fold.remove([paths[i] for i in np.flatnonzero(fold_of == f)])
        which = [c for c, i in enumerate(data.caption_image) if fold_of[i] == f]
        for c, hs in zip(which, run_queries(fold, [captions[c] for c in which], a.rerank_k)):
            assert all(h.path != targets[c] for h in hs)
            absent_hits[c] = hs
        shutil.rmtree(d)
    absent = summarise(absent_hits, targets, False, a.k)
    absent_s = time.perf_counter() - t0
    # a caption whose text also describes another test image still has a true match when its own
    # image is removed; the second report leaves those captions out
    texts: dict[str, set[int]] = {}
    for c, i in zip(captions, data.caption_image):
        texts.setdefault(c, set()).add(i)
    unique = [len(texts[c]) == 1 for c in captions]
    cal = model.calibration
    out = {
        "command": "python -m benchmarks.cutoff " + " ".join(sys.argv[1:]),
        "model": str(model.path), "calibration": cal.to_dict() if cal else None,
        "fusion_weight": model.fusion_weight, "data": a.data, "images": len(paths), "captions": len(captions),
        "k": a.k, "rerank_k": a.rerank_k, "folds": a.folds,
        "all_captions": report(present, absent, a.k, a.min_prob),
        "captions_of_one_image_only": report(subset(present, unique), subset(absent, unique), a.k, a.min_prob),
        "seconds": {"build": build_s, "present_queries": present_s, "absent_folds": absent_s},
    }
    publish(out, a.out, work if a.work is None else None)


if __name__ == "__main__":
    main()
